"""What a prior folder records beside its weights (PriorInfo): the codes, classes, grid and tokenizer it was
trained on, so that a prior folder alone is enough to sample."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from transformers import PretrainedConfig

from tokenizer.codes import CodeLayout

from .layout import TokenLayout


@dataclass
class PriorInfo:
    """What a prior folder records beside the GPT-2 weights, so that it alone is enough to sample."""

    num_codes: int  # K of the tokenizer
    num_classes: int  # C
    class_names: list[str]
    grid: tuple[int, int]  # (h, w) of the code grid: the positions of the image
    tokenizer: str | None  # folder or Hub id of the tokenizer the codes came from
    image_size: tuple[int, int] | None = None  # (H, W) of the images the codes were made from
    # The settings it samples at by default (guidance_scale, temperature, top_k, top_p): train.prior's
    # --sample-* options; None for priors saved before they were recorded (sample.pipeline.DEFAULT_SAMPLING).
    sampling: dict | None = None
    # The levels of codes it models (tokenizer.codes), coarse first: the first d levels of the tokenizer's,
    # flattened level after level into one sequence. None: one level, the grid (priors saved before levels).
    levels: tuple[tuple[int, int], ...] | None = None

    @property
    def layout(self) -> TokenLayout:
        return TokenLayout(self.num_codes, self.num_classes)

    @property
    def code_layout(self) -> CodeLayout:
        """The levels of codes a sequence holds: ``seq_len = code_layout.length()``."""
        return CodeLayout(self.levels or (tuple(self.grid),))

    @property
    def seq_len(self) -> int:
        return self.code_layout.length()

    def decode(self, tokenizer, codes: torch.Tensor) -> torch.Tensor:
        """Images from code sequences (B, seq_len) of this prior: the tokenizer decodes the levels it models."""
        return tokenizer.decode(codes, levels=self.code_layout.num_levels, grid=tuple(self.grid))

    @classmethod
    def from_dict(cls, meta: dict, levels: int | None = None) -> PriorInfo:
        """From a prior's ``config.vqgpt`` or the ``vqgpt_codes.json`` of train.encode (C = number of names);
        ``levels``: model only the first ``levels`` levels of the codes (all by default)."""
        grids = CodeLayout.from_json(meta.get("levels") or [meta["grid"]])
        if levels is not None and not 1 <= levels <= grids.num_levels:
            raise ValueError(f"--levels {levels}: these codes have {grids.num_levels} level{'s' * (grids.num_levels > 1)} ({grids.describe()}); expected 1 to {grids.num_levels}")  # fmt: skip
        grids = grids.grids[: levels or grids.num_levels]
        size = tuple(meta["image_size"]) if meta.get("image_size") else None
        num_classes = meta.get("num_classes", len(meta["class_names"]))
        return cls(meta["num_codes"], num_classes, list(meta["class_names"]), tuple(meta["grid"]), meta.get("tokenizer"), size,
                   meta.get("sampling"), grids if len(grids) > 1 else None)  # fmt: skip

    def to_dict(self) -> dict:
        """What ``config.vqgpt`` records; :meth:`from_dict` reads it back."""
        return {**asdict(self), "grid": list(self.grid), "image_size": list(self.image_size) if self.image_size else None,
                "levels": self.code_layout.to_json() if self.levels else None}  # fmt: skip

    @classmethod
    def from_config(cls, config: PretrainedConfig) -> PriorInfo:
        meta = getattr(config, "vqgpt", None)
        if not meta:
            raise ValueError(f"this {config.model_type} folder is not a vqgpt prior (its config.json has no 'vqgpt' entry)")
        return cls.from_dict(meta)

    def check_tokenizer(self, tokenizer) -> None:
        """Refuse a tokenizer whose K, or whose levels of codes for the prior's image size, differ (the prior's
        levels must be the first levels of the tokenizer's)."""
        k, mine = tokenizer.config.num_codes, self.code_layout
        if k != self.num_codes:
            raise ValueError(f"tokenizer has K={k} codes but the prior was trained on K={self.num_codes}; use the tokenizer it names ({self.tokenizer})")  # fmt: skip
        f = tokenizer.downsample_factor  # priors saved before the image size was recorded: the size of the prior's grid
        theirs = tokenizer.code_layout(*(self.image_size or (self.grid[0] * f, self.grid[1] * f)))
        if theirs.grids[: mine.num_levels] != mine.grids:
            raise ValueError(f"the tokenizer makes {theirs.describe()} but the prior models {mine.describe()}; use the tokenizer it names ({self.tokenizer})")  # fmt: skip
