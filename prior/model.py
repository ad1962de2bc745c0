"""The prior over code sequences: GPT-2 or Llama from transformers, presets, the self-describing folder, the loss."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from accelerate.utils import extract_model_from_parallel
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PretrainedConfig

from common.hub import resolve_model

from tokenizer.codes import CodeLayout

from .layout import TokenLayout


class _NoPaddingWarning(logging.Filter):
    """The prior's rows start with the null class (= pad id) on purpose and are never padded."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "attention_mask` since your input_ids may be padded" not in record.getMessage()


logging.getLogger("transformers.modeling_utils").addFilter(_NoPaddingWarning())

# GPT2LMHeadModel, or LlamaForCausalLM (RoPE, SwiGLU, RMSNorm: LlamaGen's choice), flat over the codes; over
# multi-level codes also a depth prior (RQ-Transformer) or a next-scale prior (VAR), both of Llama blocks (prior.levels).
ARCHITECTURES = ("gpt2", "llama", "depth", "scales")

# Named sizes, shared by both architectures. Dropout is small: the code sequences are a compressed,
# already-regularised signal.
PRESETS: dict[str, dict] = {
    "tiny": dict(n_layer=2, n_embd=32, n_head=2, dropout=0.0),  # tests: seconds on a CPU
    "fashion-mnist": dict(n_layer=4, n_embd=192, n_head=6, dropout=0.0),  # 1.9M params; CPU-bound, so small and no dropout
    "small": dict(n_layer=12, n_embd=768, n_head=12, dropout=0.1),  # GPT-2 small; GPUs
    "medium": dict(n_layer=24, n_embd=1024, n_head=16, dropout=0.1),  # GPT-2 medium; GPUs
}


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


def _swiglu_width(n_embd: int) -> int:
    """SwiGLU's hidden width: 8/3 of the model width (LLaMA's rule, equal in parameters to a 4x GELU MLP),
    rounded up to a multiple of 64."""
    return -(-8 * n_embd // 3 // 64) * 64


def build_prior(preset: str, info: PriorInfo, arch: str = "gpt2", depth_layers: int | None = None, **overrides):
    """A new prior of ``preset`` size for ``info``'s layout; ``arch`` one of ARCHITECTURES (``depth_layers``:
    the depth transformer's layers of a depth prior, 1 by default)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown prior preset {preset!r}; expected one of {sorted(PRESETS)}")
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown prior architecture {arch!r}; expected one of {list(ARCHITECTURES)}")
    p = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    layout = info.layout
    if arch in ("depth", "scales"):
        from .levels import LEVEL_PRIORS

        config_class, model_class = LEVEL_PRIORS[arch]
        return model_class(config_class(hidden_size=p["n_embd"], num_hidden_layers=p["n_layer"], num_attention_heads=p["n_head"],
                                        depth_layers=depth_layers or 1, dropout=p["dropout"], vocab_size=layout.vocab_size,
                                        vqgpt=info.to_dict()))  # fmt: skip
    common = dict(
        vocab_size=layout.vocab_size,
        # Special ids inside the vocabulary: sequences start with a condition and never end early.
        bos_token_id=layout.null_token, eos_token_id=layout.null_token, pad_token_id=layout.null_token,
        vqgpt=info.to_dict(),
    )  # fmt: skip
    if arch == "gpt2":
        config = GPT2Config(
            n_positions=info.seq_len + 1,  # the condition token, then h*w codes
            n_embd=p["n_embd"], n_layer=p["n_layer"], n_head=p["n_head"],
            resid_pdrop=p["dropout"], embd_pdrop=p["dropout"], attn_pdrop=p["dropout"],
            # GPT-2's tanh GELU as torch's one kernel; GPT2Config's default "gelu_new" computes the same
            # function in eight elementwise passes over the (tokens, 4 * n_embd) activations, which on a
            # CPU cost more than the MLP's matmuls at 196 codes (bench/prior_throughput.py).
            activation_function="gelu_pytorch_tanh", **common,
        )  # fmt: skip
        return GPT2LMHeadModel(config)
    config = LlamaConfig(
        max_position_embeddings=info.seq_len + 1,
        hidden_size=p["n_embd"], intermediate_size=_swiglu_width(p["n_embd"]),
        num_hidden_layers=p["n_layer"], num_attention_heads=p["n_head"], num_key_value_heads=p["n_head"],
        attention_dropout=p["dropout"], rms_norm_eps=1e-5, tie_word_embeddings=False, **common,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def architecture(config: PretrainedConfig) -> str:
    return {"llama": "llama", "vqgpt-depth": "depth", "vqgpt-scales": "scales"}.get(config.model_type, "gpt2")


def load_prior(path: str, **kwargs):
    """A saved prior folder or Hub id (any of ARCHITECTURES) -> (model in eval mode, its PriorInfo)."""
    model = AutoModelForCausalLM.from_pretrained(resolve_model(path, "prior"), **kwargs)
    return model.eval(), PriorInfo.from_config(model.config)


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
