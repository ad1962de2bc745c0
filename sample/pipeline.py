"""Class labels -> prior -> code grids -> tokenizer decoder -> images."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from common.cli import UsageError, option

from prior import GUIDANCE_SCHEDULES, PriorInfo, generate_codes, load_prior
from tokenizer import VQVAE
from common.images import to_pil


# What a prior samples at when neither the call nor the prior names a setting: chosen by measurement for the
# demo's 7x7 prior (docs/recipe.md). train.prior records its --sample-* settings (these by default) in the
# prior's config, and the prior then samples at them: a 14x14 prior trained with --sample-guidance-scale 2.5
# --sample-guidance-schedule linear samples at those. top_k 0 and top_p 1 turn a filter off.
# deep_temperature / deep_top_k: the levels after the first of multi-level codes (None: as the first level).
DEFAULT_SAMPLING = dict(guidance_scale=2.0, temperature=1.0, top_k=100, top_p=1.0, guidance_schedule="constant",
                        deep_temperature=None, deep_top_k=None)  # fmt: skip


def generation_kwargs(settings: dict) -> dict:
    """Sampling settings (top_k 0 / top_p 1 = off) -> the keyword arguments of ``generate_codes``."""
    return dict(guidance_scale=settings["guidance_scale"], temperature=settings["temperature"],
                top_k=settings["top_k"] or None, top_p=settings["top_p"] if settings["top_p"] < 1 else None,
                guidance_schedule=settings["guidance_schedule"], deep_temperature=settings.get("deep_temperature"),
                deep_top_k=settings.get("deep_top_k"))  # fmt: skip


def describe_sampling(settings: dict) -> str:
    """One line of sampling settings, as the commands print them and the prior's card records them."""
    return ", ".join(f"{k} {v}" for k, v in settings.items() if v is not None)


@dataclass
class SamplingArguments:
    """The sampling settings of ``python -m sample`` and ``python -m evaluation --prior``. Those not given
    are the prior's own (train.prior's --sample-* settings), else DEFAULT_SAMPLING (docs/recipe.md)."""

    guidance_scale: float | None = option(None, "Classifier-free guidance: 1 = plain conditional, 0 = unconditional. Default: the prior's own, else 2.", domain="non-negative")  # fmt: skip
    temperature: float | None = option(None, "Softmax temperature; 0 = greedy. Default: the prior's own, else 1.", domain="non-negative")  # fmt: skip
    top_k: int | None = option(None, "Keep the k most likely codes; 0 = no top-k filtering. Default: the prior's own, else 100.", domain="non-negative")  # fmt: skip
    top_p: float | None = option(None, "Nucleus filtering; 1 = none. Default: the prior's own, else 1.", domain="top-p")  # fmt: skip
    guidance_schedule: str | None = option(None, "How the guidance applies over the codes: constant, or linear (rising from 1 at the first code to --guidance-scale at the last). Default: the prior's own, else constant.", choices=list(GUIDANCE_SCHEDULES))  # fmt: skip
    deep_temperature: float | None = option(None, "Multi-level codes: the temperature of the levels after the first (0 = greedy). Default: the prior's own, else as --temperature.", domain="non-negative")  # fmt: skip
    deep_top_k: int | None = option(None, "Multi-level codes: top-k of the levels after the first (0 = none). Default: the prior's own, else as --top-k.", domain="non-negative")  # fmt: skip
    seed: int = option(0, "Seed of the sampling RNG: the same seed gives the same images.", domain="non-negative")
    batch_size: int = option(64, "Images generated at once (guidance doubles the rows).", domain="positive")
    device: str = option("cuda" if torch.cuda.is_available() else "cpu", "Device of the prior and the decoder.")

    def validate(self) -> None:
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise UsageError(f"--device {self.device!r}: no CUDA device is available here; use --device cpu")

    def given(self) -> dict:
        """The sampling settings as given on the command line (None: not given), named as DEFAULT_SAMPLING names them."""
        return {k: getattr(self, k) for k in DEFAULT_SAMPLING}

    def announce(self, pipe: ClassConditionalPipeline) -> dict:
        """Print and return the settings the command samples ``pipe`` at (those not given: the prior's own)."""
        settings = pipe.sampling_settings(**self.given())
        print(f"sampling at {describe_sampling(settings)} (those not given: the prior's own)")
        return settings

    def pipeline_kwargs(self) -> dict:
        return dict(**self.given(), seed=self.seed, batch_size=self.batch_size)


class ClassConditionalPipeline:
    """Sample class-conditional images from a vqgpt prior and the tokenizer it was trained on.

    >>> pipe = ClassConditionalPipeline.from_pretrained("runs/prior")
    >>> images = pipe(["Sneaker", "Bag"], guidance_scale=2.0, seed=0)   # (2, C, H, W) in [-1, 1]
    >>> pipe.sampling_settings()   # what a call that names no setting samples at: the prior's own
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

    def sampling_settings(self, **given) -> dict:
        """The settings a call samples at: those ``given`` (not None), else the prior's own (train.prior
        records its --sample-* settings), else DEFAULT_SAMPLING."""
        unknown = set(given) - set(DEFAULT_SAMPLING)
        if unknown:
            raise TypeError(f"unknown sampling settings {sorted(unknown)}; expected {list(DEFAULT_SAMPLING)}")
        own = self.info.sampling or {}
        return {k: given[k] if given.get(k) is not None else own.get(k, v) for k, v in DEFAULT_SAMPLING.items()}

    @torch.inference_mode()
    def __call__(
        self,
        labels: Sequence[int | str] | None = None,
        guidance_scale: float | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        guidance_schedule: str | None = None,
        deep_temperature: float | None = None,
        deep_top_k: int | None = None,
        seed: int | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        batch_size: int = 64,
        num_images: int | None = None,
        use_cache: bool = True,
        progress=None,
        return_codes: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Images (B, C, H, W) in [-1, 1], one per label (``labels=None``: ``num_images`` unconditional).

        A sampling setting left None is the prior's own (``sampling_settings``); ``top_k=0`` and
        ``top_p=1`` turn those filters off; ``deep_temperature`` and ``deep_top_k`` set the levels after the first
        of multi-level codes (``deep_temperature=0``: those levels greedily). ``seed`` seeds one RNG for the
        call; ``generator`` instead gives the RNG, or one per label (labels may share one), so that a
        label's images do not depend on the other labels of the call (the service batches requests so).
        ``return_codes``: also return the codes (B, T) the images were decoded from."""
        ids = self.class_ids(labels) if labels is not None else [-1] * (num_images or 1)
        sampling = generation_kwargs(self.sampling_settings(guidance_scale=guidance_scale, temperature=temperature, top_k=top_k,
                                                            top_p=top_p, guidance_schedule=guidance_schedule,
                                                            deep_temperature=deep_temperature, deep_top_k=deep_top_k))  # fmt: skip
        g = generator
        if g is None:
            g = torch.Generator(device=self.device)
            g.manual_seed(seed) if seed is not None else g.seed()
        elif not isinstance(g, torch.Generator) and len(g) != len(ids):
            raise ValueError(f"{len(g)} generators for {len(ids)} labels; expected one per label")
        images, all_codes = [], []
        for start in range(0, len(ids), batch_size):
            chunk = torch.tensor(ids[start : start + batch_size], device=self.device)
            rng = g if isinstance(g, torch.Generator) else g[start : start + batch_size]
            codes = generate_codes(self.prior, self.info.layout, self.info.seq_len, chunk, generator=rng, use_cache=use_cache, **sampling)  # fmt: skip
            images.append(self.info.decode(self.tokenizer, codes))
            all_codes.append(codes)
            if progress is not None:
                progress.update(len(chunk))
        return (torch.cat(images), torch.cat(all_codes)) if return_codes else torch.cat(images)

    @staticmethod
    def to_pil(images: torch.Tensor) -> list[Image.Image]:
        return to_pil(images)
