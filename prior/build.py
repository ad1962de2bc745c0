"""The choice of a prior's architecture, in one place above them all: build a new prior, name a saved one's
architecture, load any of them. Imports run one way: layout, info and model at the bottom; generate reads
info; levels builds on model, info and generate; this module on levels and model."""

from __future__ import annotations

from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PretrainedConfig

from common.hub import resolve_model

from .info import PriorInfo
from .levels import LEVEL_PRIORS
from .model import PRESETS, _swiglu_width

# GPT2LMHeadModel, or LlamaForCausalLM (RoPE, SwiGLU, RMSNorm: LlamaGen's choice), flat over the codes; over
# multi-level codes also a depth prior (RQ-Transformer) or a next-scale prior (VAR), both of Llama blocks (prior.levels).
ARCHITECTURES = ("gpt2", "llama", "depth", "scales")


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
