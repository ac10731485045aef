"""Linear layers outside the quantised GEMMs: fp32 math over bf16 checkpoint weights (the output head,
v4_ops.md §13, and the compressors' wkv / wgate projections, §7, §11), and the attention's grouped
output projection over a dequantised weight (§8)."""

from __future__ import annotations

import torch

from ..checks import FLOAT_HIGH, FP8, SCALES, Contract, describe, dtype_name
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


@define_op("grouped_linear", family="linear", schema="(Tensor x, Tensor weight, Tensor? scale=None) -> Tensor")
def grouped_linear(x, weight, scale=None):
    """A block-diagonal linear layer over G groups, the weight dequantised and the activations not:
    the attention's grouped output projection ``wo_a`` (v4_ops.md §8 step 6).

    x: [..., G, I] bf16/fp32/fp64; weight: [G*R, I] FP8 e4m3 with scale [ceil(G*R/128), I/128]
    fp32 or e8m0 (128x128 blocks), or dense bf16/fp32/fp64 with scale None -> [..., G, R] in x's
    dtype. Rows g*R ... g*R + R - 1 of the weight are group g's.

    ``W' = dequant(weight, scale)`` rounded to x's dtype (what the official code installs: the FP8
    checkpoint weight dequantised to bf16), then
    ``out[..., g, r] = sum_i x[..., g, i] W'[g*R + r, i]`` with fp32 sums (fp64 for fp64 x),
    rounded to x's dtype. Keeping the FP8 weight halves the bytes a decode step streams and the
    memory wo_a holds, with the official code's products.
    """
    c = Contract("grouped_linear")
    c.tensor("x", x, None, FLOAT_HIGH, min_rank=2)
    c.dims["G"], c.dims["I"] = x.shape[-2], x.shape[-1]
    fp8 = isinstance(weight, torch.Tensor) and weight.dtype in FP8
    c.tensor("weight", weight, ["GR", "I"], FP8 if fp8 else FLOAT_HIGH)
    c.divisible("GR", c.dims["G"], "the weight's rows are G groups of R")
    if fp8:
        c.divisible("I", 128, "weight uses 128x128 blocks")
        c.tensor("scale", scale, [-(-c.dims["GR"] // 128), c.dims["I"] // 128], SCALES)
    elif scale is not None:
        got = describe(scale) if isinstance(scale, torch.Tensor) else repr(scale)
        raise c.fail(f"scale must be None for {dtype_name(weight.dtype)} weights, got {got}")
    return Out((*x.shape[:-1], c.dims["GR"] // c.dims["G"]), x.dtype)
