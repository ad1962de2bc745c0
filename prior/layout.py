"""The token layout of the prior (DESIGN.md): codes, then classes, then the null class.

ids ``0..K-1`` are codes, ``K + c`` is class ``c``, ``K + C`` is the null class (unconditional rows and
classifier-free guidance). A sequence is ``[condition, code_1, ..., code_{h*w}]`` in raster order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenLayout:
    num_codes: int  # K
    num_classes: int  # C

    @property
    def null_token(self) -> int:
        return self.num_codes + self.num_classes

    @property
    def vocab_size(self) -> int:
        return self.num_codes + self.num_classes + 1

    def condition_tokens(self, labels: torch.Tensor | None, batch_size: int | None = None) -> torch.Tensor:
        """Class ids (B,) -> condition tokens (B,); ``None`` or -1 -> the null class."""
        if labels is None:
            return torch.full((batch_size or 1,), self.null_token, dtype=torch.long)
        labels = torch.as_tensor(labels, dtype=torch.long)
        bad = (labels < -1) | (labels >= self.num_classes)
        if bad.any():
            raise ValueError(
                f"class id {int(labels[bad][0])} is out of range; expected 0..{self.num_classes - 1} (or -1 for unconditional)"
            )
        return torch.where(labels < 0, torch.full_like(labels, self.null_token), labels + self.num_codes)

    def sequences(self, codes: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """Codes (B, T) and labels (B,) -> token sequences (B, 1 + T)."""
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.num_codes):
            raise ValueError(f"codes span [{int(codes.min())}, {int(codes.max())}]; expected 0..{self.num_codes - 1}")
        cond = self.condition_tokens(labels, codes.shape[0]).to(codes.device)
        return torch.cat([cond[:, None], codes.long()], dim=1)

    def split(self, sequences: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Token sequences (B, 1 + T) -> (codes (B, T), labels (B,) with -1 for the null class)."""
        cond, codes = sequences[:, 0], sequences[:, 1:]
        labels = torch.where(cond == self.null_token, torch.full_like(cond, -1), cond - self.num_codes)
        return codes, labels
