"""The HAL ops as ONNX functions (seahal.onnx.functions): calling convention, model validity, and
the places where a formulation in standard ONNX ops could silently differ from the reference —
power-of-two scales derived through Log, ties in TopK, bit patterns built arithmetically.

Each function runs here as a one-node model in onnxruntime (CPU), independently of the
onnxruntime backend; the conformance suite (tests/test_ort_backend.py) covers every op's math.
"""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto

from seahal import hal
from seahal.backends.cpu.reference import attention as ref_attention
from seahal.backends.cpu.reference import compressor as ref_compressor
from seahal.backends.cpu.reference import gemm as ref_gemm
from seahal.backends.cpu.reference import indexer as ref_indexer
from seahal.backends.cpu.reference import mhc as ref_mhc
from seahal.backends.cpu.reference import moe as ref_moe
from seahal.backends.cpu.reference import quant as ref_quant
from seahal.hal.formats import (
    E8M0_DTYPE, FP4_AMAX_FLOOR, FP8_AMAX_FLOOR, index_key_bytes, index_key_unpack, sylvester_hadamard,
)
from seahal.hal.ops.compressor import compressor_state, most_new_entries, new_entries
from seahal.hal.ops.quant import kv_record_bytes
from seahal.onnx import functions as F
from seahal.testing.cases import hc_case, sparse_attention_case, sparse_attention_fp8_case
from seahal.testing.conformance import failed_checks, float64_positions
from seahal.testing.tolerances import StoredRows, checks_for


def _run(name: str, inputs: dict[str, np.ndarray], **attributes) -> list[np.ndarray]:
    """Run function ``name`` on numpy inputs (fp32 / int / uint8) as a one-node model."""
    fn = F.FUNCTIONS[name]
    in_types = [(onnx.helper.np_dtype_to_tensor_dtype(inputs[n].dtype), inputs[n].ndim) for n in fn.inputs]
    out_types = attributes.pop("out_types")
    model = F.node_model(fn, in_types, out_types, attributes)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {n: inputs[n] for n in fn.inputs})


def _ort_value(t: torch.Tensor) -> ort.OrtValue:
    """An OrtValue sharing t's memory (bf16, which numpy lacks, as its int16 bits)."""
    if t.dtype == torch.bfloat16:
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(t.view(torch.int16).numpy(), TensorProto.BFLOAT16)
    return ort.OrtValue.ortvalue_from_numpy(t.numpy())


def _onnx_type(t: torch.Tensor) -> tuple[int, int]:
    """(ONNX element type, rank) of a float (bf16, fp32, fp64) or uint8 tensor."""
    return (TensorProto.UINT8 if t.dtype == torch.uint8 else F.onnx_dtype(t.dtype), t.dim())


def _run_into(name: str, x: torch.Tensor, out: torch.Tensor, **attributes) -> torch.Tensor:
    """Run the function ``name`` of one input x (bf16, fp32 or fp64) writing its one output into ``out``."""
    fn = F.FUNCTIONS[name]
    model = F.node_model(fn, [_onnx_type(x)], [_onnx_type(out)], attributes)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = x.contiguous()  # ORT reads and writes their memory: x and out stay alive
    binding = session.io_binding()
    binding.bind_ortvalue_input(fn.inputs[0], _ort_value(x))
    binding.bind_ortvalue_output("out0", _ort_value(out))
    session.run_with_iobinding(binding)
    return out


def _run_like(name: str, x: torch.Tensor, **attributes) -> torch.Tensor:
    """Run the function ``name`` of one input x whose one output has x's shape and dtype."""
    return _run_into(name, x, torch.empty_like(x), **attributes)


def _run_lib(name: str, x: np.ndarray, out_type: tuple[int, int]) -> np.ndarray:
    """Run the one-input, one-output ``seahal.lib`` helper ``name`` on x (dims symbolic)."""
    helper = onnx.helper

    def value(n: str, elem_type: int, rank: int) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(n, elem_type, [f"{n}_{i}" for i in range(rank)])

    node = helper.make_node(name, ["x"], ["out"], domain=F.LIB_DOMAIN)
    x_value = value("x", helper.np_dtype_to_tensor_dtype(x.dtype), x.ndim)
    graph = helper.make_graph([node], name, [x_value], [value("out", *out_type)])
    model = F.complete_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", F.OPSET)], ir_version=10))
    onnx.checker.check_model(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _hadamard_rotate(x: torch.Tensor, fp4_block: int) -> torch.Tensor:
    """hadamard_rotate through the function :func:`F.select` picks for fp4_block."""
    fn = F.select("hadamard_rotate", {"fp4_block": fp4_block})
    return _run_like(fn.name, x, **fn.attribute_values({"fp4_block": fp4_block}))


def _bits(t: torch.Tensor) -> torch.Tensor:
    """t's bit patterns (so -0 differs from 0)."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def test_every_op_has_functions_taking_its_arguments_in_hal_order():
    assert set(F.OPS) == set(hal.specs())
    for name, fn in F.FUNCTIONS.items():
        hal_names = list(inspect.signature(hal.get_spec(fn.op).contract).parameters)
        assert name in F.OPS[fn.op] and fn.name == name
        for group in (fn.inputs, fn.attributes):  # each a subsequence of the HAL signature
            assert [n for n in hal_names if n in group] == list(group), (name, group)
        taken = set(fn.inputs) | set(fn.attributes)
        assert all(n not in taken for n in hal_names if n not in fn.inputs + fn.attributes)
    assert F.FUNCTIONS["kv_compress"].inputs[-1] == "start_pos"  # a run-time input, not an attribute
    assert F.FUNCTIONS["kv_compress"].n_outputs == 3 and F.FUNCTIONS["kv_compress"].mutates == ("kv_state", "score_state")
    assert "top_k" in F.FUNCTIONS["moe_gate_hash"].attributes and "bias" not in F.FUNCTIONS["moe_gate_hash"].inputs
    store = F.FUNCTIONS["kv_cache_store"]  # no output of its own: the node returns the new cache alone
    assert (store.inputs, store.attributes) == (("kv", "cache", "slots"), ("rope_dim", "tile"))
    assert store.n_outputs == 1 and store.mutates == ("cache",) and store.shared_batch == ("slots",)
    for name in ("kv_cache_store_normed", "kv_cache_store_normed_unweighted"):  # positions: the same one output
        assert F.FUNCTIONS[name].n_outputs == 1 and F.FUNCTIONS[name].mutates == ("cache",)
    for fmt in ("fp4", "fp8"):  # likewise the new store alone; the key format picks the function
        store = F.FUNCTIONS[f"index_key_store_{fmt}"]
        assert (store.inputs, store.attributes) == (("keys", "store", "slots"), ())
        assert store.n_outputs == 1 and store.mutates == ("store",) and store.shared_batch == ("slots",)
    store = F.FUNCTIONS["kv_compress_store"]  # no output of its own: the new states, then the new store
    assert store.inputs == (*F.FUNCTIONS["kv_compress_fp8"].inputs, "store", "slots")
    assert store.attributes == F.FUNCTIONS["kv_compress_fp8"].attributes
    assert store.n_outputs == 3 and store.mutates == ("kv_state", "score_state", "store")
    assert store.shared_batch == ("slots",) and F.select("kv_compress_store", {}) is store


def test_select_picks_the_variant_from_optional_tensors_and_weight_formats():
    x = torch.zeros(2, 8)
    assert F.select("moe_gate", {"bias": torch.zeros(4), "tid2eid": None}).name == "moe_gate"
    assert F.select("moe_gate", {"bias": None, "tid2eid": None}).name == "moe_gate_unbiased"
    assert F.select("moe_gate", {"bias": None, "tid2eid": torch.zeros(9, 2, dtype=torch.int32)}).name == "moe_gate_hash"
    weights = {
        "moe_experts": (x, SimpleNamespace(dtype=ir.DataType.BFLOAT16)),
        "moe_experts_fp8": (x.to(torch.float8_e4m3fn), SimpleNamespace(dtype=ir.DataType.FLOAT8E4M3FN)),
        "moe_experts_fp4": (x.to(torch.uint8), SimpleNamespace(dtype=ir.DataType.UINT8)),
    }
    for name, (tensor, exported_value) in weights.items():  # torch tensors and onnx_ir values alike
        assert F.select("moe_experts", {"w1": tensor}).name == name
        assert F.select("moe_experts", {"w1": exported_value}).name == name
        if name != "moe_experts_fp4":  # grouped_linear weights: dense or FP8
            linear = name.replace("moe_experts", "grouped_linear")
            assert F.select("grouped_linear", {"weight": tensor}).name == linear
            assert F.select("grouped_linear", {"weight": exported_value}).name == linear
    b_formats = (("fp8", torch.float8_e4m3fn, ir.DataType.FLOAT8E4M3FN), ("fp4", torch.uint8, ir.DataType.UINT8))
    for fmt, dtype, exported in b_formats:
        assert F.select("act_quant_gemm", {"b": x.to(dtype)}).name == f"act_quant_gemm_{fmt}"  # b's format picks it
        assert F.select("act_quant_gemm", {"b": SimpleNamespace(dtype=exported)}).name == f"act_quant_gemm_{fmt}"
        assert F.FUNCTIONS[f"act_quant_gemm_{fmt}"].inputs == ("x", "b", "b_scale")
        assert F.FUNCTIONS[f"act_quant_gemm_{fmt}"].attributes == ("out_dtype",)
    with pytest.raises(KeyError, match="no ONNX function for 'act_quant_gemm' with a dense b"):
        F.select("act_quant_gemm", {"b": x})
    assert F.FUNCTIONS["grouped_linear"].inputs == ("x", "weight")  # a dense weight has no scale
    assert F.FUNCTIONS["grouped_linear_fp8"].inputs == ("x", "weight", "scale")
    assert F.select("rope", {}).name == "rope"
    assert F.select("rms_norm_rope", {"weight": torch.ones(8)}).name == "rms_norm_rope"
    assert F.select("rms_norm_rope", {"weight": None}).name == "rms_norm_rope_unweighted"
    assert F.FUNCTIONS["rms_norm_rope_unweighted"].inputs == ("x", "positions", "freqs")
    assert F.select("hadamard_rotate", {"fp4_block": 0}).name == "hadamard_rotate"
    assert F.select("hadamard_rotate", {"fp4_block": 32}).name == "hadamard_rotate_fp4"
    assert F.FUNCTIONS["hadamard_rotate_fp4"].attributes == ("fp4_block",)
    assert not F.FUNCTIONS["hadamard_rotate"].attributes  # fp4_block 0 is the function itself
    positions, freqs = torch.zeros(1, 1, dtype=torch.int64), torch.ones(1)
    assert F.select("hadamard_rotate", {"fp4_block": 0, "positions": positions, "freqs": freqs}).name == (
        "hadamard_rotate_roped")
    assert F.select("hadamard_rotate", {"fp4_block": 32, "positions": positions, "freqs": freqs}).name == (
        "hadamard_rotate_fp4_roped")
    assert F.FUNCTIONS["hadamard_rotate_roped"].inputs == ("x", "positions", "freqs")
    assert F.FUNCTIONS["hadamard_rotate_fp4_roped"].attributes == ("fp4_block",)
    for op in ("indexer_topk_packed", "index_key_pack", "index_key_store"):  # the key format picks it: no attribute
        for fmt in ("fp4", "fp8"):
            assert F.select(op, {"key_format": fmt}).name == f"{op}_{fmt}"
            assert "key_format" not in F.FUNCTIONS[f"{op}_{fmt}"].attributes
    assert F.FUNCTIONS["index_key_pack_fp4"].inputs == F.FUNCTIONS["index_key_pack_fp8"].inputs == ("keys",)
    with pytest.raises(KeyError, match="no ONNX function for 'nosuch'"):
        F.select("nosuch", {})


def test_attribute_values_follow_the_convention():
    kv_compress = F.FUNCTIONS["kv_compress"]
    args = {"ratio": 4, "overlap": True, "start_pos": 7, "norm_eps": 1e-6, "out_dtype": None}
    assert kv_compress.attribute_values(args) == {"ratio": 4, "overlap": 1, "norm_eps": 1e-6, "out_dtype": TensorProto.BFLOAT16}
    assert kv_compress.attribute_values({"out_dtype": torch.float32}) == {"out_dtype": TensorProto.FLOAT}
    indexer = F.FUNCTIONS["indexer_topk"]  # an int for a float attribute becomes a float: ONNX types attributes
    assert indexer.attributes == ("ratio", "topk", "weights_scale") and indexer.float_attributes == ("weights_scale",)
    assert indexer.inputs[-2:] == ("start_pos", "offset")  # both int64 inputs: no session per position or chunk
    values = indexer.attribute_values({"ratio": 4, "start_pos": 7, "topk": 8, "weights_scale": 1, "offset": 128})
    assert values == {"ratio": 4, "topk": 8, "weights_scale": 1.0} and isinstance(values["weights_scale"], float)
    with pytest.raises(ValueError, match="out_dtype must be one of"):
        kv_compress.attribute_values({"out_dtype": torch.int8})


def test_complete_model_adds_functions_and_imports_and_refuses_another_opset():
    graph = onnx.helper.make_graph([], "empty", [], [])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", F.OPSET)], ir_version=10)
    F.complete_model(model)
    onnx.checker.check_model(model, full_check=True)
    assert {o.domain: o.version for o in model.opset_import} == {"": F.OPSET, "seahal": 1, "seahal.lib": 1}
    names = {(f.domain, f.name) for f in model.functions}
    assert {("seahal", name) for name in F.FUNCTIONS} <= names and ("seahal.lib", "fp8_quantize") in names
    assert len(F.complete_model(model).functions) == len(names)  # idempotent
    older = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])
    with pytest.raises(ValueError, match="imports the default ONNX domain at 18; seahal functions need 21"):
        F.complete_model(older)


def test_power_of_two_scales_are_exact_across_the_exponent_range():
    """ue8m0 scales come from Log, corrected against a table of powers of two. Tiles whose amax
    is exactly ``qmax * 2^k`` (scale must stay 2^k) or one fp32 ulp above it (must become 2^(k+1))
    probe the correction at every exponent; the reference computes exponents with frexp."""
    k = np.arange(-126, 100, dtype=np.float32)
    for op, qmax, tile in (("fp4_quant", 6.0, 32), ("fp8_act_quant", 448.0, 128)):
        exact = (qmax * np.exp2(k)).astype(np.float32)
        amax = np.concatenate([exact, np.nextafter(exact, np.float32(np.inf)), np.nextafter(exact, np.float32(0))])
        x = np.zeros((amax.size, tile), np.float32)
        x[:, 3], x[:, 7] = amax, -amax / 3
        if op == "fp4_quant":
            codes, scale = _run(op, {"x": x}, block_size=tile, out_types=[(TensorProto.UINT8, 2), (TensorProto.FLOAT, 2)])
            want_codes, want_scale = ref_quant.fp4_quant(torch.from_numpy(x), tile)
            np.testing.assert_array_equal(codes, want_codes.numpy())
        else:
            q, scale = _run(op, {"x": x}, block_size=tile, scale_fmt="ue8m0",
                            out_types=[(TensorProto.FLOAT8E4M3FN, 2), (TensorProto.FLOAT, 2)])
            want_q, want_scale = ref_quant.fp8_act_quant(torch.from_numpy(x), tile)
            np.testing.assert_array_equal(q.view(np.uint8), want_q.view(torch.uint8).numpy())  # ORT hands e4m3 out as bits
        np.testing.assert_array_equal(scale, want_scale.numpy())


def test_top_k_ties_go_to_the_smaller_index():
    """ONNX TopK specifies the lower index first among equal values; indexer and router rely on
    it. All-equal scores must select 0, 1, 2, ... exactly as the reference's stable sort does."""
    q = np.ones((1, 3, 2, 4), np.float32)
    keys = np.ones((1, 10, 4), np.float32)
    weights = np.ones((1, 3, 2), np.float32)
    start = np.array(37, np.int64)  # queries at 37..39 see 9 or 10 of the 10 entries
    (got,) = _run("indexer_topk", {"q": q, "weights": weights, "keys": keys, "start_pos": start,
                                   "offset": np.array(0, np.int64)}, ratio=4, topk=6, out_types=[(TensorProto.INT32, 3)])
    want = ref_indexer.indexer_topk(*(torch.from_numpy(a) for a in (q, weights, keys)), 4, 37, 6)
    np.testing.assert_array_equal(got, want.numpy())
    assert got[0, 0].tolist() == [0, 1, 2, 3, 4, 5]

    x = np.ones((2, 8), np.float32)
    gate = np.tile(np.linspace(-1, 1, 8, dtype=np.float32), (6, 1))  # 6 experts, equal logits
    w, idx = _run("moe_gate_unbiased", {"x": x, "weight": gate}, top_k=3,
                  out_types=[(TensorProto.FLOAT, 2), (TensorProto.INT32, 2)])
    want_w, want_idx = ref_moe.moe_gate(torch.from_numpy(x), torch.from_numpy(gate), None, 3)
    np.testing.assert_array_equal(idx, want_idx.numpy())
    np.testing.assert_array_equal(idx[0], [0, 1, 2])
    np.testing.assert_allclose(w, want_w.numpy(), rtol=2**-22)  # three equal weights renormalised: 1/3 each


@pytest.mark.parametrize("weights_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("key_format", ["dense", "fp4", "fp8"])
@pytest.mark.parametrize("weights_scale", [0.37, -0.0625])
def test_indexer_scales_the_head_weights_and_offsets_the_entries(weights_scale, key_format, weights_dtype):
    """indexer_topk and indexer_topk_packed (functions indexer_topk, indexer_topk_packed_fp4 and
    _fp8, which the onnxruntime backend calls with weights_scale an attribute, offset an input) select
    the reference's indices exactly: ``w = fp32(weights) * weights_scale``, entry j as 128 + j, and
    -1 still in the slots past a query's visible entries (sequence 0's queries see 5 or 6 of 8).

    Integer q and keys in [-4, 4] (exact in bf16, and packed with power-of-two scales: decoded
    exactly) make every logit exact, and H = 2 heads make each score one rounding of the sum of two
    products ``relu(l_h) * w_h``, the same in either order. A positive scale keeps the ranking; the
    negative one reverses it, so a function that ignored the scale would fail."""
    from seahal.backends.onnxruntime import kernels

    g = torch.Generator().manual_seed(len(key_format) + weights_dtype.itemsize + (weights_scale < 0))
    b, s, h, d, n, ratio, topk, offset = 2, 3, 2, 32, 12, 4, 8, 128
    q = torch.randint(-4, 5, (b, s, h, d), generator=g).to(torch.bfloat16)
    keys = torch.randint(-4, 5, (b, n, d), generator=g).to(torch.bfloat16)
    weights = torch.randn(b, s, h, generator=g).to(weights_dtype)
    start_pos = torch.tensor([20, 37])  # per sequence: queries at 20..22 and 37..39
    if key_format == "dense":
        args = (q, weights, keys, ratio, start_pos, topk)
        run, reference = kernels.indexer_topk, ref_indexer.indexer_topk
    else:
        records = ref_quant.index_key_pack(keys, key_format)
        assert torch.equal(index_key_unpack(records, d, key_format, q.dtype), keys)
        args = (q, weights, records, key_format, ratio, start_pos, topk)
        run, reference = kernels.indexer_topk_packed, ref_indexer.indexer_topk_packed
        assert F.select("indexer_topk_packed", {"key_format": key_format}).attributes == (
            "ratio", "topk", "weights_scale")

    got = run(*args, weights_scale, offset)
    want = reference(*args, weights_scale, offset)
    assert got.dtype == torch.int32 and torch.equal(got, want)
    assert (want[0] == -1).any() and (want[want >= 0] >= offset).all()
    if weights_scale < 0:  # the reversed ranking: not what an unscaled function selects
        assert not torch.equal(want, reference(*args, 1.0, offset))


def test_kv_record_bytes_of_special_values_match_the_reference():
    """The record's e4m3 codes and bf16 rope bytes are built arithmetically (opset 21 has no
    BitCast): signed zeros, bf16 subnormals, the largest values and tiny tiles must give the
    reference's bytes exactly, and unpacking must return the reference's vectors bit for bit."""
    rope = torch.tensor([0.0, -0.0, 2.0**-130, -(2.0**-133), 2.0**-126, 3.3895e38, -1.5, 1e-40]).repeat(8)
    kv = torch.cat((torch.randn(4, 64) * torch.tensor([1e-9, 1.0, 300.0, 0.0])[:, None], rope.expand(4, 64)), dim=-1)
    (packed,) = _run("kv_cache_pack", {"kv": kv.numpy()}, rope_dim=64, tile=64, out_types=[(TensorProto.UINT8, 2)])
    want = ref_quant.kv_cache_pack(kv, 64, 64)
    np.testing.assert_array_equal(packed, want.numpy())
    fn = F.FUNCTIONS["kv_cache_unpack"]
    model = F.node_model(fn, [(TensorProto.UINT8, 2)], [(TensorProto.BFLOAT16, 2)], {"dim": 128})
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = torch.empty(4, 128, dtype=torch.bfloat16)
    binding = session.io_binding()
    binding.bind_ortvalue_input("packed", ort.OrtValue.ortvalue_from_numpy(packed))
    binding.bind_ortvalue_output("out0", ort.OrtValue.ortvalue_from_numpy_with_onnx_type(got.view(torch.int16).numpy(), TensorProto.BFLOAT16))
    session.run_with_iobinding(binding)
    assert torch.equal(got.view(torch.int16), ref_quant.kv_cache_unpack(want, 128).view(torch.int16))


def _store(op: str, data: torch.Tensor, store: torch.Tensor, slots: torch.Tensor, **args) -> torch.Tensor:
    """The one output (the new cache or store) of the function :func:`F.select` picks for the
    store op ``op`` (kv_cache_store, index_key_store) and its other arguments ``args``, as a
    one-node model; ``store`` is an input only (ONNX values are immutable) and must come back
    unchanged."""
    fn = F.select(op, args)
    index_type = TensorProto.INT32 if slots.dtype == torch.int32 else TensorProto.INT64
    in_types = [_onnx_type(data), _onnx_type(store), (index_type, slots.dim())]
    model = F.node_model(fn, in_types, [_onnx_type(store)], fn.attribute_values(args))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    out = torch.empty_like(store)
    binding = session.io_binding()
    for name, t in zip(fn.inputs, (data, store, slots), strict=True):
        binding.bind_ortvalue_input(name, _ort_value(t))
    binding.bind_ortvalue_output("out0", _ort_value(out))
    session.run_with_iobinding(binding)
    return out


def _assert_rows_stored(got: torch.Tensor, before: torch.Tensor, slots: torch.Tensor, records: torch.Tensor) -> None:
    """got [B, R, C] holds records[b, i] at row slots[b, i] (slots [B or 1, n]) and before's bytes
    in every other row."""
    for b in range(got.shape[0]):
        written = slots[0 if slots.shape[0] == 1 else b].long()
        assert torch.equal(got[b, written], records[b])
        untouched = torch.ones(got.shape[1], dtype=torch.bool)
        untouched[written] = False
        assert torch.equal(got[b, untouched], before[b, untouched])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("shared", [False, True], ids=["per_sequence", "shared_slots"])
@pytest.mark.parametrize("geometry", [(64, 64), (16, 16)], ids=["rope64_tile64", "rope16_tile16"])
def test_kv_cache_store_writes_the_reference_records_into_their_rows(dtype, index_dtype, shared, geometry):
    """kv_cache_store's function (kv_cache_pack's records scattered into rows ``slots``) gives the
    reference's new cache byte for byte: the slotted rows hold exactly kv_cache_pack's records,
    every other row keeps its old (random) bytes, and slots [1, n] put each sequence's records in
    the same rows of its own cache. Sequence 1's slots are the reverse of sequence 0's, row 0 and
    row R - 1 are written, and kv holds a zero vector and a -0 one (sign bytes of the records)."""
    rope_dim, tile = geometry
    g = torch.Generator().manual_seed(rope_dim + 2 * shared + (dtype == torch.bfloat16) + 5 * (index_dtype == torch.int32))
    batch, n, rows, dim = 3, 4, 11, 2 * tile + rope_dim
    kv = torch.randn(batch, n, dim, generator=g) * torch.exp2(torch.randint(-20, 21, (batch, n, 1), generator=g).float())
    kv[0, 1], kv[1, 2] = 0.0, -0.0
    kv = kv.to(dtype)
    cache = torch.randint(0, 256, (batch, rows, kv_record_bytes(dim, rope_dim, tile)), generator=g, dtype=torch.uint8)
    first = torch.tensor([0, rows - 1, 5, 2])
    slots = (first[None] if shared else torch.stack((first, first.flip(0), torch.tensor([3, 7, 1, 9])))).to(index_dtype)
    before = cache.clone()

    got = _store("kv_cache_store", kv, cache, slots, rope_dim=rope_dim, tile=tile)
    assert torch.equal(cache, before)  # an input: the function returns the new value
    want = before.clone()
    assert ref_quant.kv_cache_store(kv, want, slots, rope_dim, tile) is None
    assert torch.equal(got, want)
    _assert_rows_stored(got, before, slots, ref_quant.kv_cache_pack(kv, rope_dim, tile))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("shared", [False, True], ids=["per_sequence", "shared_slots"])
@pytest.mark.parametrize("key_format, d", [("fp4", 128), ("fp8", 96)])
def test_index_key_store_writes_the_reference_records_into_their_rows(dtype, index_dtype, shared, key_format, d):
    """index_key_store's functions (index_key_store_fp4 / _fp8, which the key format selects:
    index_key_pack's records scattered into rows ``slots``) give the reference's new store byte
    for byte: the slotted rows hold exactly index_key_pack's records, every other row keeps its
    old (random) bytes, and slots [1, n] put each sequence's records in the same rows of its own
    store. Sequence 1's slots are the reverse of sequence 0's, row 0 and row R - 1 are written;
    keys of magnitudes 2^-40..2^40, with a zero key, a -0 one, one below the amax floor and one
    starting with a zero 32-block (as test_index_key_records_match_the_reference_bitwise)."""
    g = torch.Generator().manual_seed(d + 2 * shared + (dtype == torch.bfloat16) + 5 * (index_dtype == torch.int32))
    batch, n, rows = 3, 4, 11
    magnitudes = torch.exp2(torch.randint(-40, 41, (batch, n, 1), generator=g).float())
    keys = torch.randn(batch, n, d, generator=g) * magnitudes
    floor = FP4_AMAX_FLOOR if key_format == "fp4" else FP8_AMAX_FLOOR
    keys[0, 1], keys[1, 2] = 0.0, -0.0
    keys[2, 0] = torch.randn(d, generator=g) * (floor / 8)
    keys[2, 3, :32] = 0.0
    keys = keys.to(dtype)
    store = torch.randint(0, 256, (batch, rows, index_key_bytes(d, key_format)), generator=g, dtype=torch.uint8)
    first = torch.tensor([0, rows - 1, 5, 2])
    slots = (first[None] if shared else torch.stack((first, first.flip(0), torch.tensor([3, 7, 1, 9])))).to(index_dtype)
    before = store.clone()
    assert F.select("index_key_store", {"key_format": key_format}).name == f"index_key_store_{key_format}"

    got = _store("index_key_store", keys, store, slots, key_format=key_format)
    assert torch.equal(store, before)  # an input: the function returns the new value
    want = before.clone()
    assert ref_quant.index_key_store(keys, want, slots, key_format) is None
    assert torch.equal(got, want)
    _assert_rows_stored(got, before, slots, ref_quant.index_key_pack(keys, key_format))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("weighted", [True, False], ids=["weighted", "unweighted"])
def test_kv_cache_store_positions_normalise_and_rotate_before_packing(dtype, weighted):
    """kv_cache_store with positions and freqs selects kv_cache_store_normed (with a norm_weight) or
    kv_cache_store_normed_unweighted (the onnxruntime backend passes them on): the new cache is the
    plain function's for the rms_norm_rope function's vectors (kv as one head), bit for bit, and is
    held to the CPU reference by the conformance rule (stored rows decoded, the others exact).
    Sequences at their own positions (one near 1e5: large angles), int32 positions, slots [1, n]
    shared by the batch; half the vectors have mean(x^2) ~ 1e-3, so norm_eps = 1e-3 (not the
    default) shows if the attribute were dropped."""
    from seahal.backends.onnxruntime import kernels

    g = torch.Generator().manual_seed(11 + 2 * weighted + dtype.itemsize)
    batch, n, rows, dim, rope_dim, tile = 2, 3, 6, 96, 32, 32
    kv = torch.randn(batch, n, dim, generator=g) * torch.tensor([1.0, 0.03])[:, None, None]
    kv = kv.to(dtype)
    cache = torch.randint(0, 256, (batch, rows, kv_record_bytes(dim, rope_dim, tile)), generator=g, dtype=torch.uint8)
    slots = torch.tensor([[5, 0, 2]])
    positions = torch.tensor([[99_997, 99_998, 99_999], [3, 4, 5]], dtype=torch.int32)
    freqs = 10000.0 ** -(torch.arange(rope_dim // 2) / (rope_dim // 2))
    weight = torch.rand(dim, generator=g) + 0.5 if weighted else None
    rotation = {"positions": positions, "freqs": freqs, "norm_weight": weight, "norm_eps": 1e-3}
    name = "kv_cache_store_normed" if weighted else "kv_cache_store_normed_unweighted"
    assert F.select("kv_cache_store", {"positions": None, "freqs": None, "norm_weight": None}).name == "kv_cache_store"
    assert F.select("kv_cache_store", rotation).name == name
    assert F.FUNCTIONS[name].inputs == (*F.FUNCTIONS["kv_cache_store"].inputs, "positions", "freqs") + (
        ("norm_weight",) if weighted else ())
    assert F.FUNCTIONS[name].attributes == (*F.FUNCTIONS["kv_cache_store"].attributes, "norm_eps")
    assert F.FUNCTIONS[name].shared_batch == ("slots",)

    normed = cache.clone()
    assert kernels.kv_cache_store(kv, normed, slots, rope_dim, tile, **rotation) is None
    vectors = kernels.rms_norm_rope(kv.unsqueeze(2), weight, 1e-3, positions, freqs).squeeze(2)
    plain = cache.clone()
    kernels.kv_cache_store(vectors, plain, slots, rope_dim, tile)
    assert torch.equal(normed, plain)
    written = torch.zeros(rows, dtype=torch.bool)
    written[slots[0]] = True
    assert torch.equal(normed[:, ~written], cache[:, ~written])
    default_eps = cache.clone()
    kernels.kv_cache_store(kv, default_eps, slots, rope_dim, tile, positions, freqs, weight)
    assert not torch.equal(default_eps, normed)

    want = cache.clone()
    ref_quant.kv_cache_store(kv, want, slots, rope_dim, tile, positions, freqs, weight, 1e-3)
    (check,) = checks_for("kv_cache_store", (kv, cache, slots, rope_dim, tile, positions, freqs, weight, 1e-3))
    verdict = check.check.compare(normed, want)
    assert verdict.ok, verdict.detail


def test_fp32_scale_bytes_decode_and_encode_exactly():
    """FP8 indexer keys carry their fp32 scale as 4 little-endian bytes, encoded and decoded
    arithmetically (opset 21 has no BitCast): random bit patterns plus signed zeros, the subnormal
    range, the largest finite value, infinities and NaN must decode bit for bit (NaN as NaN), and
    every finite one must encode to its bytes in memory."""
    gen = torch.Generator().manual_seed(0)
    patterns = torch.randint(0, 2**32, (4000,), generator=gen, dtype=torch.int64)
    special = [0, 0x80000000, 1, 0x807FFFFF, 0x00800000, 0x3F800000, 0x7F7FFFFF, 0x7F800000, 0xFF800000, 0x7FC00001]
    patterns = torch.cat((patterns, torch.tensor(special)))
    values = torch.where(patterns >= 2**31, patterns - 2**32, patterns).to(torch.int32).view(torch.float32)
    quads = values.view(torch.uint8).view(-1, 4).long().numpy()
    got = torch.from_numpy(_run_lib("fp32_from_bytes", quads, (TensorProto.FLOAT, 1)))
    both_nan = got.isnan() & values.isnan()
    assert both_nan.sum() == values.isnan().sum() > 0
    assert ((got.view(torch.int32) == values.view(torch.int32)) | both_nan).all()
    finite = values[values.isfinite()]  # and back: fp32_bytes gives each finite value's memory bytes
    got_bytes = _run_lib("fp32_bytes", finite.numpy(), (TensorProto.UINT8, 1))
    np.testing.assert_array_equal(got_bytes, finite.view(torch.uint8).numpy())


@pytest.mark.parametrize("op, overlap", [("kv_compress", True), ("kv_compress", False), ("kv_compress_fp8", True)])
def test_compressor_per_sequence_positions_are_each_sequence_alone(op, overlap):
    """start_pos [B] over a stream of calls: each sequence gets what a batch-1 reference call at
    its own position gives from its own state (position 0 resets a stale one): its new entries
    within the conformance tolerance, then exact zero rows (zero bytes for records) up to
    ceil(S/m), and its state bit for bit (both sides copy fp32 values and round score + ape to
    fp32 once; the reference runs in fp64 as in conformance, and 53 bits round that sum exactly)."""
    g = torch.Generator().manual_seed(4)
    m, d, batch, coff = 4, 32, 3, 2 if overlap else 1
    ape, norm, freqs = torch.randn(m, coff * d, generator=g), torch.rand(d, generator=g) + 0.5, torch.rand(8, generator=g)
    fp8 = op == "kv_compress_fp8"
    tail = (1e-6, 16, 8) if fp8 else (1e-6, torch.float32)  # records: 16 bf16 rope dims, 2 e4m3 tiles of 8
    attributes = {"ratio": m, "overlap": int(overlap), **({"rope_dim": 16, "tile": 8} if fp8 else {"out_dtype": TensorProto.FLOAT})}
    out_types = [(TensorProto.UINT8 if fp8 else TensorProto.FLOAT, 3), (TensorProto.FLOAT, 3), (TensorProto.FLOAT, 3)]
    state = [t.normal_(generator=g) for t in compressor_state(batch, m, d, overlap)]  # stale: position 0 resets it
    alone = [[t[b : b + 1].clone() for t in state] for b in range(batch)]
    positions = [0, 6, 11]  # chunks of 5, 1, 3 tokens complete 0 to 2 entries, per sequence differently
    for s in (5, 1, 3):
        kv, score = (torch.randn(batch, s, coff * d, generator=g) for _ in range(2))
        tensors = (kv, score, ape, norm, freqs, *state)
        inputs = {name: t.numpy() for name, t in zip(F.FUNCTIONS[op].inputs, tensors)} | {"start_pos": np.array(positions)}
        got, *state = (torch.from_numpy(t) for t in _run(op, inputs, **attributes, out_types=out_types))
        assert got.shape[1] == most_new_entries(s, m)
        for b, p in enumerate(positions):
            call = (kv[b : b + 1].double(), score[b : b + 1].double(), ape.double(), norm, freqs, *alone[b], m, overlap, p, *tail)
            want = getattr(ref_compressor, op)(*call)
            verdict = checks_for(op, call)[0].check.compare(got[b : b + 1, : want.shape[1]], want)
            assert verdict.ok, (b, p, verdict.detail)
            assert not got[b, want.shape[1] :].any(), (b, p)
            assert all(torch.equal(t[b : b + 1], u) for t, u in zip(state, alone[b])), (b, p)
        positions = [p + s for p in positions]


@pytest.mark.parametrize("slots_layout", ["per_sequence", "shared"])
@pytest.mark.parametrize("position", ["int", "tensor"])
@pytest.mark.parametrize("overlap", [True, False], ids=["CSA", "HCA"])
def test_kv_compress_store_stores_kv_compress_fp8_records_in_their_rows(overlap, position, slots_layout):
    """kv_compress_store's function is kv_compress_fp8's then store_rows over a stream of calls
    into a store of random bytes: its new states are kv_compress_fp8's bit for bit, and its new
    store is the old one with the first n = slots.shape[1] records at rows ``slots`` (n the rows
    the contract gives: new_entries at an int position, ceil(S/m) at a tensor one, whose rows past
    a sequence's new entries are zero bytes, stored too), every other row keeping its bytes. Held
    to the CPU reference (kv_compress_store, fp64 inputs as in conformance): the stored rows by
    kv_compress_fp8's records rule, every other row exact, zero bytes past the new entries, states
    bit for bit. The onnxruntime backend's kernel (its own path at an int position, whose slots are
    fewer than a tensor position's) stores the same bytes in place. Per-sequence positions [3]
    (0, 6, 11: 0 to 2 entries a call, a sequence at 6 completing none of 1 token), or one int
    position for all, where a call completing no entry has slots [B, 0]; int64 slots per
    sequence or int32 slots [1, n] shared by the batch."""
    from seahal.backends.onnxruntime import kernels

    g = torch.Generator().manual_seed(17 + 2 * overlap + 4 * (position == "int") + 8 * (slots_layout == "shared"))
    m, d, batch, rows, coff = 4, 32, 3, 10, 2 if overlap else 1
    rope_dim, tile = 16, 8
    ape, norm, freqs = torch.randn(m, coff * d, generator=g), torch.rand(d, generator=g) + 0.5, torch.rand(8, generator=g)
    attributes = {"ratio": m, "overlap": int(overlap), "rope_dim": rope_dim, "tile": tile}
    state = [t.normal_(generator=g) for t in compressor_state(batch, m, d, overlap)]  # stale: position 0 resets it
    ref_state, ort_state = [t.clone() for t in state], [t.clone() for t in state]
    store = torch.randint(0, 256, (batch, rows, kv_record_bytes(d, rope_dim, tile)), generator=g, dtype=torch.uint8)
    ref_store, ort_store = store.clone(), store.clone()
    index_dtype = torch.int32 if slots_layout == "shared" else torch.int64
    positions = [0, 6, 11] if position == "tensor" else [0] * batch
    calls_storing_nothing = 0
    for s in (5, 1, 3, 6):
        kv, score = (torch.randn(batch, s, coff * d, generator=g) for _ in range(2))
        start_pos = torch.tensor(positions) if position == "tensor" else positions[0]
        n = most_new_entries(s, m) if position == "tensor" else new_entries(start_pos, s, m)
        calls_storing_nothing += n == 0
        order = [torch.randperm(rows, generator=g)[:n] for _ in range(1 if slots_layout == "shared" else batch)]
        slots = torch.stack(order).to(index_dtype)
        tensors = (kv, score, ape, norm, freqs, *state)
        compress_inputs = dict(zip(F.FUNCTIONS["kv_compress_fp8"].inputs, (t.numpy() for t in tensors)))
        compress_inputs["start_pos"] = np.array(positions if position == "tensor" else start_pos)
        inputs = compress_inputs | {"store": store.numpy(), "slots": slots.numpy()}
        out_types = [(TensorProto.FLOAT, 3), (TensorProto.FLOAT, 3), (TensorProto.UINT8, 3)]
        *new_state, new_store = (torch.from_numpy(t) for t in _run("kv_compress_store", inputs, **attributes, out_types=out_types))
        records, *fp8_state = (torch.from_numpy(t) for t in _run("kv_compress_fp8", compress_inputs, **attributes,
                                                                  out_types=[out_types[2], *out_types[:2]]))
        assert records.shape[1] == most_new_entries(s, m) >= n
        assert all(torch.equal(t, u) for t, u in zip(new_state, fp8_state))  # kv_compress_fp8's states
        _assert_rows_stored(new_store, store, slots, records[:, :n])  # its first n records, the other rows kept

        call = (kv.double(), score.double(), ape.double(), norm, freqs, *ref_state, m, overlap, start_pos)
        tail = (1e-6, rope_dim, tile)
        ref_compressor.kv_compress_store(*call, ref_store, slots, *tail)
        records_check = checks_for("kv_compress_fp8", (*call, *tail))[0].check
        verdict = StoredRows(records_check, slots).compare(new_store, ref_store)
        assert verdict.ok, (s, positions, verdict.detail)
        assert all(torch.equal(t, u) for t, u in zip(new_state, ref_state)), (s, positions)
        stored = new_store.gather(1, slots.long().expand(batch, -1)[..., None].expand(-1, -1, new_store.shape[-1]))
        for b, p in enumerate(positions):  # rows past a sequence's new entries: zero bytes
            assert not stored[b, new_entries(p, s, m) :].any(), (b, p)

        assert kernels.kv_compress_store(kv, score, ape, norm, freqs, *ort_state, m, overlap, start_pos,
                                         ort_store, slots, *tail) is None
        assert torch.equal(ort_store, new_store) and all(torch.equal(t, u) for t, u in zip(ort_state, new_state))
        state, store = new_state, new_store
        positions = [p + s for p in positions]
    assert calls_storing_nothing == (position == "int")  # positions 5 + 1 token at one int position: no entry


@pytest.mark.parametrize("n", [1, 2, 8, 64, 512])
def test_hadamard_matrix_from_index_arithmetic_is_sylvester(n):
    """H_n is built at run time from i & j and a fixed number of XOR folds of its bits; rotating the
    identity returns it scaled, ``H_n * fp32(n^-0.5)``, exactly (each entry +-1 times the scale; the
    scale as ``Sqrt(1/n)``: 1/n is exact and Sqrt rounds once). n = 512 sets index bits 0..8, which
    the folds by 256, 16, 4 and 2 all reach."""
    got = _run_like("hadamard_rotate", torch.eye(n))
    assert torch.equal(got, sylvester_hadamard(n) * torch.tensor(n**-0.5, dtype=torch.float32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n, fp4_block", [(1, 0), (8, 0), (8, 8), (128, 0), (128, 32), (256, 0), (256, 32)])
def test_hadamard_rotate_exact_sums_match_the_reference_bitwise(dtype, n, fp4_block):
    """Integers in [-8, 8] times 2^e per row (e in [-20, 20]: FP4 blocks of many scales) have exact
    fp32 sums in any order, so ORT's MatMul, the scale ``fp32(n^-0.5)``, the rounding to x's dtype
    and the FP4 rounding must all agree with the reference bit for bit (signed zeros included:
    small negative values round to the FP4 code -0). Row 0 is zero (every block at the amax floor)."""
    g = torch.Generator().manual_seed(n + fp4_block)
    x = torch.randint(-8, 9, (2, 3, n), generator=g).float() * torch.exp2(torch.randint(-20, 21, (2, 3, 1), generator=g).float())
    x[0, 0] = 0.0
    x = x.to(dtype)
    got = _hadamard_rotate(x, fp4_block)
    assert torch.equal(_bits(got), _bits(ref_quant.hadamard_rotate(x, fp4_block)))
    if fp4_block:  # the FP4 rounding did round: not every value survives
        assert not torch.equal(got, ref_quant.hadamard_rotate(x, 0))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("n, fp4_block", [(8, 0), (128, 0), (128, 32), (256, 0), (256, 32)])
def test_hadamard_rotate_of_random_values_is_within_the_tolerance_rule(dtype, n, fp4_block):
    """N(0, 1) values times 2^e per row against the float64 reference, judged by the conformance
    rule (fp32 sums: rtol u(x) and atol gamma(n+2) sum|x|/sqrt(n); FP4: a rounding of a value within
    that bound). fp64 x is computed in fp32 as every seahal function does; the rule's atol is the
    fp32 sum bound, so it holds there too."""
    g = torch.Generator().manual_seed(7 * n + fp4_block)
    x = (torch.randn(2, 5, n, generator=g) * torch.exp2(torch.randint(-8, 9, (2, 5, 1), generator=g).float())).to(dtype)
    got = _hadamard_rotate(x, fp4_block)
    assert got.dtype == dtype and got.shape == x.shape
    (check,) = checks_for("hadamard_rotate", (x, fp4_block))
    verdict = check.check.compare(got, ref_quant.hadamard_rotate(x.double(), fp4_block))
    assert verdict.ok, verdict.detail


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("fp4_block", [0, 32])
def test_hadamard_rotate_positions_rope_first(dtype, fp4_block):
    """hadamard_rotate with positions and freqs selects hadamard_rotate_roped / _fp4_roped (the
    onnxruntime backend passes them on): the output is the plain function's of the rope function's
    output, which is rounded to x's dtype first, bit for bit, and with every position 0 (no
    rotation) the plain function's of x. It is held to the float64 CPU reference by the
    conformance rule (rope's rule carried through the rotation). Rows of magnitudes 2^-8..2^8; the
    sequences at their own positions, one near 1e5 (large angles); int32 positions; the last 64 of
    128 dims rotate."""
    from seahal.backends.onnxruntime import kernels

    g = torch.Generator().manual_seed(fp4_block + dtype.itemsize)
    x = torch.randn(2, 3, 4, 128, generator=g) * torch.exp2(torch.randint(-8, 9, (2, 3, 4, 1), generator=g).float())
    x = x.to(dtype)
    positions = torch.tensor([[99_997, 99_998, 99_999], [3, 4, 5]], dtype=torch.int32)
    freqs = 10000.0 ** -(torch.arange(32) / 32)
    roped = kernels.hadamard_rotate(x, fp4_block, positions, freqs)
    assert roped.dtype == dtype and roped.shape == x.shape
    plain_of_rope = kernels.hadamard_rotate(kernels.rope(x, positions, freqs), fp4_block)
    assert torch.equal(_bits(roped), _bits(plain_of_rope))
    assert not torch.equal(roped, kernels.hadamard_rotate(x, fp4_block))
    unrotated = kernels.hadamard_rotate(x, fp4_block, positions * 0, freqs)
    assert torch.equal(_bits(unrotated), _bits(kernels.hadamard_rotate(x, fp4_block)))

    call = (x, fp4_block, positions, freqs)
    (check,) = checks_for("hadamard_rotate", call)
    verdict = check.check.compare(roped, ref_quant.hadamard_rotate(x.double(), fp4_block, positions, freqs.double()))
    assert verdict.ok, verdict.detail


def _as_tuple(out: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("op", ["hc_pre", "hc_head"])
def test_hc_norm_weight_normalises_the_rounded_collapse(op, dtype):
    """hc_pre / hc_head with norm_weight select hc_pre_normed / hc_head_normed (the onnxruntime
    backend passes it on): y becomes the rms_norm function of the plain function's y, which is
    rounded to x's dtype first, bit for bit, with norm_eps; post and comb stay the plain ones bit
    for bit. Both calls are held to the float64 CPU reference by the conformance rules (the normed
    y by the collapse's bound carried through the norm). norm_eps (1e-3) differs from eps so that
    swapping them shows."""
    from seahal.backends.onnxruntime import kernels

    g = torch.Generator().manual_seed(len(op) + dtype.itemsize)
    n, d = 4, 64
    mixes, scales = ((2 + n) * n, 3) if op == "hc_pre" else (n, 1)
    x = torch.randn(2, 3, n, d, generator=g).to(dtype)
    fn, base = torch.randn(mixes, n * d, generator=g) / d, torch.randn(mixes, generator=g)
    scale, weight = torch.rand(scales, generator=g) + 0.5, torch.rand(d, generator=g) + 0.5
    attributes = {"sinkhorn_iters": 20} if op == "hc_pre" else {}
    attributes |= {"eps": 1e-6, "norm_eps": 1e-3}
    assert F.select(op, {"norm_weight": None}).name == op
    assert F.select(op, {"norm_weight": weight}).name == f"{op}_normed"
    assert F.FUNCTIONS[f"{op}_normed"].inputs == ("x", "fn", "base", "scale", "norm_weight")

    run, reference = getattr(kernels, op), getattr(ref_mhc, op)
    plain = _as_tuple(run(x, fn, base, scale, **attributes))
    normed = _as_tuple(run(x, fn, base, scale, **attributes, norm_weight=weight))
    assert normed[0].dtype == dtype and normed[0].shape == plain[0].shape
    assert torch.equal(_bits(normed[0]), _bits(kernels.rms_norm(plain[0], weight, attributes["norm_eps"])))
    assert all(torch.equal(a, b) for a, b in zip(normed[1:], plain[1:], strict=True))

    for got, norm_weight in ((plain, None), (normed, weight)):
        call = (x, fn, base, scale, *attributes.values(), norm_weight)
        want = _as_tuple(reference(x.double(), *call[1:]))
        for check in checks_for(op, call):
            verdict = check.check.compare(got[check.outputs], want[check.outputs])
            assert verdict.ok, (norm_weight is not None, check.label, verdict.detail)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("op", ["sparse_attention", "sparse_attention_fp8"])
def test_attention_positions_rotate_the_rounded_output_back(op, dtype):
    """sparse_attention / sparse_attention_fp8 with positions and freqs select
    sparse_attention_rotated / sparse_attention_fp8_rotated (the onnxruntime backend passes them
    on): the output is the rope function's inverse rotation of the plain function's output, which
    is rounded to q's dtype first, bit for bit. Both calls are held to the float64 CPU reference by
    the conformance rules. The sequences sit at different positions (per-sequence angles); query 0
    has no valid key (its zero output stays zero); the fp8 records are one pool the batch shares
    (batch stride 0), which the rotated function takes with batch 1 as the plain one does."""
    from seahal.backends.onnxruntime import kernels

    seed = 3 * (op == "sparse_attention_fp8") + dtype.itemsize
    if op == "sparse_attention":
        (args,) = sparse_attention_case(op, seed, dtype=dtype, indices="empty-query").calls
    else:
        (args,) = sparse_attention_fp8_case(op, seed, dtype=dtype, indices="empty-query", layout="pool").calls
    batch, seq = args[0].shape[:2]
    positions = torch.arange(seq) + torch.tensor([[0], [37]])[:batch]  # [B, S] int64, as the model's
    freqs = 10000.0 ** -(torch.arange(8) / 8)  # 2R = 16 <= D: the last 16 dims rotate
    rotation = (positions, freqs)
    assert F.select(op, {"positions": None, "freqs": None}).name == op
    assert F.select(op, {"positions": positions, "freqs": freqs}).name == f"{op}_rotated"
    assert F.FUNCTIONS[f"{op}_rotated"].inputs == (*F.FUNCTIONS[op].inputs, "positions", "freqs")
    assert F.FUNCTIONS[f"{op}_rotated"].attributes == F.FUNCTIONS[op].attributes

    run = getattr(kernels, op)
    plain = run(*args)
    rotated = run(*args, *rotation)
    assert rotated.dtype == dtype and rotated.shape == plain.shape
    assert torch.equal(_bits(rotated), _bits(kernels.rope(plain, positions, freqs, inverse=True)))
    assert not torch.equal(rotated, plain) and not rotated[:, 0].any()

    for got, call in ((plain, args), (rotated, (*args, *rotation))):
        upcast = float64_positions(op, call)
        want = getattr(ref_attention, op)(*(a.double() if i in upcast else a for i, a in enumerate(call)))
        (check,) = checks_for(op, call)
        verdict = check.check.compare(got, want)
        assert verdict.ok, (got is rotated, verdict.detail)


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_hc_post_addend_adds_the_two_parts_in_f_s_dtype(dtype, layout):
    """hc_post with an addend selects hc_post_summed (the onnxruntime backend passes it on): its
    output is the plain function's on f + addend added by torch in f's dtype, bit for bit (the fp32
    sum rounded to bf16 as torch rounds it). The addend cancels f in places (sums of 0 and of one or
    two ulps of f) and is a transposed view in one layout. Both calls are held to the float64 CPU
    reference by the conformance rules (the summed one by the rule with the addend)."""
    from seahal.backends.onnxruntime import kernels

    case = hc_case("addend", dtype.itemsize, "hc_post", dtype=dtype, layout=layout, addend="cancelling")
    f, x, post, comb, addend = call = case.calls[0]
    assert F.select("hc_post", {"addend": None}).name == "hc_post"
    assert F.select("hc_post", {"addend": addend}).name == "hc_post_summed"
    assert F.FUNCTIONS["hc_post_summed"].inputs == (*F.FUNCTIONS["hc_post"].inputs, "addend")

    summed = kernels.hc_post(*call)
    plain = kernels.hc_post(f + addend, x, post, comb)
    assert summed.dtype == x.dtype and summed.shape == x.shape
    assert torch.equal(_bits(summed), _bits(plain))
    assert not torch.equal(summed, kernels.hc_post(f, x, post, comb))

    for got, args in ((plain, (f + addend, x, post, comb)), (summed, call)):
        upcast = float64_positions("hc_post", args)
        want = ref_mhc.hc_post(*(a.double() if i in upcast else a for i, a in enumerate(args)))
        (check,) = checks_for("hc_post", args)
        verdict = check.check.compare(got, want)
        assert verdict.ok, (got is summed, verdict.detail)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("addend", [False, True], ids=["post", "post_summed"])
@pytest.mark.parametrize("normed", [False, True], ids=["pre", "pre_normed"])
def test_hc_post_pre_is_hc_post_then_hc_pre_of_the_rounded_streams(normed, addend, dtype):
    """hc_post_pre selects one of four functions by whether an addend and a norm_weight are given
    (the onnxruntime backend passes them on): its streams are the hc_post function's output
    (hc_post_summed's with the addend), in x's dtype, and its (y, post', comb') the hc_pre
    function's (hc_pre_normed's with the norm_weight) of those rounded streams, bit for bit. Held
    to the CPU reference by hc_post_pre's conformance rule: the streams by hc_post's (with the
    addend, the rule with it), and y, post', comb' by hc_pre's against the float64 reference over
    the streams the op made (the float64 reference does not round its streams to x's dtype).
    The addend cancels f in places; norm_eps (1e-3) differs from eps so that swapping them shows."""
    from seahal.backends.onnxruntime import kernels

    seed = 2 * dtype.itemsize + addend + 2 * normed
    post_case = hc_case("post", seed, "hc_post", dtype=dtype, addend="cancelling" if addend else "none")
    f, x, post, comb, *summand = post_case.calls[0]
    pre_case = hc_case("pre", seed + 1, "hc_pre", dtype=dtype, normed=normed)
    _, fn, base, scale, iters, eps, _, norm_weight = pre_case.calls[0]
    norm_eps, addend_arg = 1e-3, summand[0] if addend else None
    name = f"hc_post{'_summed' if addend else ''}_pre{'_normed' if normed else ''}"
    assert F.select("hc_post_pre", {"addend": addend_arg, "norm_weight": norm_weight}).name == name
    optional = ("norm_weight",) * normed + ("addend",) * addend  # in HAL order
    assert F.FUNCTIONS[name].inputs == ("f", "x", "post", "comb", "fn", "base", "scale", *optional)
    assert F.FUNCTIONS[name].attributes == ("sinkhorn_iters", "eps", "norm_eps") and F.FUNCTIONS[name].n_outputs == 4

    pre_args = (fn, base, scale, iters, eps, norm_eps, norm_weight)
    got = kernels.hc_post_pre(f, x, post, comb, *pre_args, addend_arg)
    streams = kernels.hc_post(f, x, post, comb, addend_arg)
    assert got[0].dtype == x.dtype and got[0].shape == x.shape
    composed = (streams, *kernels.hc_pre(streams, *pre_args))
    for part, a, b in zip(("streams", "y", "post", "comb"), got, composed, strict=True):
        assert torch.equal(_bits(a), _bits(b)), part

    assert not failed_checks("hc_post_pre", (f, x, post, comb, *pre_args, addend_arg), got)


def _index_key_pack(keys: torch.Tensor, key_format: str) -> torch.Tensor:
    """index_key_pack through the function :func:`F.select` picks for key_format."""
    fn = F.select("index_key_pack", {"key_format": key_format})
    width = index_key_bytes(keys.shape[-1], key_format)
    return _run_into(fn.name, keys, torch.empty(*keys.shape[:-1], width, dtype=torch.uint8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("key_format, d", [("fp4", 32), ("fp4", 64), ("fp4", 128), ("fp4", 256),
                                           ("fp8", 32), ("fp8", 64), ("fp8", 96), ("fp8", 128), ("fp8", 256)])
def test_index_key_records_match_the_reference_bitwise(dtype, key_format, d):
    """Packed indexer keys are integer codes and bytes, so the function must write the reference's
    records exactly. Keys are N(0, 1) times 2^e per key (e in [-60, 60]: the fp8 record's fp32
    scale bytes over a wide exponent range); key 0 is zero and key 1 is -0 (amax at the floor,
    codes of signed zeros: fp4 byte 0x88, e4m3 0x80), key 2 lies below the amax floor (the scale
    is the floor's), and key 3 starts with a zero block (fp4: one 32-block at the floor among
    normal ones)."""
    g = torch.Generator().manual_seed(d + (key_format == "fp8"))
    keys = torch.randn(2, 4, d, generator=g) * torch.exp2(torch.randint(-60, 61, (2, 4, 1), generator=g).float())
    floor = FP4_AMAX_FLOOR if key_format == "fp4" else FP8_AMAX_FLOOR
    keys[0, 0], keys[0, 1] = 0.0, -0.0
    keys[0, 2] = torch.randn(d, generator=g) * (floor / 8)
    keys[0, 3, :32] = 0.0
    keys = keys.to(dtype)
    got = _index_key_pack(keys, key_format)
    want = ref_quant.index_key_pack(keys, key_format)
    assert got.dtype == torch.uint8 and got.shape == (2, 4, index_key_bytes(d, key_format))
    assert torch.equal(got, want)
    negative_zero = 0x88 if key_format == "fp4" else 0x80  # the -0 key's codes keep their sign
    assert (want[0, 1, : d // 2 if key_format == "fp4" else d] == negative_zero).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("weights", ["fp8", "fp4"])
@pytest.mark.parametrize("out_dtype", [None, torch.float32])
@pytest.mark.parametrize("scale_dtype", [torch.float32, E8M0_DTYPE])
def test_act_quant_gemm_is_the_gemm_of_the_quantised_activations(dtype, weights, out_dtype, scale_dtype):
    """act_quant_gemm through the onnxruntime backend (act_quant_gemm_fp8 / _fp4) against the
    reference ``gemm(*fp8_act_quant(x), b, b_scale)``. x's codes and ue8m0 scales are the
    reference's exactly (x widens to fp32 exactly, and the quant is exact: see
    test_power_of_two_scales_are_exact_across_the_exponent_range), so the result is the backend's
    fp8_gemm / fp4_gemm of those codes bit for bit, and within that GEMM's conformance tolerance
    of the reference (the fp32 sums of a K step may run in another order).
    N = 200 leaves a partial 128-row weight block; x's row 0 starts with a zero tile and row 1 has
    a tile below the 1e-4 amax floor; fp8 weight scales are powers of two when e8m0."""
    from seahal.backends.onnxruntime import kernels

    g = torch.Generator().manual_seed(3 * (weights == "fp4") + (dtype == torch.float16) + 7 * (out_dtype is None))
    m, n, k = 4, 200, 384
    tile_exponents = torch.randint(-6, 7, (m, k // 128), generator=g).float()
    x = torch.randn(m, k, generator=g) * torch.exp2(tile_exponents).repeat_interleave(128, 1)
    x[0, :128] = 0.0
    x[1, 128:256] *= FP8_AMAX_FLOOR / 64
    x = x.to(dtype)
    if weights == "fp8":
        b = (torch.randn(n, k, generator=g) * 64).clamp(-448, 448).to(torch.float8_e4m3fn)
        b_scale = torch.exp2(torch.randint(-10, -4, (-(-n // 128), k // 128), generator=g).float())
        if scale_dtype == torch.float32:
            b_scale = b_scale * (1 + torch.rand(b_scale.shape, generator=g))  # any fp32 scale
    else:
        b = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8)
        b_scale = torch.exp2(torch.randint(-8, 0, (n, k // 32), generator=g).float())  # FP4 scales are powers of two
    b_scale = b_scale.to(scale_dtype)

    got = kernels.act_quant_gemm(x, b, b_scale, out_dtype)
    assert got.dtype == (out_dtype or torch.bfloat16) and got.shape == (m, n)
    a, a_scale = ref_quant.fp8_act_quant(x, 128, "ue8m0")
    gemm = f"{weights}_gemm"
    assert torch.equal(_bits(got), _bits(getattr(kernels, gemm)(a, a_scale, b, b_scale, out_dtype)))
    want = ref_gemm.act_quant_gemm(x, b, b_scale, out_dtype)
    (check,) = checks_for(gemm, (a, a_scale, b, b_scale, out_dtype))
    verdict = check.check.compare(got, want)
    assert verdict.ok, verdict.detail
