"""Mixture of experts: score- or hash-routed gate, routed experts, one shared expert (v4_ops §10).

Expert parallel: each EP rank holds ``E / ep`` consecutive experts; tokens reach them by
all-to-all (each (token, expert) pair sent to the expert's rank and its output sent back) or, for
small batches, by running every rank's experts on every token of the EP group and reducing the
partial sums. Tensor parallel: every expert's (and the shared expert's) intermediate dimension is
split over the TP group and the partial outputs are all-reduced.

The shared expert does not depend on the gate or the routed experts: with ``SEAHAL_SIDE_STREAM=1``
it runs on a side stream beside them (:func:`seahal.hal.streams.side_by_side`; the same kernels,
the same bits).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from seahal.hal.streams import side_by_side

from .config import ModelConfig
from .parallel import SINGLE_PROCESS, Parallel, TokenLayout, pad_rows, split_sizes


class Gate(nn.Module):
    """``weight: [E, D]``; score layers carry ``bias: [E]``, hash layers ``tid2eid: [vocab, k]``."""

    def __init__(self, config: ModelConfig, hashed: bool, ops: SimpleNamespace):
        super().__init__()
        self.config, self.hashed, self.ops = config, hashed, ops
        self.weight = nn.Parameter(torch.zeros(config.n_routed_experts, config.dim), requires_grad=False)
        if hashed:
            table = torch.zeros(config.vocab_size, config.n_activated_experts, dtype=torch.int32)
            self.register_buffer("tid2eid", table)
            self.bias = None
        else:
            self.bias = nn.Parameter(torch.zeros(config.n_routed_experts), requires_grad=False)
            self.tid2eid = None

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [T, D], input_ids: [T] -> (weights [T, k] fp32, expert ids [T, k] int32)."""
        c = self.config
        return self.ops.moe_gate(
            x, self.weight, self.bias, c.n_activated_experts, c.score_func, c.route_scale,
            c.n_groups, c.topk_groups, input_ids if self.hashed else None, self.tid2eid,
        )


class Experts(nn.Module):
    """Stacked expert weights ``w1, w3: [E, I, D]``, ``w2: [E, D, I]`` (dense, FP8 or FP4 with
    their ``*_scale`` tensors), run by ``moe_experts``."""

    def __init__(self, n_experts: int, dim: int, inter_dim: int, swiglu_limit: float, ops: SimpleNamespace):
        super().__init__()
        self.ops, self.swiglu_limit, self.n_experts = ops, swiglu_limit, n_experts
        self.w1 = nn.Parameter(torch.zeros(n_experts, inter_dim, dim), requires_grad=False)
        self.w3 = nn.Parameter(torch.zeros(n_experts, inter_dim, dim), requires_grad=False)
        self.w2 = nn.Parameter(torch.zeros(n_experts, dim, inter_dim), requires_grad=False)
        for name in ("w1", "w3", "w2"):  # buffers, so they count, move and show like the weights
            self.register_buffer(f"{name}_scale", None)

    def set_weights(self, name: str, weight: torch.Tensor, scale: torch.Tensor | None) -> None:
        setattr(self, name, nn.Parameter(weight, requires_grad=False))
        setattr(self, f"{name}_scale", scale)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x: [T, D], weights: [T, k] fp32, ids: [T, k] local expert ids (-1: none) -> [T, D]."""
        if x.shape[0] == 0:
            return x
        return self.ops.moe_experts(
            x, weights, ids, self.w1, self.w1_scale, self.w3, self.w3_scale, self.w2, self.w2_scale,
            self.swiglu_limit,
        )


class MoE(nn.Module):
    """``y = sum_k w_k Expert_{id_k}(x) + Shared(x)``."""

    def __init__(self, config: ModelConfig, layer: int, ops: SimpleNamespace, parallel: Parallel = SINGLE_PROCESS):
        super().__init__()
        c, p = config, parallel
        self.parallel = p
        self.first_expert = p.ep_range(c.n_routed_experts)[0]
        self.gate = Gate(c, layer < c.n_hash_layers, ops)
        self.experts = Experts(c.n_routed_experts // p.ep, c.dim, c.moe_inter_dim // p.tp, c.swiglu_limit, ops)
        shared_dim = c.moe_inter_dim * c.n_shared_experts // p.tp
        self.shared_experts = Experts(1, c.dim, shared_dim, c.swiglu_limit, ops)
        self.register_buffer("shared_weight", None, persistent=False)
        self.register_buffer("shared_id", None, persistent=False)
        self.make_constants()

    def make_constants(self, device: torch.device | None = None) -> None:
        """Every token's routing to the shared expert (weight 1, local id 0) as [1, 1] tensors the
        forward expands (no fill kernels per step); on ``device``, else the ambient one (a
        meta-built model's loader remakes them on the model's device)."""
        device = device or torch.get_default_device()
        self.shared_weight = torch.ones(1, 1, dtype=torch.float32, device=device)
        self.shared_id = torch.zeros(1, 1, dtype=torch.int32, device=device)

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor, layout: TokenLayout | None = None) -> torch.Tensor:
        """x: [B, S, D], input_ids: [B, S] -> [B, S, D]; ``layout``: where the EP group's tokens
        are (default: the same tokens on every rank)."""
        out, addend = self.parts(x, input_ids, layout)
        return out if addend is None else out + addend

    def parts(
        self, x: torch.Tensor, input_ids: torch.Tensor, layout: TokenLayout | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The output as (routed, shared) [B, S, D] in x's dtype, whose tensor sum is the output (the
        block hands both to ``hc_post``, which adds them as it reads them); where the routed part is
        an fp32 partial sum (expert parallelism) or the sum is all-reduced (tensor parallelism),
        (that fp32 sum rounded once, None)."""
        flat, ids = x.reshape(-1, x.shape[-1]), input_ids.reshape(-1)
        tokens = flat.shape[0]
        y, shared = side_by_side(
            flat.device,
            lambda: self._routed(flat, ids, layout),
            lambda: self.shared_experts(flat, self.shared_weight.expand(tokens, 1), self.shared_id.expand(tokens, 1)),
        )
        if self.parallel.tp > 1:
            return self.parallel.tp_all_reduce(y.float() + shared.float()).to(x.dtype).view_as(x), None
        if y.dtype != x.dtype:  # expert parallelism's fp32 partial sums: the fp32 sum, rounded once
            return (y + shared).to(x.dtype).view_as(x), None
        return y.view_as(x), shared.view_as(x)  # hc_post rounds their fp32 sum once, as torch's add

    def _routed(self, flat: torch.Tensor, ids: torch.Tensor, layout: TokenLayout | None) -> torch.Tensor:
        """The gate and the routed experts over the [T, D] tokens ``flat``."""
        weights, experts = self.gate(flat, ids)
        if self.parallel.ep == 1:
            return self.experts(flat, weights, experts)
        layout = layout or TokenLayout((flat.shape[0],) * self.parallel.ep, False)
        return self._expert_parallel(flat, weights, experts, layout)

    def _expert_parallel(
        self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, layout: TokenLayout
    ) -> torch.Tensor:
        """Routed experts of the whole EP group on this rank's tokens x: [T, D] -> [T, D] fp32."""
        p = self.parallel
        if not p.use_all_to_all(layout):
            return self._gathered(x, weights, ids, layout)
        if layout.distinct:
            return self._all_to_all(x, weights, ids)
        # Every rank holds the same tokens: each dispatches its 1/ep share, then all shares are
        # gathered back (otherwise each pair would be sent ep times).
        sizes = split_sizes(x.shape[0], p.ep)
        start = sum(sizes[: p.ep_rank])
        mine = slice(start, start + sizes[p.ep_rank])
        return p.ep_gather_rows(self._all_to_all(x[mine], weights[mine], ids[mine]), sizes)

    def _local(self, ids: torch.Tensor) -> torch.Tensor:
        """Global expert ids -> this rank's expert index, -1 for experts held elsewhere."""
        local = ids - self.first_expert
        return torch.where((local >= 0) & (local < self.experts.n_experts), local, -1).to(torch.int32)

    def _gathered(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """Small batches: every rank runs its experts on all the group's tokens, partial sums reduced."""
        p = self.parallel
        if not layout.distinct:
            return p.ep_all_reduce(self.experts(x, weights, self._local(ids)).float())
        rows = max(layout.counts)  # equal-size collectives: pad to the largest share
        meta = p.ep_all_gather(pad_rows(torch.cat((weights, ids.float()), dim=1), rows, -1))
        k = weights.shape[1]
        y = self.experts(p.ep_all_gather(pad_rows(x, rows)), meta[:, :k], self._local(meta[:, k:].long()))
        return p.ep_reduce_scatter(y.float())[: x.shape[0]]

    def _all_to_all(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Send each (token, expert) pair to the expert's EP rank, run it there, send the weighted
        output back and sum each token's k outputs: x [T, D] -> [T, D] fp32."""
        p, n = self.parallel, self.experts.n_experts
        k = ids.shape[1]
        dest = ids.reshape(-1).long() // n
        order = torch.argsort(dest, stable=True)
        token = order // k
        send_counts = torch.bincount(dest, minlength=p.ep)
        send, recv = send_counts.tolist(), p.ep_exchange_counts(send_counts).tolist()
        meta = torch.stack((weights.reshape(-1)[order], (ids.reshape(-1)[order] % n).float()), dim=1)
        received = p.ep_all_to_all(x[token], send, recv)
        received_meta = p.ep_all_to_all(meta, send, recv)
        out = self.experts(received, received_meta[:, :1].contiguous(), received_meta[:, 1:].to(torch.int32))
        back = p.ep_all_to_all(out, recv, send)
        y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        return y.index_add_(0, token, back.float())
