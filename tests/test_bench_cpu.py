"""``seahal bench --backend cpu``: the native kernels' rows beside their peers, the JSON document,
the per-op tables and the byte formulas against numbers worked out by hand."""

from __future__ import annotations

import argparse
import json

import pytest

from seahal.backends.cpu import native
from seahal.bench import cpu_gemm, main

pytestmark = pytest.mark.skipif(native.native_module() is None, reason="seahal._native is not built")


def test_quick_run_writes_every_op_s_rows_checked_and_timed(tmp_path, capsys):
    path = tmp_path / "cpu.json"
    rows = cpu_gemm.run(list(cpu_gemm.SHAPES), quick=True, json_path=str(path))
    doc = json.loads(path.read_text())
    assert doc["rows"] == json.loads(json.dumps(rows)) and doc["header"]["quick"] is True
    assert [(r["op"], r["M"]) for r in rows] == [(op, m) for op in cpu_gemm.SHAPES for m in cpu_gemm.QUICK_MS]
    assert doc["header"]["copy_GB/s"] > 0
    for r in rows:
        fraction = r["native"]["fraction_of_copy_bandwidth"]
        assert fraction == pytest.approx(r["native"]["GB/s"] / doc["header"]["copy_GB/s"])
        # native and reference: the same dequantised weight and fp32 sums, each rounded once to bf16
        # (2^-8 relative): they may differ by a rounding of the largest output, not by more
        assert r["native_rel_diff"] <= 2**-7, r
        if r["op"] != "grouped_linear" and native.native_module().simd_variants()[-1] == "avx512bf16":
            assert "native_avx2" in r  # the kernel's previous variant, timed beside the bf16 one
        for way in ("native", *cpu_gemm.peers(r["op"])):
            assert r[way]["seconds"] > 0 and r[way]["GFLOP/s"] == pytest.approx(2 * r["M"] * r["N"] * r["K"] / r[way]["seconds"] / 1e9)
    tables = capsys.readouterr().out
    assert "bf16 at load ms" in tables and "fp32 mm ms" in tables  # grouped_linear's peers, then the GEMMs'


def test_grouped_linear_bytes_and_shape():
    """wo_a of V4-Flash (8 groups of 1024 rows x 4096) at 16 tokens: the FP8 weight (32 MiB) and
    its 64 x 32 e8m0 scales, or its bf16 copy (64 MiB), plus bf16 x [16, 8, 4096] and out [16, 8, 1024]."""
    dims = cpu_gemm.SHAPES["grouped_linear"]["wo_a"]
    activations = 2 * 16 * 8 * 4096 + 2 * 16 * 8 * 1024
    assert cpu_gemm.moved_bytes("grouped_linear", "native", 16, dims) == 8192 * 4096 + 64 * 32 + activations
    assert cpu_gemm.moved_bytes("grouped_linear", "einsum_at_load", 16, dims) == 2 * 8192 * 4096 + activations
    assert cpu_gemm.weight_shape("grouped_linear", "wo_a") == (8192, 4096)
    x, w, s = cpu_gemm.make_operands("grouped_linear", 3, dims)
    assert x.shape == (3, 8, 4096) and w.shape == (8192, 4096) and s.shape == (64, 32)


def test_fp8_gemm_bytes():
    """q_a (1024 x 4096) at M 16: e4m3 weight and its 8 x 32 scales, e4m3 a and its fp32 16 x 32
    scales, bf16 out; the fp32 peer moves every operand at 4 bytes."""
    dims = cpu_gemm.SHAPES["fp8_gemm"]["q_a"]
    assert cpu_gemm.moved_bytes("fp8_gemm", "native", 16, dims) == 1024 * 4096 + 8 * 32 + 16 * 4096 + 4 * 16 * 32 + 2 * 16 * 1024
    assert cpu_gemm.moved_bytes("fp8_gemm", "matmul_fp32", 16, dims) == 4 * (1024 * 4096 + 16 * 4096 + 16 * 1024)


def test_unknown_op_is_refused(capsys):
    args = argparse.Namespace(backend="cpu", ops="fp8_gemm,moe_experts", quick=True, json=None)
    assert main(args) == 2
    assert "not moe_experts" in capsys.readouterr().err
