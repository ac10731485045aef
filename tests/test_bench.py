"""``seahal bench``'s plumbing without a GPU: the CPU smoke mode of the cuda benchmarks (reference
kernels at tiny shapes), the merged JSON document and table, the roofline plot, and each op's FLOP
and byte formula against numbers worked out by hand for one V4 shape."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest
import torch

from seahal.bench import CUDA_OPS, GPU_ONLY, common, expand_ops, main, run_cuda
from seahal.bench.cuda_attention import (
    attention_cases,
    attention_fp8_cases,
    causal_pairs,
    indexer_cases,
    packed_indexer_cases,
    paged_contexts,
    paged_decode_cost,
    paged_fp8_cases,
)
from seahal.bench.cuda_compressor import cases as compressor_cases
from seahal.bench.cuda_kv_cache import cases as kv_cache_cases
from seahal.bench.cuda_mhc_rope import cases as mhc_rope_cases
from seahal.bench.cuda_moe_experts import cases as experts_cases
from seahal.testing.triton_interpreter import require_triton

GPU = torch.device("cuda")  # only the shape tables are read: no tensor is made on it
SMOKE_OPS = [op for op, module in CUDA_OPS.items() if module not in GPU_ONLY and op != "model"]
"""Every kernel benchmark with a CPU smoke mode (``model``, the end-to-end comparison with
transformers, is not a kernel row: it loads whole models and has its own checks)."""
ROW_KEYS = {"op", "shape", "kernel", "flops", "bytes", "bound", "us", "tflops", "gbps", "fraction_of_limit", "check", "peer"}
CODECS = {"kv_cache_unpack"}
"""Ops with no arithmetic worth counting (FLOPs 0: memory-bound by definition)."""


def _case(cases: list[common.Case], shape: str) -> common.Case:
    (case,) = [c for c in cases if c.shape == shape]
    return case


def test_smoke_mode_writes_one_document_for_every_op(tmp_path, capsys):
    require_triton()  # the cuda backend's modules
    path = tmp_path / "bench.json"
    rows = run_cuda(SMOKE_OPS + ["fp8_gemm"], "cpu", quick=True, json_path=str(path))
    doc = json.loads(path.read_text())
    assert doc["device"].startswith("cpu") and doc["torch"] == torch.__version__
    assert doc["rows"] == json.loads(json.dumps(rows))
    assert [r["op"] for r in rows if r["op"] != "fp8_gemm"] == sorted(
        (r["op"] for r in rows if r["op"] != "fp8_gemm"), key=SMOKE_OPS.index)
    for row in rows:
        assert ROW_KEYS <= row.keys(), row
        if row["op"] == "fp8_gemm":  # no CPU smoke mode: a row that says so
            assert row["us"] is None and "CUDA" in row["note"]
            continue
        assert row["check"] == {"err": 0.0, "passed": True}  # the reference against itself
        no_arithmetic = row["op"] in CODECS or " route " in row["shape"]  # moe_experts' routing tables alone
        assert row["us"] > 0 and row["bytes"] > 0 and (row["flops"] > 0 or no_arithmetic)
        assert row["gbps"] == pytest.approx(row["bytes"] / row["us"] / 1e3)
        assert row["tflops"] == pytest.approx(row["flops"] / row["us"] / 1e6)
        (peer,) = row["peer"].values()
        assert peer["us"] > 0 and row["speedup"] == pytest.approx(peer["us"] / row["us"])
    assert {r["op"] for r in rows} == set(SMOKE_OPS) | {"fp8_gemm"}
    table = capsys.readouterr().out
    assert table.count("\n| ") == len(rows) + 1  # header separator + one line per row


def test_a_run_cut_short_keeps_the_rows_it_measured(tmp_path, monkeypatch):
    """The JSON document is rewritten after every row: a device step killed at its limit in the
    middle of a module (here: the second rope row interrupted) leaves the rows before it."""
    from seahal.bench import cuda_mhc_rope

    path = tmp_path / "bench.json"
    measure = common.measure
    calls = []

    def measure_then_stop(case, device, quick):
        calls.append(case.shape)
        if len(calls) == 2:
            raise KeyboardInterrupt  # what the step's timeout does to the process, short of killing it
        return measure(case, device, quick)

    monkeypatch.setattr(common, "measure", measure_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run_cuda(["rope"], "cpu", quick=True, json_path=str(path))
    (row,) = json.loads(path.read_text())["rows"]
    assert row["op"] == "rope" and row["shape"] == calls[0] and row["us"] > 0
    assert not common._ROW_HOOKS  # the hook left with the interrupted module
    assert cuda_mhc_rope.rows  # the module measured through common.measure_all


def test_plot_draws_or_says_why(tmp_path, capsys):
    rows = run_cuda(["rope"], "cpu", quick=True)
    path = tmp_path / "roofline.png"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert not common.plot_roofline(rows, str(path), "smoke")
        assert "matplotlib is not installed" in capsys.readouterr().out and not path.exists()
        return
    assert common.plot_roofline(rows, str(path), "smoke")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_wrong_result_is_reported_not_timed():
    x = torch.randn(64)
    work = common.Workload(lambda: x + 1, {"reference": lambda: x}, common.close(1e-2))
    case = common.Case("rope", "wrong", 100, 1000, common.PEAK_BF16_TFLOPS, lambda device: work)
    row = common.measure(case, torch.device("cpu"), quick=True)
    assert not row["check"]["passed"] and row["check"]["err"] > 0.5
    assert row["us"] is None and row["note"] == "wrong result: not timed"
    assert row["peer"]["reference"]["us"] > 0 and "speedup" not in row


def test_variants_are_checked_before_they_are_timed():
    x = torch.randn(64)
    work = common.Workload(lambda: x * 1, {"reference": lambda: x}, common.close(1e-2),
                           variants={"other tiles": lambda: x + 0, "broken tiles": lambda: x + 1})
    case = common.Case("rope", "variants", 100, 1000, common.PEAK_BF16_TFLOPS, lambda device: work)
    row = common.measure(case, torch.device("cpu"), quick=True)
    right, wrong = row["variant"]["other tiles"], row["variant"]["broken tiles"]
    assert right["check"]["passed"] and right["us"] > 0 and right["gbps"] == pytest.approx(1000 / right["us"] / 1e3)
    assert not wrong["check"]["passed"] and wrong["check"]["err"] > 0.5 and "us" not in wrong
    assert set(row["timing"]) == {"kernel", "reference", "other tiles"}
    assert "other tiles" not in row["peer"] and row["speedup"] == pytest.approx(row["peer"]["reference"]["us"] / row["us"])
    table = common.format_table([row])
    assert "other tiles " in table and "broken tiles WRONG" in table


def test_fraction_of_limit_is_the_roofline_fraction():
    compute = common.Case("x", "compute", 1979e6, 3e3, common.PEAK_FP8_TFLOPS)  # 1 us of FP8 peak, 1 ns of HBM
    memory = common.Case("x", "memory", 989e3, 3e6, common.PEAK_BF16_TFLOPS)  # 1 ns of bf16 peak, 1 us of HBM
    assert common.figures(compute, 2.0)["fraction_of_limit"] == pytest.approx(0.5)
    assert common.figures(memory, 4.0)["fraction_of_limit"] == pytest.approx(0.25)
    assert (common.bound(compute), common.bound(memory)) == ("compute", "memory")


# Hand-worked FLOPs and bytes, one V4 shape per op (the tables' own cases, so the wiring is checked too).
def test_sparse_attention_formula():
    # V4-Flash CSA decode, batch 1, 64k: 128 window + 512 top-k slots, 64 heads of 512.
    case = _case(attention_cases(GPU, quick=False), "V4-Flash CSA decode B=1 ctx=65536")
    assert case.flops == 4 * 64 * 512 * 640 == 83_886_080
    # q + o: 2*64*512*2 = 131072; 640 rows * 1024 B = 655360; indices 640*4 = 2560; sinks 256
    assert case.nbytes == 131_072 + 655_360 + 2_560 + 256
    # V4-Pro HCA decode, batch 64, 1M: window 128 + 8192 entries, 128 heads.
    case = _case(attention_cases(GPU, quick=False), "V4-Pro HCA decode B=64 ctx=1048576")
    assert case.flops == 4 * 64 * 128 * 512 * 8320
    assert case.nbytes == 4 * 64 * 128 * 512 + 2 * 64 * 8320 * 512 + 4 * 64 * 8320 + 4 * 128
    # Prefill 4096 tokens: window slots 1+2+...+128 then 128 each, plus 512 top-k per query.
    case = _case(attention_cases(GPU, quick=False), "V4-Flash CSA prefill S=4096")
    assert case.flops == 4 * 64 * 512 * (8_256 + 3_968 * 128 + 4_096 * 512)


def test_sparse_attention_fp8_formula_and_goals():
    # V4-Flash CSA decode over 584-byte records, batch 64, 64k: 640 records a sequence.
    case = _case(attention_fp8_cases(GPU, quick=False), "V4-Flash CSA decode B=64 ctx=65536 fp8")
    assert case.flops == 4 * 64 * 64 * 512 * 640 == 5_368_709_120
    # q + o 8388608; records 64 * 640 * 584 = 23920640; indices 163840; sinks 256
    assert case.nbytes == 8_388_608 + 23_920_640 + 163_840 + 256 == 32_473_344
    assert case.params["goal_us"] == pytest.approx(32_473_344 / 1.95e6)  # 65% of 3.0 TB/s, over 30 MB
    # V4-Pro batch 1, 4k: 1024 entries, all picked: 1152 records; goal 300 TFLOP/s (1.0 us) is
    # under the small-transfer allowance bytes / 3.0 TB/s + 5 us.
    case = _case(attention_fp8_cases(GPU, quick=False), "V4-Pro CSA decode B=1 ctx=4096 fp8")
    assert case.flops == 4 * 128 * 512 * 1152 == 301_989_888
    assert case.nbytes == 262_144 + 1152 * 584 + 4 * 1152 + 512 == 940_032
    assert case.params["goal_us"] == pytest.approx(940_032 / 3e6 + 5)
    # V4-Pro batch 64, 1M: 60 MB, compute goal 19.3 GFLOP / 300 TFLOP/s.
    case = _case(attention_fp8_cases(GPU, quick=False), "V4-Pro CSA decode B=64 ctx=1048576 fp8")
    assert case.nbytes == 16_777_216 + 64 * 1152 * 584 + 4 * 64 * 1152 + 512 == 60_129_792
    assert case.params["goal_us"] == pytest.approx(19_327_352_832 / 300e6)
    decode = [c for c in attention_fp8_cases(GPU, quick=False) if "context" in c.params]
    assert {c.params["context"] for c in decode} == {4096, 65536, 262144, 1 << 20}
    # the 4096-token CSA prefill over records: the dense row's FLOPs; q + o, 4096 + 1024 records of
    # 584 bytes, 4096 x 640 indices, sinks
    case = _case(attention_fp8_cases(GPU, quick=False), "V4-Flash CSA prefill S=4096 fp8")
    assert case.flops == 4 * 64 * 512 * (8_256 + 3_968 * 128 + 4_096 * 512)
    assert case.nbytes == 536_870_912 + 5_120 * 584 + 4 * 4_096 * 640 + 256


def test_paged_sparse_attention_fp8_formula_and_goals():
    # V4-Flash, contexts 1k, 4k, 64k: 256, 1024, 16384 entries -> 128 + 256, 128 + 512, 128 + 512 = 1664
    # records; the block table has ceil((128 + 16384) / 64) = 258 pages a sequence.
    flops, nbytes = paged_decode_cost(common.V4_FLASH, [1024, 4096, 65536], 64, translate=True)
    assert flops == 4 * 64 * 512 * 1664 == 218_103_808
    # q + o 3*64*512*4 = 393216; records 1664 * 584 = 971776; indices 3 * 640 * 4; sinks 256; table 3 * 258 * 4
    assert nbytes == 393_216 + 971_776 + 7_680 + 256 + 3_096
    assert paged_decode_cost(common.V4_FLASH, [1024, 4096, 65536], 64, translate=False) == (flops, nbytes - 3_096)
    # The rows: 64 sequences uniform in [1k, 64k] (seed 6 draws 5357..64976 tokens), pages of 64 rows.
    contexts = paged_contexts(GPU)
    assert len(contexts) == 64 and all(1024 <= c <= 65536 for c in contexts)
    records = sum(128 + min(512, c // 4) for c in contexts)
    table = 64 * -(-(128 + max(contexts) // 4) // 64) * 4
    cases = paged_fp8_cases(GPU, quick=True)
    assert len(cases) == 4 and all(c.op == "sparse_attention_fp8" and c.params["page_rows"] == 64 for c in cases)
    paged = _case(cases, "V4-Flash CSA decode B=64 ctx=1024..65536 paged fp8")
    assert paged.flops == 4 * 64 * 512 * records
    assert paged.nbytes == 64 * 64 * 512 * 4 + records * 584 + 64 * 640 * 4 + 256 + table
    assert paged.params["goal_us"] == pytest.approx(paged.nbytes / 1.95e6)  # over 30 MB: 65% of 3.0 TB/s
    pool_rows = _case(cases, "V4-Flash CSA decode B=64 ctx=1024..65536 paged fp8, pool rows")
    assert (pool_rows.flops, pool_rows.nbytes) == (paged.flops, paged.nbytes - table)
    pro = _case(cases, "V4-Pro CSA decode B=64 ctx=1024..65536 paged fp8")
    assert pro.params["goal_us"] == pytest.approx(pro.flops / 300e6)  # 300 TFLOP/s


def test_slow_calls_are_timed_fewer_times():
    # 2 s of timed calls at most, never fewer than 3, never more than 30 (10 quick); a call over
    # 2 s (the experts' per-expert peer at 8192 tokens: 5-16 s on the H100) is timed once
    assert [common.repeats(us, quick=False) for us in (5.0, 1e5, 1e6, 2e6, 5e6)] == [30, 20, 3, 3, 1]
    assert common.repeats(5.0, quick=True) == 10


def test_goal_is_reported():
    case = common.Case("sparse_attention_fp8", "goal", 1e6, 3e6, common.PEAK_BF16_TFLOPS, params={"goal_us": 2.0})
    met, missed = (common.record(common.new_row(case, "triton"), case, us, {}) for us in (1.5, 2.5))
    assert (met["goal_met"], missed["goal_met"]) == (True, False)
    assert "goal 2.0 us MISSED" in common.format_table([missed])


def test_indexer_formula():
    # V4-Pro decode, batch 64, 1M: 262144 entries of 128 dims, 64 heads, top-1024.
    case = _case(indexer_cases(GPU, quick=False), "V4-Pro decode B=64 ctx=1048576")
    assert case.flops == 277_025_390_592  # 2 * 64 * 64 * 262144 * (128 + 1)
    # keys 4294967296 + q 1048576 + weights 16384 + indices 262144
    assert case.nbytes == 4_296_294_400


def test_packed_indexer_formula():
    # The dense V4-Pro 1M decode row with 68-byte (fp4) or 132-byte (fp8) keys instead of 256-byte
    # bf16 ones: the same FLOPs, keys 262144 * 64 sequences * 68 or 132 bytes.
    cases = packed_indexer_cases(GPU, quick=False)
    for fmt, key_bytes in (("fp4", 68), ("fp8", 132)):
        case = _case(cases, f"V4-Pro decode B=64 ctx=1048576 {fmt} keys")
        assert case.op == "indexer_topk_packed" and case.flops == 277_025_390_592
        assert case.nbytes == 64 * 262144 * key_bytes + 1_048_576 + 16_384 + 262_144
    dense = [c.shape for c in indexer_cases(GPU, quick=False) if "S=65536" not in c.shape]
    assert [c.shape for c in cases] == [f"{shape} {fmt} keys" for fmt in ("fp4", "fp8") for shape in dense]


def test_indexer_prefill_formula():
    # Query t sees floor((t+1)/4) entries: 1+1+1+1 (t=3..6), ..., brute force at S = 37.
    assert causal_pairs(37, 4) == sum((t + 1) // 4 for t in range(37)) == 162
    # 64k tokens: sum over k = 1..16383 of 4k, plus 16384 at t = 65535.
    assert causal_pairs(65536, 4) == 4 * 16383 * 16384 // 2 + 16384 == 536_854_528
    case = _case(indexer_cases(GPU, quick=False), "V4-Flash prefill S=65536")
    assert case.flops == 2 * 536_854_528 * 64 * 129
    # keys 16384*128*2 + q 65536*64*128*2 + weights 65536*64*4 + top-512 indices 65536*512*4
    assert case.nbytes == 4_194_304 + 1_073_741_824 + 16_777_216 + 134_217_728
    assert [c.shape for c in indexer_cases(GPU, quick=True) if "prefill" in c.shape] == [
        "V4-Flash prefill S=4096", "V4-Pro prefill S=4096"]


def test_indexer_reference_peer_in_query_blocks_is_one_call(monkeypatch):
    # the 64k prefill's peer runs the reference over query blocks; 5 queries a block here, the
    # first blocks seeing no entry at all
    from seahal.backends.cpu.reference.indexer import indexer_topk
    from seahal.bench import cuda_attention

    work = cuda_attention._prefill_indexer(common.TINY, 64, None, torch.device("cpu"))
    monkeypatch.setattr(cuda_attention, "REFERENCE_SCORES", 5 * common.TINY.index_heads * 16)
    blocked = work.peers["reference, query blocks"]()
    assert torch.equal(blocked, indexer_topk(*work.kernel.args))
    assert (blocked[0, :3] == -1).all() and (blocked[0, -1] >= 0).all()


def test_kv_cache_unpack_formula():
    (case,) = [c for c in kv_cache_cases(GPU, quick=False) if c.params["tokens"] == 65536]
    assert (case.flops, case.nbytes) == (0, 65536 * 584 + 65536 * 512 * 2)


def test_moe_experts_formula():
    # V4-Flash FP4 prefill: 8192 tokens x top-6 of 256 experts (all touched), D 4096, I 2048.
    case = _case(experts_cases(GPU, quick=False), "V4-Flash fp4 prefill T=8192 top6/256")
    assert case.params["touched_experts"] == 256
    assert case.flops == 2_473_901_162_496  # 6 * 8192 * 6 * 4096 * 2048
    # per expert 12582912 B of e2m1 + 786432 B of e8m0; x and y 134217728; ids and weights 393216
    assert case.nbytes == 256 * 13_369_344 + 134_217_728 + 393_216 == 3_557_163_008


def test_kv_compress_formula():
    # CSA main compressor decode step at position 4095, batch 64: coff 2, width 1024, one new entry.
    case = _case(compressor_cases(GPU, quick=False), "CSA main (m=4, d=512) decode pos=4095 B=64")
    assert case.flops == 2 * 64 * 1 * 2 * 4 * 512 == 524_288
    # fp32: tokens 2*64*1024, held state 2*64*7*1024, state slots that change 2*64*7*1024 (the
    # kept block moved to [0, 4), the old slots [4, 7) emptied; slot 7 is empty already), ape
    # 4*1024, norm 512, freqs 32 -> 1970720 values; bf16 entries 64*512*2 = 65536
    assert case.nbytes == 4 * 1_970_720 + 65_536 == 7_948_416


def test_kv_compress_fp8_formula():
    # The same decode step writing 584-byte FP8 records instead of 1024-byte bf16 entries; the
    # indexer's compressor (whose keys are not KV records) has no fp8 rows.
    case = _case(compressor_cases(GPU, quick=False, op="kv_compress_fp8"), "CSA main (m=4, d=512) decode pos=4095 B=64")
    assert case.op == "kv_compress_fp8" and case.flops == 524_288
    assert case.nbytes == 4 * 1_970_720 + 64 * 584
    assert not [c for c in compressor_cases(GPU, quick=False, op="kv_compress_fp8") if "indexer" in c.shape]


def test_hc_pre_times_the_other_token_tile_at_the_end_to_end_prompt():
    """hc_pre's prefill rows (the end-to-end bench's 1k tokens among them) time the other tl.dot
    token tile beside the default, so one GPU run says which tile the 1k-token prefill wants: the
    default launches 16-token tiles at 1024 tokens, the variant 64 (and the reverse at 4096)."""
    require_triton()
    from seahal.testing.triton_compile import capture_launches

    with capture_launches() as launches:
        cases = {c.shape: c for c in mhc_rope_cases(["hc_pre"], GPU, quick=False)}
        assert "V4-Flash n=4 D=4096 T=1024" in cases
        for tokens, other in ((1024, 64), (4096, 16)):
            work = cases[f"V4-Flash n=4 D=4096 T={tokens}"].build(GPU)
            assert set(work.peers) == {"reference", f"{other}-token tiles", "plain collapse, then the rms_norm kernel"}
            work.kernel()
            work.peers[f"{other}-token tiles"]()
    tiles = [launch.kwargs["BLOCK_T"] for launch in launches if launch.kernel.fn.__name__ == "_mix_kernel"]
    assert tiles == [16, 64, 64, 16]

def test_mhc_and_rope_formulas():
    cases = mhc_rope_cases(["hc_pre", "hc_post", "hc_head", "rope"], GPU, quick=False)
    hc_pre = _case([c for c in cases if c.op == "hc_pre"], "V4-Pro n=4 D=7168 T=4096")
    assert hc_pre.flops == 6_106_906_624 + 88_080_384  # 2 * 4096 * 4 * 7168 * (24 + 2), the norm's 3 * 4096 * 7168
    # x 234881024 + y 58720256 + fn 2752512 + post/comb 327680 + base/scales 108 + norm weight 28672
    assert hc_pre.nbytes == 296_681_580 + 28_672
    hc_post = _case([c for c in cases if c.op == "hc_post"], "V4-Flash n=4 D=4096 T=64")
    # f's two parts read (the model's routed and shared outputs) and added: 2 * 524_288 bytes, T * D FLOPs
    assert (hc_post.flops, hc_post.nbytes) == (10_485_760 + 262_144, 2 * 524_288 + 4_194_304 + 5_120)
    hc_head = _case([c for c in cases if c.op == "hc_head"], "V4-Flash n=4 D=4096 T=1")
    assert (hc_head.flops, hc_head.nbytes) == (196_608 + 12_288, 32_768 + 8_192 + 262_144 + 20 + 16_384)
    rope = _case([c for c in cases if c.op == "rope"], "V4-Pro q 128x512 T=16384")
    assert (rope.flops, rope.nbytes) == (402_653_184, 4_294_967_296 + 131_072 + 128)
    fused = _case(mhc_rope_cases(["rms_norm_rope"], GPU, quick=False), "V4-Flash q 64x512 T=1")
    # rope's 3 * 64 * 64 plus the norm's 3 * 64 * 512; the heads read and written once, as rope's
    assert (fused.flops, fused.nbytes) == (12_288 + 98_304, 131_072 + 8 + 128)


def test_ops_list_and_errors(capsys):
    assert expand_ops("indexer, mhc,rope,rope") == [
        "indexer_topk", "indexer_topk_packed", "hc_pre", "hc_post", "hc_head", "rope"]
    # issue #6's names
    assert expand_ops("kv_compress,indexer,sparse_attention,mhc") == [
        "kv_compress", "kv_compress_fp8", "indexer_topk", "indexer_topk_packed", "sparse_attention",
        "sparse_attention_fp8", "hc_pre", "hc_post", "hc_head"]
    assert all(op in CUDA_OPS for op in expand_ops("kv_compress,indexer,sparse_attention,mhc,kv_cache_unpack"))
    args = argparse.Namespace(backend="cuda", ops="rope,flash_attn", json=None, quick=True, plot=None, device="cpu")
    assert main(args) == 2
    assert "no cuda benchmark for flash_attn" in capsys.readouterr().err


def test_contexts_reach_the_model_rows_and_only_them(monkeypatch, capsys):
    """``--contexts 4096``: the model bench at that prompt length alone (the 4k figure in a device
    call of its own); every other module's rows are called as before; without model rows, or with a
    length that is not a positive integer, a usage error."""
    from seahal.bench import cuda_mhc_rope, model_e2e, parse_contexts

    calls = {}

    def recording(module):
        def rows(ops, device, quick, **options):
            calls[module] = options
            return []
        return rows

    monkeypatch.setattr(model_e2e, "rows", recording("model"))
    monkeypatch.setattr(cuda_mhc_rope, "rows", recording("rope"))
    run_cuda(["model", "rope"], "cpu", quick=True, contexts=(4096,))
    assert calls == {"model": {"contexts": (4096,)}, "rope": {}}
    scaled = model_e2e.scale(GPU, quick=True, contexts=(4096,))
    assert scaled == dataclasses.replace(model_e2e.scale(GPU, quick=True), contexts=(4096,))
    assert model_e2e.scale(GPU, quick=False).contexts == (1024, 4096)
    with pytest.raises(ValueError, match="positive"):
        model_e2e.scale(GPU, quick=True, contexts=(0,))
    assert parse_contexts("1024,4096") == (1024, 4096)
    for bad in ("0", "4k", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_contexts(bad)
    args = argparse.Namespace(backend="cuda", ops="rope", json=None, quick=True, plot=None, device="cpu", contexts=(4096,))
    assert main(args) == 2
    assert "--contexts sets the prompt lengths of --ops model" in capsys.readouterr().err


def test_gpu_only_modules_rows_convert_to_the_common_schema(monkeypatch):
    """The GEMM, gate and quantiser benchmarks keep their own measurement (GPU only); their rows,
    as they produce them, come out in the common schema with their peers."""
    from seahal.bench import cuda_gemm, cuda_moe_gate, cuda_quant

    gemm = {"op": "fp8_gemm", "shape": "wo_b", "N": 4096, "K": 8192, "M": 4096, "bytes": 2e8, "err": 3e-3,
            "config": {}, "us": 200.0, "cublas_block_us": 220.0, "bf16_us": 400.0}
    # a decode row also times act_quant_gemm's two forms: x quantised in the GEMM, and in a launch of its own
    decode = {**gemm, "M": 1, "bytes": 3.4e7, "us": 20.0, "quantising_us": 20.5, "quantising_err": 3e-3,
              "quant_then_gemm_us": 23.0, "quant_then_gemm_err": 3e-3}
    monkeypatch.setattr(cuda_gemm, "run", lambda ops, quick, on_row: [on_row(r) for r in (gemm, decode)])
    handed_on = []
    with common.on_each_row(handed_on.append):
        row, decode_row = cuda_gemm.rows(["fp8_gemm"], GPU, quick=True)
    assert handed_on == [row, decode_row]  # each as it is measured: a cut run's JSON keeps it
    assert row["tflops"] == pytest.approx(2 * 4096 * 4096 * 8192 / 200.0 / 1e6)
    assert row["fraction_of_limit"] == pytest.approx(2 * 4096 * 4096 * 8192 / 1979e6 / 200.0)
    assert set(row["peer"]) == {"cublas_blockwise", "bf16_matmul"} and row["speedup"] == pytest.approx(1.1)
    assert row["check"] == {"err": 3e-3, "passed": True} and "variant" not in row
    variants = decode_row["variant"]
    assert set(variants) == set(cuda_gemm.QUANTISING_VARIANTS.values())
    fused = variants[cuda_gemm.QUANTISING_VARIANTS["quantising"]]
    assert fused["us"] == 20.5 and fused["gbps"] == pytest.approx(3.4e7 / 20.5 / 1e3) and fused["check"]["passed"]
    assert variants[cuda_gemm.QUANTISING_VARIANTS["quant_then_gemm"]]["us"] == 23.0

    gate = {"row": "full", "T": 16384, "bytes": 1.6e7, "same_indices": 0.5, "us": 10.0, "peer_us": 100.0}
    monkeypatch.setattr(cuda_moe_gate, "run", lambda quick: [gate])
    (row,) = cuda_moe_gate.rows(["moe_gate"], GPU, quick=True)
    assert row["flops"] == 2 * 16384 * 4096 * 256 and row["gbps"] == pytest.approx(1600.0)
    assert row["check"] == {"err": 0.5, "passed": False}

    quant = {"op": "fp8_act_quant", "shape": [4096, 7168], "scale_fmt": "fp32", "bytes": 3e7, "bitwise": True,
             "us": 15.0, "peer_us": 60.0}
    monkeypatch.setattr(cuda_quant, "run", lambda ops, quick: [quant])
    (row,) = cuda_quant.rows(["fp8_act_quant"], GPU, quick=True)
    assert (row["shape"], row["bound"], row["gbps"]) == ("4096x7168 fp32", "memory", pytest.approx(2000.0))
    assert row["fraction_of_limit"] == pytest.approx(2 / 3) and row["peer"]["reference"]["us"] == 60.0


def test_seahal_bench_command_passes_device_and_plot(tmp_path, capsys):
    from seahal.cli import main as seahal

    path = tmp_path / "bench.json"
    plot = tmp_path / "roofline.png"
    argv = ["bench", "--backend", "cuda", "--device", "cpu", "--quick", "--ops", "kv_cache_unpack", "--json", str(path),
            "--plot", str(plot)]
    assert seahal(argv) == 0
    doc = json.loads(path.read_text())
    assert doc["device"].startswith("cpu") and {r["op"] for r in doc["rows"]} == {"kv_cache_unpack"}
    out = capsys.readouterr().out
    assert "roofline written to" in out or "matplotlib is not installed" in out


def test_gemm_tuner_tries_both_fp4_forms_and_writes_the_winner():
    """``--tune`` tries every fp4 config in both forms; the table source carries the
    ``tl.dot_scaled`` flag and evaluates back to the same config (what ``--write-tables`` commits)."""
    require_triton()  # the cuda backend's modules
    from seahal.backends.cuda._gemm import GemmConfig
    from seahal.bench.cuda_gemm import config_table_source, tune_candidates

    for m in (1, 64, 512, 4096):
        fp4 = tune_candidates("fp4_gemm", m)
        assert {c for c in fp4 if c.fp4_mx} == {GemmConfig(**{**c.__dict__, "fp4_mx": True}) for c in fp4}
        assert not any(c.fp4_mx for c in tune_candidates("fp8_gemm", m))
    config = GemmConfig(128, 128, 8, 3, 1, 16, fp4_mx=True)
    row = {"M": 4096, "N": 2048, "K": 4096, "shape": "exp_up", "us": 1.0, "config": config.__dict__}
    source = config_table_source([row])
    assert "fp4_mx=True" in source
    assert eval("{" + source + "\n}", {"GemmConfig": GemmConfig}) == {(4096, 2048, 4096): config}


def test_moe_experts_tuner_runs_the_rows_asked_for_and_reports_each(monkeypatch):
    """``tune(tokens_only=..., model=...)``: only those rows, each handed to ``done`` as it finishes
    (the device step writes its JSON there, so a step cut at its limit keeps the rows it tuned)."""
    require_triton()  # the cuda backend's modules
    import torch

    from seahal.bench import cuda_moe_experts as bench

    monkeypatch.setattr(bench, "tune_row", lambda run, candidates, expected, time: {"best": None, "us": None, "trials": []})
    monkeypatch.setattr(bench, "time_us", lambda fn, device, quick: (1.0,))
    monkeypatch.setattr(bench, "reference_by_expert", lambda *args: None)
    seen = []
    cpu = torch.device("cpu")
    results = bench.tune(cpu, quick=True, tokens_only={4}, model="tiny", done=lambda r: seen.append(len(r)))
    assert [r["shape"] for r in results] == ["tiny fp4 decode T=4 top2/8"] and seen == [1]
    shared = bench.tune(cpu, quick=True, tokens_only={1}, model="tiny")  # the shared expert's one-row call
    assert [(r["shape"], r["rows"], r["format"]) for r in shared] == [("tiny fp8 decode T=1 top1/1", 1, "fp8")]
    assert "tiny fp8 decode T=16 top1/1" in [case.shape for case in bench.cases(cpu, quick=True)]
    assert bench.tune(cpu, quick=True, model="V4-Pro") == []  # no such rows off a GPU


def test_moe_experts_tuner_times_the_correct_candidates_and_keeps_the_fastest():
    """``tune_row``: a candidate whose output is off is not timed; the fastest of the rest wins."""
    require_triton()  # the cuda backend's modules
    import torch

    from seahal.backends.cuda.moe_experts import ExpertsConfig
    from seahal.bench.cuda_moe_experts import tune_candidates, tune_row

    expected = torch.ones(4, 8)
    slow, wrong, fast = ExpertsConfig(16, 128), ExpertsConfig(32, 128), ExpertsConfig(16, 128, num_warps=8)
    outputs = {slow: expected, wrong: expected * 1.5, fast: expected}
    times = {slow: 20.0, fast: 10.0}
    result = tune_row(outputs.__getitem__, [slow, wrong, fast], expected, lambda fn: times[fn.args[0]])
    assert result["best"] == dataclasses.asdict(fast) and result["us"] == 10.0
    assert [t["us"] for t in result["trials"]] == [20.0, None, 10.0]
    # decode rows try K splits; prefill neither splits nor needs the decode tiles; both try 64- and
    # 128-column tiles, FP4 blocks decoded to bf16 only
    decode, prefill = tune_candidates(1, fp4=True), tune_candidates(8192, fp4=True)
    assert {c.split_k for c in decode} == {None, 1, 2, 4} and not any(c.fp4_mx for c in decode + prefill)
    assert {c.split_k for c in prefill} == {1} and min(c.block_m for c in prefill) == 32
    assert {(c.block_n, c.num_warps) for c in decode} == {(c.block_n, c.num_warps) for c in prefill} \
        == {(128, 4), (128, 8), (64, 4), (64, 8)}
    # decode rows also quantise x by a launch of their own (prefill rows always do, past 256 rows)
    assert {c.quant_in_gemm for c in decode} == {None, False} and {c.quant_in_gemm for c in prefill} == {None}
    # the CUDA-core GEMV for FP8 weights where a touched expert has about one row (1 and 16 tokens),
    # not at 64 or prefill, and never for FP4 weights
    assert any(c.gemv for c in tune_candidates(1, fp4=False)) and any(c.gemv for c in tune_candidates(16, fp4=False))
    assert not any(c.gemv for c in tune_candidates(64, fp4=False) + tune_candidates(8192, fp4=False) + decode)
    # one FP4 token also the 16x128 8-warp tile capped to fit three programs an SM, nothing else
    capped = [c for c in decode if c.max_registers]
    assert capped and {(c.block_m, c.block_n, c.num_warps, c.num_stages, c.max_registers) for c in capped} \
        == {(16, 128, 8, 3, 80)}
    assert not any(c.max_registers for c in tune_candidates(16, fp4=True) + tune_candidates(1, fp4=False) + prefill)
    # FP4 prefill rows also each tile with x and h as bf16 values; never decode rows or FP8 weights
    assert {c.round_trip for c in prefill} == {False, True}
    assert not any(c.round_trip for c in decode + tune_candidates(8192, fp4=False))


@pytest.mark.parametrize("fmt", ["fp4", "fp8"])
def test_reference_by_expert_is_the_reference(fmt):
    """The moe_experts bench's timed peer runs the reference expert by expert on its own tokens;
    per-row quantisation and the same order of addition make it the reference, bit for bit
    (on the CPU, where a row's matmul does not depend on how many rows are gathered with it)."""
    from seahal.backends.cpu.reference.moe import moe_experts
    from seahal.bench.cuda_moe_experts import _arguments, reference_by_expert

    dims = common.ModelDims("tiny", dim=256, heads=1, index_topk=4, experts=8, inter=128, top_k=3)
    args = _arguments(dims, fmt, 24, torch.device("cpu"))
    assert torch.equal(reference_by_expert(*args), moe_experts(*args))


@pytest.mark.parametrize("fmt", ["fp4", "fp8", "dense"])
def test_the_oracle_over_the_touched_experts_is_the_reference(fmt):
    """The moe_experts rows' oracle gives the reference only the experts the sampled tokens route
    to, renumbered in order (a decode row: 6 of 256); the untouched ones add nothing, so the output
    is the reference's over all of them, bit for bit, -1 slots included."""
    from seahal.backends.cpu.reference.moe import moe_experts
    from seahal.bench.cuda_moe_experts import _arguments, reference_over_touched, touched_experts

    dims = common.ModelDims("tiny", dim=256, heads=1, index_topk=4, experts=16, inter=128, top_k=2)
    x, weights, ids, *rest = _arguments(dims, fmt, 3, torch.device("cpu"))
    ids[1, 1] = -1
    cut = touched_experts(ids, *rest)
    assert cut[1].shape[0] == ids[ids >= 0].unique().numel() == 5
    assert cut[0].tolist() == torch.searchsorted(ids[ids >= 0].unique(), ids.clamp(min=0)).masked_fill(ids < 0, -1).tolist()
    assert torch.equal(moe_experts(x, weights, *cut), moe_experts(x, weights, ids, *rest))
    assert torch.equal(reference_over_touched(x, weights, ids, *rest), moe_experts(x, weights, ids, *rest))
    assert touched_experts(ids.new_tensor([[0, 1]]).expand(1, 2), *[w[:2] if isinstance(w, torch.Tensor) else w
                                                                     for w in rest])[0].tolist() == [[0, 1]]


def test_tally_kernels_ranks_names_by_total_time():
    tally = common.tally_kernels([("gemm", 10.0), ("norm", 2.0), ("gemm", 12.5), ("quant", 3.0), ("norm", 2.5)], top=2)
    assert tally == {"kernels": 5, "busy_us": 30.0,
                     "top": [{"name": "gemm", "calls": 2, "us": 22.5}, {"name": "norm", "calls": 2, "us": 4.5}]}


def test_summarize_profile_splits_kernels_from_the_hosts_cuda_calls():
    """Device events tally as kernels; of the host's events only CUDA runtime and driver calls count
    (an aten op or a Python function on the host does not), ranked the same way."""
    from types import SimpleNamespace

    import torch

    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA

    def event(name, device, us):
        return SimpleNamespace(name=name, device_type=device, time_range=SimpleNamespace(elapsed_us=lambda: us))

    events = [event("_gemm_kernel", cuda, 40.0), event("cudaLaunchKernel", cpu, 3.0), event("aten::empty", cpu, 9.0),
              event("cuLaunchKernelEx", cpu, 4.0), event("cudaStreamSynchronize", cpu, 700.0),
              event("cudaLaunchKernel", cpu, 2.0), event("custom_op", cpu, 5.0), event("_norm_kernel", cuda, 5.0)]
    summary = common.summarize_profile(events, top=1)
    assert (summary["kernels"], summary["busy_us"], summary["top"]) == (2, 45.0, [{"name": "_gemm_kernel", "calls": 1,
                                                                                    "us": 40.0}])
    assert summary["host_api"] == {"calls": 4, "us": 709.0, "top": [
        {"name": "cudaStreamSynchronize", "calls": 1, "us": 700.0}, {"name": "cudaLaunchKernel", "calls": 2, "us": 5.0},
        {"name": "cuLaunchKernelEx", "calls": 1, "us": 4.0}]}


def test_allocator_events_count_the_calls_trips_to_the_driver(monkeypatch):
    """The counters' change over the call, for the counters this torch reports."""
    import torch

    stats = iter([{"num_alloc_retries": 2, "num_device_alloc": 10, "allocated_bytes.all.current": 5},
                  {"num_alloc_retries": 3, "num_device_alloc": 14, "allocated_bytes.all.current": 9}])
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda: next(stats))
    calls = []
    assert common.allocator_events(lambda: calls.append(1)) == {"num_alloc_retries": 1, "num_device_alloc": 4}
    assert calls == [1]


def test_kernel_breakdown_reports_a_failing_profiler(monkeypatch):
    """A bench row keeps its timing when the profiler (CUPTI) fails: the breakdown says why."""
    def broken(fn, top):
        raise RuntimeError("CUPTI_ERROR_INSUFFICIENT_PRIVILEGES")

    monkeypatch.setattr(common, "kernel_profile", broken)
    assert common.kernel_breakdown(lambda: None) == {"error": "RuntimeError: CUPTI_ERROR_INSUFFICIENT_PRIVILEGES"}


def test_kernel_breakdown_stops_at_its_budget(monkeypatch):
    calls = []
    monkeypatch.setattr(common, "kernel_profile", lambda fn, top: calls.append(fn) or {"kernels": 1})
    monkeypatch.setattr(common, "_profiled_s", [common.PROFILE_BUDGET_S - 1e-9])
    assert common.kernel_breakdown(lambda: None) == {"kernels": 1}  # under the budget: profiled
    assert "not profiled" in common.kernel_breakdown(lambda: None)["error"] and len(calls) == 1


def test_host_profile_ranks_functions_by_their_own_time():
    """The E2E prefill row's host profile: the function that holds the host longest comes first,
    with its calls, and the call's profiled time covers it."""
    import time

    from seahal.bench.common import host_profile

    def launch_many():
        for _ in range(3):
            time.sleep(0.01)

    result = host_profile(launch_many, top=3)
    first = result["top"][0]
    assert "sleep" in first["function"] and first["calls"] == 3
    assert 30e3 <= first["self_us"] <= result["profiled_us"]
    assert len(result["top"]) <= 3


def test_moe_experts_table_takes_the_tuned_winners_and_the_launch_finds_them(monkeypatch):
    """``--write``'s entries: only configs at least TABLE_MIN_GAIN faster than the default, keyed by
    (format, rows class, I, D); they evaluate back to the tuned config, replace the module's literal,
    and ``select_experts_config`` serves them on that chip (the heuristic elsewhere)."""
    require_triton()  # the cuda backend's modules
    import torch

    from seahal.backends.cuda import _gemm, moe_experts
    from seahal.backends.cuda.moe_experts import ExpertsConfig
    from seahal.bench.common import replace_config_table
    from seahal.bench.cuda_moe_experts import experts_table_source

    tuned = ExpertsConfig(32, 128, num_warps=8, num_stages=4, split_k=2)
    row = {"shape": "V4-Flash fp4 decode T=1", "format": "fp4", "rows": 6, "inter": 2048, "dim": 4096,
           "default_us": 105.0, "us": 80.0, "best": dataclasses.asdict(tuned)}
    close_call = {**row, "shape": "V4-Flash fp4 decode T=16", "rows": 96, "us": 100.0}  # 5%: within the spread
    untimed = {**row, "shape": "V4-Pro fp4 decode T=1", "inter": 3072, "us": None, "best": None}
    source = experts_table_source([row, close_call, untimed])
    table = eval("{" + source + "\n}", {"ExpertsConfig": ExpertsConfig})
    assert table == {("fp4", 8, 2048, 4096): tuned}
    module = "x = 1\nSM90_CONFIGS: ExpertsTable = {}\nCONFIGS = {}\n"
    written = replace_config_table(module, "ExpertsTable", source)
    assert written.startswith("x = 1\nSM90_CONFIGS: ExpertsTable = {\n    (\"fp4\", 8, 2048, 4096)")
    assert replace_config_table(written, "ExpertsTable", "") == module  # and back to empty
    monkeypatch.setitem(moe_experts.CONFIGS, "sm90", table)
    monkeypatch.setattr(_gemm, "chip", lambda device: "sm90")
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    assert moe_experts.select_experts_config(6, "fp4", 2048, 4096, gpu) == tuned
    assert moe_experts.select_experts_config(96, "fp4", 2048, 4096, gpu) != tuned  # another rows class
    assert moe_experts.select_experts_config(6, "fp4", 2048, 4096, cpu) == moe_experts.experts_config(6, "fp4", cpu)
