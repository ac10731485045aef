"""The Cambricon backend without a Cambricon chip.

Its kernels run against the test emulation of torch_mlu / torch_mlu_ops in
``tests/vendor_packages`` (written from Cambricon's documentation, CPU tensors): the conformance
suite checks the backend's marshalling against the CPU reference, every tmo call is checked
against the version-pinned signature table, the probes explain what is missing, and ``seahal run
--device cambricon`` runs the tiny model end to end with a plan saying which ops use tmo.
"""

from __future__ import annotations

import ast
import contextlib
import re
from pathlib import Path

import pytest
import torch
from seahal.hal.errors import DeviceError
from vendor_emulation import emulated

from seahal import hal
from seahal.cli import main

BACKEND_DIR = Path(hal.__file__).resolve().parents[1] / "backends" / "cambricon"
VENDOR_OPS = (
    "moe_gate", "moe_experts", "fp8_gemm", "kv_compress", "sparse_attention", "hc_pre", "hc_post", "hc_post_pre", "rope",
)


@contextlib.contextmanager
def mlu(**settings):
    """The Cambricon backend on the emulated torch_mlu + torch_mlu_ops (tensors on the CPU)."""
    with emulated(("torch_mlu_ops", "torch_mlu"), backend="cambricon", settings=settings) as mods:
        try:
            yield mods["torch_mlu_ops"]
        finally:
            mods["torch_mlu"]._emulation.uninstall()


def _tmo_modules():
    from seahal.backends.cambricon import route, signatures, tmo

    return tmo, signatures, route


# --------------------------------------------------------------------------------------------
# Conformance: portable + emulated vendor ops
# --------------------------------------------------------------------------------------------


def test_conformance_is_green_and_reaches_every_vendor_op():
    from seahal.testing.conformance import run_conformance

    with mlu() as tmo_emulation:
        report = run_conformance("cambricon", property_examples=3)
        calls = list(tmo_emulation._emulation.CALLS)
        _, signatures, _ = _tmo_modules()
    assert report.ok, report.summary(verbose=False)
    _assert_calls_match(calls, signatures.entry_for("1.12.1"))
    called = {name for name, _, _ in calls}
    assert report.device == "cpu"
    counts = report.counts()
    for op in VENDOR_OPS:
        assert counts[op]["pass"] > 0, (op, counts[op])
    # every tmo function of the kernels was reached (the sigmoid gate has no V4 case: not required)
    expected = {"moe_softplus_topk", "moe_softmax_topk", "moe_gen_idx", "moe_expand_input", "group_gemm",
                "moe_combine_result", "scaled_matmul", "fused_compress_multi_kv", "single_query_cached_kv_attn",
                "hc_split_sinkhorn", "fused_mhc_post", "apply_rotary"}
    assert expected <= called, expected - called


def test_fused_mhc_post_runs_at_its_documented_shape_and_matches_the_reference():
    from seahal.backends.cpu.reference.mhc import hc_post as reference

    gen = torch.Generator().manual_seed(0)
    f = torch.randn(1, 2, 4096, generator=gen).to(torch.bfloat16)
    x = torch.randn(1, 2, 4, 4096, generator=gen).to(torch.bfloat16)
    post = torch.rand(1, 2, 4, generator=gen) * 2
    comb = torch.rand(1, 2, 4, 4, generator=gen)
    with mlu() as tmo_emulation:
        p = hal.plan("cambricon", ops=["hc_post"], announce=False, environ={})
        got = p.ops.hc_post(f, x, post, comb)
        calls = [c[0] for c in tmo_emulation._emulation.CALLS]
    assert p.entries["hc_post"].label == "cambricon.tmo"
    assert calls[-1:] == ["fused_mhc_post"]  # before it: the FP8 probe's scaled_matmul
    want = reference(f.double(), x.double(), post.double(), comb.double())
    # one bf16 rounding of the output (both sides accumulate in >= fp32): 2^-8 relative
    torch.testing.assert_close(got.double(), want, rtol=2**-8, atol=2**-8)


@pytest.mark.filterwarnings("ignore:seahal. cambricon.tmo runs hc_post on the portable kernel:RuntimeWarning")
def test_hc_post_addend_is_its_post_of_the_sum():
    """With an addend, hc_post equals hc_post on f + addend (a torch add in f's dtype), bit for bit:
    on fused_mhc_post at its shape (4 streams of D = 4096, bf16 and fp32; called for both forms) and
    on the portable path (D = 32); addends that cancel f to 0 or an ulp or two in places."""
    from seahal.testing.cases import hc_case

    with mlu() as tmo_emulation:
        from seahal.backends.cambricon import mhc

        for dtype, d in ((torch.bfloat16, 4096), (torch.float32, 4096), (torch.bfloat16, 32)):
            f, x, post, comb, addend = hc_case("addend", d, "hc_post", b=1, s=2, d=d, dtype=dtype,
                                               addend="cancelling").calls[0]
            before = len(tmo_emulation._emulation.CALLS)
            got, summed = mhc.hc_post(f, x, post, comb, addend), mhc.hc_post(f + addend, x, post, comb)
            tmo_calls = [c[0] for c in tmo_emulation._emulation.CALLS[before:]]
            assert tmo_calls == ([] if d == 32 else ["fused_mhc_post"] * 2), (dtype, d)
            assert torch.equal(got, summed), (dtype, d)


@pytest.mark.filterwarnings("ignore:seahal. cambricon.tmo runs hc_p.* on the portable kernel:RuntimeWarning")
def test_hc_post_pre_is_its_own_post_then_its_own_pre():
    """The plan binds hc_post_pre to tmo, and its outputs equal the backend's hc_post then hc_pre,
    bit for bit: fused_mhc_post then hc_split_sinkhorn at fused_mhc_post's shape (4 streams of
    D = 4096; bf16, and fp32 with an addend, a folded norm weight and 7 Sinkhorn iterations); the
    portable hc_post then hc_split_sinkhorn at D = 32; both portable for fp64 streams. Each agrees
    with the CPU reference within hc_post's and hc_pre's conformance rules."""
    from seahal.testing.cases import hc_case
    from seahal.testing.conformance import failed_checks

    configs = [  # (dtype, D, normed, addend, iters, tmo calls)
        (torch.bfloat16, 4096, False, "none", 20, ["fused_mhc_post", "hc_split_sinkhorn"]),
        (torch.float32, 4096, True, "cancelling", 7, ["fused_mhc_post", "hc_split_sinkhorn"]),
        (torch.bfloat16, 32, True, "cancelling", 20, ["hc_split_sinkhorn"]),
        (torch.float64, 32, False, "cancelling", 20, []),
    ]
    with mlu() as tmo_emulation:
        from seahal.backends.cambricon import mhc

        p = hal.plan("cambricon", ops=["hc_post_pre"], announce=False, environ={})
        assert p.entries["hc_post_pre"].label == "cambricon.tmo"
        for seed, (dtype, d, normed, addend, iters, tmo_calls) in enumerate(configs):
            post_args = hc_case("post", seed, "hc_post", b=1, s=2, d=d, dtype=dtype, addend=addend).calls[0]
            pre_params = hc_case("pre", seed, "hc_pre", b=1, s=2, d=d, dtype=dtype, iters=iters,
                                 normed=normed).calls[0][1:]
            f, x, post, comb, *rest = post_args
            before = len(tmo_emulation._emulation.CALLS)
            got = p.ops.hc_post_pre(f, x, post, comb, *pre_params, *rest)
            assert [c[0] for c in tmo_emulation._emulation.CALLS[before:]] == tmo_calls, (dtype, d)
            streams = mhc.hc_post(*post_args)
            assert all(torch.equal(a, b) for a, b in zip(got, (streams, *mhc.hc_pre(streams, *pre_params)))), (dtype, d)
            assert not failed_checks("hc_post_pre", (f, x, post, comb, *pre_params, *rest), got)


@pytest.mark.filterwarnings("ignore:seahal. cambricon.tmo runs hc_pre on the portable kernel:RuntimeWarning")
def test_hc_pre_norm_weight_is_the_portable_rms_norm_of_the_tmo_collapse():
    """With norm_weight, hc_pre's y is rms_norm (the reference) of its y without it, bit for bit,
    post and comb unchanged: on hc_split_sinkhorn (bf16, fp32 streams) and the portable path (fp64)."""
    from seahal.backends.cpu.reference.norm import rms_norm
    from seahal.testing.cases import hc_case

    with mlu() as tmo_emulation:
        from seahal.backends.cambricon import mhc

        for dtype in (torch.bfloat16, torch.float32, torch.float64):
            *args, norm_weight = hc_case("normed", 0, "hc_pre", d=64, dtype=dtype, normed=True).calls[0]
            before = len(tmo_emulation._emulation.CALLS)
            (y, post, comb), (plain, plain_post, plain_comb) = mhc.hc_pre(*args, norm_weight), mhc.hc_pre(*args)
            tmo_calls = [c[0] for c in tmo_emulation._emulation.CALLS[before:]]
            assert tmo_calls == ([] if dtype == torch.float64 else ["hc_split_sinkhorn"] * 2), dtype
            assert torch.equal(post, plain_post) and torch.equal(comb, plain_comb), dtype
            assert torch.equal(y, rms_norm(plain, norm_weight, args[-1])), dtype


def test_rope_on_tmo_is_bit_exact_forward_and_inverse():
    """apply_rotary gets fp32 tables of the reference's own angles (negated for the inverse), so
    the rotation matches the CPU reference bit for bit; the caller's tensor is left untouched."""
    from seahal.backends.cpu.reference.rope import rope as reference
    from seahal.hal.ops.rope import Yarn, rope_frequencies

    gen = torch.Generator().manual_seed(2)
    freqs = rope_frequencies(16, 160000.0, Yarn(4, 64))
    positions = torch.randint(0, 5000, (2, 7), generator=gen)
    with mlu() as tmo_emulation:
        p = hal.plan("cambricon", ops=["rope"], announce=False, environ={})
        for dtype in (torch.bfloat16, torch.float32):
            x = torch.randn(2, 7, 3, 40, generator=gen).to(dtype)
            original = x.clone()
            for inverse in (False, True):
                got = p.ops.rope(x, positions, freqs, inverse)
                assert torch.equal(got, reference(x, positions, freqs, inverse)), (dtype, inverse)
            assert torch.equal(x, original)
        rotary_calls = [c for c in tmo_emulation._emulation.CALLS if c[0] == "apply_rotary"]
    assert p.entries["rope"].label == "cambricon.tmo"
    assert len(rotary_calls) == 1 + 4  # the fp32 probe, then one call per rotation


def test_the_apply_rotary_emulation_refuses_misuse_as_documented():
    """Checks from the v1.3.2 manual: int32 position ids of [total_seqlen] when discrete, tables in
    the input's dtype, rotary_dim within the head."""
    x = torch.zeros(1, 2, 1, 4)
    table = torch.zeros(2, 4)
    good = {"input": x, "sin_cache": table, "cos_cache": table, "position_ids": torch.zeros(2, dtype=torch.int32),
            "cu_seqlens": None, "interleaved": True, "discrete": True, "dynamic_ntk": False, "max_seqlen": 2}
    with mlu() as tmo_emulation:
        tmo_emulation.apply_rotary(**good)
        bad = (
            ({"position_ids": torch.zeros(2, dtype=torch.int64)}, r"position_ids dtype must be one of \['torch.int32'\]"),
            ({"position_ids": torch.zeros(1, dtype=torch.int32)}, r"position_ids must be \[2\] when discrete"),
            ({"sin_cache": table.bfloat16()}, r"sin_cache dtype must equal input dtype"),
            ({"sin_cache": torch.zeros(2, 6), "cos_cache": torch.zeros(2, 6)}, r"rotary_dim 6 must be even and at most"),
        )
        for change, message in bad:
            with pytest.raises(RuntimeError, match=message):
                tmo_emulation.apply_rotary(**{**good, **change})


def test_attention_splits_heads_beyond_tmos_per_call_limit():
    """160 heads on an fp32 cache exceed tmo's 128 heads per call: the kernel splits them, and the
    result still matches a brute-force softmax with the sink column."""
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 3, 160, 16, generator=gen)
    kv = torch.randn(1, 5, 16, generator=gen)
    indices = torch.tensor([[[0, -1, 2], [4, 3, -1], [-1, -1, -1]]], dtype=torch.int32)
    sink = torch.randn(160, generator=gen)
    with mlu() as tmo_emulation:
        p = hal.plan("cambricon", ops=["sparse_attention"], announce=False, environ={})
        got = p.ops.sparse_attention(q, kv, indices, sink, 0.25)
        heads_per_call = [c for c in tmo_emulation._emulation.CALLS if c[0] == "single_query_cached_kv_attn"]
    assert len(heads_per_call) == 2
    for s, picked in enumerate(([0, 2], [4, 3], [])):
        if not picked:
            assert torch.equal(got[0, s], torch.zeros(160, 16))
            continue
        scores = torch.cat((q[0, s] @ kv[0, picked].T * 0.25, sink[:, None]), dim=1).softmax(-1)
        torch.testing.assert_close(got[0, s], scores[:, :-1] @ kv[0, picked], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fp32_rotary", [True, False])
def test_attention_rotated_back_is_its_own_attention_then_its_own_rope(fp32_rotary, monkeypatch):
    """With positions and freqs, sparse_attention's output is its own tmo attention then the inverse
    rope, bit for bit: the backend's rope on apply_rotary (called once a case) where the fp32 rotary
    probe passed, the portable rope where it failed. The rotated cases: bf16 and fp32, V4's D = 512
    with 64 rotated dims, int32 and int64 positions, one row per sequence and one shared row."""
    from seahal.backends.cpu.reference.rope import rope as portable_rope
    from seahal.testing.cases import cases_for

    cases = [c for c in cases_for("sparse_attention") if c.name.startswith("output rotated back")]
    assert len(cases) >= 5
    with mlu() as tmo_emulation:
        from seahal.backends.cambricon import attention, probe, rope

        if not fp32_rotary:
            monkeypatch.setattr(probe, "fp32_rotary_works", lambda: "fp32 apply_rotary probe failed (test)")
        assert (probe.fp32_rotary_works() is None) == fp32_rotary  # probed here, before the calls counted
        own_rope = rope.rope if fp32_rotary else portable_rope
        for case in cases:
            *args, positions, freqs = case.calls[0]
            plain = attention.sparse_attention(*args)
            before = len(tmo_emulation._emulation.CALLS)
            got = attention.sparse_attention(*args, positions, freqs)
            called = [c[0] for c in tmo_emulation._emulation.CALLS[before:]]
            assert called.count("apply_rotary") == fp32_rotary and "single_query_cached_kv_attn" in called, case.name
            assert torch.equal(got, own_rope(plain, positions, freqs, True)), case.name


# --------------------------------------------------------------------------------------------
# The signature table
# --------------------------------------------------------------------------------------------


def _call_sites() -> list[tuple[str, str, set[str]]]:
    """(file, tmo function, literal keywords) of every ``tmo.call("fn", kw=...)`` in the backend."""
    sites = []
    for path in sorted(BACKEND_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "call"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "tmo"):
                assert not node.args[1:], f"{path.name}: tmo.call passes positional arguments"
                sites.append((path.name, node.args[0].value, {k.arg for k in node.keywords if k.arg}))
    return sites


def test_every_call_site_names_parameters_of_the_pinned_signature():
    _, signatures, _ = _tmo_modules()
    sites = _call_sites()
    assert len(sites) >= 12
    for file, function, keywords in sites:
        releases = [r for r in signatures.RELEASES.values() if function in r.functions]
        assert releases, f"{file}: {function} is in no pinned release"
        newest = releases[-1].functions[function]
        assert keywords <= set(newest.names), (file, function, keywords - set(newest.names))


def _assert_calls_match(calls, entry) -> None:
    """Every recorded tmo call was keyword-only and fits the release's pinned signature."""
    assert calls
    for function, positional, keywords in calls:
        assert positional == 0, f"{function} called with positional arguments"
        assert not entry.functions[function].problems(dict.fromkeys(keywords)), (function, keywords)


def test_on_release_1_6_calls_match_its_table_and_v4_ops_stay_portable():
    """The conformance suite on the older pinned release (1.12 is covered by the conformance test
    above): every call passed the table check, and the V4-only functions are never called."""
    from seahal.testing.conformance import run_conformance

    version = "1.6.0+torch2.7.1"
    with mlu(version=version) as tmo_emulation:
        _, signatures, _ = _tmo_modules()
        report = run_conformance("cambricon", ops=VENDOR_OPS, property_examples=0)
        entry = signatures.entry_for(version)
        calls = list(tmo_emulation._emulation.CALLS)
        plan = hal.plan("cambricon", ops=VENDOR_OPS, announce=False, environ={})
    assert report.ok, report.summary()
    _assert_calls_match(calls, entry)
    assert {c[0] for c in calls} <= set(signatures.RELEASES["1.6"].functions)
    for op in ("kv_compress", "hc_pre", "hc_post", "hc_post_pre"):
        assert plan.entries[op].fallback, op
        assert any("has none of" in why for _, why in plan.entries[op].rejected), plan.entries[op].rejected
    assert plan.entries["moe_gate"].label == "cambricon.tmo"  # sigmoid/softmax exist in 1.6
    # apply_rotary exists in 1.6, but the manual of that era lists fp16/bf16 only: fp32 is probed
    assert plan.entries["rope"].fallback
    assert any("fp32 apply_rotary probe failed on this MLU: RuntimeError: input dtype must be one of" in why
               for _, why in plan.entries["rope"].rejected), plan.entries["rope"].rejected


def test_the_table_records_the_gating_argument_drift():
    """Why calls are keyword-only: the manual's 1.3 order puts num_expert_group third, later
    releases put normalize there; a positional call would silently bind the wrong parameter."""
    _, signatures, _ = _tmo_modules()
    old = signatures.RELEASES["1.3"].functions["moe_softmax_topk"].names
    new = signatures.RELEASES["1.12"].functions["moe_softmax_topk"].names
    assert old[2:5] == ("num_expert_group", "topk_group", "normalize")
    assert new[2:5] == ("normalize", "num_expert_group", "topk_group")
    assert signatures.release_key("1.12.1+torch2.11.0") == "1.12"


def test_an_unpinned_tmo_release_is_refused_with_the_pinned_list():
    with mlu(version="1.9.0") as _:
        tmo, signatures, _ = _tmo_modules()
        avail = hal.backends()["cambricon"].availability()
        plan = hal.plan("cambricon", ops=VENDOR_OPS, announce=False, environ={})
        with pytest.raises(signatures.UnpinnedVersionError, match=r"1\.9\.0 has no entry .* \(pinned: 1\.3, 1\.6, 1\.12\)"):
            tmo.call("moe_gen_idx", expert_id=torch.zeros(1, 1, dtype=torch.int32), expert_num=1)
    assert avail.ok and "torch_mlu_ops 1.9.0 has no entry in seahal's signature table" in avail.reason
    for op in VENDOR_OPS:
        assert plan.entries[op].label == "cpu.reference" and plan.entries[op].fallback
        assert any("no entry in seahal's signature table" in why for _, why in plan.entries[op].rejected)


def test_a_call_that_breaks_the_table_is_refused_before_reaching_tmo():
    with mlu() as tmo_emulation:
        tmo, _, _ = _tmo_modules()
        with pytest.raises(tmo.TmoCallError, match=r"unknown keyword\(s\) \['k'\]; .*missing required parameter"):
            tmo.call("moe_softplus_topk", input=torch.zeros(2, 4), k=2)
        assert tmo_emulation._emulation.CALLS == []


# --------------------------------------------------------------------------------------------
# Probes, FP8, load, info
# --------------------------------------------------------------------------------------------


def test_probe_without_torch_mlu_and_load_explains_it():
    from seahal.model.loader import load
    from seahal.model.tiny import TINY_CONFIG

    avail = hal.backends()["cambricon"].availability()
    assert not avail.ok
    assert avail.reason == "torch_mlu is not installed (Cambricon ships it with its PyTorch build, not on PyPI)"
    with pytest.raises(DeviceError, match=r"device 'cambricon' is not available: torch_mlu is not installed"):
        load(dict(TINY_CONFIG), device="cambricon", announce=False)


def test_probe_names_the_toolkit_when_torch_mlu_fails_to_import(monkeypatch):
    from seahal.backends.cambricon import probe

    def broken(name):
        raise OSError("libcnrt.so: cannot open shared object file")

    monkeypatch.setattr(probe.importlib, "import_module", broken)
    monkeypatch.setenv("NEUWARE_HOME", "/nonexistent/neuware")
    avail = probe.probe()
    assert not avail.ok
    assert "torch_mlu failed to import: libcnrt.so" in avail.reason
    assert "CNToolkit not found (NEUWARE_HOME=/nonexistent/neuware does not exist)" in avail.reason


def test_probe_without_a_visible_mlu(monkeypatch):
    monkeypatch.setenv("MLU_VISIBLE_DEVICES", "")
    with mlu(device_count=0):
        avail = hal.backends()["cambricon"].availability()
    assert not avail.ok
    assert avail.reason == "torch_mlu is installed but no MLU is visible (MLU_VISIBLE_DEVICES=''; check the driver with cnmon)"


def test_without_torch_mlu_ops_every_op_takes_the_portable_path(monkeypatch):
    with mlu():
        monkeypatch.setitem(__import__("sys").modules, "torch_mlu_ops", None)
        backend = hal.backends()["cambricon"]
        backend._availability = None
        avail = backend.availability()
        plan = hal.plan("cambricon", ops=VENDOR_OPS, announce=False, environ={})
    assert avail.ok and avail.chip == "mlu590"
    assert avail.reason.endswith("torch_mlu_ops not installed: every op runs on the portable path")
    assert all(e.label == "cpu.reference" and e.fallback for e in plan.entries.values())


def test_fp8_availability_is_probed_on_the_chip():
    with mlu(fp8=False, chip="MLU370-X8"):
        avail = hal.backends()["cambricon"].availability()
        plan = hal.plan("cambricon", ops=["fp8_gemm", "moe_gate"], announce=False, environ={})
    assert avail.chip == "mlu370"
    assert plan.entries["fp8_gemm"].label == "cpu.reference"
    assert any("FP8 scaled_matmul probe failed on this MLU: RuntimeError: float8_e4m3fn scaled_matmul is not "
               "supported" in why for _, why in plan.entries["fp8_gemm"].rejected)
    assert plan.weight_conversions == {"fp8_gemm": "bfloat16", "grouped_linear": "bfloat16"}
    assert plan.entries["moe_gate"].label == "cambricon.tmo"


def test_info_says_emulated_and_not_verified_on_hardware():
    from seahal.hal.info import collect, format_text

    with mlu():
        text = format_text(collect())
    line = next(line for line in text.splitlines() if line.strip().startswith("cambricon"))
    assert "NOT verified on hardware" in line
    assert "TEST EMULATION of torch_mlu" in text


# --------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------


def test_seahal_run_on_cambricon_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SEAHAL_CACHE", str(tmp_path))
    with mlu() as tmo_emulation:
        code = main(["run", "--device", "cambricon", "--max-new-tokens", "2", "--warmup", "0"])
        called = {c[0] for c in tmo_emulation._emulation.CALLS}
    captured = capsys.readouterr()
    out = captured.out
    assert code == 0, out
    assert re.search(r"plan\(mlu emulated on cpu\): .*\d+ ops cambricon\.tmo", captured.out + captured.err)
    for op in ("moe_gate", "fp8_gemm", "kv_compress", "sparse_attention", "hc_pre", "hc_post", "hc_post_pre", "rope"):
        assert re.search(rf"^{op} +cambricon\.tmo ", out, re.MULTILINE), op
    for op in ("indexer_topk", "fp4_gemm", "fp8_act_quant"):
        assert re.search(rf"^{op} +cpu\.reference \(fallback\) ", out, re.MULTILINE), op
    assert re.search(r"generated: [12] tokens \[", out)
    assert {"moe_softplus_topk", "scaled_matmul", "single_query_cached_kv_attn", "hc_split_sinkhorn",
            "fused_compress_multi_kv", "apply_rotary"} <= called


def test_the_emulation_leaves_nothing_behind():
    """After the emulation (settings included), torch_mlu is gone and the backend unavailable again."""
    with mlu(chip="MLU370-X8", device_count=0):
        assert "torch_mlu" in __import__("sys").modules
    assert "torch_mlu" not in __import__("sys").modules and not hasattr(torch, "mlu")
    assert not hal.backends()["cambricon"].availability().ok
