"""Number-format codecs of the reference: FP8 act quant, FP4 quant, e8m0 scales, the packed KV record,
Hadamard. Expected values are hand-computed from the format definitions (v4_ops.md §11, §12), or come
from torch's own float8 / e8m0 casts and torch's documented float4_e2m1fn_x2 bit layout.

e4m3fn bits: s eeee mmm, bias 7, max 448 = 0x7E, subnormals m * 2^-9. e2m1 bits: s ee m, bias 1,
values {0, .5, 1, 1.5, 2, 3, 4, 6}. e8m0: byte e is 2^(e-127), 255 is NaN.
"""

from __future__ import annotations

import math

import pytest
import torch

from seahal import hal
from seahal.backends.cpu.reference import quant
from seahal.backends.cpu.reference.quant import fp4_quant, fp8_act_quant, kv_cache_pack, kv_cache_unpack
from seahal.hal.formats import decode_scale, e2m1_encode, hadamard, sylvester_hadamard
from seahal.hal.ops.quant import kv_record_bytes
from seahal.hal.spec import Out


def _bytes(t: torch.Tensor) -> list[int]:
    return t.contiguous().view(torch.uint8).flatten().tolist()


def _is_power_of_two(s: torch.Tensor) -> bool:
    """fp32 with an all-zero mantissa field (normal) or a single set bit (subnormal)."""
    bits = s.float().view(torch.int32)
    mantissa, exponent = bits & 0x7FFFFF, (bits >> 23) & 0xFF
    normal = (exponent > 0) & (mantissa == 0)
    subnormal = (exponent == 0) & (mantissa > 0) & ((mantissa & (mantissa - 1)) == 0)
    return bool((normal | subnormal).all())


# ---- FP8 e4m3 activation quant ---------------------------------------------------------------------------

# (tile values, expected ue8m0 scale, expected e4m3 values of x/s); the rest of each tile is zero
FP8_TILES = [
    # amax = 448 -> s = 2^ceil(log2 1) = 1. RNE ties: 17 is between 16 and 18 (step 2 in [16, 32)) -> 16
    # (even mantissa 000); 19 -> 20 (010); 1.0625 -> 1 and 1.1875 -> 1.25 (step 1/8 in [1, 2));
    # subnormal ties 2^-10 -> 0 and 3*2^-10 -> 2^-8 (step 2^-9).
    (
        [448.0, -448.0, 17.0, -17.0, 19.0, -19.0, 1.0625, 1.1875, 2.0**-10, 3 * 2.0**-10, -(2.0**-10)],
        1.0,
        [448.0, -448.0, 16.0, -16.0, 20.0, -20.0, 1.0, 1.25, 0.0, 2.0**-8, -0.0],
    ),
    # amax = 448 * 2^2 exactly -> s = 4 (not 8); 68/4 = 17 -> 16
    ([1792.0, 68.0, -4.0], 4.0, [448.0, 16.0, -1.0]),
    # amax = 449 -> log2(449/448) > 0 -> s = 2; 449/2 = 224.5 -> 224 (step 16 in [128, 256))
    ([449.0, -449.0, 3.0], 2.0, [224.0, -224.0, 1.5]),
    # amax = 447 -> s = 1, no rounding of the scale down
    ([447.0], 1.0, [448.0]),
    # amax = 448 * 2^-3 -> s = 2^-3
    ([56.0, -0.5], 2.0**-3, [448.0, -4.0]),
    # zero tile: amax floor 1e-4 -> 1e-4/448 = 2.2e-7 in (2^-23, 2^-22] -> s = 2^-22
    ([0.0], 2.0**-22, [0.0]),
    # amax 1e-6 < floor: s = 2^-22; 1e-6 * 2^22 = 4.19 -> 4 (step 0.5 in [4, 8)); -3e-7 * 2^22 = -1.258 -> -1.25
    ([1e-6, -3e-7], 2.0**-22, [4.0, -1.25]),
]


@pytest.mark.parametrize("block_size", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fp8_act_quant_hand_computed(block_size, dtype):
    x = torch.zeros(len(FP8_TILES), 2 * block_size, dtype=dtype)  # second tile of each row stays zero
    for row, (values, _, _) in enumerate(FP8_TILES):
        x[row, : len(values)] = torch.tensor(values, dtype=dtype)
    q, s = fp8_act_quant(x, block_size)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32 and s.shape == (len(FP8_TILES), 2)
    assert _is_power_of_two(s)
    for row, (values, scale, expected) in enumerate(FP8_TILES):
        assert s[row, 0].item() == scale and s[row, 1].item() == 2.0**-22
        want = torch.zeros(2 * block_size, dtype=torch.float32)
        want[: len(expected)] = torch.tensor(expected)
        assert _bytes(q[row]) == _bytes(want.to(torch.float8_e4m3fn)), row
    # a few bytes by hand: 448 = 1.75 * 2^8 -> 0 1111 110; 16 = 2^4 -> 0 1011 000; -20 -> 1 1011 010;
    # 2^-8 = 2 * 2^-9 subnormal -> 0 0000 010; -0 -> 1 0000 000 (the sign of -2^-10 survives rounding)
    assert _bytes(q[0, :11]) == [0x7E, 0xFE, 0x58, 0xD8, 0x5A, 0xDA, 0x38, 0x3A, 0x00, 0x02, 0x80]


def test_fp8_act_quant_fp32_scales_and_saturation():
    """scale_fmt='fp32': s = max(amax, 1e-4)/448 in fp32 (bit-exact). For amax = 113.5, fp32(amax/448)
    rounds down, so x/s = 448.00003 > 448: the clamp (and e4m3's own saturation) give exactly 448."""
    x = torch.zeros(3, 128)
    x[0, :3] = torch.tensor([113.5, -113.5, 1.0])
    x[1, 0] = 448.0
    q, s = fp8_act_quant(x, 128, "fp32")
    amax = torch.tensor([113.5, 448.0, 1e-4], dtype=torch.float32)
    assert _bytes(s) == _bytes(amax / torch.tensor(448.0))
    assert (x[0, 0] / s[0]).item() > 448.0
    assert _bytes(q[0, :2]) == [0x7E, 0xFE]  # +-448, not NaN (0x7F)
    assert q[0, 2].float().item() == float(torch.tensor(1.0 / s[0].item()).to(torch.float8_e4m3fn).float())
    assert _bytes(q[2]) == [0] * 128


def _expected_fp8(x: torch.Tensor, block_size: int, scale_fmt: str):
    """Independent oracle: per-tile scale from Python math / numpy-style fp32, torch's own e4m3 cast."""
    xt = x.float().reshape(*x.shape[:-1], -1, block_size)
    amax = xt.abs().amax(-1)
    floor = torch.tensor(1e-4, dtype=torch.float32).item()
    if scale_fmt == "ue8m0":
        scale = torch.tensor(
            [2.0 ** math.ceil(math.log2(max(a, floor) / 448.0)) for a in amax.flatten().tolist()]
        ).reshape(amax.shape)
    else:
        scale = torch.maximum(amax, torch.tensor(floor)) / torch.tensor(448.0)
    q = (xt / scale.unsqueeze(-1)).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return q.reshape(x.shape), scale


@pytest.mark.parametrize("scale_fmt", ["ue8m0", "fp32"])
@pytest.mark.parametrize("block_size", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fp8_act_quant_matches_torch_e4m3_cast(scale_fmt, block_size, dtype):
    g = torch.Generator().manual_seed(block_size)
    x = torch.randn(5, 3, 512, generator=g)
    # tile magnitudes over 2^-20 .. 2^12 (fp16 range permitting), one all-zero tile
    span = (-12, 8) if dtype == torch.float16 else (-20, 12)
    tile_scale = torch.exp2(torch.randint(*span, (5, 3, 512 // block_size, 1), generator=g).float())
    x = (x.reshape(5, 3, -1, block_size) * tile_scale).reshape(5, 3, 512)
    x[0, 0, :block_size] = 0
    x = x.to(dtype)
    q, s = fp8_act_quant(x, block_size, scale_fmt)
    q_want, s_want = _expected_fp8(x, block_size, scale_fmt)
    assert _bytes(s) == _bytes(s_want.float())
    assert _bytes(q) == _bytes(q_want)
    if scale_fmt == "ue8m0":  # the smallest power of two >= amax/448: amax/s in (224, 448] above the floor
        assert _is_power_of_two(s)
        amax = x.float().reshape(5, 3, -1, block_size).abs().amax(-1)
        ratio = (amax / s)[amax >= 1e-4]
        assert ratio.numel() > 0 and ((ratio > 224) & (ratio <= 448)).all()


# ---- FP4 e2m1 ---------------------------------------------------------------------------------------------

GRID = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
MIDPOINTS = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]
MIDPOINT_CODES = [0, 2, 2, 4, 4, 6, 6]  # ties go to the even code: 0.25->0, 0.75->1, 1.25->1, 1.75->2, ...


def _e2m1_from_bits(code: int) -> float:
    """torch.float4_e2m1fn_x2's documented nibble layout (c10/util/Float4_e2m1fn_x2.h, OCP MX 5.3.3):
    seem with exponent bias 1; exponent 0 is subnormal (m * 0.5)."""
    sign = -1.0 if code & 0x8 else 1.0
    exponent, mantissa = (code >> 1) & 0x3, code & 0x1
    magnitude = mantissa * 0.5 if exponent == 0 else 2.0 ** (exponent - 1) * (1 + mantissa / 2)
    return sign * magnitude


def _decode_float4_x2(packed: torch.Tensor) -> list[float]:
    """Values of a float4_e2m1fn_x2 tensor, val0 in bits 3:0 and val1 in bits 7:4 of each byte."""
    out = []
    for byte in packed.view(torch.uint8).flatten().tolist():
        out += [_e2m1_from_bits(byte & 0xF), _e2m1_from_bits(byte >> 4)]
    return out


def _nearest_even(v: float) -> float:
    """Round |v| <= 6 to the e2m1 grid by brute force: nearest, ties to the even grid index; keeps sign."""
    m = abs(v)
    dist = [abs(m - g) for g in GRID]
    best = min(dist)
    index = [i for i, d in enumerate(dist) if d == best]
    index = index[0] if len(index) == 1 else next(i for i in index if i % 2 == 0)
    return math.copysign(GRID[index], v)


def test_fp4_quant_codes_for_grid_midpoints_and_signed_zero():
    values = GRID + [-g for g in GRID] + MIDPOINTS + [-m for m in MIDPOINTS] + [0.1, -0.1]
    codes = list(range(16)) + MIDPOINT_CODES + [8 + c for c in MIDPOINT_CODES] + [0, 8]
    x = torch.tensor(values, dtype=torch.float32)[None]  # amax 6 -> s = 1
    packed, s = fp4_quant(x, 32)
    assert s.tolist() == [[1.0]] and packed.dtype == torch.uint8 and packed.shape == (1, 16)
    assert _bytes(packed) == [codes[2 * i] | codes[2 * i + 1] << 4 for i in range(16)]
    assert _bytes(packed[0, :3]) == [0x10, 0x32, 0x54]  # element 0 in the low nibble
    # -0.0 and -0.1 keep the sign bit (code 8 = -0), as torch's float -> e2m1 conversion does
    assert codes[8] == 8 and codes[-1] == 8


@pytest.mark.parametrize("exponent", [-126, -40, -3, 0, 5, 100])
def test_fp4_quant_scales(exponent):
    """s = 2^ceil(log2(max(amax, 6 * 2^-126) / 6)): a tile of amax 6 * 2^k gets s = 2^k exactly; one just
    above gets 2^(k+1); a zero tile and a tile below the floor get 2^-126."""
    k = exponent
    x = torch.zeros(4, 64, dtype=torch.float64)
    x[0, :32] = torch.tensor(GRID * 4, dtype=torch.float64) * 2.0**k  # amax 6 * 2^k
    x[1, 0] = 6 * 2.0**k * (1 + 2.0**-20)
    x[2, 0] = 1e-39  # fp32 subnormal, below the floor
    x = x.float()
    packed, s = fp4_quant(x, 32)
    assert _is_power_of_two(s)
    assert s[0, 0].item() == 2.0**k and s[1, 0].item() == 2.0 ** (k + 1)
    assert (s[:, 1] == 2.0**-126).all() and s[2, 0].item() == 2.0**-126 and s[3, 0].item() == 2.0**-126
    assert _bytes(packed[0, :16]) == [0x10, 0x32, 0x54, 0x76] * 4
    assert _bytes(packed[1, :1]) == [0x05]  # 6 * 2^k (1 + 2^-20) / 2^(k+1) = 3.000003 -> 3 = code 5
    assert _bytes(packed[2]) == [0] * 32  # 1e-39 / 2^-126 = 0.085 -> 0


def test_e2m1_encode_saturates():
    """Out-of-range magnitudes encode as +-6 (codes 7 / 15). Inside fp4_quant x/s never exceeds 6 since
    s >= amax/6, so the clamp there is defensive; the encoder saturates on its own."""
    v = torch.tensor([6.0, 6.5, 100.0, float("inf"), -7.0, -1e30])
    assert e2m1_encode(v).tolist() == [7, 7, 7, 7, 15, 15]


@pytest.mark.skipif(not hasattr(torch, "float4_e2m1fn_x2"), reason="views as torch's float4_e2m1fn_x2, which this torch lacks")
@pytest.mark.parametrize("block_size", [32, 64])
def test_fp4_quant_matches_float4_e2m1fn_x2_layout(block_size):
    """Our packed bytes, viewed as torch.float4_e2m1fn_x2 and decoded by that dtype's documented layout,
    equal brute-force RNE of x/s. torch 2.13 can view uint8 as float4_e2m1fn_x2 but cannot convert it
    ("copy_kernel" not implemented), so the decoding follows the documented bit layout."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(6, 256, generator=g) * torch.exp2(torch.randint(-10, 10, (6, 1), generator=g).float())
    packed, s = fp4_quant(x, block_size)
    as_fp4 = packed.view(torch.float4_e2m1fn_x2)
    assert as_fp4.shape == (6, 128)

    scaled = (x.reshape(6, -1, block_size) / s.unsqueeze(-1)).reshape(6, 256)
    want = [_nearest_even(v) for v in scaled.flatten().tolist()]
    got = _decode_float4_x2(as_fp4)
    assert [math.copysign(1, v) for v in got] == [math.copysign(1, v) for v in want]
    assert got == want


# ---- e8m0 scales ------------------------------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(torch, "float8_e8m0fnu"), reason="compares with torch's float8_e8m0fnu (torch >= 2.7)")
def test_decode_scale_matches_torch_e8m0():
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    e8m0 = codes.view(torch.float8_e8m0fnu)
    want = e8m0.to(torch.float32)  # torch's own conversion: 2^(e-127), 0xFF = NaN
    for scales in (e8m0, codes):
        got = decode_scale(scales)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    assert decode_scale(codes)[127].item() == 1.0 and math.isnan(decode_scale(codes)[255].item())


# ---- packed FP8 KV record ---------------------------------------------------------------------------------


def test_kv_record_is_584_bytes_for_v4():
    kv = torch.randn(2, 3, 512).to(torch.bfloat16)
    packed = kv_cache_pack(kv)
    assert kv_record_bytes(512) == 584 == 448 + 128 + 7 + 1
    assert packed.shape == (2, 3, 584) and packed.dtype == torch.uint8
    assert (packed[..., 583] == 0).all()  # pad
    # the 7 scale bytes sit at 576..582 and are the tiles' ue8m0 exponents
    _, s = fp8_act_quant(kv[..., :448].float(), 64)
    assert _bytes(packed[..., 576:583]) == [int(math.log2(v)) + 127 for v in s.flatten().tolist()]


def test_kv_pack_byte_positions_small_example():
    """dim 192 = nope 128 (two 64-tiles) + rope 64: record = 128 e4m3 + 128 rope bytes + 2 scales + 6 pad.

    tile 0: amax 448 -> s = 1 (byte 127): 448 -> 0x7E, 1 -> 0x38, -2 -> 0xC0.
    tile 1: amax 1 -> s = 2^ceil(log2(1/448)) = 2^-8 (byte 119): 1 -> 256 = 2^8 -> 0 1111 000 = 0x78.
    rope: bf16 1.0 = 0x3F80 and -2.0 = 0xC000, little-endian.
    """
    kv = torch.zeros(192, dtype=torch.bfloat16)
    kv[0], kv[1], kv[2] = 448.0, 1.0, -2.0
    kv[64] = 1.0
    kv[128], kv[129] = 1.0, -2.0
    packed = kv_cache_pack(kv)
    assert packed.shape == (kv_record_bytes(192),) == (264,)
    want = [0] * 264
    want[0:3] = [0x7E, 0x38, 0xC0]
    want[64] = 0x78
    want[128:132] = [0x80, 0x3F, 0x00, 0xC0]
    want[256:258] = [127, 119]
    assert _bytes(packed) == want
    unpacked = kv_cache_unpack(packed, 192)
    assert unpacked.dtype == torch.bfloat16
    assert torch.equal(unpacked, kv)  # every value above is exact in e4m3 with its tile scale


def _random_kv(seed: int, shape=(4, 5, 512)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-8, 8, (*shape[:-1], 1), generator=g).float())
    kv[0, 0, :64] = 0  # a zero tile
    kv[0, 1, 64:128] *= 1e-7  # a tile below the 1e-4 amax floor (subnormal e4m3 codes)
    return kv.to(torch.bfloat16)


def test_kv_round_trip_precision():
    """rope (last 64) round-trips exactly in bf16. nope: x/s is exact (s a power of two), e4m3 has 3
    fraction bits, so RNE moves a normal value by at most half a step, 2^-4 of its binade's base
    (<= 2^-4 |x|); below 2^-6 (subnormals, step 2^-9) by at most 2^-10. Scaled back by s, and the
    bf16 output holds e4m3 * 2^k exactly (3 < 7 fraction bits), so |x' - x| <= max(2^-4 |x|, 2^-10 s)."""
    kv = _random_kv(0)
    out = kv_cache_unpack(kv_cache_pack(kv), 512)
    assert out.shape == kv.shape and out.dtype == torch.bfloat16
    assert torch.equal(out[..., 448:], kv[..., 448:])

    nope, nope_out = kv[..., :448].double(), out[..., :448].double()
    amax = nope.reshape(4, 5, 7, 64).abs().amax(-1).clamp(min=1e-4)
    s = torch.exp2(torch.ceil(torch.log2(amax / 448))).repeat_interleave(64, dim=-1)
    bound = torch.maximum(2.0**-4 * nope.abs(), 2.0**-10 * s)
    assert ((nope_out - nope).abs() <= bound).all()
    # and exactly torch's e4m3 cast of x/s, times s
    torch.testing.assert_close(nope_out, (nope / s).float().to(torch.float8_e4m3fn).double() * s, rtol=0, atol=0)


def test_kv_pack_is_idempotent():
    """Packing the unpacked vector gives the same bytes, except where a tile's max rounds down onto 224 s
    (amax/s in (224, 232] rounds to 224): the repack then picks s/2 with doubled codes, the same values."""
    kv = _random_kv(1)
    packed = kv_cache_pack(kv)
    repacked = kv_cache_pack(kv_cache_unpack(packed, 512))
    assert torch.equal(kv_cache_unpack(repacked, 512), kv_cache_unpack(packed, 512))
    tile_max = kv_cache_unpack(packed, 512)[..., :448].float().reshape(4, 5, 7, 64).abs().amax(-1)
    scales = torch.exp2(packed[..., 576:583].float() - 127)
    drops = tile_max / scales == 224
    same_record = ~drops.any(-1)
    assert same_record.sum() >= same_record.numel() // 2
    assert torch.equal(repacked[same_record], packed[same_record])

    # the edge case by hand: 225 -> 224 with s = 1; repacked: s = 1/2 (byte 126), 448 -> 0x7E
    kv = torch.zeros(512, dtype=torch.bfloat16)
    kv[0] = 225.0
    packed = kv_cache_pack(kv)
    repacked = kv_cache_pack(kv_cache_unpack(packed, 512))
    assert (packed[0].item(), packed[576].item()) == (0x76, 127)  # 224 = 1.75 * 2^7 -> 0 1110 110
    assert (repacked[0].item(), repacked[576].item()) == (0x7E, 126)
    assert torch.equal(kv_cache_unpack(repacked, 512), kv_cache_unpack(packed, 512))


# ---- Hadamard ---------------------------------------------------------------------------------------------


def _sylvester(n: int) -> torch.Tensor:
    """H[i, j] = (-1)^popcount(i & j), the Sylvester-ordered Hadamard matrix."""
    return torch.tensor([[(-1.0) ** bin(i & j).count("1") for j in range(n)] for i in range(n)], dtype=torch.float64)


@pytest.mark.parametrize("n", [1, 2, 8, 128])
def test_hadamard_matches_sylvester_and_is_orthonormal(n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(3, n, generator=g, dtype=torch.float64)
    h = _sylvester(n)
    # fp64 math: sums of n terms, error ~ n * 2^-53
    torch.testing.assert_close(hadamard(x), x @ h / math.sqrt(n), rtol=1e-13, atol=1e-13)
    rotation = hadamard(torch.eye(n, dtype=torch.float64))  # rows of H / sqrt(n)
    torch.testing.assert_close(rotation @ rotation.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-13)
    # bf16 in/out: fp32 math then one bf16 rounding (half ulp = 2^-9 relative); atol for cancellations
    y = hadamard(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    want = x.to(torch.bfloat16).double() @ h / math.sqrt(n)
    torch.testing.assert_close(y.double(), want, rtol=2.0**-8, atol=2.0**-12)


def test_hadamard_builds_its_matrix_once_per_size_dtype_and_device(monkeypatch):
    """The matrix is made once (a decode step rotates the indexer's query every token; building it
    is log2(n) rounds of small kernels) and is the Sylvester matrix of the definition."""
    from seahal.hal import formats

    built = []
    monkeypatch.setattr(formats, "sylvester_hadamard", lambda *a: built.append(a) or _sylvester(a[0]).to(a[1]))
    formats._sylvester_hadamard_on.cache_clear()
    try:
        x = torch.randn(3, 64, dtype=torch.float64)
        first = hadamard(x)
        assert torch.equal(hadamard(x), first) and len(built) == 1
        hadamard(x.float())
        assert len(built) == 2  # another compute dtype, another matrix
    finally:
        formats._sylvester_hadamard_on.cache_clear()
    assert torch.equal(sylvester_hadamard(128).double(), _sylvester(128))


# ---- contracts and portability ----------------------------------------------------------------------------


def test_through_plan_and_on_meta_tensors():
    """Outputs match the contracts' shapes and dtypes; the kernels run on meta tensors (no host sync)."""
    plan = hal.plan("cpu", ops=["fp8_act_quant", "fp4_quant", "kv_cache_pack", "kv_cache_unpack"], announce=False)
    x = torch.randn(2, 3, 512).to(torch.bfloat16)
    calls = {
        "fp8_act_quant": (x, 128, "ue8m0"),
        "fp4_quant": (x, 32),
        "kv_cache_pack": (x,),
        "kv_cache_unpack": (kv_cache_pack(x), 512),
    }
    for op, args in calls.items():
        got = getattr(plan.ops, op)(*args)
        got = got if isinstance(got, tuple) else (got,)
        meta_args = tuple(a.to("meta") if isinstance(a, torch.Tensor) else a for a in args)
        on_meta = getattr(quant, op)(*meta_args)  # the reference kernel itself
        on_meta = on_meta if isinstance(on_meta, tuple) else (on_meta,)
        contract = plan[op].spec.contract(*args)
        contract = (contract,) if isinstance(contract, Out) else contract
        for t, m, c in zip(got, on_meta, contract, strict=True):
            assert (tuple(t.shape), t.dtype) == (tuple(m.shape), m.dtype) == (c.shape, c.dtype), op
