"""The DeepSeek-V4 graph: embedding -> mHC streams -> blocks -> hc head -> norm -> head (v4_ops §2)."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from seahal import hal

from .attention import Attention, StepPositions
from .cache import Cache
from .config import CSA_RATIO, ModelConfig
from .generate import generate as _generate
from .layers import Head, RMSNorm
from .moe import MoE
from .parallel import SINGLE_PROCESS, Parallel, TokenLayout

MODEL_OPS = tuple(hal.specs())


def _hc_params(n: int, dim: int, rows: int, prefix: str, module: nn.Module, n_scales: int) -> None:
    module.register_parameter(f"{prefix}_fn", nn.Parameter(torch.zeros(rows, n * dim), requires_grad=False))
    module.register_parameter(f"{prefix}_base", nn.Parameter(torch.zeros(rows), requires_grad=False))
    module.register_parameter(f"{prefix}_scale", nn.Parameter(torch.ones(n_scales), requires_grad=False))


SubLayerOutput = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]
"""A sub-layer's output not yet mixed into the streams: (f, its second part or None, post, comb),
``hc_post``'s arguments besides the streams."""


class Block(nn.Module):
    """One layer: ``h = hc_post(Attention(norm(hc_pre(h))), h)``, then the same with the MoE.

    Each ``hc_post`` is run by the ``hc_pre`` that reads its streams (``hc_post_pre``, one op at
    every sub-layer boundary): the block starts from the previous block's pending MoE output and
    leaves its own pending (:attr:`SubLayerOutput`) for the next block, or for the model's last
    ``hc_post`` before the head.
    """

    def __init__(self, config: ModelConfig, layer: int, ops: SimpleNamespace, parallel: Parallel = SINGLE_PROCESS):
        super().__init__()
        c = config
        self.config, self.ops = c, ops
        self.attn_norm = RMSNorm(c.dim, c.norm_eps, ops)
        self.attn = Attention(c, layer, ops, parallel)
        self.ffn_norm = RMSNorm(c.dim, c.norm_eps, ops)
        self.ffn = MoE(c, layer, ops, parallel)
        rows = (2 + c.hc_mult) * c.hc_mult
        _hc_params(c.hc_mult, c.dim, rows, "hc_attn", self, 3)
        _hc_params(c.hc_mult, c.dim, rows, "hc_ffn", self, 3)

    def _hc_pre(self, h: torch.Tensor, pending: SubLayerOutput | None, prefix: str, norm: RMSNorm):
        """The streams with ``pending`` mixed in, and hc_pre's (y, post, comb) of them with y through
        the sub-layer's norm: one op (``hc_post_pre``, or ``hc_pre`` when nothing is pending)."""
        c = self.config
        fn, base, scale = (getattr(self, f"{prefix}_{p}") for p in ("fn", "base", "scale"))
        pre = (fn, base, scale, c.hc_sinkhorn_iters, c.hc_eps, c.norm_eps, norm.weight)
        if pending is None:
            return h, *self.ops.hc_pre(h, *pre)
        f, addend, post, comb = pending
        return self.ops.hc_post_pre(f, h, post, comb, *pre, addend)

    def forward(
        self, h: torch.Tensor, pending: SubLayerOutput | None, input_ids: torch.Tensor, cache,
        start_pos: int | torch.Tensor, layout: TokenLayout | None = None, step: StepPositions | None = None,
    ) -> tuple[torch.Tensor, SubLayerOutput]:
        """h: [B, S, n, D] residual streams, ``pending``: the previous block's MoE output not yet in
        them (None for the first block) -> (the streams after the attention, this block's MoE
        output to mix into them); ``layout``: see :class:`MoE`; ``step``: see :meth:`Attention.forward`."""
        h, y, post, comb = self._hc_pre(h, pending, "hc_attn", self.attn_norm)
        h, y, post, comb = self._hc_pre(h, (self.attn(y, cache, start_pos, step), None, post, comb), "hc_ffn",
                                        self.ffn_norm)
        f, addend = self.ffn.parts(y, input_ids, layout)  # the routed and shared outputs, summed by hc_post
        return h, (f, addend, post, comb)


def _embedding(rows: int, dim: int, dtype: torch.dtype) -> nn.Embedding:
    """A frozen [rows, dim] embedding, N(0, 1) as ``nn.Embedding`` initialises it, except on the
    meta device (the loader's build, whose weights the checkpoint replaces): there it is left
    unmade, as ``normal_`` on a meta tensor imports torch._dynamo, 2 s of a first load."""
    weight = torch.empty(rows, dim, dtype=dtype)
    if weight.device.type != "meta":
        nn.init.normal_(weight)
    return nn.Embedding(rows, dim, _weight=weight, _freeze=True)


class Transformer(nn.Module):
    """DeepSeek-V4 without the MTP block (its weights are ignored by the loader).

    ``model(input_ids)`` is a stateless forward -> logits [B, S, vocab] fp32;
    ``model(input_ids, cache=cache)`` consumes the tokens, advances the cache and returns the same.

    Split over processes (``parallel``, see model/parallel.py), every rank is called with the same
    input_ids and returns the same logits; the embedding and head are vocabulary-parallel.
    """

    def __init__(
        self, config: ModelConfig, plan: hal.Plan, dtype: torch.dtype = torch.float32,
        parallel: Parallel = SINGLE_PROCESS,
    ):
        super().__init__()
        self.config, self.plan, self.dtype, self.parallel = config, plan, dtype, parallel
        ops = plan.ops
        self.ops = ops
        c = config
        parallel.config.check(c)
        self.vocab_start, vocab_end = parallel.tp_range(c.vocab_size)
        self.embed = _embedding(vocab_end - self.vocab_start, c.dim, dtype)
        self.layers = nn.ModuleList(Block(c, i, ops, parallel) for i in range(c.n_layers))
        self.norm = RMSNorm(c.dim, c.norm_eps, ops)
        self.head = Head(c.dim, vocab_end - self.vocab_start, ops, dtype)
        _hc_params(c.hc_mult, c.dim, c.hc_mult, "hc_head", self, 1)

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    def new_cache(self, batch_size: int, max_seq_len: int | None = None) -> Cache:
        """An empty cache for ``batch_size`` sequences of up to ``max_seq_len`` tokens (under
        dp_attention, for this rank's share of them)."""
        capacity = max_seq_len or self.config.max_seq_len
        batch = self.parallel.local_batch_size(batch_size)
        return Cache.new(self.config, batch, capacity, self.dtype, self.device, self.ops)

    def generate(self, prompts, max_new_tokens: int, **kwargs):
        """Continue prompts token by token; see :func:`seahal.model.generate.generate`."""
        return _generate(self, prompts, max_new_tokens, **kwargs)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, cache: Cache | None = None, last_only: bool = False) -> torch.Tensor:
        """input_ids: [B, S] -> logits [B, S, vocab] fp32 ([B, 1, vocab] with ``last_only``)."""
        batch, s = input_ids.shape
        if cache is None:
            cache = self.new_cache(batch, _round_up(s, max(self.config.compress_ratios + [CSA_RATIO])))
        cache.check_room(s)
        start_pos = cache.pos
        c, p = self.config, self.parallel
        layout = p.token_layout(batch, s) if p.ep > 1 else None
        input_ids = p.local_batch(input_ids)
        b = input_ids.shape[0]
        # the n streams start equal: a stride-0 view of the embedding (the first hc_pre and hc_post
        # read it through its strides; hc_post's output is the first materialised stream tensor)
        h = self._embed(input_ids).to(self.dtype).unsqueeze(2).expand(b, s, c.hc_mult, c.dim)
        offsets = self.layers[0].attn.window_offsets if len(self.layers) else None
        step = StepPositions.of(start_pos, s, input_ids.device, offsets, cache.tables)  # made once for every layer
        pending = None
        for block, layer_cache in zip(self.layers, cache.layers):
            h, pending = block(h, pending, input_ids, layer_cache, start_pos, layout, step)
        cache.pos = step.end  # a new tensor at a tensor position (the caller's stays), shared with the entry counts
        if last_only:
            h = h[:, -1:]
            pending = pending if pending is None else _last_token(pending)
        if pending is not None:
            f, addend, post, comb = pending
            h = self.ops.hc_post(f, h, post, comb, addend)
        z = self.ops.hc_head(h, self.hc_head_fn, self.hc_head_base, self.hc_head_scale, c.hc_eps, c.norm_eps,
                             self.norm.weight)  # the final norm in the collapse's op
        logits = p.tp_all_gather(self.head(z), dim=-1)
        return p.gather_batch(logits, batch)

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings [B, S, D]; vocabulary-parallel: each TP rank looks up the ids in its
        range, zeros elsewhere, and the TP group sums (exact: one non-zero term per token)."""
        if self.parallel.tp == 1:
            return self.embed(input_ids)
        local = input_ids - self.vocab_start
        inside = (local >= 0) & (local < self.embed.num_embeddings)
        rows = self.embed(torch.where(inside, local, 0)).masked_fill(~inside.unsqueeze(-1), 0)
        return self.parallel.tp_all_reduce(rows)


def _last_token(pending: SubLayerOutput) -> SubLayerOutput:
    """A pending sub-layer output's last token (each tensor's [B, 1, ...] view)."""
    return tuple(t if t is None else t[:, -1:] for t in pending)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
