"""Block-scaled quantised GEMMs: FP8 x FP8 (1x128 / 128x128) and FP8 x FP4 (1x128 / 1x32)."""

from __future__ import annotations

import torch

from ..checks import FLOAT_HIGH, FP8, SCALES, Contract
from ..spec import Out, define_op

OUT_DTYPES = (torch.bfloat16, torch.float32)


def _out_dtype(c: Contract, out_dtype: torch.dtype | None) -> torch.dtype:
    dtype = torch.bfloat16 if out_dtype is None else out_dtype
    c.choice("out_dtype", dtype, OUT_DTYPES)
    return dtype


def _activation(c: Contract, a: torch.Tensor, a_scale: torch.Tensor) -> None:
    c.tensor("a", a, ["M", "K"], FP8)
    c.divisible("K", 128, "1x128 activation tiles")
    c.tensor("a_scale", a_scale, ["M", c.dims["K"] // 128], (torch.float32,))


def _fp8_weights(c: Contract, b: torch.Tensor, b_scale: torch.Tensor) -> None:
    c.tensor("b", b, ["N", "K"], FP8)
    n_blocks = -(-c.dims["N"] // 128)
    c.tensor("b_scale", b_scale, [n_blocks, c.dims["K"] // 128], SCALES)


def _fp4_weights(c: Contract, b: torch.Tensor, b_scale: torch.Tensor) -> None:
    c.tensor("b", b, ["N", c.dims["K"] // 2], (torch.uint8,))
    c.tensor("b_scale", b_scale, ["N", c.dims["K"] // 32], SCALES)


def _quantised_product(op: str, a, a_scale, b, b_scale, out_dtype, weights) -> Out:
    """The contract of a GEMM of FP8 activations ``a`` [M, K] with ``weights``' format: C [M, N]."""
    c = Contract(op)
    _activation(c, a, a_scale)
    weights(c, b, b_scale)
    return Out((c.dims["M"], c.dims["N"]), _out_dtype(c, out_dtype))


@define_op(
    "fp8_gemm",
    family="gemm",
    schema="(Tensor a, Tensor a_scale, Tensor b, Tensor b_scale, ScalarType? out_dtype=None) -> Tensor",
)
def fp8_gemm(a, a_scale, b, b_scale, out_dtype=None):
    """FP8 block-scaled GEMM ``C = (A * sA) @ (B * sB)^T`` with fp32 accumulation per K block.

    a: [M, K] e4m3, a_scale: [M, K/128] fp32 (1x128 tiles),
    b: [N, K] e4m3, b_scale: [ceil(N/128), K/128] fp32 or e8m0 (128x128 blocks)
    -> [M, N] bf16 (or out_dtype fp32).

    ``C[m, n] = sum_kb sA[m, kb] * sB[n // 128, kb] * sum_{k in kb} A[m, k] * B[n, k]``
    """
    return _quantised_product("fp8_gemm", a, a_scale, b, b_scale, out_dtype, _fp8_weights)


@define_op(
    "fp4_gemm",
    family="gemm",
    schema="(Tensor a, Tensor a_scale, Tensor b, Tensor b_scale, ScalarType? out_dtype=None) -> Tensor",
)
def fp4_gemm(a, a_scale, b, b_scale, out_dtype=None):
    """FP8 x FP4 GEMM: activations e4m3 (1x128 scales), weights e2m1 packed (1x32 e8m0 scales).

    a: [M, K] e4m3, a_scale: [M, K/128] fp32,
    b: [N, K/2] uint8 (two e2m1 codes per byte, low nibble first), b_scale: [N, K/32] e8m0, or
    fp32 holding the same powers of two (FP4 block scales are ue8m0 by definition, §11.4;
    kernels may rely on ``e2m1 * scale`` being exact in bf16)
    -> [M, N] bf16 (or fp32).

    ``C[m, n] = sum_k A[m, k] sA[m, k/128] * e2m1(B[n, k]) sB[n, k/32]`` accumulated in fp32.
    """
    return _quantised_product("fp4_gemm", a, a_scale, b, b_scale, out_dtype, _fp4_weights)


@define_op(
    "act_quant_gemm",
    family="gemm",
    schema="(Tensor x, Tensor b, Tensor b_scale, ScalarType? out_dtype=None) -> Tensor",
)
def act_quant_gemm(x, b, b_scale, out_dtype=None):
    """A linear layer on quantised weights: x quantised to FP8 in 1x128 tiles with ue8m0 scales,
    then the block-scaled GEMM of b's format (the official inference code's ``linear``).

    x: [M, K] bf16/fp16/fp32/fp64, K a multiple of 128;
    b: [N, K] e4m3 with b_scale [ceil(N/128), K/128] (``fp8_gemm``'s weights), or [N, K/2] uint8
    packed e2m1 with b_scale [N, K/32] (``fp4_gemm``'s); b_scale fp32 or e8m0
    -> [M, N] bf16 (or out_dtype fp32).

    ``C = fp8_gemm(*fp8_act_quant(x), b, b_scale, out_dtype)`` for e4m3 weights,
    ``fp4_gemm(*fp8_act_quant(x), b, b_scale, out_dtype)`` for e2m1 ones: the activations' codes
    and scales are ``fp8_act_quant``'s exactly, so a kernel may quantise x inside the GEMM (no
    round trip of the codes through memory) but not differently.
    """
    c = Contract("act_quant_gemm")
    c.tensor("x", x, ["M", "K"], FLOAT_HIGH + (torch.float16,))
    c.divisible("K", 128, "1x128 activation tiles")
    c.tensor("b", b, dtypes=FP8 + (torch.uint8,))
    (_fp4_weights if b.dtype == torch.uint8 else _fp8_weights)(c, b, b_scale)
    return Out((c.dims["M"], c.dims["N"]), _out_dtype(c, out_dtype))
