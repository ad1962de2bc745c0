"""EMA vector quantizer with dead-code restarts.

The codebook is a buffer moved by exponential moving averages of the encoder outputs assigned to each
code (van den Oord et al. 2017, appendix), not by the optimizer. Everything that depends on the batch is
computed over the *global* batch: under ``torch.distributed`` the counts and sums are all-reduced and
random draws (initialisation, restarts) index the concatenation of every rank's vectors, so two
processes with half a batch each end with the same codebook as one process with the whole batch.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import nn


# ---------------------------------------------------------------- distributed helpers


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if _world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def _global_offsets(n_local: int, device: torch.device) -> tuple[int, int]:
    """(offset of this rank's rows in the global batch, global batch size)."""
    if _world_size() == 1:
        return 0, n_local
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(_world_size())]
    dist.all_gather(sizes, torch.tensor([n_local], dtype=torch.long, device=device))
    sizes = [int(s) for s in sizes]
    rank = dist.get_rank()
    return sum(sizes[:rank]), sum(sizes)


def _gather_rows(flat: torch.Tensor, global_idx: torch.Tensor) -> torch.Tensor:
    """Rows ``global_idx`` of the global batch (every rank's ``flat`` concatenated), on every rank.

    Each rank fills in the rows it owns and zeros elsewhere; a sum all-reduce completes them, exactly,
    without ever gathering the whole batch.
    """
    offset, _ = _global_offsets(flat.shape[0], flat.device)
    local = global_idx - offset
    mine = (local >= 0) & (local < flat.shape[0])
    out = torch.zeros(global_idx.numel(), flat.shape[1], dtype=flat.dtype, device=flat.device)
    out[mine] = flat[local[mine]]
    return _all_reduce_sum(out)


@contextlib.contextmanager
def full_float32_matmul():
    """Matmuls in IEEE float32 inside, whatever the training chose (TF32 would flip near-tied argmins)."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


# ---------------------------------------------------------------- the quantizer


def perplexity(counts: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of the histogram ``counts`` (all levels pooled when it is (L, K))."""
    p = counts.sum(0) / counts.sum().clamp(min=1) if counts.ndim == 2 else counts / counts.sum().clamp(min=1)
    return torch.exp(-(p * torch.log(p.clamp(min=1e-10))).sum())


def rotate_to(z: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The rotation trick (Fifty et al. 2024): ``q`` in the forward pass, a rotation of ``z`` backward.

    Rows ``z`` (N, d) are mapped onto ``q`` by ``s R z`` with ``R = I - 2 w w^T + 2 q_hat z_hat^T``,
    ``w = (z_hat + q_hat) / |z_hat + q_hat|`` and ``s = |q| / |z|``, all held constant (stop-gradient).
    The forward value is exactly ``q``; the gradient reaching ``z`` is ``s R^T g``, which keeps the
    angle between the gradient and the code vector, where the straight-through estimator copies ``g``.
    """
    z_norm, q_norm = z.norm(dim=-1, keepdim=True).clamp(min=1e-12), q.norm(dim=-1, keepdim=True)
    z_hat, q_hat = (z / z_norm).detach(), (q / q_norm.clamp(min=1e-12)).detach()
    w = F.normalize(z_hat + q_hat, dim=-1).detach()
    rotated = z - 2 * (z * w).sum(-1, keepdim=True) * w + 2 * (z * z_hat).sum(-1, keepdim=True) * q_hat
    return rotated * (q_norm / z_norm).detach()


@dataclass
class QuantizerOutput:
    quantized: torch.Tensor  # (B, D, h, w), straight-through (or rotated) when grads are on
    indices: torch.Tensor  # (B, h, w) long
    loss: torch.Tensor  # beta * |z - sg(e)|^2, in the code space
    counts: torch.Tensor  # (K,) vectors per code in this (global, when training) batch
    perplexity: torch.Tensor  # exp(entropy of the code histogram)
    usage: torch.Tensor  # fraction of codes used by this batch
    restarted: int  # codes restarted by this step
    window_usage: torch.Tensor | None = None  # fraction used by the last `usage_window` training batches


class EMAQuantizer(nn.Module):
    """Nearest-neighbour quantizer with an EMA codebook, Laplace smoothing and dead-code restarts.

    Args:
        num_codes: K, codebook size.
        dim: D, code dimension (channels of the encoder output).
        beta: commitment weight; 0.25 as in the VQ-VAE paper.
        decay: EMA decay g; 0.99 keeps ~100 steps of memory.
        eps: Laplace smoothing so a code with no vectors never divides by zero.
        dead_threshold: a code whose EMA count (vectors per step) falls below this is restarted.
        kmeans_iters: Lloyd iterations on the first batch for initialisation; 0 = random vectors.
        seed: seeds the draws of initialisation and restarts (identical on every rank).
        codebook_dim: codes of this (small) dimension, reached from D and back by 1x1 projections
            (LlamaGen uses 8); ``None`` quantizes the encoder output itself.
        l2_codes: unit-norm codes and inputs: the nearest code is the one of largest cosine.
        rotation_trick: the rotation trick instead of the straight-through estimator.
        usage_window: training batches over which ``window_usage`` counts the codes in use.
    """

    def __init__(
        self,
        num_codes: int,
        dim: int,
        beta: float = 0.25,
        decay: float = 0.99,
        eps: float = 1e-5,
        dead_threshold: float = 1.0,
        kmeans_iters: int = 0,
        seed: int = 0,
        codebook_dim: int | None = None,
        l2_codes: bool = False,
        rotation_trick: bool = False,
        usage_window: int = 100,
    ):
        super().__init__()
        self.num_codes, self.input_dim = num_codes, dim
        self.dim = codebook_dim or dim  # the dimension the codebook lives in
        self.beta, self.decay, self.eps = beta, decay, eps
        self.dead_threshold, self.kmeans_iters, self.seed = dead_threshold, kmeans_iters, seed
        self.l2_codes, self.rotation_trick, self.usage_window = l2_codes, rotation_trick, usage_window
        projected = codebook_dim is not None and codebook_dim != dim
        self.project_in = nn.Conv2d(dim, self.dim, 1) if projected else nn.Identity()  # (B, D, h, w) -> (B, d, h, w)
        self.project_out = nn.Conv2d(self.dim, dim, 1) if projected else nn.Identity()
        self.register_buffer("codebook", torch.randn(num_codes, self.dim))
        self.register_buffer("ema_count", torch.zeros(num_codes))
        self.register_buffer("ema_sum", torch.zeros(num_codes, self.dim))
        self.register_buffer("initialized", torch.tensor(False))
        # Number of training updates so far; seeds the restart draws so a resumed run draws the same.
        self.register_buffer("steps", torch.tensor(0, dtype=torch.long))
        # The last training update that used each code (-1: never); telemetry, not saved with the model.
        self.register_buffer("last_used", torch.full((num_codes,), -1, dtype=torch.long), persistent=False)

    # -- assignment -------------------------------------------------------------------------

    def nearest(self, flat: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """Index of the nearest code for each row of ``flat`` (N, D), in float32 even under autocast or TF32.

        ``|z|^2 - 2 z.e + |e|^2`` as one fused matmul and add, ``addmm(|e|^2, z, e^T, alpha=-2)``
        (``|z|^2`` is the same for every code of a row, so the argmin skips it). Rows go in chunks so
        each (chunk, K) block of distances stays in cache and memory stays O(chunk * K), not O(N * K).
        """
        chunk = chunk or (1024 if flat.device.type == "cpu" else 32768)  # CPU cache vs GPU launch count
        with torch.autocast(device_type=flat.device.type, enabled=False), full_float32_matmul():
            e = self.codebook.float()
            e_sq, flat = (e * e).sum(1), flat.float()
            # min(1).indices: the first minimum, like argmin, and faster on CPU.
            return torch.cat([torch.addmm(e_sq, flat[i : i + chunk], e.t(), alpha=-2).min(1).indices
                              for i in range(0, flat.shape[0], chunk)])  # fmt: skip

    def _draw(self, n: int, population: int, salt: int) -> torch.Tensor:
        """``n`` indices into the global batch, the same on every rank (CPU generator, fixed seed)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(self.steps) * 7919 + salt)
        if n <= population:
            return torch.randperm(population, generator=g)[:n]
        return torch.randint(population, (n,), generator=g)

    def _counts_and_sums(self, flat: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        counts = torch.bincount(idx, minlength=self.num_codes).float()
        sums = torch.zeros(self.num_codes, self.dim, device=flat.device).index_add_(0, idx, flat)
        return _all_reduce_sum(counts), _all_reduce_sum(sums)

    # -- training-time updates --------------------------------------------------------------

    @torch.no_grad()
    def init_from_data(self, flat: torch.Tensor) -> None:
        """Codebook from K vectors of the global batch, refined by ``kmeans_iters`` Lloyd steps."""
        _, population = _global_offsets(flat.shape[0], flat.device)
        self.codebook.copy_(_gather_rows(flat, self._draw(self.num_codes, population, salt=1).to(flat.device)))
        counts, sums = self._counts_and_sums(flat, self.nearest(flat))
        for _ in range(self.kmeans_iters):
            used = counts > 0
            self.codebook[used] = sums[used] / counts[used, None]
            counts, sums = self._counts_and_sums(flat, self.nearest(flat))
        self._normalise_codebook()
        # Statistics as if this codebook had always been there, so the first EMA step is on scale.
        self.ema_count.copy_(counts)
        self.ema_sum.copy_(self.codebook * counts[:, None])
        self.initialized.fill_(True)

    @torch.no_grad()
    def ema_update(self, counts: torch.Tensor, sums: torch.Tensor) -> None:
        """``N <- gN + (1-g)n``, ``m <- gm + (1-g)sum``, ``e = m / N~`` with Laplace-smoothed N~."""
        g = self.decay
        self.ema_count.mul_(g).add_(counts, alpha=1 - g)
        self.ema_sum.mul_(g).add_(sums, alpha=1 - g)
        n = self.ema_count.sum()
        smoothed = (self.ema_count + self.eps) / (n + self.num_codes * self.eps) * n
        self.codebook.copy_(self.ema_sum / smoothed[:, None])
        self._normalise_codebook()

    @torch.no_grad()
    def update(self, flat: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, int, torch.Tensor]:
        """One training step of the codebook from the vectors ``flat`` (N, d) assigned to ``idx`` (N,):
        the EMA update, then dead-code restarts. Returns the global counts (K,), the codes restarted and
        the usage over the last ``usage_window`` steps."""
        counts, sums = self._counts_and_sums(flat, idx)
        self.ema_update(counts, sums)
        restarted = self.restart_dead_codes(flat) if self.dead_threshold > 0 else 0
        self.last_used[counts > 0] = self.steps
        window_usage = ((self.last_used >= 0) & (self.last_used > self.steps - self.usage_window)).float().mean()
        self.steps += 1
        return counts, restarted, window_usage

    def _normalise_codebook(self) -> None:
        """With l2 codes, every code is put back on the unit sphere (the EMA mean of unit vectors is not)."""
        if self.l2_codes:
            self.codebook.copy_(F.normalize(self.codebook, dim=1))

    @torch.no_grad()
    def restart_dead_codes(self, flat: torch.Tensor) -> int:
        """Move codes whose EMA count is below ``dead_threshold`` onto vectors of the global batch.

        Their statistics restart at ``dead_threshold`` vectors centred on the new vector, so the next
        EMA update keeps them there instead of dragging them back to where they died.
        """
        dead = (self.ema_count < self.dead_threshold).nonzero().squeeze(1)
        if dead.numel() == 0:
            return 0
        _, population = _global_offsets(flat.shape[0], flat.device)
        if population == 0:  # no vector this step (a residual level every image dropped): nothing to restart onto
            return 0
        fresh = _gather_rows(flat, self._draw(dead.numel(), population, salt=2).to(flat.device))
        self.codebook[dead] = fresh
        self.ema_count[dead] = self.dead_threshold
        self.ema_sum[dead] = fresh * self.dead_threshold
        return int(dead.numel())

    # -- forward ----------------------------------------------------------------------------

    def _to_code_space(self, z: torch.Tensor) -> torch.Tensor:
        """Encoder outputs (B, D, h, w) -> the vectors that are quantized (B, d, h, w)."""
        z = self.project_in(z)
        return F.normalize(z, dim=1) if self.l2_codes else z

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantize encoder outputs ``z`` (B, D, h, w); updates the codebook in training mode only."""
        if z.ndim != 4 or z.shape[1] != self.input_dim:
            raise ValueError(f"quantizer input has shape {tuple(z.shape)}; expected (B, {self.input_dim}, h, w)")
        b, _, h, w = z.shape
        z = self._to_code_space(z)
        z_rows = rearrange(z, "b d h w -> (b h w) d")  # (N, d): one copy, for the assignment and the loss
        flat = z_rows.detach().float()
        restarted = 0
        if self.training and not bool(self.initialized):
            self.init_from_data(flat)
        idx = self.nearest(flat)
        # Quantize with the codebook the assignment was made with, before this step's update.
        q = F.embedding(idx, self.codebook).to(z.dtype)  # (N, d)
        window_usage = None
        if self.training:
            counts, restarted, window_usage = self.update(flat, idx)
        else:
            counts = torch.bincount(idx, minlength=self.num_codes).float()
        indices = idx.view(b, h, w)
        loss = self.beta * F.mse_loss(z_rows, q.detach())
        if torch.is_grad_enabled() and z.requires_grad:
            # Decoder gradients reach the encoder: copied (straight-through) or rotated.
            q = rotate_to(z_rows, q.detach()) if self.rotation_trick else z_rows + (q - z_rows).detach()
        q = self.project_out(rearrange(q, "(b h w) d -> b d h w", b=b, h=h, w=w).contiguous())
        usage = (counts > 0).float().mean()
        return QuantizerOutput(q, indices, loss, counts, perplexity(counts), usage, restarted, window_usage)

    def nearest_grid(self, z: torch.Tensor, levels: int | None = None) -> torch.Tensor:
        """Indices (B, h, w) of the nearest codes for encoder outputs (B, D, h, w) (one level); no updates."""
        b, _, h, w = z.shape
        return self.nearest(rearrange(self._to_code_space(z), "b d h w -> (b h w) d")).view(b, h, w)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes (B, D, h, w) for indices (B, h, w), projected back to the decoder's width."""
        if indices.min() < 0 or indices.max() >= self.num_codes:
            raise ValueError(
                f"code indices span [{int(indices.min())}, {int(indices.max())}]; expected 0..{self.num_codes - 1}"
            )
        codes = rearrange(F.embedding(indices, self.codebook), "b h w d -> b d h w").contiguous()  # as in forward
        return self.project_out(codes)

    def lookup_levels(self, grids: list[torch.Tensor]) -> torch.Tensor:
        """The latent of one level's grid ``[(B, h, w)]``: every quantizer's decoding entry point."""
        (indices,) = grids
        return self.lookup(indices)


# ---------------------------------------------------------------- residual levels


def kept_levels(q: nn.Module, b: int, device: torch.device) -> torch.Tensor:
    """(b,) levels (or scales) each example of this rank keeps under ``q``'s quantizer dropout (residual or
    multiscale); drawn per example of the global batch, the same on every rank (a CPU generator seeded by
    the step)."""
    full = torch.full((b,), q.num_levels, dtype=torch.long)
    if not (q.training and q.dropout > 0 and q.num_levels > 1):
        return full.to(device)
    offset, population = _global_offsets(b, device)
    g = torch.Generator().manual_seed(q.seed * 1_000_003 + int(q.steps) * 7919 + 3)
    dropped = torch.rand(population, generator=g) < q.dropout
    depth = torch.randint(1, q.num_levels + 1, (population,), generator=g)
    return torch.where(dropped, depth, full.new_full((population,), q.num_levels))[offset : offset + b].to(device)


@dataclass
class ResidualOutput(QuantizerOutput):
    level_usage: torch.Tensor | None = None  # (L,) fraction of each level's codebook used by this batch
    level_window_usage: torch.Tensor | None = None  # (L,) the same over the last `usage_window` training batches


class ResidualQuantizer(nn.Module):
    """``levels`` EMA quantizers in a row at every position, each quantizing what the ones before it left
    (residual quantization: RQ-VAE, SoundStream): ``z ~ e_1 + e_2 + ... + e_L``.

    Every level is an :class:`EMAQuantizer` (its own codebook, or one ``shared_codebook``) and keeps its
    guarantees: EMA with Laplace smoothing, restarts onto that level's residuals, data initialisation
    from the first batch's residuals, float32 distances, all-reduced statistics. Each codebook takes one
    update per step, from all the vectors assigned to it, ordered by example, so N processes end equal
    to one process with the global batch.

    ``dropout``: in training, that fraction of the examples keeps only its first ``d`` levels, ``d``
    uniform in 1..L (SoundStream's quantizer dropout), so that every prefix of the levels decodes.
    Codes are ``(B, L * h * w)``, level after level (:mod:`tokenizer.codes`).
    """

    def __init__(self, num_codes: int, dim: int, levels: int, shared_codebook: bool = False, dropout: float = 0.0,
                 beta: float = 0.25, seed: int = 0, rotation_trick: bool = False, **kw):  # fmt: skip
        super().__init__()
        self.num_codes, self.input_dim, self.dim, self.num_levels = num_codes, dim, dim, levels
        self.shared_codebook, self.dropout, self.beta, self.seed = shared_codebook, dropout, beta, seed
        self.rotation_trick = rotation_trick
        n = 1 if shared_codebook else levels
        self.codebooks = nn.ModuleList(EMAQuantizer(num_codes, dim, beta=beta, seed=seed + i, **kw) for i in range(n))

    def level(self, i: int) -> EMAQuantizer:
        return self.codebooks[0 if self.shared_codebook else i]

    @property
    def steps(self) -> torch.Tensor:
        return self.codebooks[0].steps

    def forward(self, z: torch.Tensor) -> ResidualOutput:
        """Quantize encoder outputs ``z`` (B, D, h, w) level by level; updates the codebooks in training only."""
        if z.ndim != 4 or z.shape[1] != self.input_dim:
            raise ValueError(f"quantizer input has shape {tuple(z.shape)}; expected (B, {self.input_dim}, h, w)")
        b, _, h, w = z.shape
        z_rows = rearrange(z, "b d h w -> (b h w) d")
        residual = z_rows.detach().float()
        kept = kept_levels(self, b, z.device).repeat_interleave(h * w)  # (N,) levels kept by each row's image
        every_level = not (self.training and self.dropout > 0)  # then no row is masked
        total = torch.zeros_like(residual)  # the sum of the kept levels' codes
        idxs, residuals, loss = [], [], z_rows.new_zeros(())
        for i in range(self.num_levels):
            quantizer = self.level(i)
            if self.training and not bool(quantizer.initialized):
                quantizer.init_from_data(residual)  # level i's codebook from level i's residuals
            idx = quantizer.nearest(residual)
            q = F.embedding(idx, quantizer.codebook)  # the codebook before this step's update
            partial = total + q
            # Commitment to every partial sum the image keeps: |z - sg(e_1 + ... + e_i)|^2.
            if every_level:
                loss = loss + F.mse_loss(z_rows.float(), partial)
                total = partial
            else:
                used = (kept > i).float()[:, None]
                loss = loss + (((z_rows.float() - partial) ** 2) * used).sum() / used.sum().clamp(min=1) / self.dim
                total = total + q * used
            idxs.append(idx)
            residuals.append(residual)
            residual = residual - q
        loss = self.beta * loss / self.num_levels
        indices = torch.stack(idxs)  # (L, N)
        counts, restarted, window = self._update(torch.stack(residuals), indices, kept, b) if self.training else (None, 0, None)
        if counts is None:  # evaluation: this batch's counts per level
            counts = torch.stack([torch.bincount(i, minlength=self.num_codes).float() for i in idxs])
        q = total.to(z.dtype)
        if torch.is_grad_enabled() and z.requires_grad:
            q = rotate_to(z_rows, q.detach()) if self.rotation_trick else z_rows + (q - z_rows).detach()
        q = rearrange(q, "(b h w) d -> b d h w", b=b, h=h, w=w).contiguous()
        level_usage = (counts > 0).float().mean(1)
        codes = rearrange(indices, "l (b n) -> b (l n)", b=b)  # level after level (tokenizer.codes)
        return ResidualOutput(q, codes, loss, counts, perplexity(counts), level_usage.min(), restarted,
                              None if window is None else window.min(), level_usage, window)  # fmt: skip

    @torch.no_grad()
    def _update(self, residuals: torch.Tensor, indices: torch.Tensor, kept: torch.Tensor, b: int):
        """One EMA step of every codebook from the rows assigned to it that their image keeps, ordered by
        example, then level, then position (so the global batch is every rank's rows in rank order).
        Returns per-level counts (L, K), restarts, and per-level window usage (L,)."""
        L, n = indices.shape
        used = kept[None, :] > torch.arange(L, device=kept.device)[:, None]  # (L, N)
        by_example = lambda t: rearrange(t, "l (b p) ... -> (b l p) ...", b=b)  # noqa: E731
        counts, restarted, windows = [], 0, []
        groups = [list(range(L))] if self.shared_codebook else [[i] for i in range(L)]
        everything = bool(used.all())  # no image dropped a level: no rows to take out
        for group in groups:
            if len(group) == 1:  # one level: its rows are already in example order
                flat, idx, mask = residuals[group[0]], indices[group[0]], used[group[0]]
            else:
                sel = torch.tensor(group, device=indices.device)
                flat, idx, mask = (by_example(t[sel]) for t in (residuals, indices, used))
            c, r, wu = self.level(group[0]).update(*((flat, idx) if everything else (flat[mask], idx[mask])))
            restarted += r
            for i in group:  # each level's own counts (a shared codebook's mix every level's)
                own = c if len(group) == 1 else torch.bincount(indices[i][used[i]], minlength=self.num_codes).float()
                counts.append(own if len(group) == 1 else _all_reduce_sum(own))
                windows.append(wu)
        return torch.stack(counts), restarted, torch.stack(windows)

    def nearest_grid(self, z: torch.Tensor, levels: int | None = None) -> torch.Tensor:
        """Codes (B, d * h * w) of encoder outputs (B, D, h, w), level after level, of the first d = ``levels``
        levels (all by default; the rest are never computed); no updates."""
        b, _, h, w = z.shape
        residual = rearrange(z, "b d h w -> (b h w) d").float()
        idxs = []
        for i in range(levels or self.num_levels):
            idx = self.level(i).nearest(residual)
            residual = residual - F.embedding(idx, self.level(i).codebook)
            idxs.append(idx)
        return rearrange(torch.stack(idxs), "l (b n) -> b (l n)", b=b)

    def lookup_levels(self, grids: list[torch.Tensor]) -> torch.Tensor:
        """The latent (B, D, h, w) of the first ``len(grids)`` levels: the sum of their codes."""
        return sum(self.level(i).lookup(g) for i, g in enumerate(grids))


# ---------------------------------------------------------------- residual scales


class Phi(nn.Module):
    """VAR's refinement of an upsampled scale: ``(1 - r) h + r conv3x3(h)``, r = 0.5.

    The convolution starts as the identity: VAR learns its codebook by gradient through the refinement,
    while an EMA codebook fits the residuals themselves, so the refinement must start by passing codes
    through unchanged (a random start removes about half of every scale's residual)."""

    def __init__(self, dim: int, ratio: float = 0.5):
        super().__init__()
        self.conv, self.ratio = nn.Conv2d(dim, dim, 3, padding=1), ratio
        nn.init.dirac_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * (1 - self.ratio) + self.conv(h) * self.ratio


class MultiScaleQuantizer(nn.Module):
    """Residual scales ending at the code grid (VAR's tokenizer, Tian et al. 2024): scale ``s`` quantizes
    the residual of the scales before it, area-downsampled to ``s x s``; its codes are upsampled back to
    the grid (bicubic) and refined by a small convolution (:class:`Phi`) before they are subtracted. One
    EMA codebook serves every scale (VAR's), with the guarantees of :class:`EMAQuantizer`; it takes one
    update per step from every scale's vectors, ordered by example, then scale, then position.

    ``dropout``: in training, that fraction of the images keeps only its first ``d`` scales (``d`` uniform),
    so that every prefix of the scales decodes. Codes are ``(B, sum s^2)``, coarse scale first.
    """

    def __init__(self, num_codes: int, dim: int, scales: list[int], dropout: float = 0.0, beta: float = 0.25,
                 seed: int = 0, rotation_trick: bool = False, **kw):  # fmt: skip
        super().__init__()
        self.num_codes, self.input_dim, self.dim = num_codes, dim, dim
        self.scales, self.num_levels, self.dropout, self.beta, self.seed = list(scales), len(scales), dropout, beta, seed
        self.rotation_trick = rotation_trick
        self.codebook = EMAQuantizer(num_codes, dim, beta=beta, seed=seed, **kw)
        self.phi = nn.ModuleList(Phi(dim) for _ in scales)

    @property
    def steps(self) -> torch.Tensor:
        return self.codebook.steps

    def _check_grid(self, h: int, w: int) -> None:
        if (h, w) != (self.scales[-1],) * 2:
            raise ValueError(f"scales {','.join(map(str, self.scales))} end at {self.scales[-1]}x{self.scales[-1]} but the code grid "
                             f"of these images is {h}x{w}; the last scale must be the grid")  # fmt: skip

    def _up(self, i: int, q: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Scale i's codes (B, D, s, s) -> their contribution on the grid (B, D, h, w)."""
        if q.shape[-2:] != (h, w):
            q = F.interpolate(q, size=(h, w), mode="bicubic")
        return self.phi[i](q)

    def _rows(self, r: torch.Tensor, s: int) -> torch.Tensor:
        """The residual (B, D, h, w) at scale s, as rows (B * s * s, D)."""
        if r.shape[-2:] != (s, s):
            r = F.interpolate(r, size=(s, s), mode="area")
        return rearrange(r, "b d h w -> (b h w) d")

    def forward(self, z: torch.Tensor) -> ResidualOutput:
        if z.ndim != 4 or z.shape[1] != self.input_dim:
            raise ValueError(f"quantizer input has shape {tuple(z.shape)}; expected (B, {self.input_dim}, h, w)")
        b, _, h, w = z.shape
        self._check_grid(h, w)
        z32 = z.float()
        target = z32.detach()
        if self.training and not bool(self.codebook.initialized):
            self.codebook.init_from_data(rearrange(target, "b d h w -> (b h w) d"))  # from the grid's vectors
        kept = kept_levels(self, b, z.device)  # (B,) scales each image keeps
        rest, f_hat = target.clone(), torch.zeros_like(target)
        rows, idxs, loss = [], [], z32.new_zeros(())
        for i, s in enumerate(self.scales):
            flat = self._rows(rest, s).detach()
            idx = self.codebook.nearest(flat)
            q = rearrange(F.embedding(idx, self.codebook.codebook), "(b h w) d -> b d h w", b=b, h=s, w=s)
            used = (kept > i).float()[:, None, None, None]
            step = self._up(i, q, h, w) * used  # trains the refinement (its gradient comes from the loss)
            f_hat = f_hat + step
            rest = rest - step.detach()
            # VAR's loss at every scale: the encoder commits to the partial sum, the refinement fits the target.
            weight = used.expand(-1, 1, h, w)
            n = weight.sum().clamp(min=1) * self.dim
            loss = loss + (self.beta * ((f_hat.detach() - z32) ** 2 * weight).sum() + ((f_hat - target) ** 2 * weight).sum()) / n
            rows.append(flat.view(b, s * s, -1))
            idxs.append(idx.view(b, s * s))
        loss = loss / self.num_levels
        codes = torch.cat(idxs, 1)  # (B, T): coarse scale first
        if self.training:
            counts, restarted, window = self._update(torch.cat(rows, 1), codes, kept)
        else:
            counts, restarted, window = self._counts(codes), 0, None
        q_rows = rearrange(f_hat, "b d h w -> (b h w) d")
        z_rows = rearrange(z32, "b d h w -> (b h w) d")
        if torch.is_grad_enabled() and z.requires_grad:
            # The decoder's gradient reaches the encoder (straight-through or rotated); the refinement learns from the loss.
            q_rows = rotate_to(z_rows, q_rows.detach()) if self.rotation_trick else z_rows + (q_rows - z_rows).detach()
        q = rearrange(q_rows, "(b h w) d -> b d h w", b=b, h=h, w=w).to(z.dtype).contiguous()
        level_usage = (counts > 0).float().mean(1)
        return ResidualOutput(q, codes, loss, counts, perplexity(counts), level_usage.min(), restarted,
                              window, level_usage, None if window is None else window.expand(self.num_levels))  # fmt: skip

    def _scale_of_codes(self, device) -> torch.Tensor:
        return torch.cat([torch.full((s * s,), i, device=device) for i, s in enumerate(self.scales)])

    def _counts(self, codes: torch.Tensor, used: torch.Tensor | None = None) -> torch.Tensor:
        """(L, K) codes of each scale in this batch (only ``used`` ones, (B, T) bool, when given)."""
        scale = self._scale_of_codes(codes.device).expand_as(codes)
        keep = torch.ones_like(codes, dtype=torch.bool) if used is None else used
        flat = (scale * self.num_codes + codes)[keep]
        return torch.bincount(flat, minlength=self.num_levels * self.num_codes).float().view(self.num_levels, self.num_codes)

    @torch.no_grad()
    def _update(self, rows: torch.Tensor, codes: torch.Tensor, kept: torch.Tensor):
        """One EMA step of the codebook from every scale's rows that their image keeps; rows (B, T, D) are in
        example, then scale, then position order. Returns per-scale counts (L, K), restarts, window usage."""
        used = kept[:, None] > self._scale_of_codes(codes.device)[None, :]  # (B, T)
        _, restarted, window = self.codebook.update(rows[used], codes[used])
        return _all_reduce_sum(self._counts(codes, used)), restarted, window

    def nearest_grid(self, z: torch.Tensor, levels: int | None = None) -> torch.Tensor:
        """Codes (B, sum s^2) of encoder outputs (B, D, h, w), coarse scale first, of the first ``levels``
        scales (all by default); no updates."""
        b, _, h, w = z.shape
        self._check_grid(h, w)
        rest, idxs = z.float().clone(), []
        for i, s in enumerate(self.scales[: levels or len(self.scales)]):
            idx = self.codebook.nearest(self._rows(rest, s))
            q = rearrange(F.embedding(idx, self.codebook.codebook), "(b h w) d -> b d h w", b=b, h=s, w=s)
            rest = rest - self._up(i, q, h, w)
            idxs.append(idx.view(b, s * s))
        return torch.cat(idxs, 1)

    def lookup_levels(self, grids: list[torch.Tensor]) -> torch.Tensor:
        """The latent (B, D, h, w) on the finest grid of the first ``len(grids)`` scales' codes."""
        h = w = self.scales[-1]
        return sum(self._up(i, self.codebook.lookup(g), h, w) for i, g in enumerate(grids))


# ---------------------------------------------------------------- Gumbel-softmax


class GumbelQuantizer(nn.Module):
    """The differentiable alternative to nearest-code assignment (DALL-E's dVAE, taming's GumbelQuantize):
    a 1x1 convolution gives logits over the K codes at every position; in training the code is a
    Gumbel-softmax sample at a temperature annealed from ``tau_start`` to ``tau_end`` over ``anneal_steps``
    (exponentially, as DALL-E), hard in the forward pass and soft in the backward one (straight-through),
    and a KL term pulls the code distribution towards uniform; at evaluation the code is the argmax.
    The codebook is learned by the optimizer. Codes are a grid (B, h, w), like the EMA quantizer's.
    """

    def __init__(self, num_codes: int, dim: int, kl_weight: float = 5e-4, tau_start: float = 1.0, tau_end: float = 1 / 16,
                 anneal_steps: int = 1000, usage_window: int = 100, **_):  # fmt: skip
        super().__init__()
        self.num_codes, self.input_dim, self.dim, self.num_levels = num_codes, dim, dim, 1
        self.kl_weight, self.tau_start, self.tau_end, self.anneal_steps = kl_weight, tau_start, tau_end, anneal_steps
        self.usage_window = usage_window
        self.to_logits = nn.Conv2d(dim, num_codes, 1)  # (B, D, h, w) -> (B, K, h, w)
        self.embedding = nn.Embedding(num_codes, dim)
        self.register_buffer("steps", torch.tensor(0, dtype=torch.long))
        self.register_buffer("last_used", torch.full((num_codes,), -1, dtype=torch.long), persistent=False)

    @property
    def temperature(self) -> float:
        """The temperature of this step: tau_start * (tau_end / tau_start) ** (step / anneal_steps), then tau_end."""
        progress = min(int(self.steps) / max(self.anneal_steps, 1), 1.0)
        return self.tau_start * (self.tau_end / self.tau_start) ** progress

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        if z.ndim != 4 or z.shape[1] != self.input_dim:
            raise ValueError(f"quantizer input has shape {tuple(z.shape)}; expected (B, {self.input_dim}, h, w)")
        b, _, h, w = z.shape
        with torch.autocast(device_type=z.device.type, enabled=False):
            logits = self.to_logits(z.float())  # (B, K, h, w)
            log_q = F.log_softmax(logits, dim=1)
            # KL(q || uniform) = sum_k q_k (log q_k + log K), averaged over positions.
            kl = (log_q.exp() * (log_q + math.log(self.num_codes))).sum(1).mean()
            window_usage = None
            if self.training:
                one_hot = F.gumbel_softmax(logits, tau=self.temperature, hard=True, dim=1)  # (B, K, h, w)
                idx = one_hot.argmax(1)
                q = torch.einsum("bkhw,kd->bdhw", one_hot, self.embedding.weight)
            else:
                idx = logits.argmax(1)
                q = rearrange(self.embedding(idx), "b h w d -> b d h w")
        counts = torch.bincount(idx.flatten(), minlength=self.num_codes).float()
        if self.training:
            counts = _all_reduce_sum(counts)  # the global batch's, as the EMA quantizer reports
            self.last_used[counts > 0] = self.steps
            window_usage = ((self.last_used >= 0) & (self.last_used > self.steps - self.usage_window)).float().mean()
            self.steps += 1
        return QuantizerOutput(q.to(z.dtype).contiguous(), idx, self.kl_weight * kl, counts, perplexity(counts),
                               (counts > 0).float().mean(), 0, window_usage)  # fmt: skip

    def nearest_grid(self, z: torch.Tensor, levels: int | None = None) -> torch.Tensor:
        """The hard codes (B, h, w) of encoder outputs (B, D, h, w) (one level): the argmax of the logits."""
        return self.to_logits(z.float()).argmax(1)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        if indices.min() < 0 or indices.max() >= self.num_codes:
            raise ValueError(f"code indices span [{int(indices.min())}, {int(indices.max())}]; expected 0..{self.num_codes - 1}")
        return rearrange(self.embedding(indices), "b h w d -> b d h w").contiguous()

    lookup_levels = EMAQuantizer.lookup_levels
