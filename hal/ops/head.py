"""The output head: fp32 logits from the final normalised hidden state (v4_ops.md §13)."""

from __future__ import annotations

import torch

from ..checks import Contract
from ..spec import Out, define_op

FLOATS = (torch.bfloat16, torch.float32, torch.float64)


@define_op("head_logits", family="head", schema="(Tensor x, Tensor weight) -> Tensor")
def head_logits(x, weight):
    """Logits ``x @ weight^T`` computed in fp32 (fp64 when x or weight is fp64).

    x: [..., D] bf16/fp32/fp64, weight: [V, D] bf16/fp32/fp64 -> [..., V] fp32 (fp64).

    Both operands are widened (exactly) before the products, which are summed in fp32: the
    official ``F.linear(x.float(), W)`` with W held in fp32, for a W stored as the checkpoint's
    bf16 (half the bytes a decode step streams).
    """
    c = Contract("head_logits")
    c.tensor("x", x, None, FLOATS, min_rank=1)
    c.dims["D"] = x.shape[-1]
    c.tensor("weight", weight, ["V", "D"], FLOATS)
    dtype = torch.float64 if torch.float64 in (x.dtype, weight.dtype) else torch.float32
    return Out((*x.shape[:-1], c.dims["V"]), dtype)
