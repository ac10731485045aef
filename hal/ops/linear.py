"""Linear layers the official code computes in fp32 over bf16 checkpoint weights: the output head
(v4_ops.md §13) and the compressors' wkv / wgate projections (§7, §11)."""

from __future__ import annotations

import torch

from ..checks import FLOAT_HIGH, Contract
from ..spec import Out, define_op


@define_op("fp32_linear", family="linear", schema="(Tensor x, Tensor weight) -> Tensor")
def fp32_linear(x, weight):
    """``x @ weight^T`` computed in fp32 (fp64 when x or weight is fp64).

    x: [..., D] bf16/fp32/fp64, weight: [N, D] bf16/fp32/fp64 -> [..., N] fp32 (fp64).

    Both operands are widened (exactly) before the products, which are summed in fp32: the
    official ``F.linear(x.float(), W)`` with W held in fp32, for a W kept as the checkpoint's bf16
    (no fp32 copy: half the bytes a decode step streams, no widening pass per call).
    """
    c = Contract("fp32_linear")
    c.tensor("x", x, None, FLOAT_HIGH, min_rank=1)
    c.dims["D"] = x.shape[-1]
    c.tensor("weight", weight, ["N", "D"], FLOAT_HIGH)
    dtype = torch.float64 if torch.float64 in (x.dtype, weight.dtype) else torch.float32
    return Out((*x.shape[:-1], c.dims["N"]), dtype)
