"""The Ascend backend without an Ascend chip: probes, and its kernels on a test emulation of torch_npu.

``tests/vendor_packages/torch_npu`` emulates the torch_npu operators the backend calls (documented
names, keywords, layouts, dtypes and misuse checks; math on CPU tensors), so the backend's own
marshalling runs through the conformance suite and the model. What the emulation cannot show (the
real kernels' numerics and performance) is for ``seahal conformance --backend ascend`` on a chip.
"""

from __future__ import annotations

import contextlib
import re

import pytest
import torch
from vendor_emulation import emulated

from seahal import hal
from seahal.cli import main
from seahal.hal.info import collect, format_text
from seahal.testing.cases import Case, cases_for, hc_case, requirements
from seahal.testing.conformance import failed_checks, run_case, run_conformance, targets

A2, A3, A5 = 220, 250, 260


def _ascend() -> hal.Backend:
    return hal.backends()["ascend"]


# --------------------------------------------------------------------------------------------
# Probes: what is missing, said exactly
# --------------------------------------------------------------------------------------------


def test_without_torch_npu_the_probe_and_load_say_what_is_missing():
    reason = "torch_npu is not installed: pip install seahal[ascend] (needs the CANN toolkit)"
    assert _ascend().availability().reason == reason
    from seahal.model import load
    from seahal.model.tiny import TINY_CONFIG

    with pytest.raises(hal.DeviceError, match=re.escape(f"device 'ascend' is not available: {reason}")):
        load(dict(TINY_CONFIG), device="ascend", announce=False)


@pytest.mark.parametrize(
    ("settings", "reason"),
    [
        ({"version": "2.10.0.post4"}, "torch_npu 2.10.0.post4 is older than 2.13, which the Ascend kernels need"),
        ({"device_count": 0}, "torch_npu is installed but no NPU is visible (driver, ASCEND_RT_VISIBLE_DEVICES?)"),
        ({"soc_version": 202}, "SoC version 202 is not a chip the Ascend backend knows (Atlas A2 (910B) 220-225"),
    ],
)
def test_probe_explains_an_unusable_torch_npu(settings, reason):
    with emulated("torch_npu", backend="ascend", settings=settings):
        availability = _ascend().availability()
        assert not availability and availability.reason.startswith(reason)
        with pytest.raises(hal.DeviceError, match=re.escape(reason)):
            hal.resolve_device("npu")


@pytest.mark.parametrize(("soc", "chip"), [(A2, "ascend910b"), (A3, "ascend910c"), (A5, "ascend950")])
def test_emulated_chip_family_and_placement(soc, chip):
    with emulated("torch_npu", backend="ascend", settings={"soc_version": soc}):
        availability = _ascend().availability()
        assert (availability.ok, availability.chip, availability.emulated_on) == (True, chip, "cpu")
        assert availability.reason.startswith("TEST EMULATION of torch_npu on cpu tensors, not an NPU: torch_npu 2.14.0")
        device, backend = hal.resolve_device("ascend")
        assert (device, backend.name) == (torch.device("cpu"), "ascend")
    assert not _ascend().availability()  # the emulation is gone with its context


def test_seahal_info_marks_the_emulation_and_the_missing_hardware_verification():
    text = format_text(collect())
    assert re.search(r"^  ascend +device 'npu': unavailable \[NOT verified on hardware\]$", text, re.M)
    with emulated("torch_npu", backend="ascend", settings={"soc_version": A5}):
        text = format_text(collect())
    line = next(line for line in text.splitlines() if line.split()[:1] == ["ascend"])
    assert line.split(None, 1)[1] == (
        "device 'npu': available, chip ascend950 [NOT verified on hardware] "
        "[EMULATED: test emulation of the vendor package, tensors on cpu]"
    )


# --------------------------------------------------------------------------------------------
# Conformance: the backend's kernels (vendor calls + marshalling) against the CPU reference
# --------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:seahal. ascend.torch_npu runs .* on the portable kernel:RuntimeWarning")
@pytest.mark.parametrize("soc", [A2, A5])
def test_conformance_on_the_emulation(soc):
    with emulated("torch_npu", backend="ascend", settings={"soc_version": soc}):
        report = run_conformance("ascend", property_examples=4)
    assert report.ok, report.summary()
    counts = report.counts()
    for op in ("moe_gate", "moe_experts", "sparse_attention"):
        assert counts[op]["pass"] >= 3, report.summary()
    # chip capabilities: FP8 G-B GEMM (and act_quant_gemm over it), FP8 block quant (fp32 scales)
    # and mHC on the 950 only, interleaved npu_rotary_mul on A2/A3 only; elsewhere every case is unsupported
    for op, on_chip in (("fp8_gemm", A5), ("act_quant_gemm", A5), ("fp8_act_quant", A5), ("hc_pre", A5),
                        ("hc_post", A5), ("hc_post_pre", A5), ("rope", A2)):
        if soc == on_chip:
            assert counts[op]["pass"] > 0, (op, report.summary())
        else:
            assert counts[op]["pass"] == 0 < counts[op]["unsupported"], (op, report.summary())


def _indexer_case(seed: int, batch: int, seq: int, n: int, start_pos: int, topk: int) -> Case:
    """V4's indexer geometry (head dim 128, the vendor's only one), which the generic cases lack."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq, 8, 128, generator=g).to(torch.bfloat16)
    weights = torch.rand(batch, seq, 8, generator=g).to(torch.bfloat16).float()
    keys = torch.randn(batch, n, 128, generator=g).to(torch.bfloat16)
    args = (q, weights, keys, 4, start_pos, topk)
    return Case("indexer_topk", f"head dim 128, S={seq}, N={n}, start {start_pos}", (args,), requirements("indexer_topk", args))


def test_indexer_vendor_path_at_head_dim_128():
    """The generic cases use small head dims (portable path); these reach npu_lightning_indexer.
    Head weights are given bf16-representable: the vendor op takes bf16 weights, and rounding
    fp32 weights could reorder near-tied entries (a documented precision limit, not tested here)."""
    cases = [_indexer_case(0, 2, 9, 3, 0, 2), _indexer_case(1, 1, 1, 37, 147, 16), _indexer_case(2, 2, 5, 6, 20, 8)]
    with emulated("torch_npu", backend="ascend"):
        (target,) = targets("ascend", ops=["indexer_topk"])
        import seahal.backends.ascend.attention as attention

        calls = []
        real = attention.torch_npu.npu_lightning_indexer
        attention.torch_npu.npu_lightning_indexer = lambda *a, **k: calls.append(k) or real(*a, **k)
        try:
            results = [run_case(target, case) for case in cases]
        finally:
            attention.torch_npu.npu_lightning_indexer = real
    assert [r.status for r in results] == ["pass"] * 3, [r.detail for r in results]
    assert len(calls) == 3 and {c["layout_key"] for c in calls} == {"PA_BSND"}


@contextlib.contextmanager
def _vendor_calls(module, *names: str):
    """Record the keyword arguments of each ``module.torch_npu.<name>`` call made in the context."""
    calls: dict[str, list[dict]] = {name: [] for name in names}
    real = {name: getattr(module.torch_npu, name) for name in names}
    for name in names:
        setattr(module.torch_npu, name, lambda *a, _name=name, **k: calls[_name].append(k) or real[_name](*a, **k))
    try:
        yield calls
    finally:
        for name in names:
            setattr(module.torch_npu, name, real[name])


def test_mhc_vendor_path_at_stream_geometry():
    """The generic mHC cases (D <= 32) are below npu_mhc_pre's D >= 512; these V4-like streams
    (n = 4, D = 512) reach npu_mhc_pre -> npu_mhc_sinkhorn and npu_mhc_post on the 950, hc_pre and
    hc_head also with norm_weight (the portable RMSNorm after npu_mhc_pre, never its gamma), hc_post
    also with an addend (npu_mhc_post on the sum)."""
    cases = [hc_case(f"{op} n=4 D=512", seed, op, b=1, s=3, d=512) for seed, op in enumerate(("hc_pre", "hc_head", "hc_post"))]
    cases.append(hc_case("hc_pre 7 Sinkhorn iterations", 3, "hc_pre", b=2, s=1, d=512, iters=7))
    cases += [hc_case(f"{op} n=4 D=512 normed", 4 + seed, op, b=1, s=3, d=512, normed=True)
              for seed, op in enumerate(("hc_pre", "hc_head"))]
    cases.append(hc_case("hc_post n=4 D=512 addend", 6, "hc_post", b=1, s=3, d=512, addend="cancelling"))
    with emulated("torch_npu", backend="ascend", settings={"soc_version": A5}):
        from seahal.backends.ascend import mhc

        with _vendor_calls(mhc, "npu_mhc_pre", "npu_mhc_sinkhorn", "npu_mhc_post") as calls:
            results = [run_case(targets("ascend", ops=[case.op])[0], case) for case in cases]
    assert [r.status for r in results] == ["pass"] * 7, [r.detail for r in results]
    assert [len(calls[name]) for name in ("npu_mhc_pre", "npu_mhc_sinkhorn", "npu_mhc_post")] == [5, 3, 2]
    assert [c["num_iters"] for c in calls["npu_mhc_sinkhorn"]] == [20, 7, 20]
    assert all(c.get("gamma") is None for c in calls["npu_mhc_pre"])


@pytest.mark.filterwarnings("ignore:seahal. ascend.torch_npu runs .* on the portable kernel:RuntimeWarning")
def test_mhc_norm_weight_is_the_portable_rms_norm_of_the_vendor_collapse():
    """hc_pre / hc_head with norm_weight equal rms_norm (the reference) of their own y without it,
    bit for bit, on the vendor path and on the portable one (D = 512 and D = 32)."""
    from seahal.backends.cpu.reference.norm import rms_norm

    with emulated("torch_npu", backend="ascend", settings={"soc_version": A5}):
        from seahal.backends.ascend import mhc

        for op, kernel in (("hc_pre", mhc.hc_pre), ("hc_head", mhc.hc_head)):
            for d in (512, 32):
                *args, norm_weight = hc_case(f"{op} D={d}", d, op, b=1, s=2, d=d, normed=True).calls[0]
                y = kernel(*args, norm_weight)
                plain = kernel(*args)
                if op == "hc_pre":
                    assert all(torch.equal(a, b) for a, b in zip(y[1:], plain[1:])), (op, d)
                    y, plain = y[0], plain[0]
                assert torch.equal(y, rms_norm(plain, norm_weight, args[-1])), (op, d)


@pytest.mark.filterwarnings("ignore:seahal. ascend.torch_npu runs .* on the portable kernel:RuntimeWarning")
def test_mhc_post_addend_is_the_vendor_post_of_the_sum():
    """hc_post with an addend equals hc_post on f + addend (a torch add in f's dtype), bit for bit,
    and npu_mhc_post gets that sum as h_out: bf16 n = 4 on npu_mhc_post, fp32 and n = 3 on the
    portable kernel (npu_mhc_post never called); addends that cancel f to 0 or an ulp or two in
    places."""
    with emulated("torch_npu", backend="ascend", settings={"soc_version": A5}):
        from seahal.backends.ascend import mhc

        for dtype, n in ((torch.bfloat16, 4), (torch.float32, 4), (torch.bfloat16, 3)):
            case = hc_case("addend", n, "hc_post", n=n, d=512, dtype=dtype, addend="cancelling")
            f, x, post, comb, addend = case.calls[0]
            with _vendor_calls(mhc, "npu_mhc_post") as calls:
                got = mhc.hc_post(f, x, post, comb, addend)
            vendor = dtype == torch.bfloat16 and n == 4
            assert [torch.equal(c["h_out"], f + addend) for c in calls["npu_mhc_post"]] == [True] * vendor, (dtype, n)
            assert torch.equal(got, mhc.hc_post(f + addend, x, post, comb)), (dtype, n)


def _post_pre_args(seed: int, n: int = 4, d: int = 512, dtype=torch.bfloat16, iters: int = 20, normed: bool = False,
                   addend: str = "none") -> tuple[tuple, tuple]:
    """hc_post_pre's arguments as (hc_post's (f, x, post, comb[, addend]), hc_pre's past the streams
    (fn, base, scale, iters, eps, norm_eps, norm_weight)), drawn by the two ops' case builders."""
    post_args = hc_case("post", seed, "hc_post", b=1, s=3, n=n, d=d, dtype=dtype, addend=addend).calls[0]
    pre_args = hc_case("pre", seed, "hc_pre", b=1, s=3, n=n, d=d, dtype=dtype, iters=iters, normed=normed).calls[0]
    return post_args, pre_args[1:]


@pytest.mark.filterwarnings("ignore:seahal. ascend.torch_npu runs .* on the portable kernel:RuntimeWarning")
def test_mhc_post_pre_is_its_own_post_then_its_own_pre():
    """hc_post_pre: the 950's plan binds the vendor kernel, A2's the portable reference (mHC's chip
    rule). Through the plan its outputs equal the backend's hc_post then hc_pre, bit for bit:
    npu_mhc_post then npu_mhc_pre -> npu_mhc_sinkhorn at n = 4, D = 512 (also with an addend, a
    folded norm weight and 7 Sinkhorn iterations); npu_mhc_post with the portable hc_pre at D = 32;
    both portable for fp32 streams and n = 3. Each agrees with the CPU reference within hc_post's
    and hc_pre's conformance rules."""
    configs = [  # (post_pre args, npu_mhc_post calls, npu_mhc_pre calls)
        (_post_pre_args(0), 1, 1),
        (_post_pre_args(1, iters=7, normed=True, addend="cancelling"), 1, 1),
        (_post_pre_args(2, d=32, addend="cancelling"), 1, 0),
        (_post_pre_args(3, dtype=torch.float32, normed=True), 0, 0),
        (_post_pre_args(4, n=3, addend="cancelling"), 0, 0),
    ]
    with emulated("torch_npu", backend="ascend", settings={"soc_version": A2}):
        with pytest.warns(RuntimeWarning, match="no npu kernel and run on a portable fallback: hc_post_pre"):
            entry = hal.plan("ascend", ops=["hc_post_pre"], announce=False, environ={}).entries["hc_post_pre"]
        assert (entry.label, entry.fallback) == ("cpu.reference", True)
    with emulated("torch_npu", backend="ascend", settings={"soc_version": A5}):
        from seahal.backends.ascend import mhc

        p = hal.plan("ascend", ops=["hc_post_pre"], announce=False, environ={})
        assert p.entries["hc_post_pre"].label == "ascend.torch_npu"
        for (post_args, pre_params), post_calls, pre_calls in configs:
            f, x, post, comb, *addend = post_args
            with _vendor_calls(mhc, "npu_mhc_pre", "npu_mhc_sinkhorn", "npu_mhc_post") as calls:
                got = p.ops.hc_post_pre(f, x, post, comb, *pre_params, *addend)
            counts = [len(calls[name]) for name in ("npu_mhc_post", "npu_mhc_pre", "npu_mhc_sinkhorn")]
            assert counts == [post_calls, pre_calls, pre_calls], (x.shape, x.dtype, counts)
            streams = mhc.hc_post(*post_args)
            assert all(torch.equal(a, b) for a, b in zip(got, (streams, *mhc.hc_pre(streams, *pre_params)))), x.shape
            assert not failed_checks("hc_post_pre", (f, x, post, comb, *pre_params, *addend), got)


@pytest.mark.parametrize("soc", [A2, A5])
def test_attention_rotated_back_is_its_own_attention_then_its_own_rope(soc):
    """With positions and freqs, sparse_attention's output is npu_sparse_flash_attention's then the
    inverse rope, bit for bit: the backend's rope on npu_rotary_mul on A2 (called once a case), the
    portable rope on the 950 (npu_rotary_mul never called). The bf16 rotated cases: V4's D = 512 with
    64 rotated dims, int32 and int64 positions, one row per sequence and one shared row (stride 0)."""
    from seahal.backends.cpu.reference.rope import rope as portable_rope

    cases = [c for c in cases_for("sparse_attention")
             if c.name.startswith("output rotated back") and c.calls[0][0].dtype == torch.bfloat16]
    assert len(cases) >= 4
    with emulated("torch_npu", backend="ascend", settings={"soc_version": soc}):
        from seahal.backends.ascend import attention, rope

        own_rope = rope.rope if soc == A2 else portable_rope
        for case in cases:
            *args, positions, freqs = case.calls[0]
            plain = attention.sparse_attention(*args)
            with _vendor_calls(rope, "npu_rotary_mul") as calls:
                got = attention.sparse_attention(*args, positions, freqs)
            assert len(calls["npu_rotary_mul"]) == (soc == A2), case.name
            assert torch.equal(got, own_rope(plain, positions, freqs, True)), case.name


# --------------------------------------------------------------------------------------------
# The model end to end: `seahal run --device ascend`
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("soc", "fp8_kernel"), [(A2, "cpu.reference (fallback)"), (A5, "ascend.torch_npu")])
def test_seahal_run_on_the_emulated_npu(soc, fp8_kernel, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SEAHAL_CACHE", str(tmp_path))
    with emulated("torch_npu", backend="ascend", settings={"soc_version": soc}):
        with pytest.warns(RuntimeWarning, match="no npu kernel and run on a portable fallback"):
            assert main(["run", "--device", "ascend", "--max-new-tokens", "1", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^plan\(npu emulated on cpu\): \d+ ops cpu\.reference, \d+ ops ascend\.torch_npu", out, re.M)
    table = {m[0]: m[1].strip() for m in re.findall(r"^(\w+) +(\S+(?: \(fallback\))?) ", out, re.M)}
    vendor = ["moe_experts", "indexer_topk", "sparse_attention"] + (
        ["hc_pre", "hc_post", "hc_post_pre", "hc_head"] if soc == A5 else ["rope"])
    for op in vendor:
        assert table[op] == "ascend.torch_npu", out  # vendor operators (mHC on the 950 only, rope on A2/A3 only)
    for op in ["moe_gate", "kv_compress", "fp8_act_quant"] + (["rope"] if soc == A5 else ["hc_pre", "hc_post_pre"]):
        assert table[op] == "cpu.reference (fallback)", out  # the portable path (V4's sqrtsoftplus gate, ue8m0 quant)
    assert table["fp8_gemm"] == fp8_kernel
    conversions = re.findall(r"^weights converted at load: quantised (\w+) weights -> bfloat16", out, re.M)
    assert sorted(conversions) == sorted(["fp4_gemm", "moe_experts", "grouped_linear"] + (["fp8_gemm"] if soc == A2 else []))
    assert re.search(r"generated: 1 tokens \[\d+\]", out)
