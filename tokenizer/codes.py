"""Multi-level codes: the one container every consumer of a tokenizer's codes reads.

A tokenizer describes an image by ``L`` levels of codes, ordered coarse to fine, level ``l`` a grid
``(h_l, w_l)``: one level for a flat tokenizer, ``L`` levels of the same grid for residual quantization
(each level quantizes what the levels before it left). They travel as one LongTensor ``(B, T)``: level
after level, each level in raster order, ``T = sum_l h_l * w_l``. The first ``d`` levels are the prefix of
``layout.length(d)`` codes, and they decode on their own to a coarser image (``VQVAE.decode(codes,
levels=d)``): the codec's rate.

A flat tokenizer is the one-level case: its ``encode`` returns ``(B, h, w)`` as it always did, the same
numbers as its ``(B, h*w)`` row of this container, and ``CodeLayout.flatten`` accepts both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CodeLayout:
    grids: tuple[tuple[int, int], ...]  # (h_l, w_l) of every level, coarse to fine

    @classmethod
    def from_json(cls, value) -> CodeLayout:
        """From the ``[[h, w], ...]`` list that folders and metadata files record."""
        return cls(tuple((int(h), int(w)) for h, w in value))

    def to_json(self) -> list[list[int]]:
        return [list(g) for g in self.grids]

    @property
    def num_levels(self) -> int:
        return len(self.grids)

    @property
    def grid(self) -> tuple[int, int]:
        """The finest level's grid: the positions of the image."""
        return self.grids[-1]

    def length(self, levels: int | None = None) -> int:
        """Codes in the first ``levels`` levels (all by default)."""
        return sum(h * w for h, w in self.grids[: self.levels(levels)])

    def levels_of(self, length: int) -> int:
        """How many levels a prefix of ``length`` codes holds; a length that is no prefix of levels is an error."""
        for d in range(1, self.num_levels + 1):
            if self.length(d) == length:
                return d
        raise ValueError(f"{length} codes are no prefix of levels of {self.describe()}")

    def levels(self, levels: int | None) -> int:
        """``levels`` checked against this layout (None: all)."""
        if levels is None:
            return self.num_levels
        if not 1 <= levels <= self.num_levels:
            raise ValueError(f"levels={levels}: this tokenizer's codes have {self.num_levels} level{'s' * (self.num_levels > 1)}; expected 1 to {self.num_levels}")  # fmt: skip
        return levels

    def flatten(self, codes: torch.Tensor, levels: int | None = None) -> torch.Tensor:
        """Codes as ``(B, T)``: a ``(B, h, w)`` grid of a one-level layout, or ``(B, length(d))`` rows for
        the first ``d = levels`` levels (``(B, T)`` rows of all levels are cut to that prefix)."""
        n = self.length(levels)
        if codes.ndim == 3 and self.num_levels == 1 and tuple(codes.shape[1:]) == self.grids[0]:
            return codes.flatten(1)
        if codes.ndim != 2 or codes.shape[1] not in (n, self.length()):
            shapes = f"(B, {n})" + (f" or (B, {self.length()})" if n != self.length() else "")
            if self.num_levels == 1:
                shapes += f" or (B, {self.grids[0][0]}, {self.grids[0][1]})"
            raise ValueError(f"codes of shape {tuple(codes.shape)}; expected {shapes} for {self.describe()}")
        return codes[:, :n]

    def split(self, codes: torch.Tensor, levels: int | None = None) -> list[torch.Tensor]:
        """The first ``levels`` levels of ``codes`` as grids ``[(B, h_l, w_l), ...]``."""
        flat, out, start = self.flatten(codes, levels), [], 0
        for h, w in self.grids[: self.levels(levels)]:
            out.append(flat[:, start : start + h * w].reshape(-1, h, w))
            start += h * w
        return out

    def describe(self) -> str:
        """'a 7x7 grid' or '4 levels of 7x7', for messages and model cards."""
        if self.num_levels == 1:
            return f"a {self.grids[0][0]}x{self.grids[0][1]} grid"
        if len(set(self.grids)) == 1:
            return f"{self.num_levels} levels of {self.grids[0][0]}x{self.grids[0][1]}"
        return "scales " + ", ".join(f"{h}x{w}" for h, w in self.grids)
