"""Ops whose ``start_pos`` may be a 0-d device tensor (the position as data, for captured decode
graphs): the contract, the HAL's dispatch to the kernel's tensor-position twin, and the padded
rows, against the same op at the int position."""

from __future__ import annotations

import pytest
import torch

from seahal import hal
from seahal.backends.cpu.reference import compressor as ref_compressor
from seahal.backends.cpu.reference import indexer as ref_indexer
from seahal.hal.ops.compressor import compressor_state, most_new_entries, new_entries

POSITION_OPS = {"kv_compress", "kv_compress_fp8", "kv_compress_store", "indexer_topk", "indexer_topk_packed"}
QUIET = {"SEAHAL_QUIET": "1"}


def _plan(ops=None):
    return hal.plan("cpu", ops=ops, announce=False, environ=QUIET)


def test_the_position_ops_are_the_ones_taking_start_pos():
    taking = {name for name, spec in hal.specs().items() if "int start_pos" in spec.schema}
    assert {name for name, spec in hal.specs().items() if spec.position} == taking == POSITION_OPS
    for name in POSITION_OPS:
        spec = hal.get_spec(name)
        assert "Tensor start_pos" in spec.position_schema and "int start_pos" not in spec.position_schema


def _stream_inputs(overlap: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    coff, d, m = (2 if overlap else 1), 16, 4
    projections = [torch.randn(2, n, coff * d, generator=g) for n in (5, 1, 1, 1, 3, 1, 1, 4)]
    scores = [torch.randn(p.shape, generator=g) for p in projections]
    fixed = (torch.randn(m, coff * d, generator=g), torch.rand(d, generator=g) + 0.5, torch.rand(4, generator=g))
    return projections, scores, fixed, d, m


@pytest.mark.parametrize("op", ["kv_compress", "kv_compress_fp8"])
@pytest.mark.parametrize("overlap", [True, False])
def test_compressor_at_a_tensor_position_pads_the_int_positions_entries(op, overlap):
    """A stream of prefill and decode calls, once with int positions and once with tensors: the
    tensor calls return ceil(S/m) rows, the int call's entries first and zero rows after, and
    leave the same state bit for bit (including the reset at position 0 of a dirty state)."""
    plan = _plan([op])
    projections, scores, (ape, norm, freqs), d, m = _stream_inputs(overlap)
    extra = (1e-6, 8, 8) if op == "kv_compress_fp8" else ()
    state_int = [t.clone().normal_() for t in compressor_state(2, m, d, overlap)]  # dirty: position 0 resets it
    state_tensor = [t.clone() for t in state_int]
    pos = 0
    for kv, score in zip(projections, scores):
        s = kv.shape[1]
        by_int = plan[op](kv, score, ape, norm, freqs, *state_int, m, overlap, pos, *extra)
        by_tensor = plan[op](kv, score, ape, norm, freqs, *state_tensor, m, overlap, torch.tensor(pos), *extra)
        n = new_entries(pos, s, m)
        assert by_int.shape[1] == n and by_tensor.shape[1] == most_new_entries(s, m)
        assert torch.equal(by_tensor[:, :n], by_int), (op, pos)
        assert not by_tensor[:, n:].any()
        assert all(torch.equal(a, b) for a, b in zip(state_int, state_tensor)), (op, pos)
        pos += s


@pytest.mark.parametrize("key_format", ["dense", "fp4", "fp8"])
def test_indexer_at_a_tensor_position_selects_as_at_the_int_position(key_format):
    g = torch.Generator().manual_seed(1)
    q, weights = torch.randn(2, 3, 4, 32, generator=g), torch.rand(2, 3, 4, generator=g)
    keys = torch.randn(2, 9, 32, generator=g)
    if key_format == "dense":
        op, args = "indexer_topk", (q, weights, keys)
    else:
        codes = hal.formats.index_key_pack(keys, key_format)
        op, args = "indexer_topk_packed", (q, weights, codes, key_format)
    bound = _plan([op])[op]
    assert not bound.reads_position_on_host  # the reference only computes with the position
    for pos in range(0, 40, 3):  # nothing visible, every visibility boundary, all 9 keys
        expected = bound(*args, 4, pos, 5)
        assert torch.equal(bound(*args, 4, torch.tensor(pos), 5), expected), pos
    assert (bound(*args, 4, torch.tensor(0), 5) == -1).all()


@pytest.mark.parametrize(
    "start_pos, message",
    [
        (-1, "start_pos must be an int >= 0 or a 0-d int32/int64 tensor, got -1"),
        (torch.tensor([3, 4]), r"start_pos must be an int, a 0-d tensor or \[B=1\] \(a position per sequence\), "
                               r"got \[2\] int64 on cpu"),
        (torch.tensor([[3]]), r"start_pos must be an int, a 0-d tensor or \[B=1\] .*, got \[1, 1\] int64"),
        (torch.tensor(3.0), r"start_pos must be int32 or int64, got \[\] float32 on cpu"),
        (torch.tensor(3, device="meta"), "start_pos must be on cpu like q, got"),
    ],
)
def test_a_bad_position_is_named_before_any_kernel_runs(start_pos, message):
    q, weights, keys = torch.randn(1, 2, 4, 32), torch.rand(1, 2, 4), torch.randn(1, 5, 32)
    with pytest.raises(hal.SpecError, match=message):
        _plan(["indexer_topk"]).ops.indexer_topk(q, weights, keys, 4, start_pos, 3)


def test_kernels_receive_the_position_as_they_declare(reference_registry):
    """A kernel declaring device_position gets the tensor itself; any other kernel gets the int
    (read on the host) and its output padded; plans list the latter as host-position ops."""
    seen = {}

    def spy(name):
        def kernel(q, weights, keys, ratio, start_pos, topk):
            seen[name] = start_pos
            return ref_indexer.indexer_topk(q, weights, keys, ratio, int(start_pos), topk)

        return kernel

    hal.register_backend("posvendor", device_type="cpu", probe=lambda: hal.Availability(True), priority=99)
    hal.register_kernel("indexer_topk", "posvendor", "device", spy("device"), priority=50, device_position=True)
    hal.register_kernel("kv_compress", "posvendor", "host", ref_compressor.kv_compress, priority=50)
    hal.register_kernel("indexer_topk", "posvendor", "host", spy("host"), priority=40)
    plan = hal.plan("posvendor", ops=["indexer_topk", "kv_compress"], announce=False, environ=QUIET)
    assert plan.host_position_ops == ["kv_compress"]
    q, weights, keys = torch.randn(1, 2, 4, 32), torch.rand(1, 2, 4), torch.randn(1, 5, 32)
    plan.ops.indexer_topk(q, weights, keys, 4, torch.tensor(9), 3)
    assert isinstance(seen["device"], torch.Tensor) and int(seen["device"]) == 9

    host = hal.plan("posvendor", ops=["indexer_topk"], announce=False, environ={**QUIET, "SEAHAL_OPS": "indexer_topk=posvendor.host"})
    assert host.host_position_ops == ["indexer_topk"]
    host.ops.indexer_topk(q, weights, keys, 4, torch.tensor(9), 3)
    assert seen["host"] == 9 and isinstance(seen["host"], int)


@pytest.mark.parametrize("op", sorted(POSITION_OPS))
def test_the_tensor_position_twin_passes_opcheck(op):
    """The twin torch op's fake (the contract at a tensor position) matches what the kernel
    returns, schema and all (torch.library.opcheck)."""
    from seahal.testing.examples import example_args

    bound = _plan([op])[op]
    args, kwargs = example_args(op)
    index = bound.spec.position_index()
    args = (*args[:index], torch.tensor(args[index]), *args[index + 1 :])
    torch.library.opcheck(bound.position_op, args, kwargs, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("op", ["kv_compress", "kv_compress_fp8"])
@pytest.mark.parametrize("overlap", [True, False])
def test_compressor_per_sequence_positions_are_each_sequence_alone(op, overlap):
    """start_pos [B]: sequence b computes what a batch-1 call at start_pos[b] on its slice computes
    (its own reset, state and entries, zero rows past them), bit for bit; through the plan, so
    the contract takes the [B] tensor and the portable reference serves it without a host read."""
    plan = _plan([op])
    projections, scores, (ape, norm, freqs), d, m = _stream_inputs(overlap, seed=2)
    extra = (1e-6, 8, 8) if op == "kv_compress_fp8" else ()
    batch = projections[0].shape[0]
    state = [t.clone().normal_() for t in compressor_state(batch, m, d, overlap)]  # dirty: position 0 resets it
    alone = [[t[b : b + 1].clone() for t in state] for b in range(batch)]
    positions = [0, 7]
    assert not plan[op].reads_position_on_host
    for kv, score in zip(projections, scores):
        s = kv.shape[1]
        together = plan[op](kv, score, ape, norm, freqs, *state, m, overlap, torch.tensor(positions), *extra)
        assert together.shape[1] == most_new_entries(s, m)
        for b, p in enumerate(positions):
            one = plan[op](kv[b : b + 1], score[b : b + 1], ape, norm, freqs, *alone[b], m, overlap, p, *extra)
            assert torch.equal(together[b : b + 1, : one.shape[1]], one), (op, b, p)
            assert not together[b, one.shape[1] :].any()
            assert all(torch.equal(t[b : b + 1], u) for t, u in zip(state, alone[b])), (op, b, p)
        positions = [p + s for p in positions]


@pytest.mark.parametrize("key_format", ["dense", "fp4"])
def test_indexer_per_sequence_positions_are_each_sequence_alone(key_format):
    g = torch.Generator().manual_seed(3)
    q, weights, keys = torch.randn(3, 2, 4, 32, generator=g), torch.rand(3, 2, 4, generator=g), torch.randn(3, 9, 32, generator=g)
    packed = key_format != "dense"
    op = "indexer_topk_packed" if packed else "indexer_topk"
    stored = (hal.formats.index_key_pack(keys, key_format), key_format) if packed else (keys,)
    bound = _plan([op])[op]
    positions = [1, 13, 40]  # nothing visible, a visibility boundary within the chunk, every key
    together = bound(q, weights, *stored, 4, torch.tensor(positions), 5)
    for b, p in enumerate(positions):
        one = bound(q[b : b + 1], weights[b : b + 1], *(t[b : b + 1] if isinstance(t, torch.Tensor) else t for t in stored), 4, p, 5)
        assert torch.equal(together[b : b + 1], one), (b, p)
    assert (together[0] == -1).all() and (together[2] >= 0).all()


def test_per_sequence_positions_need_a_device_position_kernel(reference_registry):
    """A kernel taking one int for the batch gets per-sequence positions only when they agree;
    otherwise the call fails naming the kernel, and such a kernel is not offered per-sequence cases."""
    hal.register_backend("onevendor", device_type="cpu", probe=lambda: hal.Availability(True), priority=99)
    kernel = hal.register_kernel("indexer_topk", "onevendor", "one", ref_indexer.indexer_topk, priority=50)
    plan = hal.plan("onevendor", ops=["indexer_topk"], announce=False, environ=QUIET)
    q, weights, keys = torch.randn(2, 1, 4, 32), torch.rand(2, 1, 4), torch.randn(2, 5, 32)
    same = plan.ops.indexer_topk(q, weights, keys, 4, torch.tensor([9, 9]), 3)
    assert torch.equal(same, plan.ops.indexer_topk(q, weights, keys, 4, 9, 3))
    with pytest.raises(NotImplementedError, match=r"indexer_topk: kernel .*indexer_topk takes one start_pos .* \[3, 9\]"):
        plan.ops.indexer_topk(q, weights, keys, 4, torch.tensor([9, 3]), 3)
    per_sequence = hal.PlanContext("cpu", None, {"position": "per-sequence"})
    assert kernel.rejection(per_sequence) == "takes one position for the batch (not registered device_position)"
