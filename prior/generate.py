"""Sampling code sequences from the prior: KV cache, code-only vocabulary, classifier-free guidance."""

from __future__ import annotations

import inspect

import torch
from transformers import StaticCache

from .layout import TokenLayout


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Keep the ``top_k`` largest and the smallest set of logits whose probability reaches ``top_p``."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        remove = probs.cumsum(-1) - probs >= top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return logits


def cache_keyword(model) -> str:
    """The name a model's forward takes its KV cache by (and its output returns it by): ``cache`` since
    transformers renamed ``past_key_values``, which it warns about and will remove."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


# How the guidance scale s applies over the n codes of a sequence (code t = 0 .. n-1): at every code, or
# rising linearly from plain conditional sampling to s at the last code (the ramp of MUSE and VAR; measured
# in docs/recipe.md), or falling from s at the first code towards 1.
GUIDANCE_SCHEDULES = {
    "constant": lambda s, t, n: s,
    "linear": lambda s, t, n: 1 + (s - 1) * (t + 1) / n,
    "linear-down": lambda s, t, n: s - (s - 1) * t / n,
}


@torch.no_grad()
def generate_codes(
    model,
    layout: TokenLayout,
    seq_len: int,
    labels: torch.Tensor | None,
    batch_size: int | None = None,
    guidance_scale: float = 1.0,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    cache: str = "dynamic",
    forward=None,
    guidance_schedule: str = "constant",
) -> torch.Tensor:
    """Sample code sequences (B, seq_len) for class ``labels`` (B,) (-1 or ``None``: unconditional).

    Guidance ``l = l_null + s (l_cond - l_null)`` runs the conditional and null rows as one batch of 2B.
    ``s = 1`` is plain conditional sampling and ``s = 0`` unconditional: both skip the extra rows.
    ``guidance_schedule`` (a key of ``GUIDANCE_SCHEDULES``) sets the scale of each code from ``s``:
    ``"linear"`` rises from about 1 at the first code to ``s`` at the last.
    ``temperature = 0`` or ``top_k = 1`` is greedy decoding. Only code ids (< K) can be emitted.
    ``cache="static"`` preallocates transformers' ``StaticCache``: every step is then a one-token
    forward of fixed shapes, which ``forward=torch.compile(model, mode="reduce-overhead")`` can replay
    as a CUDA graph (measured in bench/gpu.py).
    """
    if guidance_schedule not in GUIDANCE_SCHEDULES:
        raise ValueError(f"guidance_schedule {guidance_schedule!r}; expected one of {list(GUIDANCE_SCHEDULES)}")
    scale_at = GUIDANCE_SCHEDULES[guidance_schedule]
    if cache not in ("dynamic", "static"):
        raise ValueError(f"cache {cache!r}; expected 'dynamic' or 'static'")
    forward = model if forward is None else forward  # (a compiled module has no truth value)
    device = next(model.parameters()).device
    cond = layout.condition_tokens(labels, batch_size).to(device)
    b = cond.shape[0]
    if guidance_scale == 0:
        cond = torch.full_like(cond, layout.null_token)
    guided = guidance_scale not in (0.0, 1.0)
    rows = torch.cat([cond, torch.full_like(cond, layout.null_token)]) if guided else cond
    ids = rows[:, None]  # (R, 1), R = 2B when guided
    past = StaticCache(config=model.config, max_cache_len=seq_len + 1) if use_cache and cache == "static" else None
    keyword = cache_keyword(model)
    for t in range(seq_len):
        if use_cache:  # the condition, then one new token a step
            out = forward(input_ids=ids[:, -1:], use_cache=True, cache_position=torch.tensor([t], device=device), **{keyword: past})
            past = out[keyword]
        else:
            out = forward(input_ids=ids, use_cache=False)
        logits = out.logits[:, -1, : layout.num_codes].float()  # (R, K)
        if guided:
            l_cond, l_null = logits.chunk(2)
            logits = l_null + scale_at(guidance_scale, t, seq_len) * (l_cond - l_null)  # (B, K)
        if temperature == 0 or top_k == 1:
            nxt = logits.argmax(-1)
        else:
            probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        ids = torch.cat([ids, (torch.cat([nxt, nxt]) if guided else nxt)[:, None]], dim=1)
    return ids[:b, 1:]
