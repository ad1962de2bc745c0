"""Class labels -> prior -> code grids -> tokenizer decoder -> images."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from common.cli import UsageError, option

from prior import PriorInfo, generate_codes, load_prior
from tokenizer import VQVAE
from common.images import to_pil


@dataclass
class SamplingArguments:
    """The sampling settings of ``python -m sample``, ``python -m evaluation --prior`` and the prior's
    evaluation during training. Defaults chosen by measurement: docs/recipe.md."""

    guidance_scale: float = option(2.0, "Classifier-free guidance: 1 = plain conditional, 0 = unconditional.", domain="non-negative")  # fmt: skip
    temperature: float = option(1.0, "Softmax temperature; 0 = greedy.", domain="non-negative")
    top_k: int = option(100, "Keep the k most likely codes; 0 = no top-k filtering.", domain="non-negative")
    top_p: float = option(1.0, "Nucleus filtering; 1 = none.", domain="top-p")
    seed: int = option(0, "Seed of the sampling RNG: the same seed gives the same images.", domain="non-negative")
    batch_size: int = option(64, "Images generated at once (guidance doubles the rows).", domain="positive")
    device: str = option("cuda" if torch.cuda.is_available() else "cpu", "Device of the prior and the decoder.")

    def validate(self) -> None:
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise UsageError(f"--device {self.device!r}: no CUDA device is available here; use --device cpu")

    def pipeline_kwargs(self) -> dict:
        return dict(guidance_scale=self.guidance_scale, temperature=self.temperature, top_k=self.top_k or None,
                    top_p=self.top_p if self.top_p < 1 else None, seed=self.seed, batch_size=self.batch_size)  # fmt: skip


class ClassConditionalPipeline:
    """Sample class-conditional images from a vqgpt prior and the tokenizer it was trained on.

    >>> pipe = ClassConditionalPipeline.from_pretrained("runs/prior")
    >>> images = pipe(["Sneaker", "Bag"], guidance_scale=2.0, seed=0)   # (2, C, H, W) in [-1, 1]
    """

    def __init__(self, prior, tokenizer: VQVAE, info: PriorInfo):
        info.check_tokenizer(tokenizer)
        self.prior, self.tokenizer, self.info = prior.eval(), tokenizer.eval(), info

    @classmethod
    def from_pretrained(cls, prior_path: str, tokenizer: str | VQVAE | None = None, device: str | None = None):
        """Load a prior folder or Hub id and the tokenizer it names (or ``tokenizer``, to override)."""
        prior, info = load_prior(prior_path)
        if tokenizer is None:
            if not info.tokenizer:
                raise ValueError(f"prior {prior_path} names no tokenizer; pass tokenizer=PATH_OR_HUB_ID")
            tokenizer = info.tokenizer
        if isinstance(tokenizer, str):
            tokenizer = VQVAE.from_pretrained(tokenizer)
        pipe = cls(prior, tokenizer, info)
        return pipe.to(device) if device else pipe

    def to(self, device: str | torch.device):
        self.prior.to(device)
        self.tokenizer.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.prior.parameters()).device

    @property
    def class_names(self) -> list[str]:
        return self.info.class_names

    def class_ids(self, labels: Sequence[int | str | None]) -> list[int]:
        """Class ids or names -> ids, checked against the prior; ``None`` entries (or -1) mean unconditional."""
        ids = []
        for label in labels:
            if isinstance(label, str) and not label.lstrip("-").isdigit():
                if label not in self.class_names:
                    raise ValueError(f"unknown class {label!r}; expected one of {self.class_names}")
                ids.append(self.class_names.index(label))
            else:
                ids.append(-1 if label is None else int(label))
        self.info.layout.condition_tokens(torch.tensor(ids))  # range check, before any generation
        return ids

    @torch.inference_mode()
    def __call__(
        self,
        labels: Sequence[int | str] | None = None,
        guidance_scale: float = 2.0,
        temperature: float = 1.0,
        top_k: int | None = 100,
        top_p: float | None = None,
        seed: int | None = None,
        batch_size: int = 64,
        num_images: int | None = None,
        use_cache: bool = True,
        progress=None,
    ) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1], one per label (``labels=None``: ``num_images`` unconditional)."""
        ids = self.class_ids(labels) if labels is not None else [-1] * (num_images or 1)
        g = torch.Generator(device=self.device)
        if seed is not None:
            g.manual_seed(seed)
        else:
            g.seed()
        images = []
        for start in range(0, len(ids), batch_size):
            chunk = torch.tensor(ids[start : start + batch_size], device=self.device)
            codes = generate_codes(self.prior, self.info.layout, self.info.seq_len, chunk, guidance_scale=guidance_scale,
                                   temperature=temperature, top_k=top_k or None, top_p=top_p, generator=g, use_cache=use_cache)  # fmt: skip
            images.append(self.tokenizer.decode(codes.view(-1, *self.info.grid)))
            if progress is not None:
                progress.update(len(chunk))
        return torch.cat(images)

    @staticmethod
    def to_pil(images: torch.Tensor) -> list[Image.Image]:
        return to_pil(images)
