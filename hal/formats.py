"""Number-format codecs: FP8 e4m3, e8m0 (ue8m0) scales, FP4 e2m1, packed indexer keys, Hadamard
(v4_ops.md §11, §12).

Every function is pure torch on the input's device, with no host synchronisation.
"""

from __future__ import annotations

import functools

import torch

FP8_MAX = 448.0
FP8_AMAX_FLOOR = 1e-4
FP4_MAX = 6.0
FP4_AMAX_FLOOR = 6.0 * 2.0**-126

E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
"""Magnitudes of e2m1 codes 0..7; code 8+i is -E2M1_VALUES[i]."""

E8M0_DTYPE: torch.dtype | None = getattr(torch, "float8_e8m0fnu", None)
"""torch's dtype of e8m0 scale bytes, ``float8_e8m0fnu`` (torch >= 2.7); None on older torch,
where a model holds its e8m0 scales as their fp32 values (:func:`e8m0_scales`)."""
E8M0_HELD_DTYPE: torch.dtype = E8M0_DTYPE or torch.float32
"""The dtype a model holds e8m0 scales in on this torch (:func:`e8m0_scales`)."""


def ue8m0_ceil(s: torch.Tensor) -> torch.Tensor:
    """Round positive scales up to a power of two, exactly: ``2^ceil(log2 s)`` via frexp.

    ``s = m * 2^e`` with m in [0.5, 1): s is already ``2^(e-1)`` when m == 0.5, else the next power
    of two is ``2^e``.
    """
    mantissa, exponent = torch.frexp(s)
    exponent = torch.where(mantissa == 0.5, exponent - 1, exponent)
    return torch.ldexp(torch.ones_like(s), exponent)


def block_scales(amax: torch.Tensor, qmax: float, floor: float, scale_fmt: str) -> torch.Tensor:
    """fp32 scale per tile: ``max(amax, floor) / qmax``, rounded up to a power of two for ue8m0.

    The division is by a tensor, not the Python number: on CUDA, torch divides by a host scalar as
    a product with its reciprocal, which is not the correctly rounded quotient (the first GPU run
    found fp32 scales one ulp off, and a power-of-two quotient can round past 2^k)."""
    s = amax.to(torch.float32).clamp(min=floor)
    s = s / s.new_full((), qmax)
    return ue8m0_ceil(s) if scale_fmt == "ue8m0" else s


def decode_scale(scale: torch.Tensor) -> torch.Tensor:
    """Block scales as fp32: fp32/fp64 pass through; e8m0 bytes e become ``2^(e-127)``, 255 is NaN."""
    if scale.dtype in (torch.float32, torch.float64):
        return scale.float() if scale.dtype == torch.float32 else scale
    if scale.dtype == torch.uint8 or str(scale.dtype) == "torch.float8_e8m0fnu":
        exponent = scale.view(torch.uint8).to(torch.float32)
        return torch.where(exponent == 255, torch.nan, torch.exp2(exponent - 127.0))
    raise TypeError(f"unsupported scale dtype {scale.dtype}")


def e8m0_scales(codes: torch.Tensor) -> torch.Tensor:
    """e8m0 scale bytes (uint8) as a model holds them: viewed as ``float8_e8m0fnu`` where torch
    has it, else decoded to fp32 (exact: powers of two), which every kernel also takes."""
    return codes.view(E8M0_DTYPE) if E8M0_DTYPE is not None else decode_scale(codes)


def gather_rows(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``t[index]`` along dim 0, through the bytes for a one-byte dtype (float8: torch before 2.6
    cannot index it on the CPU)."""
    return t.view(torch.uint8)[index].view(t.dtype) if t.element_size() == 1 else t[index]


def scatter_rows(store: torch.Tensor, slots: torch.Tensor, records: torch.Tensor) -> None:
    """``store[b, slots[b, i]] = records[b, i]`` in place (store [B, N, width], slots [B or 1, S]
    int, records [B, S, width]): the row write of the store ops and the model's caches."""
    rows = slots.to(torch.int64).expand(records.shape[:2])
    store.scatter_(1, rows[..., None].expand(records.shape), records)


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


@functools.cache
def _e2m1_table(device: torch.device) -> torch.Tensor:
    return torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES), dtype=torch.float32, device=device)


def e2m1_decode(code: torch.Tensor) -> torch.Tensor:
    """e2m1 codes (uint8 0..15) -> fp32 values (:data:`E2M1_VALUES`, bit 3 the sign).

    A lookup in a table made once per device: a table made per call would be a copy from the
    host, which a CUDA graph cannot capture (a capture runs after a warm-up call, which makes it).
    """
    return _e2m1_table(code.device)[code.long()]


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


@functools.cache
def _e2m1_byte_table(device: torch.device) -> torch.Tensor:
    """[256, 2] fp32: both e2m1 values of each byte, the low nibble's first (made once per device,
    as :func:`_e2m1_table`)."""
    return _e2m1_table(device)[fp4_unpack(torch.arange(256, dtype=torch.uint8, device=device)).long()].reshape(256, 2)


def fp4_dequantize(packed: torch.Tensor, scale: torch.Tensor, tile: int = 32, dtype=torch.float32) -> torch.Tensor:
    """(packed [..., K/2], scales [..., K/tile]) -> [..., K] in dtype.

    Each byte's two values come from one lookup in a 256-entry pair table: the values of
    ``e2m1_decode(fp4_unpack(packed))`` in two device kernels instead of five (a decode step of the
    model runs this for every CSA layer's indexer query)."""
    values = _e2m1_byte_table(packed.device)[packed.long()].reshape(*packed.shape[:-1], packed.shape[-1] * 2)
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


INDEX_KEY_FORMATS = ("fp4", "fp8")
"""Packed indexer-key formats (v4_ops.md §12): MXFP4 (68 bytes at d = 128) and FP8 (132 bytes)."""
FP4_TILE = 32
"""Elements per ue8m0 scale of an FP4 (MXFP4) vector."""


def index_key_bytes(d: int, fmt: str) -> int:
    """Bytes of one packed indexer key of d elements in format ``fmt``.

    ``"fp4"``: d/2 bytes of e2m1 codes + d/32 ue8m0 scale bytes (68 at d = 128: DeepGEMM's and
    vLLM's FP4 indexer cache); ``"fp8"``: d e4m3 codes + one fp32 scale (132 at d = 128: the
    DeepSeek-V3.2 layout, vLLM's default indexer cache).
    """
    if fmt == "fp4":
        if d <= 0 or d % FP4_TILE:
            raise ValueError(f"fp4 index keys need d to be a positive multiple of {FP4_TILE}, got {d}")
        return d // 2 + d // FP4_TILE
    if fmt == "fp8":
        if d <= 0:
            raise ValueError(f"fp8 index keys need d > 0, got {d}")
        return d + 4
    raise ValueError(f"index key format must be one of {list(INDEX_KEY_FORMATS)}, got {fmt!r}")


def index_key_pack(keys: torch.Tensor, fmt: str) -> torch.Tensor:
    """Indexer keys [..., d] (any float dtype) -> packed records [..., index_key_bytes(d, fmt)] uint8.

    ``"fp4"``: ``[e2m1 codes, element 2i in the low nibble of byte i | e8m0 byte of each 32-block]``,
    quantised as ``fp4_quant``: ``s = 2^ceil(log2(max(amax, 6*2^-126) / 6))`` per block,
    ``code = e2m1_rne(clamp(x / s, -6, 6))`` (what the model's FP4 indexer simulation rounds to).

    ``"fp8"``: ``[e4m3 codes | fp32 scale, 4 bytes little-endian]``, one scale per key:
    ``s = 2^ceil(log2(max(amax, 1e-4) / 448))``, ``code = e4m3_rne(clamp(x / s, -448, 448))``.
    The scale rule follows vLLM's ``indexer_k_quant_and_cache`` (``csrc/cache_kernels.cu``:
    ``scale = max(amax, 1e-4) / 448``, rounded up to a power of two when ``use_ue8m0``), which
    vLLM's DeepSeek-V3.2 and V4 indexers call with ``scale_fmt="ue8m0"`` and a 128-element quant
    block (one block per 128-d key), as V3.2's own inference code does (``act_quant(k, 128,
    scale_fmt)`` with ``scale_fmt = "ue8m0"``): ue8m0-rounded values, stored as fp32.
    """
    d = keys.shape[-1]
    index_key_bytes(d, fmt)  # validates fmt and d
    quantised = fp4_quantize(keys, FP4_TILE) if fmt == "fp4" else fp8_quantize(keys, d, "ue8m0")
    return index_key_records(*quantised, fmt)


def index_key_records(codes: torch.Tensor, scale: torch.Tensor, fmt: str) -> torch.Tensor:
    """Packed indexer keys from quantised ones: ``"fp4"``: packed e2m1 codes [..., d/2] uint8 and
    power-of-two scales [..., d/32] fp32 (``fp4_quant``'s outputs); ``"fp8"``: e4m3 codes [..., d]
    and one fp32 scale [..., 1] (``fp8_act_quant``'s with block d) -> [..., index_key_bytes(d, fmt)]."""
    if fmt == "fp4":
        return torch.cat((codes, ue8m0_encode(scale)), dim=-1)
    # fp32 bytes in memory order: little-endian on every platform torch supports. (The [..., 1]
    # scale is made dense with a unit last stride, which a size-1 dim need not have.)
    scale_bytes = scale.squeeze(-1).contiguous().unsqueeze(-1).view(torch.uint8)
    return torch.cat((codes.view(torch.uint8), scale_bytes), dim=-1)


def index_key_unpack(records: torch.Tensor, d: int, fmt: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Packed indexer keys [..., index_key_bytes(d, fmt)] uint8 -> [..., d] in dtype.

    Each value is decoded in fp32, ``e2m1(code) * 2^(e - 127)`` (fp4; e = 255 is NaN) or
    ``e4m3(code) * s`` (fp8), then rounded to dtype: exact for power-of-two scales, which is
    what :func:`index_key_pack` writes (an fp8 record may hold any fp32 scale).
    """
    width = index_key_bytes(d, fmt)
    if records.dtype != torch.uint8 or records.shape[-1] != width:
        raise ValueError(
            f"{fmt} index keys of d={d} must be [..., {width}] uint8, got {list(records.shape)} {records.dtype}"
        )
    if fmt == "fp4":
        codes, exponents = records[..., : d // 2], records[..., d // 2 :]
        return fp4_dequantize(codes, decode_scale(exponents), FP4_TILE, dtype)
    codes = records[..., :d].contiguous().view(torch.float8_e4m3fn)
    scale = records[..., d:].contiguous().view(torch.float32)
    return fp8_dequantize(codes, scale, d, dtype)


def sylvester_hadamard(n: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """The n x n Sylvester Hadamard matrix (n a power of two) of +-1: ``H_2n = [[H, H], [H, -H]]``."""
    h = torch.ones(1, 1, dtype=dtype, device=device)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h


@functools.cache
def _sylvester_hadamard_on(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """:func:`sylvester_hadamard`, made once per (n, dtype, device) and never modified: building it is
    log2(n) rounds of small kernels, which a rotation per decode step would otherwise repeat."""
    return sylvester_hadamard(n, dtype, device)


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal Sylvester Hadamard rotation of the last dim (a power of two): ``x @ H / sqrt(n)``.

    fp32 math (fp64 when x is fp64), output in x's dtype.
    """
    n = x.shape[-1]
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (x.to(dtype) @ _sylvester_hadamard_on(n, dtype, x.device) * n**-0.5).to(x.dtype)


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
