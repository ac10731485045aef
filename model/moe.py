"""Mixture of experts: score- or hash-routed gate, routed experts, one shared expert (v4_ops §10)."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from .config import ModelConfig


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
        self.ops, self.swiglu_limit = ops, swiglu_limit
        self.w1 = nn.Parameter(torch.zeros(n_experts, inter_dim, dim), requires_grad=False)
        self.w3 = nn.Parameter(torch.zeros(n_experts, inter_dim, dim), requires_grad=False)
        self.w2 = nn.Parameter(torch.zeros(n_experts, dim, inter_dim), requires_grad=False)
        self.w1_scale = self.w3_scale = self.w2_scale = None

    def set_weights(self, name: str, weight: torch.Tensor, scale: torch.Tensor | None) -> None:
        setattr(self, name, nn.Parameter(weight, requires_grad=False))
        setattr(self, f"{name}_scale", scale)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.ops.moe_experts(
            x, weights, ids, self.w1, self.w1_scale, self.w3, self.w3_scale, self.w2, self.w2_scale,
            self.swiglu_limit,
        )


class MoE(nn.Module):
    """``y = sum_k w_k Expert_{id_k}(x) + Shared(x)``."""

    def __init__(self, config: ModelConfig, layer: int, ops: SimpleNamespace):
        super().__init__()
        c = config
        self.gate = Gate(c, layer < c.n_hash_layers, ops)
        self.experts = Experts(c.n_routed_experts, c.dim, c.moe_inter_dim, c.swiglu_limit, ops)
        self.shared_experts = Experts(1, c.dim, c.moe_inter_dim * c.n_shared_experts, c.swiglu_limit, ops)

    def forward(self, x: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """x: [B, S, D], input_ids: [B, S] -> [B, S, D]."""
        flat, ids = x.reshape(-1, x.shape[-1]), input_ids.reshape(-1)
        weights, experts = self.gate(flat, ids)
        y = self.experts(flat, weights, experts)
        ones = torch.ones(flat.shape[0], 1, dtype=torch.float32, device=x.device)
        shared = self.shared_experts(flat, ones, torch.zeros_like(ones, dtype=torch.int32))
        return (y.float() + shared.float()).to(x.dtype).view_as(x)
