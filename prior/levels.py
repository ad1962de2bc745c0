"""Priors over multi-level codes (tokenizer.codes), built from transformers' ``LlamaModel`` fed with ``inputs_embeds``.

- ``DepthPrior`` (RQ-Transformer, Lee et al. 2022): a spatial Llama runs over the positions of the grid (its
  input at a position is the condition, then the sum of the code embeddings of all levels at the position
  before), and a small depth Llama predicts the L codes of each position from the spatial output, one
  level after another. Sampling: one spatial step a position, one depth step a level, each with its cache.
- ``ScalePrior`` (VAR, Tian et al. 2024): next-scale prediction. One Llama sees every token of the coarser
  scales and all tokens of its own scale (a block-causal 4D mask), and predicts a whole scale at once: the
  input of scale k is the sum of the coarser scales' code embeddings, each interpolated to scale k's grid,
  plus the condition, a learned position and a scale embedding (RoPE is off: all position ids are 0).
  Sampling: one forward a scale, with the cache. Over residual levels of one grid it is next-level prediction.

Both save, load (``AutoModelForCausalLM``) and push like the flat priors, and both give the shared mechanism
of prior.steps what it needs: ``code_logits`` (teacher-forced, in the codes' container order) and ``steps``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, LlamaConfig, LlamaModel, PretrainedConfig, PreTrainedModel

from .generate import cache_keyword
from .info import PriorInfo
from .model import _swiglu_width


class LevelPriorConfig(PretrainedConfig):
    """The sizes of a level prior (the names the flat priors' configs use) and its ``vqgpt`` record (PriorInfo)."""

    def __init__(self, hidden_size: int = 192, num_hidden_layers: int = 4, num_attention_heads: int = 6, depth_layers: int = 1,
                 dropout: float = 0.0, initializer_range: float = 0.02, vqgpt: dict | None = None, **kwargs):  # fmt: skip
        self.hidden_size, self.num_hidden_layers, self.num_attention_heads = hidden_size, num_hidden_layers, num_attention_heads
        self.depth_layers, self.dropout, self.initializer_range, self.vqgpt = depth_layers, dropout, initializer_range, vqgpt
        super().__init__(**kwargs)


class DepthPriorConfig(LevelPriorConfig):
    model_type = "vqgpt-depth"


class ScalePriorConfig(LevelPriorConfig):
    model_type = "vqgpt-scales"


def _llama(config: LevelPriorConfig, layers: int, vocab: int, positions: int) -> LlamaModel:
    return LlamaModel(LlamaConfig(
        vocab_size=vocab, hidden_size=config.hidden_size, intermediate_size=_swiglu_width(config.hidden_size),
        num_hidden_layers=layers, num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_attention_heads,
        max_position_embeddings=positions, attention_dropout=config.dropout, rms_norm_eps=1e-5, pad_token_id=None,
    ))  # fmt: skip


class _LevelPrior(PreTrainedModel):
    base_model_prefix = "prior"
    _supports_sdpa = True

    def __init__(self, config: LevelPriorConfig):
        super().__init__(config)
        self.info = PriorInfo.from_dict(config.vqgpt)
        self.num_codes, self.num_levels = self.info.num_codes, self.info.code_layout.num_levels
        self.cond = nn.Embedding(self.info.num_classes + 1, config.hidden_size)  # the classes, then the null class
        self.head = nn.Linear(config.hidden_size, self.num_levels * self.num_codes, bias=False)  # a head of K codes a level

    def condition(self, cond: torch.Tensor) -> torch.Tensor:
        """Condition tokens of TokenLayout (K + c, or the null token) -> embeddings (R, D)."""
        return self.cond(cond - self.num_codes)

    def level_logits(self, hidden: torch.Tensor, level: int) -> torch.Tensor:
        """(..., D) -> the logits (..., K) of the codes of ``level``."""
        k = self.num_codes
        return F.linear(hidden, self.head.weight[level * k : (level + 1) * k])

    def forward(self, codes: torch.Tensor, cond: torch.Tensor):
        return self.code_logits(codes, cond)


class DepthPrior(_LevelPrior):
    config_class = DepthPriorConfig

    def __init__(self, config: DepthPriorConfig):
        super().__init__(config)
        grids = set(self.info.code_layout.grids)
        if len(grids) != 1 or self.num_levels < 2:
            raise ValueError(f"a depth prior models 2 or more levels of one grid, not {self.info.code_layout.describe()}; "
                             "use --arch llama (one level) or --arch scales (scales)")  # fmt: skip
        (h, w), k, L = grids.pop(), self.num_codes, self.num_levels
        self.positions = h * w
        self.spatial = _llama(config, config.num_hidden_layers, L * k, self.positions)  # its embed_tokens: a table per level
        self.depth = _llama(config, config.depth_layers, L * k, L)
        self.post_init()

    def offsets(self, device) -> torch.Tensor:
        """Where each level's table starts in the embeddings (no buffer: a model loaded from a folder is built
        on the meta device, and only saved tensors are filled)."""
        return torch.arange(self.num_levels, device=device) * self.num_codes

    def code_logits(self, codes: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits (B, T, K) of codes (B, T) (level after level) given condition tokens (B,)."""
        b, L, p, k = codes.shape[0], self.num_levels, self.positions, self.num_codes
        stack = codes.view(b, L, p).transpose(1, 2) + self.offsets(codes.device)  # (B, P, L): the codes of each position
        above = self.spatial.embed_tokens(stack).sum(2)  # (B, P, D)
        x = torch.cat([self.condition(cond)[:, None], above[:, :-1]], dim=1)  # position p sees positions < p
        h = self.spatial(inputs_embeds=x).last_hidden_state  # (B, P, D)
        v = torch.cat([h[:, :, None], self.depth.embed_tokens(stack[:, :, :-1])], dim=2)  # (B, P, L, D): level l sees levels < l
        out = self.depth(inputs_embeds=v.flatten(0, 1)).last_hidden_state.view(b, p, L, -1)
        logits = torch.einsum("bpld,lkd->bplk", out, self.head.weight.view(L, k, -1))
        return logits.transpose(1, 2).reshape(b, L * p, k)

    def steps(self) -> DepthSteps:
        return DepthSteps(self)


class DepthSteps:
    """Position after position (a spatial step), and at each the L levels (a depth step each)."""

    def __init__(self, model: DepthPrior):
        self.model, p = model, model.positions
        self.order = [(torch.tensor([level * p + pos]), level) for pos in range(p) for level in range(model.num_levels)]
        self.keyword = cache_keyword(model.spatial)

    def start(self, cond: torch.Tensor) -> torch.Tensor:
        self.spatial_cache = DynamicCache(config=self.model.spatial.config)
        return self._position(self.model.condition(cond)[:, None])

    def _position(self, x: torch.Tensor) -> torch.Tensor:
        h = self.model.spatial(inputs_embeds=x, use_cache=True, **{self.keyword: self.spatial_cache}).last_hidden_state
        self.depth_cache, self.codes = DynamicCache(config=self.model.depth.config), []
        return self._level(h)

    def _level(self, v: torch.Tensor) -> torch.Tensor:
        out = self.model.depth(inputs_embeds=v, use_cache=True, **{self.keyword: self.depth_cache}).last_hidden_state
        return self.model.level_logits(out, len(self.codes))  # (R, 1, K)

    def feed(self, codes: torch.Tensor) -> torch.Tensor:
        """The codes (R, 1) of the level just chosen -> the logits of the next step."""
        m = self.model
        self.codes.append(codes + len(self.codes) * m.num_codes)
        if len(self.codes) < m.num_levels:
            return self._level(m.depth.embed_tokens(self.codes[-1]))
        return self._position(m.spatial.embed_tokens(torch.cat(self.codes, dim=1)).sum(1, keepdim=True))


def block_causal_mask(grids) -> torch.Tensor:
    """(T, T) bool, True where token i may attend token j: j's scale is i's or a coarser one."""
    scale = torch.cat([torch.full((h * w,), i) for i, (h, w) in enumerate(grids)])
    return scale[None, :] <= scale[:, None]


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask -> the 4D additive mask transformers uses as is (0 allowed, the dtype's minimum not)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)[None, None]


class ScalePrior(_LevelPrior):
    config_class = ScalePriorConfig

    def __init__(self, config: ScalePriorConfig):
        super().__init__(config)
        layout, k = self.info.code_layout, self.num_codes
        self.grids, self.sizes = layout.grids, [h * w for h, w in layout.grids]
        self.model = _llama(config, config.num_hidden_layers, self.num_levels * k, 1)  # its embed_tokens: a table per scale
        self.position = nn.Embedding(layout.length(), config.hidden_size)
        self.scale = nn.Embedding(self.num_levels, config.hidden_size)
        self.post_init()

    def _embedded(self, level: int, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, h_l * w_l) of a scale -> their embeddings as a map (B, D, h_l, w_l)."""
        h, w = self.grids[level]
        return self.model.embed_tokens(codes + level * self.num_codes).transpose(1, 2).reshape(len(codes), -1, h, w)

    def _inputs(self, level: int, maps: list[torch.Tensor], cond: torch.Tensor) -> torch.Tensor:
        """The input tokens (B, n_l, D) of scale ``level`` from the embedded maps of the scales before it."""
        h, w = self.grids[level]
        x = self.condition(cond)[:, None].expand(-1, h * w, -1)
        for m in maps:
            x = x + F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
        start = sum(self.sizes[:level])
        return x + self.position.weight[start : start + h * w] + self.scale.weight[level]

    def _run(self, x: torch.Tensor, mask: torch.Tensor, **cache) -> torch.Tensor:
        zeros = torch.zeros(x.shape[:2], dtype=torch.long, device=x.device)  # RoPE off: positions are learned
        return self.model(inputs_embeds=x, attention_mask=_additive(mask, x.dtype), position_ids=zeros, **cache).last_hidden_state

    def _logits(self, out: torch.Tensor) -> torch.Tensor:
        """Outputs (B, T, D) of all scales -> their logits (B, T, K), each scale by its own head."""
        return torch.cat([self.level_logits(o, level) for level, o in enumerate(out.split(self.sizes, dim=1))], dim=1)

    def code_logits(self, codes: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits (B, T, K) of codes (B, T) (scale after scale) given condition tokens (B,)."""
        splits = codes.split(self.sizes, dim=1)
        maps = [self._embedded(i, c) for i, c in enumerate(splits[:-1])]
        x = torch.cat([self._inputs(i, maps[:i], cond) for i in range(self.num_levels)], dim=1)
        return self._logits(self._run(x, block_causal_mask(self.grids).to(x.device)))

    def steps(self) -> ScaleSteps:
        return ScaleSteps(self)


class ScaleSteps:
    """Scale after scale, one forward each with the cache: a scale's tokens see everything before and each other."""

    def __init__(self, model: ScalePrior):
        self.model, starts = model, [sum(model.sizes[:i]) for i in range(model.num_levels)]
        self.order = [(torch.arange(s, s + n), i) for i, (s, n) in enumerate(zip(starts, model.sizes))]
        self.keyword = cache_keyword(model.model)

    def _step(self) -> torch.Tensor:
        level, m = len(self.maps), self.model
        x = m._inputs(level, self.maps, self.cond)
        seen = self.cache.get_seq_length()
        out = m._run(x, torch.ones(x.shape[1], seen + x.shape[1], dtype=torch.bool, device=x.device),
                     use_cache=True, **{self.keyword: self.cache})  # fmt: skip
        return m.level_logits(out, level)

    def start(self, cond: torch.Tensor) -> torch.Tensor:
        self.cond, self.maps = cond, []
        self.cache = DynamicCache(config=self.model.model.config)
        return self._step()

    def feed(self, codes: torch.Tensor) -> torch.Tensor:
        """The codes (R, n_l) of the scale just chosen -> the logits (R, n_{l+1}, K) of the next."""
        self.maps.append(self.model._embedded(len(self.maps), codes))
        return self._step()


LEVEL_PRIORS = {"depth": (DepthPriorConfig, DepthPrior), "scales": (ScalePriorConfig, ScalePrior)}
for _config, _model in LEVEL_PRIORS.values():
    AutoConfig.register(_config.model_type, _config)
    AutoModelForCausalLM.register(_config, _model)
