"""Native CPU fast paths from ``seahal._native`` (C++17, pybind11, OpenMP).

The C++ functions take raw data pointers and sizes, so the extension depends on pybind11 only;
this module is the thin, typed wrapper: it checks the call against the op's contract, makes the
inputs contiguous, allocates the output and hands the pointers over. Weights and their scales
are read as stored (1 byte per FP8 weight, half a byte per FP4 weight, fp32 or e8m0 scales),
never expanded to a float copy.
"""

from __future__ import annotations

from types import ModuleType

import torch

from seahal.hal import get_spec, register_kernel

from .reference.linear import grouped_linear as reference_grouped_linear
from .reference.quant import fp8_act_quant

_SCALES = ("float32", "float8_e8m0fnu")
_GEMM_CAPABILITIES = {"out_dtype": ("bfloat16", "float32"), "scale_dtype": _SCALES}
_CODEC_FORMATS = ("e4m3", "e8m0", "e2m1")


def native_module() -> ModuleType | None:
    """``seahal._native``, or None when the package was not built with it."""
    try:
        from seahal import _native
    except ImportError:
        return None
    return _native


def _native() -> ModuleType:
    module = native_module()
    if module is None:
        raise RuntimeError("seahal._native is not built: reinstall seahal with a C++17 compiler (pip install -e .)")
    return module


def check_cpu_tensors(op: str, *tensors: torch.Tensor | None) -> None:
    """Raise unless every tensor given (None: an absent optional) is on the CPU, naming ``op``."""
    devices = {t.device.type for t in tensors if t is not None}
    if devices != {"cpu"}:
        raise ValueError(f"{op} (native cpu kernel) needs cpu tensors, got {sorted(devices)}")


def _block_scaled_gemm(op: str, a, a_scale, b, b_scale, out_dtype) -> torch.Tensor:
    """Check the call against ``op``'s contract, then run the native kernel of the same op."""
    meta = get_spec(op).check(a, a_scale, b, b_scale, out_dtype)
    check_cpu_tensors(op, a, a_scale, b, b_scale)
    kernel = _native().fp8_block_gemm if op == "fp8_gemm" else _native().fp4_gemm
    out = torch.empty(meta.shape, dtype=meta.dtype)
    a, a_scale, b, b_scale = (t.contiguous() for t in (a, a_scale, b, b_scale))
    e8m0 = b_scale.dtype != torch.float32
    m, k = a.shape
    kernel(
        a.data_ptr(), a_scale.data_ptr(), b.data_ptr(), b_scale.data_ptr(), e8m0, out.data_ptr(),
        m, out.shape[1], k, out.dtype == torch.bfloat16, torch.get_num_threads(),
    )  # fmt: skip
    return out


def fp8_gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, out_dtype=None):
    """FP8 block-scaled GEMM ``C = (A sA) @ (B sB)^T`` with fp32 accumulation per 128-wide K block.

    a: [M, K] e4m3, a_scale: [M, K/128] fp32, b: [N, K] e4m3, b_scale: [ceil(N/128), K/128]
    fp32 or e8m0 -> [M, N] bf16 (or out_dtype fp32).

    ``C[m, n] = sum_kb (sum_{k in kb} A[m, k] B[n, k]) * sA[m, kb] * sB[n // 128, kb]``, the
    same fp32 arithmetic as the reference up to summation order (csrc/gemm.cpp).
    """
    return _block_scaled_gemm("fp8_gemm", a, a_scale, b, b_scale, out_dtype)


def fp4_gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, out_dtype=None):
    """FP8 x FP4 GEMM ``C = (A sA) @ (e2m1(B) sB)^T`` accumulated in fp32.

    a: [M, K] e4m3, a_scale: [M, K/128] fp32, b: [N, K/2] uint8 packed e2m1 (low nibble first),
    b_scale: [N, K/32] fp32 or e8m0 -> [M, N] bf16 (or out_dtype fp32).

    ``C[m, n] = sum_kb (sum_{k in kb} A[m, k] e2m1(B[n, k]) sB[n, k/32]) * sA[m, kb]``: the weight
    scale is applied while decoding, exact for e8m0 scales, so the result equals the reference's
    per-32-step sums up to summation order (csrc/gemm.cpp).
    """
    return _block_scaled_gemm("fp4_gemm", a, a_scale, b, b_scale, out_dtype)


def act_quant_gemm(x: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, out_dtype=None) -> torch.Tensor:
    """x's FP8 1x128 tiles (the reference ``fp8_act_quant``) through the native GEMM of b's format:
    :func:`fp8_gemm` for e4m3 b [N, K], :func:`fp4_gemm` for packed e2m1 b [N, K/2] -> [M, N]."""
    op = "fp4_gemm" if b.dtype == torch.uint8 else "fp8_gemm"
    return _block_scaled_gemm(op, *fp8_act_quant(x), b, b_scale, out_dtype)


GROUPED_GEMV_MAX_TOKENS = 8
"""Up to this many tokens ``grouped_linear`` multiplies the FP8 bytes directly (csrc/gemm.cpp)."""


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Per group g, ``x[..., g, :] @ W'_g^T`` with W' the weight dequantised and rounded to x's dtype.

    x: [..., G, I] bf16/fp32, weight: [G*R, I] e4m3 with [ceil(G*R/128), I/128] fp32 or e8m0
    scales -> [..., G, R] in x's dtype. Up to :data:`GROUPED_GEMV_MAX_TOKENS` tokens the weight's
    bytes are decoded row by row into every token's fp32 lanes (read once, never expanded); more
    tokens dequantise it natively to x's dtype, a group at a time, for torch's GEMM. Dense weights and
    fp64 x run the reference. The same W' and fp32 sums as the reference, in another order.

    V4-Flash's wo_a (8192 x 4096, e8m0 scales, bf16 x) on 2 cores (``seahal bench --backend cpu
    --ops grouped_linear``): 4.0 / 11.4 / 28 ms at 1 / 16 / 128 tokens, against 4.8 / 6.1 / 23 ms
    for the einsum over the weight dequantised to bf16 at load (twice the memory) and ~200 ms for
    the reference, which dequantises it on every call. The GEMV and the per-group GEMM cross near
    8 tokens (5-7 ms each); dequantising the whole W' at once took 44 ms at 64 tokens, most of it
    faulting in a fresh 64 MB (:func:`_grouped_linear_by_group`).
    """
    get_spec("grouped_linear").check(x, weight, scale)
    if weight.dtype != torch.float8_e4m3fn or x.dtype == torch.float64:
        return reference_grouped_linear(x, weight, scale)
    check_cpu_tensors("grouped_linear", x, weight, scale)
    g, i = x.shape[-2:]
    n = weight.shape[0]
    weight, scale = weight.contiguous(), scale.contiguous()
    tokens = x.reshape(-1, g, i)
    if tokens.shape[0] > GROUPED_GEMV_MAX_TOKENS or tokens.shape[0] == 0:
        return _grouped_linear_by_group(x, weight, scale)
    tokens = tokens if tokens.stride(-1) == 1 else tokens.contiguous()
    e8m0, bf16 = scale.dtype != torch.float32, x.dtype == torch.bfloat16
    out = torch.empty((tokens.shape[0], n), dtype=x.dtype)
    _native().fp8_grouped_gemv(
        tokens.data_ptr(), tokens.stride(0), tokens.stride(1), bf16, weight.data_ptr(), scale.data_ptr(), e8m0,
        out.data_ptr(), tokens.shape[0], n, i, n // g, torch.get_num_threads(),
    )
    return out.view(*x.shape[:-1], n // g)


def _grouped_linear_by_group(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``grouped_linear`` one group at a time: W'_g dequantised natively into one [R, I] buffer in
    x's dtype, then ``x[..., g, :] @ W'_g^T`` (torch's GEMM, fp32 sums). The buffer is 1/G of the
    dequantised weight and reused by every group (and, through the allocator, by the next call),
    where a whole W' would be a fresh allocation (V4-Flash's 64 MB: past malloc's reuse) faulted in
    on every call. Groups whose rows do not start on a 128-row scale block dequantise it whole."""
    g, i = x.shape[-2:]
    r = weight.shape[0] // g
    if r % 128:
        return reference_grouped_linear(x, _dequantize_into(torch.empty(weight.shape, dtype=x.dtype), weight, scale))
    dense = torch.empty((r, i), dtype=x.dtype)
    per_group = [x[..., group, :] @ _dequantize_into(dense, weight[group * r:], scale[group * r // 128:]).T
                 for group in range(g)]  # each product made before the next group overwrites the buffer
    return torch.stack(per_group, dim=-2)


def _dequantize_into(dense: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``dense`` [rows, I] (bf16 or fp32) <- the first rows of the FP8 ``weight`` [>= rows, I]
    dequantised, ``scale`` its block scales from the row's block on (contiguous, as both are)."""
    rows, i = dense.shape
    _native().fp8_dequantize(weight.data_ptr(), scale.data_ptr(), scale.dtype != torch.float32, dense.data_ptr(),
                             rows, i, dense.dtype == torch.bfloat16, torch.get_num_threads())
    return dense


def encode(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """fp32 values -> one code byte each (uint8, same shape) in ``fmt``: e4m3, e8m0 or e2m1.

    e4m3: round to nearest even, saturating at ±448, NaN kept; e8m0: as ``torch.float8_e8m0fnu``;
    e2m1: nearest with ties to the even code, saturating at ±6, the sign kept (code 0..15).
    """
    return _codec(fmt, "encode", x.to(torch.float32).contiguous(), torch.uint8)


def decode(codes: torch.Tensor, fmt: str) -> torch.Tensor:
    """Code bytes (uint8, or the float8 dtype viewed as bytes) in ``fmt`` -> fp32 values, same shape."""
    return _codec(fmt, "decode", codes.contiguous().view(torch.uint8), torch.float32)


def _codec(fmt: str, direction: str, src: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    if fmt not in _CODEC_FORMATS:
        raise ValueError(f"fmt must be one of {_CODEC_FORMATS}, got {fmt!r}")
    if src.device.type != "cpu":
        raise ValueError(f"native codecs need a cpu tensor, got {src.device}")
    out = torch.empty(src.shape, dtype=out_dtype)
    getattr(_native(), f"{fmt}_{direction}")(src.data_ptr(), out.data_ptr(), src.numel())
    return out


def register_native_kernels() -> None:
    """Register the native kernels above the reference (priority 10) when the module is built."""
    if native_module() is None:
        return
    for op in ("fp8_gemm", "fp4_gemm"):
        register_kernel(
            op, "cpu", "native", f"{__name__}:{op}", priority=10, capabilities=_GEMM_CAPABILITIES
        )  # fmt: skip
    register_kernel(
        "act_quant_gemm", "cpu", "native", f"{__name__}:act_quant_gemm", priority=10,
        capabilities={"dtype": ("bfloat16", "float32", "float64"), "weight_format": ("fp8", "fp4"), **_GEMM_CAPABILITIES},
    )
    register_kernel(
        "grouped_linear", "cpu", "native", f"{__name__}:grouped_linear", priority=10,
        capabilities={"dtype": ("bfloat16", "float32"), "weight_format": ("fp8",), "scale_dtype": _SCALES},
    )
    register_kernel(
        "moe_experts", "cpu", "native", "seahal.backends.cpu.native_moe:moe_experts", priority=10,
        capabilities={"dtype": ("bfloat16", "float32"), "weight_format": ("fp8", "fp4"), "scale_dtype": _SCALES},
    )
