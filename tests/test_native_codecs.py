"""Native number-format codecs (csrc/formats.hpp) against torch's float8 dtypes and the reference.

Every comparison is exact: a codec either produces the same byte / the same fp32 value or it is
wrong. Inputs cover every code, every midpoint between neighbouring values (the ties), one fp32
ulp either side of each midpoint, subnormals, saturation and non-finite values.
"""

from __future__ import annotations

import pytest
import torch

from seahal.backends.cpu import native
from seahal.hal.formats import E2M1_VALUES, e2m1_decode, e2m1_encode

pytestmark = pytest.mark.skipif(native.native_module() is None, reason="seahal._native is not built")

ALL_BYTES = torch.arange(256, dtype=torch.uint8)


def assert_same_floats(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Bitwise-equal values, except that any NaN matches any NaN."""
    nan = expected.isnan()
    assert torch.equal(actual.isnan(), nan)
    assert torch.equal(actual[~nan].view(torch.int32), expected[~nan].view(torch.int32))


def neighbourhood(points: torch.Tensor) -> torch.Tensor:
    """points and the fp32 values one ulp below and above each, both signs."""
    up = torch.nextafter(points, torch.full_like(points, float("inf")))
    down = torch.nextafter(points, torch.full_like(points, -float("inf")))
    near = torch.cat((points, up, down))
    return torch.cat((near, -near))


def midpoints(values: torch.Tensor) -> torch.Tensor:
    """Midpoints of consecutive sorted values (exact in fp32 for these formats)."""
    values = values.sort().values
    return (values[1:] + values[:-1]) / 2


def log_uniform(n: int, low: float, high: float, seed: int) -> torch.Tensor:
    """n random fp32 values with magnitudes log-uniform in [2^low, 2^high] and random signs."""
    gen = torch.Generator().manual_seed(seed)
    exponent = low + (high - low) * torch.rand(n, generator=gen, dtype=torch.float64)
    sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0).double()
    return (sign * torch.exp2(exponent)).float()


# e4m3fn


def test_e4m3_decode_every_byte_matches_torch():
    assert_same_floats(native.decode(ALL_BYTES, "e4m3"), ALL_BYTES.view(torch.float8_e4m3fn).float())


def test_e4m3_decode_accepts_the_float8_dtype():
    assert_same_floats(native.decode(ALL_BYTES.view(torch.float8_e4m3fn), "e4m3"), ALL_BYTES.view(torch.float8_e4m3fn).float())


def e4m3_inputs() -> torch.Tensor:
    finite = ALL_BYTES.view(torch.float8_e4m3fn).float()
    finite = finite[finite.isfinite() & (finite >= 0)]
    special = torch.tensor(
        [0.0, 2.0**-10, 2.0**-9 * 0.5, 2.0**-126, 1e-45, 2.0**-6 * 0.99, 447.0, 448.0, 460.0, 464.0, 465.0, 1e6, 3e38]
    )
    return torch.cat(
        (
            neighbourhood(finite),
            neighbourhood(midpoints(finite)),
            neighbourhood(special),
            log_uniform(20000, -14, 10, seed=0),
            torch.tensor([float("inf"), -float("inf"), float("nan")]),
        )
    )


def test_e4m3_encode_matches_torch_after_clamp():
    """torch's cast (RNE) turns overflow into NaN; clamped to ±448 first it is the saturating cast."""
    x = e4m3_inputs()
    expected = x.clamp(-448.0, 448.0).to(torch.float8_e4m3fn).view(torch.uint8)
    actual = native.encode(x, "e4m3")
    nan = x.isnan()
    assert torch.equal(actual[~nan], expected[~nan])
    assert (actual[nan] & 0x7F == 0x7F).all()  # NaN stays NaN


def test_e4m3_encode_saturates_and_keeps_signed_zero():
    codes = native.encode(torch.tensor([1e4, -1e4, float("inf"), -float("inf"), -0.0, -(2.0**-11)]), "e4m3")
    assert codes.tolist() == [0x7E, 0xFE, 0x7E, 0xFE, 0x80, 0x80]


def test_e4m3_ties_go_to_the_even_code():
    """1.0625 lies half way between 1.0 (0x38) and 1.125 (0x39); 1.1875 between 0x39 and 0x3A."""
    codes = native.encode(torch.tensor([1.0625, 1.1875, 2.0**-10, 3 * 2.0**-10]), "e4m3")
    assert codes.tolist() == [0x38, 0x3A, 0x00, 0x02]


def test_e4m3_round_trip_is_identity_on_every_finite_value():
    finite = ALL_BYTES[(ALL_BYTES & 0x7F) != 0x7F]
    assert torch.equal(native.encode(native.decode(finite, "e4m3"), "e4m3"), finite)


# e8m0


@pytest.mark.skipif(not hasattr(torch, "float8_e8m0fnu"), reason="compares with torch's float8_e8m0fnu (torch >= 2.7)")
def test_e8m0_decode_every_byte_matches_torch():
    assert_same_floats(native.decode(ALL_BYTES, "e8m0"), ALL_BYTES.view(torch.float8_e8m0fnu).float())


@pytest.mark.skipif(not hasattr(torch, "float8_e8m0fnu"), reason="compares with torch's float8_e8m0fnu (torch >= 2.7)")
def test_e8m0_encode_matches_torch():
    powers = torch.exp2(torch.arange(-149, 128, dtype=torch.float64)).float()
    x = torch.cat(
        (
            neighbourhood(powers),
            neighbourhood(powers[1:] * 1.5),  # half way in the linear domain
            log_uniform(20000, -149, 127.9, seed=1),
            torch.tensor([0.0, -0.0, 3e38, float("inf"), -float("inf"), float("nan")]),
        )
    )
    assert torch.equal(native.encode(x, "e8m0"), x.to(torch.float8_e8m0fnu).view(torch.uint8))


# e2m1


def e2m1_grid() -> torch.Tensor:
    values = torch.tensor(E2M1_VALUES)
    dense = torch.arange(-7 * 256, 7 * 256 + 1) / 256  # step 2^-8 in [-7, 7]
    return torch.cat((dense, neighbourhood(values), neighbourhood(midpoints(values)), torch.tensor([-0.0, 1e-30, -1e-30])))


def test_e2m1_encode_matches_reference():
    """The reference encodes values already clamped to [-6, 6]; the native codec saturates itself."""
    x = e2m1_grid()
    assert torch.equal(native.encode(x, "e2m1"), e2m1_encode(x.clamp(-6.0, 6.0)))


def test_e2m1_encode_ties_saturation_and_sign():
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 9.0, -9.0, -0.1, -0.0])
    assert native.encode(x, "e2m1").tolist() == [0, 2, 2, 4, 4, 6, 6, 7, 15, 8, 8]


def test_e2m1_decode_every_code_matches_reference():
    codes = torch.arange(16, dtype=torch.uint8)
    assert_same_floats(native.decode(codes, "e2m1"), e2m1_decode(codes))


def test_unknown_format_is_refused():
    with pytest.raises(ValueError, match="fmt must be one of"):
        native.encode(torch.zeros(2), "e5m2")
