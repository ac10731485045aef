"""Plain building blocks: RMSNorm and a Linear that holds dense, FP8 or FP4 weights.

Dense math is ordinary device-agnostic PyTorch; quantised weights go through the plan's ops.
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import torch
from torch import nn


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

    Quantised weights quantise x to FP8 in 1x128 tiles first, as the official inference code does,
    then run the GEMM of their format: one ``act_quant_gemm`` (``fp8_gemm`` / ``fp4_gemm`` on
    ``fp8_act_quant``'s tiles, which a kernel may form inside the GEMM); the output takes x's dtype.
    ``reader`` names the op that reads a quantised weight where it is not one of those (the
    attention's wo_a, read by ``grouped_linear``): the key of a plan's ``weight_conversions``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        ops: SimpleNamespace,
        dtype: torch.dtype = torch.float32,
        reader: str | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.ops, self.reader = ops, reader
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=dtype), requires_grad=False)
        self.register_buffer("scale", None, persistent=False)

    def set_weight(self, weight: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> None:
        """Install a checkpoint weight in its own format (shapes are checked by the loader);
        dense weights are stored in ``dtype``."""
        if scale is None:
            weight = weight.to(dtype)
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.scale = scale

    @property
    def format(self) -> str:
        return weight_format(self.weight)

    def forward(self, x: torch.Tensor, quantized: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """``quantized``: x's ``fp8_act_quant`` (:func:`quantize_shared_input`), when linears
        sharing x quantise it once."""
        return linear(x, self.weight, self.scale, self.ops, quantized)


def weight_format(weight: torch.Tensor) -> str:
    """"fp8" (e4m3), "fp4" (packed e2m1 bytes) or "dense", as :class:`Linear` holds a weight."""
    if weight.dtype == torch.float8_e4m3fn:
        return "fp8"
    return "fp4" if weight.dtype == torch.uint8 else "dense"


def linear(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, ops: SimpleNamespace,
    quantized: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """x [..., in] W^T -> [..., out] in x's dtype, for W [out, in] in any of :class:`Linear`'s formats."""
    fmt = weight_format(weight)
    if fmt == "dense":
        return nn.functional.linear(x, weight.to(x.dtype))
    out_dtype = torch.float32 if x.dtype == torch.float32 else torch.bfloat16
    if quantized is None:
        y = ops.act_quant_gemm(x.reshape(-1, x.shape[-1]), weight, scale, out_dtype)
    else:
        y = (ops.fp8_gemm if fmt == "fp8" else ops.fp4_gemm)(*quantized, weight, scale, out_dtype)
    return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


def _traced() -> bool:
    """Whether this call is being traced by ``torch.compile`` or ``torch.export``."""
    return torch.compiler.is_compiling() or getattr(torch.compiler, "is_exporting", lambda: False)()


class StackedLinears:
    """Linears that take one input, multiplied as one: their weights stacked into one [sum of
    outs, in] matrix (FP8 block scales and FP4 group scales likewise), each Linear's weight and
    scale then views into it, so nothing is held twice. One GEMM launch instead of one a Linear,
    with all their rows to spread over the GPU; each output column is still its own weight row's
    product. Stacked on first use, and again after a Linear's weight was replaced (a load,
    ``to()``). Linears that cannot share a matrix (formats or dtypes that differ, an FP8 block of
    128 weight rows that would straddle two of them) run one by one, and so do traces
    (``torch.export``, ``torch.compile``): stacking rebinds the Linears' weights, which a trace must
    not do to the module it traces.
    """

    def __init__(self, *linears: Linear):
        self.linears = linears
        self.sizes = [lin.out_features for lin in linears]
        self._stacked: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._views: list[tuple[int, int | None]] = []
        """The (weight, scale) data pointers each Linear had when stacked."""

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``tuple(lin(x) for lin in linears)``: one product where they stack, else one each over
        x's FP8 tiles made once (:func:`quantize_shared_input`)."""
        stacked = self.weights()
        if stacked is None:
            quantized = quantize_shared_input(x, *self.linears)
            return tuple(lin(x, quantized) for lin in self.linears)
        return linear(x, *stacked, self.linears[0].ops).split(self.sizes, dim=-1)

    def weights(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(stacked weight, stacked scale or None), or None where the Linears cannot share a matrix."""
        if _traced():
            return None
        if self._stacked is not None and self._pointers() == self._views:
            return self._stacked
        weights = [lin.weight for lin in self.linears]
        scales = [lin.scale for lin in self.linears]
        fmt = weight_format(weights[0])
        if len({(w.dtype, w.device, w.shape[1]) for w in weights}) > 1 or any(weight_format(w) != fmt for w in weights) \
                or len({None if s is None else s.dtype for s in scales}) > 1:
            return None
        if fmt == "fp8" and any(size % 128 for size in self.sizes[:-1]):
            return None
        weight = torch.cat(weights)
        scale = None if scales[0] is None else torch.cat(scales)
        rows = [0, *itertools.accumulate(self.sizes)]
        scale_rows = rows if fmt != "fp8" else [-(-r // 128) for r in rows]
        for i, lin in enumerate(self.linears):
            lin.weight = nn.Parameter(weight[rows[i]:rows[i + 1]], requires_grad=False)
            if scale is not None:
                lin.scale = scale[scale_rows[i]:scale_rows[i + 1]]
        self._stacked, self._views = (weight, scale), self._pointers()
        return self._stacked

    def _pointers(self) -> list[tuple[int, int | None]]:
        return [(lin.weight.data_ptr(), None if lin.scale is None else lin.scale.data_ptr()) for lin in self.linears]


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
