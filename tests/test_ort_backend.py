"""The onnxruntime backend (backends/onnxruntime): every HAL op through onnxruntime, held to the
conformance suite, placed by plans only when asked for by name, and running the tiny model."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from seahal import hal
from seahal.backends import onnxruntime as ort_backend
from seahal.backends.onnxruntime import kernels, session
from seahal.cli import main as cli
from seahal.hal.formats import index_key_pack
from seahal.hal.ops.compressor import compressor_state
from seahal.onnx.functions import select
from seahal.testing.conformance import run_conformance

pytest.importorskip("onnxruntime")


def _labels(plan: hal.Plan) -> dict[str, str]:
    return {op: entry.label for op, entry in plan.entries.items()}


def test_conformance_passes_on_every_op():
    """Every op's fixed cases plus one hypothesis example, against the float64 CPU reference with
    the suite's tolerances (docs/conformance.md); none may be unsupported: every op is here, and
    the functions taking a position take one per sequence."""
    report = run_conformance("onnxruntime", property_examples=1)
    assert report.ok, report.summary()
    counts = report.counts()
    assert set(counts) == set(hal.specs())
    for op, row in counts.items():
        assert row["unsupported"] == 0 and row["pass"] >= 6, (op, row)


@pytest.mark.parametrize("device", ["onnxruntime", "ort"])
def test_plan_by_name_binds_every_op_to_onnxruntime(device):
    plan = hal.plan(device, policy="strict", announce=False, environ={})
    assert (plan.backend.name, plan.device) == ("onnxruntime", torch.device("cpu"))
    assert set(_labels(plan).values()) == {"onnxruntime.function"}
    assert all(e.reason == f"highest priority ({ort_backend.KERNEL_PRIORITY}) for cpu" for e in plan.entries.values())


def test_cpu_and_auto_plans_never_see_onnxruntime():
    """The backend is opt-in: plans for cpu keep cpu's kernels and do not even list onnxruntime's;
    device="auto" ranks it below cpu. An override may still send one op there."""
    plan = hal.plan("cpu", announce=False, environ={})
    assert set(_labels(plan).values()) <= {"cpu.reference", "cpu.native"}
    assert not any(k.startswith("onnxruntime.") for e in plan.entries.values() for k, _ in e.rejected)
    assert hal.resolve_device("auto")[1].name != "onnxruntime"
    mixed = hal.plan("cpu", ["rope", "hc_post"], announce=False, environ={"SEAHAL_OPS": "rope=onnxruntime"})
    assert _labels(mixed) == {"rope": "onnxruntime.function", "hc_post": "cpu.reference"}
    assert mixed.entries["rope"].reason == "override onnxruntime"


def test_seahal_info_lists_the_backend(capsys):
    assert cli(["info"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.split()[:1] == ["onnxruntime"])
    assert line.split(None, 1)[1] == "device 'cpu': available"
    assert "providers: " in out and "CPUExecutionProvider" in out


def test_probe_explains_what_is_missing(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    availability = ort_backend.probe()
    assert not availability
    assert availability.reason == "onnxruntime not installed (pip install onnxruntime onnx onnxscript)"


def test_execution_provider_follows_the_device_or_the_environment():
    assert session.providers("cpu", environ={}) == ("CPUExecutionProvider",)
    with pytest.raises(RuntimeError, match=r"lacks NoSuchExecutionProvider \(wanted for SEAHAL_ORT_PROVIDERS=NoSuch"):
        session.providers("cpu", environ={"SEAHAL_ORT_PROVIDERS": "NoSuchExecutionProvider"})
    import onnxruntime

    for device, provider in (("cuda", "CUDAExecutionProvider"), ("npu", "CANNExecutionProvider")):
        if provider in onnxruntime.get_available_providers():
            assert session.providers(device, environ={})[0] == provider
        else:
            with pytest.raises(RuntimeError, match=f"lacks {provider} \\(wanted for {device} tensors\\); this build has"):
                session.providers(device, environ={})


def test_start_pos_is_an_input_so_decode_steps_share_a_session():
    """kv_compress at successive positions reuses one session (start_pos is a graph input)."""
    kv = torch.randn(1, 1, 16)
    ape, norm, freqs = torch.zeros(4, 16), torch.ones(16), torch.ones(4)
    kv_state, score_state = compressor_state(1, 4, 16, overlap=False)
    session._session.cache_clear()
    for pos in range(1, 9):
        kernels.kv_compress(kv, kv, ape, norm, freqs, kv_state, score_state, 4, False, pos)
    info = session._session.cache_info()
    assert (info.misses, info.hits) == (1, 7)


def test_kv_cache_store_positions_are_inputs_so_decode_steps_share_a_session(monkeypatch):
    """kv_cache_store normalising and rotating at successive decode positions (ring slots p mod 4,
    per sequence) builds one session, of kv_cache_store_normed, and reuses it: positions, slots and
    the cache are graph inputs, norm_eps an attribute. Each step rewrites its slots' rows alone."""
    built = []
    real = session.node_model
    monkeypatch.setattr(session, "node_model", lambda function, *args: built.append(function.name) or real(function, *args))
    g = torch.Generator().manual_seed(1)
    kv, weight = torch.randn(2, 1, 96, generator=g), torch.rand(96, generator=g) + 0.5
    freqs = 10000.0 ** -(torch.arange(16) / 16)
    cache = torch.zeros(2, 4, 136, dtype=torch.uint8)
    session._session.cache_clear()
    for pos in range(1, 9):
        positions = torch.tensor([[pos], [pos + 5]])
        before = cache.clone()
        assert kernels.kv_cache_store(kv, cache, positions % 4, 32, 32, positions, freqs, weight, 1e-5) is None
        changed = (cache != before).any(-1)
        assert torch.equal(changed, torch.zeros(2, 4, dtype=torch.bool).scatter_(1, positions % 4, True)), pos
    info = session._session.cache_info()
    assert (info.misses, info.hits) == (1, 7) and built == ["kv_cache_store_normed"]


def test_hadamard_rotate_positions_are_inputs_so_decode_steps_share_a_session(monkeypatch):
    """The indexer's query roped then rotated and FP4-rounded (hadamard_rotate with positions) at
    successive decode positions builds one session, of hadamard_rotate_fp4_roped, and reuses it:
    positions are graph inputs, fp4_block an attribute. Each step's output is the plain FP4 rotation
    of the query roped at that step's positions."""
    built = []
    real = session.node_model
    monkeypatch.setattr(session, "node_model", lambda function, *args: built.append(function.name) or real(function, *args))
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 1, 4, 64, generator=g).to(torch.bfloat16)
    freqs = 10000.0 ** -(torch.arange(16) / 16)
    session._session.cache_clear()
    for pos in range(1, 9):
        positions = torch.tensor([[pos], [pos + 100]])
        got = kernels.hadamard_rotate(q, 32, positions, freqs)
        assert torch.equal(got, kernels.hadamard_rotate(kernels.rope(q, positions, freqs), 32)), pos
    info = session._session.cache_info()
    assert built.count("hadamard_rotate_fp4_roped") == 1 and built.count("rope") == 1
    assert info.misses == len(built) == 3 and info.hits == 3 * 8 - 3


def test_indexer_position_and_offset_are_inputs_so_steps_and_chunks_share_a_session(monkeypatch):
    """indexer_topk_packed (FP4 keys) through a plan for onnxruntime with the model's weights_scale
    and offset, at successive decode positions, then at a prefill chunk's offset (W + S): start_pos
    and offset are inputs, weights_scale an attribute (the model's constant), so one session of
    indexer_topk_packed_fp4 serves every step and every chunk length. Each call selects the cpu
    reference's indices exactly: integer q and keys make the logits exact, and with two heads each
    score is one rounding of a two-term sum, in any order."""
    built = []
    real = session.node_model
    monkeypatch.setattr(session, "node_model", lambda function, *args: built.append(function.name) or real(function, *args))
    g = torch.Generator().manual_seed(4)
    q = torch.randint(-4, 5, (2, 1, 2, 32), generator=g).to(torch.bfloat16)
    keys = index_key_pack(torch.randint(-4, 5, (2, 8, 32), generator=g).float(), "fp4")
    weights = torch.randn(2, 1, 2, generator=g).to(torch.bfloat16)
    ops = hal.plan("onnxruntime", ["indexer_topk_packed"], announce=False, environ={}).ops
    reference = hal.plan(
        "cpu", ["indexer_topk_packed"], announce=False, environ={"SEAHAL_OPS": "indexer_topk_packed=cpu.reference"}
    ).ops
    scale = 128**-0.5 * 64**-0.5  # the V4 indexer's head_dim^-0.5 * n_heads^-0.5
    session._session.cache_clear()
    for pos, offset in [*((pos, 16) for pos in range(8, 32)), (31, 16 + 5)]:
        call = (q, weights, keys, "fp4", 4, pos, 4, scale, offset)
        got, want = ops.indexer_topk_packed(*call), reference.indexer_topk_packed(*call)
        assert torch.equal(got, want) and (got[got >= 0] >= offset).all(), (pos, offset)
    assert built == ["indexer_topk_packed_fp4"]
    info = session._session.cache_info()
    assert (info.misses, info.hits) == (1, 24)


def test_hc_post_pre_runs_the_function_its_optional_tensors_pick(monkeypatch):
    """hc_post_pre through a plan for onnxruntime, twice per combination of addend and
    norm_weight (positional and by keyword, defaults filled in): each combination builds one
    session, of the function select picks, which the second call reuses; the outputs are the
    contract's (streams and y in x's dtype, post' and comb' fp32) and the cpu plan's reference
    kernel's within 1e-4 of their scale: fp32 activations, the same fp32 math in another summation
    order (about 2^-24 relative per sum of n*D = 256 terms, through 20 Sinkhorn rounds of 4 x 4)."""
    built = []
    real = session.node_model
    monkeypatch.setattr(session, "node_model", lambda function, *args: built.append(function.name) or real(function, *args))
    g = torch.Generator().manual_seed(3)
    n, d = 4, 64
    x, f, addend = torch.randn(2, 3, n, d, generator=g), *torch.randn(2, 2, 3, d, generator=g)
    post, comb = 2 * torch.rand(2, 3, n, generator=g), torch.softmax(torch.randn(2, 3, n, n, generator=g), dim=-2)
    fn, base = torch.randn((2 + n) * n, n * d, generator=g) / d, torch.randn((2 + n) * n, generator=g)
    scale, weight = torch.rand(3, generator=g) + 0.5, torch.rand(d, generator=g) + 0.5
    ops = hal.plan("onnxruntime", ["hc_post_pre"], announce=False, environ={}).ops
    reference = hal.plan("cpu", ["hc_post_pre"], announce=False, environ={"SEAHAL_OPS": "hc_post_pre=cpu.reference"}).ops
    session._session.cache_clear()
    expected = []
    for optional in ({}, {"norm_weight": weight}, {"addend": addend}, {"norm_weight": weight, "addend": addend}):
        expected.append(select("hc_post_pre", {"addend": None, "norm_weight": None, **optional}).name)
        got = ops.hc_post_pre(f, x, post, comb, fn, base, scale, **optional)
        again = ops.hc_post_pre(f, x, post, comb, fn, base, scale, 20, 1e-6, 1e-6, optional.get("norm_weight"),
                                optional.get("addend"))
        want = reference.hc_post_pre(f, x, post, comb, fn, base, scale, **optional)
        assert [(t.shape, t.dtype) for t in got] == [(x.shape, x.dtype), ((2, 3, d), x.dtype),
                                                     ((2, 3, n), torch.float32), ((2, 3, n, n), torch.float32)]
        for name, a, b, w in zip(("streams", "y", "post", "comb"), got, again, want, strict=True):
            assert torch.equal(a, b), (optional.keys(), name)
            assert (a - w).abs().max() <= 1e-4 * w.abs().max(), (optional.keys(), name)
    assert built == expected == ["hc_post_pre", "hc_post_pre_normed", "hc_post_summed_pre", "hc_post_summed_pre_normed"]
    info = session._session.cache_info()
    assert (info.misses, info.hits) == (4, 4)


def test_tiny_model_on_onnxruntime_matches_cpu():
    """Prefill and two cached decode steps of the tiny V4 model (fp32 activations) on
    device="onnxruntime" against device="cpu".

    Tolerance 1e-4 * max|logit|: both plans compute every op in fp32 and differ only in
    summation order (ORT MatMul/Einsum vs torch), each op within γ(K) = K·2^-24 relative for
    K <= 512 (3e-5), which stays near 1e-6 relative through the 4 layers (observed: 3e-6 absolute
    on logits of magnitude ~10). The bound leaves room for that, not for a wrong formula; an FP8
    activation code landing on the other side of a rounding tie would move logits by about one
    e4m3 step of that value and could exceed it, which these fixed inputs do not provoke."""
    from seahal.model import load
    from seahal.model.tiny import default_checkpoint

    path, _ = default_checkpoint()
    ids = torch.randint(0, 512, (1, 14), generator=torch.Generator().manual_seed(0))
    models = {device: load(path, device=device, announce=False, environ={}) for device in ("cpu", "onnxruntime")}
    assert set(_labels(models["onnxruntime"].plan).values()) == {"onnxruntime.function"}
    caches = {device: m.new_cache(1, 32) for device, m in models.items()}
    for chunk in (ids[:, :12], ids[:, 12:13], ids[:, 13:14]):
        got, want = (models[d](chunk, cache=caches[d]) for d in ("onnxruntime", "cpu"))
        scale = want.abs().max()
        assert (got - want).abs().max() <= 1e-4 * scale
        assert torch.equal(got.argmax(-1), want.argmax(-1))
