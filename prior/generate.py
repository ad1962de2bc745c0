"""Sampling code sequences from the prior: KV cache, code-only vocabulary, classifier-free guidance."""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from transformers import StaticCache

from .info import PriorInfo
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


def draw(probs: torch.Tensor, generator: torch.Generator | Sequence[torch.Generator] | None) -> torch.Tensor:
    """One sample from each row of ``probs`` (B, m, K) -> (B, m): with one RNG for all rows, or one per row."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.multinomial(probs.flatten(0, 1), 1, generator=generator)
    if len(generator) != len(probs):
        raise ValueError(f"{len(generator)} generators for {len(probs)} rows; expected one per row")
    return torch.stack([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generator)])


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


class FlatSteps:
    """The steps of a flat prior (GPT-2 or Llama over one sequence): one code a step, in the codes' order.

    ``levels``: the level of each code (a flat prior over several levels flattened level after level).
    ``use_cache=False`` reruns the whole sequence every step (the reference the cached path is tested
    against); ``cache="static"`` preallocates transformers' ``StaticCache``, so that every step is a one-token
    forward of fixed shapes that ``forward=torch.compile(model, mode="reduce-overhead")`` can replay as a
    CUDA graph (bench/gpu.py)."""

    def __init__(self, model, levels: list[int], use_cache: bool = True, cache: str = "dynamic", forward=None):
        if cache not in ("dynamic", "static"):
            raise ValueError(f"cache {cache!r}; expected 'dynamic' or 'static'")
        self.model, self.forward = model, model if forward is None else forward  # (a compiled module has no truth value)
        self.order = [(torch.tensor([t]), level) for t, level in enumerate(levels)]
        self.use_cache, self.static, self.keyword = use_cache, cache == "static", cache_keyword(model)

    def start(self, cond: torch.Tensor) -> torch.Tensor:
        self.ids, self.t = cond[:, None], 0
        self.past = StaticCache(config=self.model.config, max_cache_len=len(self.order) + 1) if self.use_cache and self.static else None
        return self._step()

    def _step(self) -> torch.Tensor:
        if self.use_cache:  # the condition, then one new token a step
            position = torch.tensor([self.t], device=self.ids.device)
            out = self.forward(input_ids=self.ids[:, -1:], use_cache=True, cache_position=position, **{self.keyword: self.past})
            self.past = out[self.keyword]
        else:
            out = self.forward(input_ids=self.ids, use_cache=False)
        self.t += 1
        return out.logits[:, -1:]

    def feed(self, codes: torch.Tensor) -> torch.Tensor:
        self.ids = torch.cat([self.ids, codes], dim=1)
        return self._step()


def prior_steps(model, seq_len: int, **flat):
    """The steps a prior generates (or codes) a sequence by: ``order`` lists, for each step, the positions
    (in the codes' container order) it emits and their level; ``start(cond)`` gives the first step's logits
    (R, n, V >= K) for condition tokens (R,), and ``feed(codes (R, n))`` the next step's. One step is one code
    for a flat prior, one level of one position for a depth prior and one whole scale for a next-scale prior.
    ``flat``: FlatSteps' options."""
    if hasattr(model, "steps"):
        return model.steps()
    layout = PriorInfo.from_config(model.config).code_layout
    levels = [i for i, (h, w) in enumerate(layout.grids) for _ in range(h * w)][:seq_len]
    return FlatSteps(model, levels + [levels[-1]] * (seq_len - len(levels)), **flat)


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
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    use_cache: bool = True,
    cache: str = "dynamic",
    forward=None,
    guidance_schedule: str = "constant",
    deep_temperature: float | None = None,
    deep_top_k: int | None = None,
) -> torch.Tensor:
    """Sample code sequences (B, seq_len) for class ``labels`` (B,) (-1 or ``None``: unconditional), step by
    step as the prior generates (``prior_steps``: a code, a level of a position, or a scale at a time).

    Guidance ``l = l_null + s (l_cond - l_null)`` runs the conditional and null rows as one batch of 2B.
    ``s = 1`` is plain conditional sampling and ``s = 0`` unconditional: both skip the extra rows.
    ``guidance_schedule`` (a key of ``GUIDANCE_SCHEDULES``) sets the scale of each step from ``s``:
    ``"linear"`` rises from about 1 at the first step to ``s`` at the last.
    ``temperature = 0`` or ``top_k = 1`` is greedy decoding. ``deep_temperature`` and ``deep_top_k`` (None:
    the same as the first level's) apply to the codes of every level after the first: ``deep_temperature=0``
    samples the coarse level and takes the deep levels greedily. Only code ids (< K) can be emitted.
    ``generator``: one RNG for the whole batch, or one per row (rows may share one: a row's draws then come
    from it in row order), so that a row's codes do not depend on the other rows batched with it.
    ``use_cache``, ``cache`` and ``forward``: a flat prior's options (FlatSteps).
    """
    if guidance_schedule not in GUIDANCE_SCHEDULES:
        raise ValueError(f"guidance_schedule {guidance_schedule!r}; expected one of {list(GUIDANCE_SCHEDULES)}")
    scale_at = GUIDANCE_SCHEDULES[guidance_schedule]
    steps = prior_steps(model, seq_len, use_cache=use_cache, cache=cache, forward=forward)
    device = next(model.parameters()).device
    cond = layout.condition_tokens(labels, batch_size).to(device)
    b = cond.shape[0]
    if guidance_scale == 0:
        cond = torch.full_like(cond, layout.null_token)
    guided = guidance_scale not in (0.0, 1.0)
    settings = [(temperature, top_k), (temperature if deep_temperature is None else deep_temperature,
                                       top_k if deep_top_k is None else deep_top_k)]  # fmt: skip
    codes = torch.zeros(b, seq_len, dtype=torch.long, device=device)
    logits = steps.start(torch.cat([cond, torch.full_like(cond, layout.null_token)]) if guided else cond)
    n = len(steps.order)
    for i, (where, level) in enumerate(steps.order):
        logits = logits[..., : layout.num_codes].float()  # (R, m, K): the m codes of this step
        if guided:
            l_cond, l_null = logits.chunk(2)
            logits = l_null + scale_at(guidance_scale, i, n) * (l_cond - l_null)  # (B, m, K)
        t, k = settings[min(level, 1)]
        if t == 0 or k == 1:
            nxt = logits.argmax(-1)
        else:
            probs = filter_logits(logits / t, k, top_p).softmax(-1)
            nxt = draw(probs, generator).view(b, -1)
        codes[:, where.to(device)] = nxt
        if i + 1 < n:
            logits = steps.feed(torch.cat([nxt, nxt]) if guided else nxt)
    return codes
