"""Plain building blocks: RMSNorm and a Linear that holds dense, FP8 or FP4 weights.

Dense math is ordinary device-agnostic PyTorch; quantised weights go through the plan's ops.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from seahal.hal.formats import dequantize_weight


class RMSNorm(nn.Module):
    """``x * rsqrt(mean(x^2) + eps) * weight`` over the last dim: the plan's ``rms_norm`` op."""

    def __init__(self, dim: int, eps: float, ops: SimpleNamespace):
        super().__init__()
        self.eps, self.ops = eps, ops
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps)


class Linear(nn.Module):
    """``y = x W^T`` for W [out, in] stored dense (bf16/fp32), FP8 e4m3 with 128x128 block scales
    (``scale``: [ceil(out/128), in/128]) or FP4 e2m1 (uint8 [out, in/2], ``scale``: [out, in/32]).

    Quantised weights quantise x to FP8 in 1x128 tiles first (``fp8_act_quant``), as the official
    inference code does, then run ``fp8_gemm`` / ``fp4_gemm``; the output takes x's dtype.
    ``dense_only`` weights are dequantised when installed (the official code does so for wo_a,
    which is used as a grouped einsum rather than a GEMM).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        ops: SimpleNamespace,
        dtype: torch.dtype = torch.float32,
        dense_only: bool = False,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.ops, self.dense_only = ops, dense_only
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=dtype), requires_grad=False)
        self.register_buffer("scale", None, persistent=False)

    def set_weight(self, weight: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> None:
        """Install a checkpoint weight in its own format (shapes are checked by the loader);
        dense weights, and every weight of a ``dense_only`` layer, are stored in ``dtype``."""
        if self.dense_only or scale is None:
            weight, scale = dequantize_weight(weight, scale, dtype), None
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.scale = scale

    @property
    def format(self) -> str:
        if self.weight.dtype == torch.float8_e4m3fn:
            return "fp8"
        return "fp4" if self.weight.dtype == torch.uint8 else "dense"

    def forward(self, x: torch.Tensor, quantized: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """``quantized``: x's ``fp8_act_quant`` (:func:`quantize_shared_input`), when linears
        sharing x quantise it once."""
        if self.format == "dense":
            return nn.functional.linear(x, self.weight.to(x.dtype))
        q, s = quantized if quantized is not None else self.ops.fp8_act_quant(x.reshape(-1, self.in_features))
        gemm = self.ops.fp8_gemm if self.format == "fp8" else self.ops.fp4_gemm
        out_dtype = torch.float32 if x.dtype == torch.float32 else torch.bfloat16
        y = gemm(q, s, self.weight, self.scale, out_dtype)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


def quantize_shared_input(x: torch.Tensor, *linears: Linear) -> tuple[torch.Tensor, torch.Tensor] | None:
    """x [..., in] quantised once for ``linears`` that all take it (``Linear.forward(x, quantized)``):
    its FP8 1x128 tiles when every one holds FP8/FP4 weights, else None (each does its own)."""
    if not linears or any(linear.format == "dense" for linear in linears):
        return None
    return linears[0].ops.fp8_act_quant(x.reshape(-1, linears[0].in_features))


class Head(nn.Module):
    """Output head: fp32 logits ``x W^T`` (v4_ops §13) through the plan's ``fp32_linear``.

    W keeps the checkpoint's bf16 (or fp32): both widen exactly, so the logits are the official
    fp32 computation's while a decode step streams half the bytes of an fp32 copy.
    """

    STORED = (torch.bfloat16, torch.float32)
    """Weight dtypes kept as they are (both widen exactly); others are held in fp32."""

    def __init__(self, dim: int, vocab: int, ops: SimpleNamespace, dtype: torch.dtype):
        super().__init__()
        self.ops = ops
        dtype = dtype if dtype in self.STORED else torch.float32
        self.weight = nn.Parameter(torch.zeros(vocab, dim, dtype=dtype), requires_grad=False)

    def set_weight(self, weight: torch.Tensor) -> None:
        """Install a checkpoint weight: bf16 and fp32 as they are, other dtypes converted to fp32."""
        self.weight = nn.Parameter(weight if weight.dtype in self.STORED else weight.float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., D] -> logits [..., V] fp32 (a float64 model's x is rounded to fp32 first, as the
        official head's ``x.float()`` does)."""
        return self.ops.fp32_linear(x if x.dtype in self.STORED else x.float(), self.weight)
