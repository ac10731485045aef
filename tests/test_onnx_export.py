"""ONNX export of a tiny DeepSeek-V4: the checker, the seahal functions, and onnxruntime's logits
and cache against the PyTorch model, for a prefill and for a decode step fed the prefill's cache.

Two checkpoints of the tiny layout (3 layers: SWA with hash routing, CSA, HCA): dense fp32 math
without the FP8/FP4 precision simulation, and the release layout (FP8 linears, FP4 experts,
FP8 KV records, FP4 indexer keys), also run with FP8 indexer keys (``fp8_keys``). The prompt
(19 tokens) wraps the 16-slot window ring and completes CSA and HCA entries; one decode graph then
runs every position up to the capacity (19..31), feeding its present cache back as past: it
completes CSA entries at 19, 23, 27 and 31, the HCA entry at 31, and the window keeps wrapping.
hc_pre and hc_head are also exported on their own, with and without norm_weight, sparse_attention
and sparse_attention_fp8 with and without positions, hc_post with and without an addend,
hc_post_pre with and without each of norm_weight and addend,
kv_cache_store with positions, with and without a norm weight (the model calls one form only),
index_key_store in both key formats, and hadamard_rotate with and without positions and fp4_block.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from onnx import inliner  # noqa: E402

from seahal import hal  # noqa: E402
from seahal.backends.cpu.reference.quant import (  # noqa: E402
    hadamard_rotate, index_key_store, kv_cache_pack, kv_cache_store,
)
from seahal.cli import main  # noqa: E402
from seahal.hal.formats import index_key_bytes  # noqa: E402
from seahal.hal.ops.quant import kv_record_bytes  # noqa: E402
from seahal.model.config import ModelConfig  # noqa: E402
from seahal.model.convert import convert_tensors, quantised_config, write_checkpoint  # noqa: E402
from seahal.model.tiny import TINY_CONFIG, random_tensors  # noqa: E402
from seahal.onnx.export import (  # noqa: E402
    MIN_TORCH, _attach_functions, _pure_bindings, _translation, export_onnx, reference_model,
)
from seahal.onnx.functions import OPS, OPSET, select  # noqa: E402

pytestmark = pytest.mark.skipif(
    torch.torch_version.TorchVersion(torch.__version__) < MIN_TORCH,
    reason=f"export needs torch >= {'.'.join(map(str, MIN_TORCH))}",
)

PROMPT, BATCH, CAPACITY = 19, 2, 32
LAYOUT = {**TINY_CONFIG, "n_layers": 3, "compress_ratios": [0, 4, 16]}

DENSE_RTOL = 1e-4
"""Dense fp32: ONNX Runtime evaluates the same fp32 formulas in another order (blocked GEMMs,
other reductions). Each dot product of K <= 512 terms may differ by ~sqrt(K) * 2^-24 relative
(~1e-6 typical; observed <= 1.2e-6 of the logit scale after 3 layers); 1e-4 of the largest logit
leaves room for unlucky orders and is still far below any wrong formula (O(1) errors)."""

RELEASE_RTOL = 2e-2
"""Release layout: the same fp32 math, but activations are rounded to FP8 (e4m3, 3 mantissa
bits) before every GEMM and the cached KV and indexer keys to FP8/FP4. Where ONNX Runtime's
input to a rounding differs from PyTorch's in the last fp32 bit at a rounding boundary, one
element moves by one code step (2^-3 of its value); through a 256-wide GEMM that is ~1e-2 of
the output scale at most. (Observed: logits within 7.7e-6 of the scale at every step; one bf16
rope value of one compressed entry per compressed layer is one bf16 step apart.)"""


def _checkpoint(path, quantise: bool):
    raw = dict(LAYOUT)
    tensors = random_tensors(ModelConfig.from_dict(raw), seed=1).items()
    if quantise:
        tensors, raw = convert_tensors(tensors), quantised_config(raw, "fp4", "fp8")
    else:
        raw.update(simulate_fp8_kv=False, simulate_fp4_indexer=False)
    write_checkpoint(tensors, path)
    (path / "config.json").write_text(json.dumps(raw))
    return path


OVERRIDES = {"dense": {}, "release": {"cache_format": "fp8"}, "fp8_keys": {"cache_format": "fp8", "index_cache_format": "fp8"}}
"""Model config overrides per variant: the release checkpoint with FP8 KV records and its default
FP4 indexer keys, or with FP8 indexer keys (d_i + 4 bytes: e4m3 codes and an fp32 scale)."""


class Case:
    """One checkpoint, its reference model, and its exported prefill and decode graphs."""

    def __init__(self, variant: str, folder):
        self.variant = variant
        quantised = variant != "dense"
        self.checkpoint = _checkpoint(folder / "ckpt", quantise=quantised)
        self.model = reference_model(self.checkpoint, **OVERRIDES[variant])
        self.rtol = RELEASE_RTOL if quantised else DENSE_RTOL
        self.prefill = export_onnx(self.model, folder / "prefill.onnx", "prefill", PROMPT, BATCH, CAPACITY)
        self.decode = export_onnx(self.model, folder / "decode.onnx", "decode", PROMPT, BATCH, CAPACITY)


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    return Case("dense", tmp_path_factory.mktemp("dense"))


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return Case("release", tmp_path_factory.mktemp("release"))


@pytest.fixture(scope="module")
def fp8_keys(tmp_path_factory):
    return Case("fp8_keys", tmp_path_factory.mktemp("fp8_keys"))


VARIANTS = pytest.mark.parametrize("variant", list(OVERRIDES))


def _run(path, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip((o.name for o in session.get_outputs()), session.run(None, feed)))


PACKED_MISMATCH = 1e-3
"""Packed cache bytes (FP8 records, FP4 or FP8 keys) that may differ: only a value at a rounding
boundary (see RELEASE_RTOL) changes its code; observed: 1 of 9600 and 1 of 7200 KV record bytes
(the bf16 rope values above), none in the key records."""


def _assert_close(actual: np.ndarray, expected: torch.Tensor, rtol: float, what: str) -> None:
    expected = expected.numpy()
    if expected.dtype == np.uint8:
        mismatched = (actual != expected).mean()
        assert mismatched <= PACKED_MISMATCH, f"{what}: {mismatched:.2%} of the bytes differ"
        return
    finite = np.isfinite(expected)
    assert np.array_equal(finite, np.isfinite(actual)), f"{what}: -inf slots differ"
    scale = np.abs(expected[finite]).max(initial=1.0)
    error = np.abs(actual[finite] - expected[finite]).max(initial=0.0)
    assert error <= rtol * scale, f"{what}: max |onnx - torch| = {error:.3g}, allowed {rtol * scale:.3g}"


@VARIANTS
def test_graph_is_checked_and_calls_seahal_functions(variant, request):
    case = request.getfixturevalue(variant)
    model, prefill, decode = case.model, case.prefill, case.decode
    for graph in (prefill, decode):
        proto = onnx.load(graph.path)
        onnx.checker.check_model(proto, full_check=True)
        functions = {(f.domain, f.name) for f in proto.functions}
        calls = [n for n in proto.graph.node if n.domain == "seahal"]
        assert calls and all((n.domain, n.op_type) in functions for n in calls)
        to_op = {name: op for op, names in OPS.items() for name in names}
        assert Counter(to_op[n.op_type] for n in calls) == graph.hal_nodes
        # Every function body is standard ONNX (or further seahal functions the model carries).
        for f in proto.functions:
            assert all(n.domain in ("", "seahal", "seahal.lib") for n in f.node), f.name
        cache_names = list(model.new_cache(BATCH, CAPACITY).named_tensors())
        past = ["start_pos", *(f"past.{n}" for n in cache_names)] if graph.mode == "decode" else []
        assert [i.name for i in proto.graph.input] == ["input_ids", *past]
        assert [o.name for o in proto.graph.output] == ["logits", *(f"present.{n}" for n in cache_names)]
    hal_ops = set(prefill.hal_nodes)
    packed = variant != "dense"
    attention = "sparse_attention_fp8" if packed else "sparse_attention"
    indexer = "indexer_topk_packed" if packed else "indexer_topk"  # 68-byte FP4 (release) or 132-byte FP8 key records
    assert {"hc_pre", "hc_post", "hc_head", "kv_compress", indexer, attention} <= hal_ops
    assert indexer in decode.hal_nodes
    assert {"moe_gate", "moe_experts"} <= hal_ops
    assert attention in decode.hal_nodes
    called = {n.op_type for g in (prefill, decode) for n in onnx.load(g.path).graph.node if n.domain == "seahal"}
    wo_a = model.layers[0].attn.wo_a.weight  # FP8 in the release layout, unless the plan dequantises it at load
    assert select("grouped_linear", {"weight": wo_a}).name in called
    if packed:  # the FP8 KV records are attended as stored: nothing decodes the cache
        assert {"act_quant_gemm", "fp8_act_quant", "fp8_gemm", "kv_cache_pack"} <= hal_ops
        assert "hadamard_rotate" in hal_ops and "hadamard_rotate" in decode.hal_nodes  # the indexer's FP4 rounding
        # the index-key records: the prompt's packed (an int position), a decode step's packed and stored
        assert "index_key_pack" in hal_ops and "index_key_store" in decode.hal_nodes
        key_format = OVERRIDES[variant].get("index_cache_format", "fp4")
        decode_functions = {n.op_type for n in onnx.load(decode.path).graph.node if n.domain == "seahal"}
        # the query's RoPE in its rotation; each step's KV records packed, normalised and stored by one node
        assert {f"index_key_store_{key_format}", f"indexer_topk_packed_{key_format}", "hadamard_rotate_fp4_roped",
                "kv_cache_store_normed"} <= decode_functions
        assert not {"sparse_attention", "kv_cache_unpack"} & (hal_ops | set(decode.hal_nodes))
    meta = {p.key: p.value for p in onnx.load(decode.path).metadata_props}
    assert (meta["seahal.mode"], meta["seahal.cache_capacity"]) == ("decode", "32")
    assert "seahal.start_pos" not in meta  # a graph input
    start_pos = onnx.load(decode.path).graph.input[1].type.tensor_type
    assert (start_pos.elem_type, [d.dim_value for d in start_pos.shape.dim]) == (onnx.TensorProto.INT64, [BATCH])


@VARIANTS
def test_onnxruntime_matches_pytorch_for_prefill_then_decode_steps(variant, request):
    """The prefill graph, then ONE decode graph (one session) at every position to the capacity,
    each step fed the previous one's present cache and its position; logits and the cache's valid
    rows compared with the PyTorch model and its Cache after every step."""
    case = request.getfixturevalue(variant)
    model, rtol, prefill, decode = case.model, case.rtol, case.prefill, case.decode
    ids = torch.randint(0, 512, (BATCH, CAPACITY), generator=torch.Generator().manual_seed(7))
    cache = model.new_cache(BATCH, CAPACITY)
    expected = model(ids[:, :PROMPT], cache=cache)
    out = _run(prefill.path, {"input_ids": ids[:, :PROMPT].numpy()})
    _assert_close(out["logits"], expected, rtol, f"{variant} prefill logits")
    for name, tensor in cache.named_tensors().items():
        _assert_close(out[f"present.{name}"], tensor, rtol, f"{variant} prefill {name}")

    session = ort.InferenceSession(str(decode.path), providers=["CPUExecutionProvider"])
    output_names = [o.name for o in session.get_outputs()]
    for pos in range(PROMPT, CAPACITY):
        feed = {f"past.{name[len('present.'):]}": v for name, v in out.items() if name.startswith("present.")}
        feed.update(input_ids=ids[:, pos : pos + 1].numpy(), start_pos=np.full(BATCH, pos, dtype=np.int64))
        out = dict(zip(output_names, session.run(None, feed)))
        expected = model(ids[:, pos : pos + 1], cache=cache)
        _assert_close(out["logits"], expected, rtol, f"{variant} decode logits at {pos}")
        for name, tensor in cache.named_tensors().items():
            rows = _valid_rows(cache, name)
            _assert_close(out[f"present.{name}"][:, rows], tensor[:, rows], rtol, f"{variant} decode {name} at {pos}")
    assert [lc.n_compressed for lc in cache.layers] == [0, CAPACITY // 4, CAPACITY // 16]


def _valid_rows(cache, name: str) -> slice:
    """The rows of cache tensor ``name`` valid at the cache's int position: of a compressed store
    the ``n_compressed`` entries (after the ring), of the rest all. The decode graph also stores
    its compressor's padding (a packed zero entry) in the next entry, where the int-position
    cache leaves the zeros it was made with."""
    layer, tensor = name.split(".")[1:]
    lc = cache.layers[int(layer)]
    valid = {"kv": slice(0, lc.window + lc.n_compressed), "index_keys": slice(0, lc.n_compressed)}
    return valid.get(tensor, slice(None))


@VARIANTS
def test_sequences_at_different_positions_decode_in_one_graph(variant, request):
    """The decode graph at per-sequence positions: two prompts of 7 and 19 tokens prefilled into the
    rows of one cache, then steps of both together, against the PyTorch model's position-generic
    step at the same positions (seahal.model.decode_graph.DecodeGraph), logits and whole cache."""
    from seahal.model.decode_graph import DecodeGraph

    case = request.getfixturevalue(variant)
    model, rtol, decode = case.model, case.rtol, case.decode
    ids = torch.randint(0, 512, (BATCH, CAPACITY), generator=torch.Generator().manual_seed(11))
    lengths = [7, PROMPT]
    cache = model.new_cache(BATCH, CAPACITY)
    for b, n in enumerate(lengths):
        model(ids[b : b + 1, :n], cache=cache.rows(b, b + 1))
    feed = {f"past.{name}": t.clone().numpy() for name, t in cache.named_tensors().items()}
    graph = DecodeGraph(model, cache, capture=False, positions=lengths)
    session = ort.InferenceSession(str(decode.path), providers=["CPUExecutionProvider"])
    output_names = [o.name for o in session.get_outputs()]
    for step in range(CAPACITY - PROMPT):
        tokens = torch.stack([ids[b, n + step] for b, n in enumerate(lengths)])[:, None]
        feed.update(input_ids=tokens.numpy(), start_pos=np.array([n + step for n in lengths], dtype=np.int64))
        out = dict(zip(output_names, session.run(None, feed)))
        expected = graph.step(tokens)
        _assert_close(out["logits"], expected, rtol, f"{variant} logits at step {step}")
        for name, tensor in cache.named_tensors().items():
            _assert_close(out[f"present.{name}"], tensor, rtol, f"{variant} {name} at step {step}")
        feed = {f"past.{name[len('present.'):]}": v for name, v in out.items() if name.startswith("present.")}


def test_inlined_graph_gives_the_same_outputs(release):
    """A runtime that does not know the seahal ops inlines their bodies: same graph, same numbers.
    (The release layout: it calls the most functions.)"""
    model, decode = release.model, release.decode
    inlined = inliner.inline_local_functions(onnx.load(decode.path))
    onnx.checker.check_model(inlined, full_check=True)
    assert not inlined.functions and all(n.domain == "" for n in inlined.graph.node)
    ids = torch.randint(0, 512, (BATCH, 1), generator=torch.Generator().manual_seed(3))
    past = model.new_cache(BATCH, CAPACITY).named_tensors()
    feed = {"input_ids": ids.numpy(), "start_pos": np.array([3, 9], dtype=np.int64)}
    feed.update({f"past.{name}": t.numpy() for name, t in past.items()})
    with_functions = _run(decode.path, feed)
    session = ort.InferenceSession(inlined.SerializeToString(), providers=["CPUExecutionProvider"])
    plain = dict(zip(with_functions, session.run(None, feed)))
    for name, value in with_functions.items():
        np.testing.assert_allclose(plain[name], value, rtol=1e-6, atol=1e-6, err_msg=name)


def _exported_alone(
    module_type: type[nn.Module], ops: list[str], args: tuple, path: Path
) -> tuple[list[str], list[np.ndarray], tuple[torch.Tensor, ...]]:
    """``module_type(plan)`` over a CPU plan of the reference kernels of ``ops``, exported to ONNX at
    ``path`` (the model checked; a mutating op traced through its pure twin) and run by onnxruntime
    on ``args``: (the seahal nodes' functions in graph order, onnxruntime's outputs, the module's
    own outputs)."""
    plan = hal.plan("cpu", ops, announce=False, environ={"SEAHAL_OPS": ",".join(f"{op}=cpu.reference" for op in ops)})
    module = module_type(plan)
    with _pure_bindings(plan, positional=False) as bindings:
        program = torch.export.export(module, args)
    table = {torch_op: _translation(op, torch_op) for torch_op, op in bindings.items() if op in ops}
    onnx_program = torch.onnx.export(program, dynamo=True, custom_translation_table=table, opset_version=OPSET,
                                     optimize=False, verbose=False)
    _attach_functions(onnx_program.model)
    onnx_program.save(path)
    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    calls = [n.op_type for n in proto.graph.node if n.domain == "seahal"]
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {i.name: a.numpy() for i, a in zip(session.get_inputs(), args, strict=True)})
    return calls, got, module(*args)


class _Collapses(nn.Module):
    """hc_pre and hc_head, each with and without norm_weight, through a plan's ops."""

    def __init__(self, plan: hal.Plan):
        super().__init__()
        self.ops = plan.ops

    def forward(self, x, pre_fn, pre_base, pre_scale, head_fn, head_base, head_scale, norm_weight):
        pre, head = (x, pre_fn, pre_base, pre_scale), (x, head_fn, head_base, head_scale)
        normed = self.ops.hc_pre(*pre, 20, 1e-6, 1e-3, norm_weight)
        plain = self.ops.hc_pre(*pre, 20, 1e-6, 1e-3)
        return *normed, *plain, self.ops.hc_head(*head, 1e-6, 1e-3, norm_weight), self.ops.hc_head(*head, 1e-6, 1e-3)


def test_hc_norm_weight_exports_the_normed_functions(tmp_path):
    """hc_pre / hc_head traced with and without norm_weight become seahal::hc_pre_normed / hc_pre
    and hc_head_normed / hc_head nodes (the translation selects by the traced arguments), and
    onnxruntime's outputs match the CPU reference's. norm_eps (1e-3) is not eps: a swap shows."""
    g = torch.Generator().manual_seed(5)
    n, d, mixes = 4, 64, 24  # hc_pre: (2 + n) * n mixes
    args = (
        torch.randn(2, 3, n, d, generator=g),
        torch.randn(mixes, n * d, generator=g) / d, torch.randn(mixes, generator=g), torch.rand(3, generator=g) + 0.5,
        torch.randn(n, n * d, generator=g) / d, torch.randn(n, generator=g), torch.rand(1, generator=g) + 0.5,
        torch.rand(d, generator=g) + 0.5,
    )
    calls, got, want = _exported_alone(_Collapses, ["hc_pre", "hc_head"], args, tmp_path / "collapses.onnx")
    assert calls == ["hc_pre_normed", "hc_pre", "hc_head_normed", "hc_head"]
    names = ["y_normed", "post_normed", "comb_normed", "y", "post", "comb", "head_normed", "head"]
    for name, actual, expected in zip(names, got, want, strict=True):
        _assert_close(actual, expected, DENSE_RTOL, name)


class _Attentions(nn.Module):
    """sparse_attention and sparse_attention_fp8 (records of kv_cache_pack with rope_dim = tile =
    16), each with and without positions, through a plan's ops."""

    def __init__(self, plan: hal.Plan):
        super().__init__()
        self.ops = plan.ops

    def forward(self, q, kv, records, indices, sink, positions, freqs):
        scale = q.shape[-1] ** -0.5
        dense, packed = (q, kv, indices, sink, scale), (q, records, indices, sink, scale, 16, 16)
        return (
            self.ops.sparse_attention(*dense, positions, freqs), self.ops.sparse_attention(*dense),
            self.ops.sparse_attention_fp8(*packed, positions, freqs), self.ops.sparse_attention_fp8(*packed),
        )


def test_attention_positions_export_the_rotated_functions(tmp_path):
    """sparse_attention / sparse_attention_fp8 traced with and without positions and freqs become
    seahal::sparse_attention_rotated / sparse_attention and sparse_attention_fp8_rotated /
    sparse_attention_fp8 nodes, and onnxruntime's outputs match the CPU reference's."""
    g = torch.Generator().manual_seed(6)
    batch, seq, heads, dim, rows = 2, 5, 4, 64, 16
    kv = torch.randn(batch, rows, dim, generator=g)
    indices = torch.randint(-1, rows, (batch, seq, 8), generator=g, dtype=torch.int32)
    positions = torch.arange(seq) + torch.tensor([[3], [40]])
    args = (
        torch.randn(batch, seq, heads, dim, generator=g), kv, kv_cache_pack(kv, 16, 16), indices,
        torch.randn(heads, generator=g), positions, 10000.0 ** -(torch.arange(8) / 8),
    )
    ops = ["sparse_attention", "sparse_attention_fp8"]
    calls, got, want = _exported_alone(_Attentions, ops, args, tmp_path / "attentions.onnx")
    assert calls == ["sparse_attention_rotated", "sparse_attention", "sparse_attention_fp8_rotated", "sparse_attention_fp8"]
    for name, actual, expected in zip(calls, got, want, strict=True):
        _assert_close(actual, expected, DENSE_RTOL, name)


class _Posts(nn.Module):
    """hc_post with and without an addend (the sub-layer output in two parts), through a plan's ops."""

    def __init__(self, plan: hal.Plan):
        super().__init__()
        self.ops = plan.ops

    def forward(self, f, x, post, comb, addend):
        return self.ops.hc_post(f, x, post, comb, addend), self.ops.hc_post(f, x, post, comb)


def test_hc_post_addend_exports_the_summed_function(tmp_path):
    """hc_post traced with and without addend becomes seahal::hc_post_summed / hc_post nodes, and
    onnxruntime's outputs match the CPU reference's; on one token the addend cancels f (a sum of 0)."""
    g = torch.Generator().manual_seed(7)
    n, d = 4, 64
    f = torch.randn(2, 3, d, generator=g)
    addend = torch.randn(2, 3, d, generator=g)
    addend[0, 0] = -f[0, 0]
    comb = torch.softmax(torch.randn(2, 3, n, n, generator=g), dim=-2)
    args = (f, torch.randn(2, 3, n, d, generator=g), 2 * torch.rand(2, 3, n, generator=g), comb, addend)
    calls, got, want = _exported_alone(_Posts, ["hc_post"], args, tmp_path / "posts.onnx")
    assert calls == ["hc_post_summed", "hc_post"]
    for name, actual, expected in zip(calls, got, want, strict=True):
        _assert_close(actual, expected, DENSE_RTOL, name)


class _PostPres(nn.Module):
    """hc_post_pre without and with norm_weight, each without and with an addend, through a plan's ops."""

    def __init__(self, plan: hal.Plan):
        super().__init__()
        self.ops = plan.ops

    def forward(self, f, x, post, comb, fn, base, scale, norm_weight, addend):
        pre = (fn, base, scale, 20, 1e-6, 1e-3)
        return (
            *self.ops.hc_post_pre(f, x, post, comb, *pre),
            *self.ops.hc_post_pre(f, x, post, comb, *pre, norm_weight),
            *self.ops.hc_post_pre(f, x, post, comb, *pre, addend=addend),
            *self.ops.hc_post_pre(f, x, post, comb, *pre, norm_weight, addend),
        )


def test_hc_post_pre_exports_the_function_of_its_optional_tensors(tmp_path):
    """hc_post_pre traced with neither, either or both of norm_weight and addend becomes a
    seahal::hc_post_pre / hc_post_pre_normed / hc_post_summed_pre / hc_post_summed_pre_normed node
    (four outputs each), and onnxruntime's outputs match the CPU reference's; on one token the addend
    cancels f (a sum of 0). norm_eps (1e-3) is not eps: a swap shows."""
    g = torch.Generator().manual_seed(8)
    n, d, mixes = 4, 64, 24  # hc_pre: (2 + n) * n mixes
    f = torch.randn(2, 3, d, generator=g)
    addend = torch.randn(2, 3, d, generator=g)
    addend[0, 0] = -f[0, 0]
    comb = torch.softmax(torch.randn(2, 3, n, n, generator=g), dim=-2)
    args = (
        f, torch.randn(2, 3, n, d, generator=g), 2 * torch.rand(2, 3, n, generator=g), comb,
        torch.randn(mixes, n * d, generator=g) / d, torch.randn(mixes, generator=g), torch.rand(3, generator=g) + 0.5,
        torch.rand(d, generator=g) + 0.5, addend,
    )
    calls, got, want = _exported_alone(_PostPres, ["hc_post_pre"], args, tmp_path / "post_pres.onnx")
    assert calls == ["hc_post_pre", "hc_post_pre_normed", "hc_post_summed_pre", "hc_post_summed_pre_normed"]
    names = [f"{call} {output}" for call in calls for output in ("streams", "y", "post", "comb")]
    for name, actual, expected in zip(names, got, want, strict=True):
        _assert_close(actual, expected, DENSE_RTOL, name)


class _Rotations(nn.Module):
    """hadamard_rotate with and without positions (x roped first), each with and without the FP4
    rounding, through a plan's ops."""

    def __init__(self, plan: hal.Plan):
        super().__init__()
        self.ops = plan.ops

    def forward(self, x, positions, freqs):
        rotate = self.ops.hadamard_rotate
        return rotate(x, 32, positions, freqs), rotate(x, 0, positions, freqs), rotate(x, 32), rotate(x)


def test_hadamard_rotate_positions_export_the_roped_functions(tmp_path):
    """hadamard_rotate traced with and without positions and freqs, with and without fp4_block,
    becomes seahal::hadamard_rotate_fp4_roped / hadamard_rotate_roped / hadamard_rotate_fp4 /
    hadamard_rotate nodes, and onnxruntime's outputs are held to the float64 CPU reference by the
    conformance rule (an FP4 code may round the other way where the fp32 sums differ)."""
    from seahal.testing.tolerances import checks_for

    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 3, 4, 128, generator=g) * torch.exp2(torch.randint(-4, 5, (2, 3, 4, 1), generator=g).float())
    positions = torch.arange(3) + torch.tensor([[5], [90]])
    args = (x, positions, 10000.0 ** -(torch.arange(32) / 32))
    forms = {  # each node's function -> its call's arguments after x
        "hadamard_rotate_fp4_roped": (32, *args[1:]), "hadamard_rotate_roped": (0, *args[1:]),
        "hadamard_rotate_fp4": (32,), "hadamard_rotate": (0,),
    }
    calls, got, _ = _exported_alone(_Rotations, ["hadamard_rotate"], args, tmp_path / "rotations.onnx")
    assert calls == list(forms)
    for actual, (name, call) in zip(got, forms.items(), strict=True):
        want = hadamard_rotate(x.double(), *call)  # float64 math, the angles too
        (check,) = checks_for("hadamard_rotate", (x, *call))
        verdict = check.check.compare(torch.from_numpy(actual), want)
        assert verdict.ok, (name, verdict.detail)


class _Store(nn.Module):
    """A store op (kv_cache_store, index_key_store) into a copy of its store through a plan's ops
    (a mutating op with no output); ``extra``: its arguments after slots."""

    def __init__(self, plan: hal.Plan, op: str, *extra):
        super().__init__()
        self.ops, self.op, self.extra = plan.ops, op, extra

    def forward(self, data, store, slots):
        store = store.clone()
        assert getattr(self.ops, self.op)(data, store, slots, *self.extra) is None
        return store


def _exported_store(tmp_path: Path, op: str, args: tuple, *extra) -> tuple[list[str], np.ndarray]:
    """``_Store(op, *extra)`` on ``args`` (data, store, slots) exported (:func:`_exported_alone`):
    the seahal nodes of the checked model, and the store onnxruntime returns."""
    calls, (got,), _ = _exported_alone(lambda plan: _Store(plan, op, *extra), [op], args, tmp_path / "store.onnx")
    return calls, got


def test_kv_cache_store_exports_through_its_pure_twin(tmp_path):
    """kv_cache_store mutates its cache and returns nothing: traced through its pure twin (which
    returns the new cache, copied back), it becomes one seahal::kv_cache_store node whose one output
    is that cache, and onnxruntime's cache equals the reference's byte for byte (slots [1, n]: the
    same rows of every sequence's cache; the other rows keep their bytes)."""
    g = torch.Generator().manual_seed(8)
    kv = torch.randn(2, 3, 48, generator=g)
    cache = torch.randint(0, 256, (2, 8, kv_record_bytes(48, 16, 16)), generator=g, dtype=torch.uint8)
    slots = torch.tensor([[5, 0, 7]])
    nodes, got = _exported_store(tmp_path, "kv_cache_store", (kv, cache, slots), 16, 16)
    assert nodes == ["kv_cache_store"]
    want = cache.clone()
    kv_cache_store(kv, want, slots, 16, 16)
    np.testing.assert_array_equal(got, want.numpy())
    assert (want != cache).any(-1).sum() == 6  # 3 rows of each sequence written
    np.testing.assert_array_equal(got[:, [1, 2, 3, 4, 6]], cache[:, [1, 2, 3, 4, 6]].numpy())


@pytest.mark.parametrize("key_format", ["fp4", "fp8"])
def test_index_key_store_exports_through_its_pure_twin(tmp_path, key_format):
    """index_key_store, the same way: one seahal::index_key_store_<key_format> node (the key format
    selects the function; no attribute) whose one output is the new store, onnxruntime's store the
    reference's byte for byte (int32 slots per sequence; the other rows keep their bytes)."""
    g = torch.Generator().manual_seed(9)
    keys = torch.randn(2, 3, 64, generator=g)
    store = torch.randint(0, 256, (2, 8, index_key_bytes(64, key_format)), generator=g, dtype=torch.uint8)
    slots = torch.tensor([[5, 0, 7], [1, 7, 2]], dtype=torch.int32)
    nodes, got = _exported_store(tmp_path, "index_key_store", (keys, store, slots), key_format)
    assert nodes == [f"index_key_store_{key_format}"]
    want = store.clone()
    index_key_store(keys, want, slots, key_format)
    np.testing.assert_array_equal(got, want.numpy())
    assert (want != store).any(-1).sum() == 6  # 3 rows of each sequence written
    np.testing.assert_array_equal(got[0, [1, 2, 3, 4, 6]], store[0, [1, 2, 3, 4, 6]].numpy())
    np.testing.assert_array_equal(got[1, [0, 3, 4, 5, 6]], store[1, [0, 3, 4, 5, 6]].numpy())


class _NormedStores(nn.Module):
    """kv_cache_store with positions, with and without a norm weight, each into a copy of the cache
    through a plan's ops (the vectors normalised and rotated before packing)."""

    def __init__(self, plan: hal.Plan):
        super().__init__()
        self.ops = plan.ops

    def forward(self, kv, cache, slots, positions, freqs, norm_weight):
        weighted, unweighted = cache.clone(), cache.clone()
        assert self.ops.kv_cache_store(kv, weighted, slots, 16, 16, positions, freqs, norm_weight, 1e-3) is None
        assert self.ops.kv_cache_store(kv, unweighted, slots, 16, 16, positions, freqs) is None
        return weighted, unweighted


def test_kv_cache_store_positions_export_the_normed_functions(tmp_path):
    """kv_cache_store traced with positions and freqs, with and without norm_weight, becomes
    seahal::kv_cache_store_normed / kv_cache_store_normed_unweighted nodes (the translation selects
    by the traced arguments; norm_eps an attribute), and onnxruntime's caches hold the reference's
    within the conformance rule (the stored rows decoded, every other row its bytes)."""
    from seahal.testing.tolerances import checks_for

    g = torch.Generator().manual_seed(9)
    kv = torch.randn(2, 3, 48, generator=g)
    cache = torch.randint(0, 256, (2, 8, kv_record_bytes(48, 16, 16)), generator=g, dtype=torch.uint8)
    slots = torch.tensor([[5, 0, 7], [1, 2, 3]])
    positions = torch.arange(3) + torch.tensor([[40], [7]])
    freqs, weight = 10000.0 ** -(torch.arange(8) / 8), torch.rand(48, generator=g) + 0.5
    args = (kv, cache, slots, positions, freqs, weight)
    path = tmp_path / "stores.onnx"
    calls, got, _ = _exported_alone(_NormedStores, ["kv_cache_store"], args, path)
    assert calls == ["kv_cache_store_normed", "kv_cache_store_normed_unweighted"]
    eps = [a.f for n in onnx.load(path).graph.node if n.domain == "seahal" for a in n.attribute if a.name == "norm_eps"]
    assert eps[0] == pytest.approx(1e-3)
    for actual, norm_weight, eps in zip(got, (weight, None), (1e-3, 1e-6), strict=True):
        call = (kv, cache, slots, 16, 16, positions, freqs, norm_weight, eps)
        want = cache.clone()
        kv_cache_store(kv, want, *call[2:])
        (check,) = checks_for("kv_cache_store", call)
        verdict = check.check.compare(torch.from_numpy(actual), want)
        assert verdict.ok, (norm_weight is not None, verdict.detail)


def test_cli_exports_a_decode_step(release, tmp_path, capsys):
    out = tmp_path / "step.onnx"
    args = ["export-onnx", "--model", str(release.checkpoint), "--out", str(out), "--mode", "decode"]
    args += ["--batch-size", str(BATCH), "--max-seq-len", str(CAPACITY)]
    assert main(args + ["--cache-format", "fp8"]) == 0
    assert "decode: 1 token(s) at the position input start_pos" in capsys.readouterr().out
    exported, reference = onnx.load(out), onnx.load(release.decode.path)
    assert [i.name for i in exported.graph.input] == [i.name for i in reference.graph.input]
    assert [o.name for o in exported.graph.output] == [o.name for o in reference.graph.output]


def test_an_older_torch_is_refused_before_anything_is_read(monkeypatch, tmp_path):
    monkeypatch.setattr(torch, "__version__", "2.5.1+cpu")
    with pytest.raises(RuntimeError, match=r"ONNX export needs torch >= 2\.6 .*, got torch 2\.5\.1\+cpu"):
        export_onnx(tmp_path / "no checkpoint here", tmp_path / "x.onnx")


def test_bad_arguments_are_named(dense, tmp_path):
    model = dense.model
    with pytest.raises(ValueError, match="mode must be one of"):
        export_onnx(model, tmp_path / "x.onnx", mode="train")
    with pytest.raises(ValueError, match="needs max_seq_len >= 33"):
        export_onnx(model, tmp_path / "x.onnx", mode="prefill", prompt_len=33, max_seq_len=32)
