"""The prior over code sequences: presets, the loss and the teacher-forced logits of every architecture.
(prior.info: what a folder records; prior.build: the choice of architecture.)"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from accelerate.utils import extract_model_from_parallel

from .layout import TokenLayout


class _NoPaddingWarning(logging.Filter):
    """The prior's rows start with the null class (= pad id) on purpose and are never padded."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "attention_mask` since your input_ids may be padded" not in record.getMessage()


logging.getLogger("transformers.modeling_utils").addFilter(_NoPaddingWarning())

# Named sizes, shared by both architectures. Dropout is small: the code sequences are a compressed,
# already-regularised signal.
PRESETS: dict[str, dict] = {
    "tiny": dict(n_layer=2, n_embd=32, n_head=2, dropout=0.0),  # tests: seconds on a CPU
    "fashion-mnist": dict(n_layer=4, n_embd=192, n_head=6, dropout=0.0),  # 1.9M params; CPU-bound, so small and no dropout
    "small": dict(n_layer=12, n_embd=768, n_head=12, dropout=0.1),  # GPT-2 small; GPUs
    "medium": dict(n_layer=24, n_embd=1024, n_head=16, dropout=0.1),  # GPT-2 medium; GPUs
}


def _swiglu_width(n_embd: int) -> int:
    """SwiGLU's hidden width: 8/3 of the model width (LLaMA's rule, equal in parameters to a 4x GELU MLP),
    rounded up to a multiple of 64."""
    return -(-8 * n_embd // 3 // 64) * 64


def prior_loss(model, codes: torch.Tensor, labels: torch.Tensor, layout: TokenLayout, p_uncond: float = 0.0,
               reduction: str = "mean") -> torch.Tensor:  # fmt: skip
    """Mean cross-entropy (nats) of the codes given the condition, over code positions only.

    ``codes`` (B, T) long, ``labels`` (B,) with -1 for unlabelled. ``reduction="none"`` gives (B,). With probability ``p_uncond`` a row's
    condition becomes the null class (torch's global RNG, which the training loop seeds per step), so
    one model learns both the conditional and the unconditional distribution for guidance.
    """
    cond = layout.condition_tokens(labels).to(codes.device)
    if p_uncond > 0:
        drop = torch.rand(cond.shape, device=cond.device) < p_uncond
        cond = torch.where(drop, torch.full_like(cond, layout.null_token), cond)
    logits = code_logits(model, codes, cond, layout)
    nll = F.cross_entropy(logits.float().reshape(-1, layout.num_codes), codes.reshape(-1), reduction=reduction)
    return nll if reduction == "mean" else nll.view(codes.shape).mean(1)  # "none": (B,) per sequence


def code_logits(model, codes: torch.Tensor, cond: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """Teacher-forced logits (B, T, K) of every code of ``codes`` (B, T) given condition tokens (B,): a flat
    prior reads ``[condition, code_1 .. code_{T-1}]``; a level prior (prior.levels) computes its own, through
    its forward (so that a DDP or FSDP wrapper sees the call)."""
    if hasattr(extract_model_from_parallel(model, keep_torch_compile=False), "code_logits"):  # under DDP / FSDP / compile
        return model(codes=codes, cond=cond)
    inputs = torch.cat([cond[:, None], codes[:, :-1]], dim=1)  # (B, T): condition, code_1..code_{T-1}
    return model(input_ids=inputs).logits[..., : layout.num_codes]  # (B, T, K): only codes are predicted


def bits(nats):  # float or tensor
    return nats / math.log(2)
