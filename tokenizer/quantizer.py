"""EMA vector quantizer with dead-code restarts.

The codebook is a buffer moved by exponential moving averages of the encoder outputs assigned to each
code (van den Oord et al. 2017, appendix), not by the optimizer. Everything that depends on the batch is
computed over the *global* batch: under ``torch.distributed`` the counts and sums are all-reduced and
random draws (initialisation, restarts) index the concatenation of every rank's vectors, so two
processes with half a batch each end with the same codebook as one process with the whole batch.
"""

from __future__ import annotations

import contextlib
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
            counts, sums = self._counts_and_sums(flat, idx)
            self.ema_update(counts, sums)
            restarted = self.restart_dead_codes(flat) if self.dead_threshold > 0 else 0
            self.last_used[counts > 0] = self.steps
            window_usage = ((self.last_used >= 0) & (self.last_used > self.steps - self.usage_window)).float().mean()
            self.steps += 1
        else:
            counts = torch.bincount(idx, minlength=self.num_codes).float()
        indices = idx.view(b, h, w)
        loss = self.beta * F.mse_loss(z_rows, q.detach())
        if torch.is_grad_enabled() and z.requires_grad:
            # Decoder gradients reach the encoder: copied (straight-through) or rotated.
            q = rotate_to(z_rows, q.detach()) if self.rotation_trick else z_rows + (q - z_rows).detach()
        q = self.project_out(rearrange(q, "(b h w) d -> b d h w", b=b, h=h, w=w).contiguous())
        p = counts / counts.sum().clamp(min=1)
        perplexity = torch.exp(-(p * torch.log(p.clamp(min=1e-10))).sum())
        usage = (counts > 0).float().mean()
        return QuantizerOutput(q, indices, loss, counts, perplexity, usage, restarted, window_usage)

    def nearest_grid(self, z: torch.Tensor) -> torch.Tensor:
        """Indices (B, h, w) of the nearest codes for encoder outputs (B, D, h, w); no updates."""
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
