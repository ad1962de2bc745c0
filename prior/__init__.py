"""Stage two of vqgpt: a GPT-2 or Llama prior over the tokenizer's code sequences."""

from .generate import GUIDANCE_SCHEDULES, cache_keyword, filter_logits, generate_codes
from .layout import TokenLayout
from .model import ARCHITECTURES, PRESETS, PriorInfo, bits, build_prior, load_prior, prior_loss

__all__ = ["TokenLayout", "PriorInfo", "PRESETS", "ARCHITECTURES", "build_prior", "load_prior", "prior_loss", "bits", "generate_codes", "filter_logits", "cache_keyword", "GUIDANCE_SCHEDULES"]  # fmt: skip
