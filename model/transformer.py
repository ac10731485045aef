"""The DeepSeek-V4 graph: embedding -> mHC streams -> blocks -> hc head -> norm -> head (v4_ops §2)."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from seahal import hal

from .attention import Attention
from .cache import Cache
from .config import CSA_RATIO, ModelConfig
from .generate import generate as _generate
from .layers import RMSNorm
from .moe import MoE

MODEL_OPS = tuple(hal.specs())


def _hc_params(n: int, dim: int, rows: int, prefix: str, module: nn.Module, n_scales: int) -> None:
    module.register_parameter(f"{prefix}_fn", nn.Parameter(torch.zeros(rows, n * dim), requires_grad=False))
    module.register_parameter(f"{prefix}_base", nn.Parameter(torch.zeros(rows), requires_grad=False))
    module.register_parameter(f"{prefix}_scale", nn.Parameter(torch.ones(n_scales), requires_grad=False))


class Block(nn.Module):
    """One layer: ``h = hc_post(Attention(norm(hc_pre(h))), h)``, then the same with the MoE."""

    def __init__(self, config: ModelConfig, layer: int, ops: SimpleNamespace):
        super().__init__()
        c = config
        self.config, self.ops = c, ops
        self.attn_norm = RMSNorm(c.dim, c.norm_eps)
        self.attn = Attention(c, layer, ops)
        self.ffn_norm = RMSNorm(c.dim, c.norm_eps)
        self.ffn = MoE(c, layer, ops)
        rows = (2 + c.hc_mult) * c.hc_mult
        _hc_params(c.hc_mult, c.dim, rows, "hc_attn", self, 3)
        _hc_params(c.hc_mult, c.dim, rows, "hc_ffn", self, 3)

    def _hc_pre(self, h: torch.Tensor, prefix: str):
        c = self.config
        fn, base, scale = (getattr(self, f"{prefix}_{p}") for p in ("fn", "base", "scale"))
        return self.ops.hc_pre(h, fn, base, scale, c.hc_sinkhorn_iters, c.hc_eps, c.norm_eps)

    def forward(self, h: torch.Tensor, input_ids: torch.Tensor, cache, start_pos: int) -> torch.Tensor:
        """h: [B, S, n, D] residual streams -> [B, S, n, D]."""
        y, post, comb = self._hc_pre(h, "hc_attn")
        h = self.ops.hc_post(self.attn(self.attn_norm(y), cache, start_pos), h, post, comb)
        y, post, comb = self._hc_pre(h, "hc_ffn")
        return self.ops.hc_post(self.ffn(self.ffn_norm(y), input_ids), h, post, comb)


class Transformer(nn.Module):
    """DeepSeek-V4 without the MTP block (its weights are ignored by the loader).

    ``model(input_ids)`` is a stateless forward -> logits [B, S, vocab] fp32;
    ``model(input_ids, cache=cache)`` consumes the tokens, advances the cache and returns the same.
    """

    def __init__(self, config: ModelConfig, plan: hal.Plan, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.config, self.plan, self.dtype = config, plan, dtype
        ops = plan.ops
        self.ops = ops
        c = config
        self.embed = nn.Embedding(c.vocab_size, c.dim, dtype=dtype)
        self.embed.weight.requires_grad_(False)
        self.layers = nn.ModuleList(Block(c, i, ops) for i in range(c.n_layers))
        self.norm = RMSNorm(c.dim, c.norm_eps)
        # fp32 like the official code: logits are computed in fp32, and converting a bf16 head
        # on every call would copy vocab x dim floats per step.
        self.head = nn.Linear(c.dim, c.vocab_size, bias=False, dtype=torch.float32)
        self.head.weight.requires_grad_(False)
        _hc_params(c.hc_mult, c.dim, c.hc_mult, "hc_head", self, 1)

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def new_cache(self, batch_size: int, max_seq_len: int | None = None) -> Cache:
        """An empty cache for ``batch_size`` sequences of up to ``max_seq_len`` tokens."""
        capacity = max_seq_len or self.config.max_seq_len
        return Cache.new(self.config, batch_size, capacity, self.dtype, self.device, self.ops)

    def generate(self, prompts, max_new_tokens: int, **kwargs):
        """Continue prompts token by token; see :func:`seahal.model.generate.generate`."""
        return _generate(self, prompts, max_new_tokens, **kwargs)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, cache: Cache | None = None, last_only: bool = False) -> torch.Tensor:
        """input_ids: [B, S] -> logits [B, S, vocab] fp32 ([B, 1, vocab] with ``last_only``)."""
        b, s = input_ids.shape
        if cache is None:
            cache = self.new_cache(b, _round_up(s, max(self.config.compress_ratios + [CSA_RATIO])))
        cache.check_room(s)
        start_pos = cache.pos
        c = self.config
        h = self.embed(input_ids).to(self.dtype).unsqueeze(2).expand(b, s, c.hc_mult, c.dim).contiguous()
        for block, layer_cache in zip(self.layers, cache.layers):
            h = block(h, input_ids, layer_cache, start_pos)
        cache.pos += s
        if last_only:
            h = h[:, -1:]
        z = self.ops.hc_head(h, self.hc_head_fn, self.hc_head_base, self.hc_head_scale, c.hc_eps, c.norm_eps)
        return nn.functional.linear(self.norm(z).float(), self.head.weight)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
