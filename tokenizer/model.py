"""The VQ-VAE image tokenizer: residual conv encoder -> EMA quantizer -> residual conv decoder."""

# No `from __future__ import annotations` here: the Hub mixin reads the real VQVAEConfig
# annotation of __init__ to rebuild the config dataclass from config.json.
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from common.hub import HubMixin

from .codes import CodeLayout
from .quantizer import EMAQuantizer, GumbelQuantizer, MultiScaleQuantizer, ResidualQuantizer

QUANTIZERS = ("ema", "residual", "multiscale", "gumbel")
ONE_LEVEL = ("ema", "gumbel")  # quantizers whose codes are one grid


def check_config(cfg: "VQVAEConfig") -> None:
    """One line for a configuration whose quantizer options do not fit together."""
    if cfg.quantizer not in QUANTIZERS:
        raise ValueError(f"quantizer {cfg.quantizer!r}: expected one of {', '.join(QUANTIZERS)}")
    if cfg.levels < 1:
        raise ValueError(f"--levels {cfg.levels}: expected a positive number of levels")
    if cfg.quantizer in ONE_LEVEL:
        for given, value, needs in ((f"--levels {cfg.levels}", cfg.levels != 1, "--quantizer residual"),
                                    ("--shared-codebook", cfg.shared_codebook, "--quantizer residual"),
                                    ("--scales", cfg.scales, "--quantizer multiscale"),
                                    (f"--quantizer-dropout {cfg.quantizer_dropout}", cfg.quantizer_dropout, "--quantizer residual or multiscale")):  # fmt: skip
            if value:
                raise ValueError(f"{given} needs levels of codes: pass {needs}")
    if cfg.quantizer == "multiscale":
        check_scales(cfg.scales)
        if cfg.levels != 1 or cfg.shared_codebook:
            raise ValueError(f"{'--levels' if cfg.levels != 1 else '--shared-codebook'} is for --quantizer residual; a multiscale quantizer has one codebook and a level per scale")  # fmt: skip
    elif cfg.scales:
        raise ValueError("--scales needs --quantizer multiscale")
    if not 0 <= cfg.quantizer_dropout <= 1:
        raise ValueError(f"--quantizer-dropout {cfg.quantizer_dropout}: expected a probability in [0, 1]")
    if cfg.quantizer == "gumbel" and (cfg.dead_threshold and cfg.dead_threshold != VQVAEConfig.dead_threshold or cfg.rotation_trick):
        raise ValueError(f"{'--rotation-trick' if cfg.rotation_trick else '--dead-threshold'} is for nearest-code quantizers; --quantizer gumbel learns its codebook by gradient")  # fmt: skip
    if cfg.quantizer != "ema" and (cfg.codebook_dim or cfg.l2_codes):
        raise ValueError(f"--codebook-dim and --l2-codes quantize one level; with --quantizer {cfg.quantizer} leave them out")


def check_scales(scales) -> None:
    """Scales must be given, positive and strictly increasing (the last must be the grid: checked on images)."""
    if not scales:
        raise ValueError("--quantizer multiscale needs --scales, e.g. 1,2,4,7 (the last one the code grid)")
    if any(s < 1 for s in scales) or any(a >= b for a, b in zip(scales, scales[1:])):
        raise ValueError(f"--scales {','.join(map(str, scales))}: expected positive sizes in increasing order, the last one the code grid")  # fmt: skip


@dataclass
class VQVAEConfig:
    in_channels: int = 1  # 1 for grayscale, 3 for RGB
    channels: int = 64  # width of the first stage; doubled at every downsampling
    max_channels: int = 256  # cap on the width so deep stacks stay affordable
    num_downsamples: int = 2  # stride-2 steps; f = 2 ** num_downsamples (28 px -> 7x7 codes at f=4)
    num_res_blocks: int = 2  # residual blocks at every resolution
    num_codes: int = 512  # K
    code_dim: int = 64  # D
    beta: float = 0.25  # commitment weight of the VQ-VAE paper
    decay: float = 0.99  # EMA decay of the codebook
    eps: float = 1e-5  # Laplace smoothing of the code counts
    dead_threshold: float = 1.0  # restart codes whose EMA count falls below one vector per step
    kmeans_iters: int = 10  # Lloyd steps on the first batch; cheap and avoids early dead codes
    seed: int = 0  # seeds initialisation and restart draws
    codebook_dim: int | None = None  # codes in a smaller space than D, through 1x1 projections (LlamaGen: 8)
    l2_codes: bool = False  # unit-norm codes and inputs: nearest by cosine (LlamaGen)
    rotation_trick: bool = False  # gradients to the encoder by rotation (Fifty et al. 2024), not copied
    # Levels of codes (tokenizer.codes): "ema" quantizes once; "residual" quantizes `levels` times at every
    # position, each level what the levels before it left; "multiscale" quantizes the residual at each of
    # `scales` (s x s grids, the last one the code grid), VAR's tokenizer.
    quantizer: str = "ema"
    levels: int = 1  # levels of a residual quantizer
    scales: list[int] | None = None  # the scales of a multiscale quantizer, increasing, ending at the code grid
    shared_codebook: bool = False  # one codebook for every residual level instead of one each
    quantizer_dropout: float = 0.0  # fraction of training images that keep only their first d levels (d uniform)
    # "gumbel": Gumbel-softmax codes (taming's GumbelQuantize; DALL-E's temperatures and KL weight).
    gumbel_kl_weight: float = 5e-4  # weight of the KL term to the uniform distribution over codes
    gumbel_tau_start: float = 1.0  # temperature at the first step
    gumbel_tau_end: float = 0.0625  # temperature after gumbel_anneal_steps (1/16)
    gumbel_anneal_steps: int = 1000  # steps of the exponential annealing

    @property
    def downsample_factor(self) -> int:
        return 2**self.num_downsamples


PRESETS: dict[str, VQVAEConfig] = {
    # For tests: trains in seconds on a CPU; 28 px -> 7x7 codes.
    "tiny": VQVAEConfig(channels=16, num_res_blocks=1, num_codes=64, code_dim=16, kmeans_iters=2),
    # Fashion-MNIST / MNIST on a CPU: 28x28 grayscale -> 7x7 codes from 512.
    "fashion-mnist": VQVAEConfig(channels=32, num_res_blocks=2, num_codes=512, code_dim=32),
    # The same at f=2: 28x28 -> 14x14 codes from 1024; reconstructions near the real data (docs/tokenizer.md),
    # for the tokenizer alone (the codec) or a prior over 196 codes where a GPU affords one.
    "fashion-mnist-14": VQVAEConfig(channels=32, num_res_blocks=2, num_codes=1024, code_dim=32, num_downsamples=1),
    # 32-64 px RGB (CIFAR-10, small crops): 32 px -> 8x8 codes, 64 px -> 16x16.
    "rgb-32": VQVAEConfig(in_channels=3, channels=96, num_res_blocks=2, num_codes=1024, code_dim=64),
}


def get_config(preset: str, **overrides) -> VQVAEConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown tokenizer preset {preset!r}; expected one of {sorted(PRESETS)}")
    return replace(PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None})


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, max(1, ch // 4)), ch)


class ResBlock(nn.Module):
    """Pre-norm residual block: GN-SiLU-conv3x3-GN-SiLU-conv1x1 (VQ-VAE paper, with GroupNorm)."""

    def __init__(self, ch: int):
        super().__init__()
        self.body = nn.Sequential(_norm(ch), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1),
                                  _norm(ch), nn.SiLU(), nn.Conv2d(ch, ch, 1))  # fmt: skip

    def forward(self, x):
        return x + self.body(x)


def _widths(cfg: VQVAEConfig) -> list[int]:
    return [min(cfg.channels * 2**i, cfg.max_channels) for i in range(cfg.num_downsamples + 1)]


class Encoder(nn.Module):
    """Strided convs down to the code grid, then residual blocks there, where they are cheap."""

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        w = _widths(cfg)
        layers: list[nn.Module] = [nn.Conv2d(cfg.in_channels, w[0], 3, padding=1)]
        for i in range(cfg.num_downsamples):
            layers += [nn.SiLU(), nn.Conv2d(w[i], w[i + 1], 4, stride=2, padding=1)]  # (H, W) -> (H/2, W/2)
        layers += [ResBlock(w[-1]) for _ in range(cfg.num_res_blocks)]
        layers += [_norm(w[-1]), nn.SiLU(), nn.Conv2d(w[-1], cfg.code_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):  # (B, C, H, W) -> (B, D, H/f, W/f)
        return self.net(x)


class Decoder(nn.Module):
    """Mirror of the encoder: residual blocks on the code grid, then transposed convs up."""

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        w = _widths(cfg)[::-1]
        layers: list[nn.Module] = [nn.Conv2d(cfg.code_dim, w[0], 3, padding=1)]
        layers += [ResBlock(w[0]) for _ in range(cfg.num_res_blocks)]
        layers += [_norm(w[0])]
        for i in range(cfg.num_downsamples):
            layers += [nn.SiLU(), nn.ConvTranspose2d(w[i], w[i + 1], 4, stride=2, padding=1)]  # (h, w) -> (2h, 2w)
        layers += [nn.SiLU(), nn.Conv2d(w[-1], cfg.in_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, q):  # (B, D, h, w) -> (B, C, h*f, w*f)
        return self.net(q)


@dataclass
class VQVAEOutput:
    reconstruction: torch.Tensor  # (B, C, H, W), unclamped
    indices: torch.Tensor  # (B, h, w)
    loss: torch.Tensor  # reconstruction + commitment
    reconstruction_loss: torch.Tensor
    commitment_loss: torch.Tensor
    stats: dict = field(default_factory=dict)  # perplexity, usage, restarted, counts


class VQVAE(
    nn.Module,
    HubMixin,
    library_name="vqgpt",
    tags=["vq-vae", "image-tokenizer", "vqgpt"],
    repo_url="https://github.com/vqgpt/vqgpt",
):
    """VQ-VAE image tokenizer. Images are float (B, C, H, W) in [-1, 1]; H and W divisible by f."""

    model_kind = "tokenizer"

    def __init__(self, config: VQVAEConfig):
        super().__init__()
        self.config = config
        check_config(config)
        self.encoder = Encoder(config)
        common = dict(beta=config.beta, decay=config.decay, eps=config.eps, dead_threshold=config.dead_threshold,
                      kmeans_iters=config.kmeans_iters, seed=config.seed, rotation_trick=config.rotation_trick)  # fmt: skip
        if config.quantizer == "residual":
            self.quantizer = ResidualQuantizer(config.num_codes, config.code_dim, config.levels, config.shared_codebook,
                                               config.quantizer_dropout, **common)  # fmt: skip
        elif config.quantizer == "multiscale":
            self.quantizer = MultiScaleQuantizer(config.num_codes, config.code_dim, config.scales, config.quantizer_dropout, **common)
        elif config.quantizer == "gumbel":
            self.quantizer = GumbelQuantizer(config.num_codes, config.code_dim, config.gumbel_kl_weight, config.gumbel_tau_start,
                                             config.gumbel_tau_end, config.gumbel_anneal_steps)  # fmt: skip
        else:
            self.quantizer = EMAQuantizer(config.num_codes, config.code_dim, codebook_dim=config.codebook_dim,
                                          l2_codes=config.l2_codes, **common)  # fmt: skip
        self.decoder = Decoder(config)

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    def code_grid(self, height: int, width: int) -> tuple[int, int]:
        f = self.downsample_factor
        return height // f, width // f

    def code_layout(self, height: int, width: int) -> CodeLayout:
        """The levels of codes of an image of this size (tokenizer.codes): one grid, ``levels`` of it, or
        the scales (the last one must be the grid)."""
        grid = self.code_grid(height, width)
        if self.config.quantizer == "multiscale":
            self.quantizer._check_grid(*grid)
        return self._layout(grid)

    def _layout(self, grid: tuple[int, int] | None) -> CodeLayout:
        """The levels of codes on a ``grid`` of positions (a multiscale quantizer's are its scales)."""
        if self.config.quantizer == "multiscale":
            return CodeLayout(tuple((s, s) for s in self.config.scales))
        return CodeLayout((grid,) * self.num_levels)

    @property
    def num_levels(self) -> int:
        return len(self.config.scales) if self.config.quantizer == "multiscale" else self.config.levels

    def check_images(self, x: torch.Tensor) -> None:
        c, f = self.config.in_channels, self.downsample_factor
        if x.ndim != 4 or x.shape[1] != c:
            raise ValueError(f"images have shape {tuple(x.shape)}; expected (B, {c}, H, W) with {c} channel(s)")
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(
                f"image size {x.shape[2]}x{x.shape[3]} is not divisible by the downsampling factor f={f}; "
                "pad or resize the images (--pad-to-multiple / --resolution)"
            )

    def forward(self, x: torch.Tensor, latent: torch.Tensor | None = None) -> VQVAEOutput:
        """``latent``: decode this (B, D, h, w) quantized latent instead of ``x``'s own, the encoder and the
        codebook untouched (the decoder-only fine-tuning of ``train.tokenizer --finetune-decoder``)."""
        self.check_images(x)
        if latent is not None:
            recon = self.decoder(latent)
            rec_loss = F.mse_loss(recon.float(), x.float())
            return VQVAEOutput(recon, None, rec_loss, rec_loss, rec_loss.new_zeros(()), {})
        z = self.encoder(x)
        q = self.quantizer(z)
        recon = self.decoder(q.quantized)
        rec_loss = F.mse_loss(recon.float(), x.float())
        stats = {"perplexity": q.perplexity, "usage": q.usage, "restarted": q.restarted, "counts": q.counts,
                 "window_usage": q.window_usage, "level_usage": getattr(q, "level_usage", None)}  # fmt: skip
        return VQVAEOutput(recon, q.indices, rec_loss + q.loss, rec_loss, q.loss, stats)

    @torch.inference_mode()
    def encode(self, x: torch.Tensor, levels: int | None = None) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] -> codes, long: (B, H/f, W/f) for one level, else (B, T), level
        after level (tokenizer.codes), of the first ``levels`` levels (all by default)."""
        self.check_images(x)
        levels = self.code_layout(*x.shape[-2:]).levels(levels)
        return self.quantizer.nearest_grid(self.encoder(x), levels)

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor, levels: int | None = None, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """Codes -> images (B, C, h*f, w*f) clamped to [-1, 1], from the first ``levels`` levels (all by
        default). ``codes``: (B, h, w) for one level, or (B, T) rows of all levels or of the first
        ``levels``; ``grid`` (h, w) is needed only for the rows of a non-square grid."""
        return self.decoder(self.latent(codes, levels, grid)).clamp(-1, 1)

    def latent(self, codes: torch.Tensor, levels: int | None = None, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """The quantized latent (B, D, h, w) of the first ``levels`` levels of ``codes`` (see :meth:`decode`)."""
        codes = codes.long()
        if codes.ndim == 3:  # a (B, h, w) grid: its own positions
            grid = tuple(codes.shape[1:])
        elif grid is None and self.config.quantizer != "multiscale":
            grid = self._square_grid(codes, levels)
        return self.quantizer.lookup_levels(self._layout(grid).split(codes, levels))

    def _square_grid(self, codes: torch.Tensor, levels: int | None) -> tuple[int, int]:
        """(h, w) of (B, T) rows of square grids: T is L * h * h (every level) or d * h * h (the first d)."""
        if codes.ndim == 2:
            for count in dict.fromkeys((self.num_levels, levels or self.num_levels)):
                side = round((codes.shape[1] / count) ** 0.5)
                if count * side * side == codes.shape[1]:
                    return side, side
        raise ValueError(f"codes of shape {tuple(codes.shape)}: expected (B, h, w), or (B, T) rows of square grids (else pass grid=(h, w))")  # fmt: skip
