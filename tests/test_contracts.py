"""Every op's contract rejects a wrong dtype, a wrong shape and mixed devices with a SpecError that
names the op, the argument, what was expected and what came, before any kernel runs.

The bad calls are built by perturbing one argument of ``example_args``; the plan binds a spy kernel
that records every call, so "before any kernel runs" is observed, not assumed.
"""

from __future__ import annotations

import inspect
import math
import re

import pytest
import torch

from seahal import hal
from seahal.hal.checks import dtype_name
from seahal.testing.examples import example_args, fp8_block_quantize

OPS = list(hal.specs())

CALLS: list[str] = []


def _spy(op: str):
    """A kernel that records its call and returns empty outputs of the contract's shapes."""
    spec = hal.get_spec(op)

    def kernel(*args, **kwargs):
        CALLS.append(op)
        return spec.fake(*args, **kwargs)

    return kernel


# One spy function per op for the whole session: each becomes the torch op seahal::<op>__spy_record.
SPIES = {op: _spy(op) for op in OPS}


@pytest.fixture
def spy_plan(isolated_registry):
    """plan(op) binding the spy kernel (priority above every real cpu kernel) for one op."""
    hal.register_backend("spy", device_type="cpu", probe=lambda: hal.Availability(True, "records calls"))
    for op, kernel in SPIES.items():
        hal.register_kernel(op, "spy", "record", kernel, priority=1000)
    CALLS.clear()

    def make(op: str) -> hal.Plan:
        p = hal.plan("cpu", ops=[op], announce=False)
        assert p.entries[op].label == "spy.record"
        return p

    return make


def _tensor_positions(args: tuple) -> list[int]:
    return [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]


def _arg_name(op: str, index: int) -> str:
    return list(inspect.signature(hal.get_spec(op).contract).parameters)[index]


def _replace(args: tuple, index: int, value: torch.Tensor) -> tuple:
    return args[:index] + (value,) + args[index + 1 :]


def _rejected(plan: hal.Plan, op: str, args: tuple, kwargs: dict) -> str:
    """Call the bound op, expect a SpecError, and check the kernel never ran; returns the message."""
    with pytest.raises(hal.SpecError) as err:
        plan[op](*args, **kwargs)
    assert CALLS == [], f"{op}: the kernel ran before the contract rejected its arguments"
    message = str(err.value)
    assert message.startswith(f"{op}: "), message
    return message


# -- the examples themselves ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_examples_are_valid_in_every_dtype(dtype):
    """example_args checks its result against the contract; float64 kv_cache_pack and
    kv_cache_store have no form."""
    for op in OPS:
        if op in ("kv_cache_pack", "kv_cache_store") and dtype == torch.float64:
            with pytest.raises(hal.SpecError, match=r"kv must be (\[.*\] )?bfloat16 or float16 or float32"):
                example_args(op, dtype=dtype)
            continue
        args, _ = example_args(op, dtype=dtype)
        assert _tensor_positions(args), op
    for weight_format in ("fp8", "fp4"):
        args, _ = example_args("moe_experts", weight_format=weight_format)
        assert args[3].dtype == (torch.float8_e4m3fn if weight_format == "fp8" else torch.uint8)
    with pytest.raises(ValueError, match="moe_experts only"):
        example_args("rope", weight_format="fp8")


def test_examples_are_seeded():
    first, again, other = example_args("rope"), example_args("rope"), example_args("rope", seed=1)
    assert torch.equal(first[0][0], again[0][0]) and not torch.equal(first[0][0], other[0][0])


def test_fp8_block_quantize_against_per_block_formula():
    w = torch.randn(130, 256, generator=torch.Generator().manual_seed(0), dtype=torch.float64).float()
    q, scale = fp8_block_quantize(w)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape and scale.shape == (2, 2)
    for i in range(2):
        for j in range(2):
            block = w[128 * i : 128 * (i + 1), 128 * j : 128 * (j + 1)]
            expected = 2.0 ** math.ceil(math.log2(block.abs().max().item() / 448))  # ue8m0: power of two
            assert scale[i, j].item() == expected
            error = (q[128 * i : 128 * (i + 1), 128 * j : 128 * (j + 1)].float() * expected - block).abs()
            # e4m3 keeps 3 mantissa bits: round-to-nearest is within 2^-4 relative (normals), and
            # within half the subnormal step 2^-9 * 2^-1 of the scale below 2^-6
            assert bool((error <= torch.maximum(block.abs() * 2.0**-4, torch.tensor(expected * 2.0**-10))).all())


@pytest.mark.parametrize("op", OPS)
def test_spy_runs_on_valid_arguments(spy_plan, op):
    """The positive control: the same plan and arguments, unperturbed, reach the kernel once."""
    args, kwargs = example_args(op)
    spy_plan(op)[op](*args, **kwargs)
    assert CALLS == [op]


@pytest.mark.parametrize("op", OPS)
def test_wrong_dtype(spy_plan, op):
    """The first tensor argument as int16, which no contract accepts there."""
    args, kwargs = example_args(op)
    index = _tensor_positions(args)[0]
    good = args[index]
    bad = torch.zeros(good.shape, dtype=torch.int16)
    message = _rejected(spy_plan(op), op, _replace(args, index, bad), kwargs)
    name = _arg_name(op, index)
    expected, _, actual = message.partition(", got ")
    assert expected.startswith(f"{op}: {name} must be "), message
    assert dtype_name(good.dtype) in expected, message  # the valid dtype is among those listed
    assert actual == f"{list(good.shape)} int16 on cpu", message


# The argument whose last dim grows by one (default: the last tensor argument). rope's freqs may
# cover any number of pairs up to D/2, so growing it is legal (rms_norm_rope's too): grow positions' S instead.
WRONG_SHAPE_ARG = {"rope": "positions", "rms_norm_rope": "positions"}


@pytest.mark.parametrize("op", OPS)
def test_wrong_shape(spy_plan, op):
    args, kwargs = example_args(op)
    tensors = _tensor_positions(args)
    names = [_arg_name(op, i) for i in tensors]
    index = tensors[names.index(WRONG_SHAPE_ARG[op])] if op in WRONG_SHAPE_ARG else tensors[-1]
    good = args[index]
    bad = torch.zeros(*good.shape[:-1], good.shape[-1] + 1, dtype=good.dtype)
    message = _rejected(spy_plan(op), op, _replace(args, index, bad), kwargs)
    name = _arg_name(op, index)
    expected, _, actual = message.partition(", got ")
    assert expected.startswith((f"{op}: {name} must be ", f"{op}: {name}'s last dim")), message
    if "must be [" in expected:  # a shape pattern: the actual shape is printed in full
        assert actual == f"{list(bad.shape)} {dtype_name(good.dtype)} on cpu", message
    else:  # a rule on the last dim: the actual size is printed
        assert str(bad.shape[-1]) in actual, message


@pytest.mark.parametrize(
    "op, index, make_bad, message",
    [
        (
            "fp8_gemm",
            2,
            lambda b: b[:, :200].contiguous(),
            "fp8_gemm: b must be [N=130, K=256] float8_e4m3fn (with K=256 from an earlier argument), "
            "got [130, 200] float8_e4m3fn on cpu",
        ),
        (
            "sparse_attention",
            1,
            lambda kv: kv[..., :8].contiguous(),
            "sparse_attention: kv must be [B=2, N=6, D=16] float32 (with D=16 from an earlier argument), "
            "got [2, 6, 8] float32 on cpu",
        ),
        (
            "moe_gate",
            1,
            lambda w: w.to(torch.float16),
            "moe_gate: weight must be [E, D=16] bfloat16 or float32 or float64, got [8, 16] float16 on cpu",
        ),
        (
            "hadamard_rotate",
            0,
            lambda x: torch.cat((x, x[..., :16]), dim=-1),
            "hadamard_rotate: x's last dim must be a power of two, got 48",
        ),
        (
            "hc_post_pre",
            4,
            lambda fn: fn[:, :31].contiguous(),
            "hc_post_pre: fn must be [24, 32] float32 or float64, got [24, 31] float32 on cpu",
        ),
    ],
)
def test_messages_read_as_documented(spy_plan, op, index, make_bad, message):
    """Whole messages for a few cases: op, argument, the expected pattern with bound sizes, what came."""
    args, kwargs = example_args(op)
    assert _rejected(spy_plan(op), op, _replace(args, index, make_bad(args[index])), kwargs) == message


MULTI_TENSOR_OPS = [op for op in OPS if len(_tensor_positions(example_args(op)[0])) > 1]


@pytest.mark.parametrize("op", MULTI_TENSOR_OPS)
def test_mixed_devices(spy_plan, op):
    """The last tensor argument on another device ("meta": the one a CPU-only machine has)."""
    args, kwargs = example_args(op)
    last = _tensor_positions(args)[-1]
    moved = args[last].to("meta")
    message = _rejected(spy_plan(op), op, _replace(args, last, moved), kwargs)
    names = [_arg_name(op, i) for i in _tensor_positions(args)]
    match = re.fullmatch(rf"{op}: {names[-1]} must be on cpu like (\w+), got (.*)", message)
    assert match is not None, message
    assert match[1] in names[:-1], message  # the argument that fixed the device
    assert match[2] == f"{list(moved.shape)} {dtype_name(moved.dtype)} on meta", message


@pytest.mark.parametrize("op", OPS)
def test_all_meta_is_one_device(op):
    """Meta tensors are a device like any other: all on meta passes and gives the same output
    metadata as on cpu (this is how shapes are inferred without data)."""
    spec = hal.get_spec(op)
    args, kwargs = example_args(op)
    meta_args, meta_kwargs = example_args(op, device="meta")
    assert spec.check(*meta_args, **meta_kwargs) == spec.check(*args, **kwargs)
