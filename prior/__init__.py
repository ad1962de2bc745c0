"""Stage two of vqgpt: a prior over the tokenizer's codes: GPT-2 or Llama over the sequence or, over levels of
codes, a depth (RQ-Transformer) or next-scale (VAR) prior."""

from .build import ARCHITECTURES, architecture, build_prior, load_prior
from .generate import GUIDANCE_SCHEDULES, cache_keyword, filter_logits, generate_codes, prior_steps
from .info import PriorInfo
from .layout import TokenLayout
from .levels import DepthPrior, ScalePrior, block_causal_mask
from .model import PRESETS, bits, code_logits, prior_loss

__all__ = ["TokenLayout", "PriorInfo", "PRESETS", "ARCHITECTURES", "architecture", "build_prior", "load_prior", "prior_loss", "bits", "generate_codes", "prior_steps", "code_logits", "DepthPrior", "ScalePrior", "block_causal_mask", "filter_logits", "cache_keyword", "GUIDANCE_SCHEDULES"]  # fmt: skip
