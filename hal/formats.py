"""Number-format codecs: FP8 e4m3, e8m0 (ue8m0) scales, FP4 e2m1, Hadamard (v4_ops.md §11).

Every function is pure torch on the input's device, with no host synchronisation.
"""

from __future__ import annotations

import torch

FP8_MAX = 448.0
FP8_AMAX_FLOOR = 1e-4
FP4_MAX = 6.0
FP4_AMAX_FLOOR = 6.0 * 2.0**-126

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
"""Magnitudes of e2m1 codes 0..7; code 8+i is -E2M1_VALUES[i]."""


def ue8m0_ceil(s: torch.Tensor) -> torch.Tensor:
    """Round positive scales up to a power of two, exactly: ``2^ceil(log2 s)`` via frexp.

    ``s = m * 2^e`` with m in [0.5, 1): s is already ``2^(e-1)`` when m == 0.5, else the next power
    of two is ``2^e``.
    """
    mantissa, exponent = torch.frexp(s)
    exponent = torch.where(mantissa == 0.5, exponent - 1, exponent)
    return torch.ldexp(torch.ones_like(s), exponent)


def block_scales(amax: torch.Tensor, qmax: float, floor: float, scale_fmt: str) -> torch.Tensor:
    """fp32 scale per tile: ``max(amax, floor) / qmax``, rounded up to a power of two for ue8m0."""
    s = amax.to(torch.float32).clamp(min=floor) / qmax
    return ue8m0_ceil(s) if scale_fmt == "ue8m0" else s


def decode_scale(scale: torch.Tensor) -> torch.Tensor:
    """Block scales as fp32: fp32/fp64 pass through; e8m0 bytes e become ``2^(e-127)``, 255 is NaN."""
    if scale.dtype in (torch.float32, torch.float64):
        return scale.float() if scale.dtype == torch.float32 else scale
    if scale.dtype == torch.uint8 or str(scale.dtype) == "torch.float8_e8m0fnu":
        exponent = scale.view(torch.uint8).to(torch.float32)
        return torch.where(exponent == 255, torch.nan, torch.exp2(exponent - 127.0))
    raise TypeError(f"unsupported scale dtype {scale.dtype}")


def ue8m0_encode(scale: torch.Tensor) -> torch.Tensor:
    """Power-of-two fp32 scales ``2^k`` -> e8m0 bytes ``k + 127`` (uint8), exactly via frexp."""
    _, exponent = torch.frexp(scale)
    return (exponent + 126).to(torch.uint8)


def _tiles(x: torch.Tensor, tile: int) -> torch.Tensor:
    return x.reshape(*x.shape[:-1], x.shape[-1] // tile, tile)


def fp8_quantize(x: torch.Tensor, tile: int, scale_fmt: str = "ue8m0") -> tuple[torch.Tensor, torch.Tensor]:
    """x: [..., K] -> (e4m3 [..., K], fp32 scales [..., K/tile]); see the fp8_act_quant spec."""
    xt = _tiles(x.to(torch.float32), tile)
    scale = block_scales(xt.abs().amax(dim=-1), FP8_MAX, FP8_AMAX_FLOOR, scale_fmt)
    q = (xt / scale.unsqueeze(-1)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.reshape(x.shape), scale


def fp8_dequantize(q: torch.Tensor, scale: torch.Tensor, tile: int, dtype=torch.float32) -> torch.Tensor:
    """(e4m3 [..., K], scales [..., K/tile]) -> [..., K] in dtype."""
    x = _tiles(q.to(torch.float32), tile) * decode_scale(scale).to(torch.float32).unsqueeze(-1)
    return x.reshape(q.shape).to(dtype)


def e2m1_encode(v: torch.Tensor) -> torch.Tensor:
    """Round values already in [-6, 6] to e2m1 codes (uint8 0..15), nearest, ties to even code.

    Code = sign << 3 | i where E2M1_VALUES[i] is the magnitude; a midpoint between codes i and i+1
    goes to whichever of the two is even. Negative values that round to zero keep the sign (-0).
    """
    magnitude = v.abs()
    code = torch.zeros_like(magnitude, dtype=torch.uint8)
    for i in range(len(E2M1_VALUES) - 1):
        mid = (E2M1_VALUES[i] + E2M1_VALUES[i + 1]) / 2
        up = magnitude > mid if (i + 1) % 2 else magnitude >= mid
        code += up.to(torch.uint8)
    sign = torch.signbit(v).to(torch.uint8) << 3
    return code | sign


def e2m1_decode(code: torch.Tensor) -> torch.Tensor:
    """e2m1 codes (uint8 0..15) -> fp32 values."""
    table = torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES), dtype=torch.float32, device=code.device)
    return table[code.long()]


def fp4_pack(code: torch.Tensor) -> torch.Tensor:
    """[..., K] codes -> [..., K/2] bytes, element 2i in the low nibble."""
    return code[..., 0::2] | (code[..., 1::2] << 4)


def fp4_unpack(packed: torch.Tensor) -> torch.Tensor:
    """[..., K/2] bytes -> [..., K] codes."""
    low, high = packed & 0x0F, packed >> 4
    return torch.stack((low, high), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def fp4_quantize(x: torch.Tensor, tile: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [..., K] -> (packed codes [..., K/2] uint8, fp32 power-of-two scales [..., K/tile])."""
    xt = _tiles(x.to(torch.float32), tile)
    scale = block_scales(xt.abs().amax(dim=-1), FP4_MAX, FP4_AMAX_FLOOR, "ue8m0")
    code = e2m1_encode((xt / scale.unsqueeze(-1)).clamp(-FP4_MAX, FP4_MAX))
    return fp4_pack(code.reshape(x.shape)), scale


def fp4_dequantize(packed: torch.Tensor, scale: torch.Tensor, tile: int = 32, dtype=torch.float32) -> torch.Tensor:
    """(packed [..., K/2], scales [..., K/tile]) -> [..., K] in dtype."""
    values = e2m1_decode(fp4_unpack(packed))
    x = _tiles(values, tile) * decode_scale(scale).to(torch.float32).unsqueeze(-1)
    return x.reshape(values.shape).to(dtype)


def fp8_quant_dequant(x: torch.Tensor, tile: int) -> torch.Tensor:
    """The stored precision of an FP8-cached vector part: quantise then decode, in x's dtype."""
    q, s = fp8_quantize(x, tile)
    return fp8_dequantize(q, s, tile, x.dtype)


def fp4_quant_dequant(x: torch.Tensor, tile: int = 32) -> torch.Tensor:
    """The stored precision of an FP4-simulated vector (indexer q and keys), in x's dtype."""
    packed, s = fp4_quantize(x, tile)
    return fp4_dequantize(packed, s, tile, x.dtype)


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal Sylvester Hadamard rotation of the last dim (a power of two): ``x @ H / sqrt(n)``.

    fp32 math (fp64 when x is fp64), output in x's dtype.
    """
    n = x.shape[-1]
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    h = torch.ones(1, 1, dtype=dtype, device=x.device)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return (x.to(dtype) @ h * n**-0.5).to(x.dtype)


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype a reference kernel computes in: float64 if any input is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def dequantize_weight(weight: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A stored weight [rows, cols] as floats: FP8 e4m3 with [ceil(rows/128), cols/128] block
    scales, packed FP4 e2m1 [rows, cols/2] with [rows, cols/32] scales, or dense (cast only)."""
    if weight.dtype == torch.float8_e4m3fn:
        rows = weight.shape[-2]
        row_scales = decode_scale(scale).repeat_interleave(128, dim=-2)[..., :rows, :]
        return fp8_dequantize(weight, row_scales, 128, dtype)
    if weight.dtype == torch.uint8:
        return fp4_dequantize(weight, scale, 32, dtype)
    return weight.to(dtype)
