"""scripts/gpu_session.sh's plumbing without a GPU: the steps it would run (--dry-run), that a failing
step does not stop the next and a spent budget skips the rest (steps run with ``PYTHON=false``), and
the digest of bench JSON documents it prints last."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from seahal.bench import CUDA_OPS, expand_ops, run_cuda

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_session.sh"
STEPS = ["setup", "conformance", "bench-model-quick", "bench-experts", "bench-decode", "bench-mhc-compress",
         "pytest-gpu", "bench-gemm"]
RETURNED_FILES = 8
"""Files the device tool brings back from $OUT."""

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def _run(*args: str, python: str | None = None, out: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **({"PYTHON": python} if python else {}), **({"OUT": str(out)} if out else {})}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=60, check=False)


def test_dry_run_lists_the_steps_in_priority_order():
    result = _run("--dry-run")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("budget 540s")
    steps = [re.match(r"(\S+)\s+<=\s+(\d+)s\s+(.*)", line).groups() for line in lines[1:]]
    assert [name for name, _, _ in steps] == STEPS
    commands = dict((name, command) for name, _, command in steps)
    assert "pytest" in commands["pytest-gpu"] and "tests/test_cuda_*.py" in commands["pytest-gpu"]
    assert commands["conformance"].startswith("SEAHAL_CUDA_UNVERIFIED=1 ")  # unverified kernels serve plans
    assert commands["pytest-gpu"].startswith("SEAHAL_CUDA_UNVERIFIED=1 ")
    assert "tests/test_decode_graph.py" in commands["pytest-gpu"] and "on_a_gpu" in commands["pytest-gpu"]  # PDL's too
    benched = []
    for name in [step for step in STEPS if step.startswith("bench-")]:
        ops = re.search(r"--ops (\S+)", commands[name]).group(1)
        assert set(expand_ops(ops)) <= set(CUDA_OPS), ops  # every name is one `seahal bench` knows
        benched += expand_ops(ops)
    assert {"sparse_attention_fp8", "indexer_topk", "kv_compress", "hc_pre", "moe_experts", "fp8_gemm", "model"} <= set(benched)
    written = {Path(p).name for p in re.findall(r"--json \$RESULTS/(\S+)", result.stdout)}
    assert len(written | {"summary.txt", "session.log"}) <= RETURNED_FILES


def test_only_selects_steps_and_bad_arguments_are_refused():
    result = _run("--dry-run", "--only", "bench-decode,conformance", "--budget", "300")
    assert result.stdout.splitlines()[0].startswith("budget 300s")
    assert [line.split()[0] for line in result.stdout.splitlines()[1:]] == ["conformance", "bench-decode"]
    # the router's rows run only when named (measured, its bf16 path unchanged since)
    result = _run("--dry-run", "--only", "bench-gate")
    (line,) = result.stdout.splitlines()[1:]
    assert line.split()[0] == "bench-gate" and "--ops moe_gate" in line
    # the end-to-end model bench runs only when named, after the carried wheels are installed
    result = _run("--dry-run", "--only", "bench-model")
    (line,) = result.stdout.splitlines()[1:]
    assert line.split()[0] == "bench-model" and "install_carried_wheels && " in line and "--ops model" in line
    # or at 4k alone, compiled ahead at that context, into a file of its own
    result = _run("--dry-run", "--only", "bench-model-4k")
    (line,) = result.stdout.splitlines()[1:]
    assert line.split()[0] == "bench-model-4k" and line.count("--contexts 4096") == 2
    assert "triton_precompile model --quick --contexts 4096" in line and "bench-model-4k.json" in line
    result = _run("--frobnicate")
    assert result.returncode == 2 and "unknown argument --frobnicate" in result.stderr


def test_every_step_runs_though_each_fails(tmp_path):
    result = _run("--budget", "100", python="false", out=tmp_path)
    assert result.returncode == 1
    summary = (tmp_path / "summary.txt").read_text().splitlines()
    assert [line.split()[:2] for line in summary[1 : 1 + len(STEPS)]] == [[name, "failed(1)"] for name in STEPS]
    assert all(f"=== {name} (limit" in (tmp_path / "session.log").read_text() for name in STEPS)
    assert summary[0] == result.stdout.splitlines()[-len(summary)]  # the summary is printed last


def test_a_spent_budget_skips_the_remaining_steps(tmp_path):
    result = _run("--budget", "10", "--only", "conformance,bench-gemm", python="false", out=tmp_path)
    assert result.returncode == 1
    rows = [line.split() for line in (tmp_path / "summary.txt").read_text().splitlines()[1:3]]
    assert [row[:2] for row in rows] == [["conformance", "skipped"], ["bench-gemm", "skipped"]]


def test_bench_digest_names_wrong_failed_and_missed_rows(tmp_path, capsys):
    path = tmp_path / "bench-quick.json"
    run_cuda(["kv_cache_unpack", "sparse_attention_fp8"], "cpu", quick=True, json_path=str(path))
    doc = json.loads(path.read_text())
    wrong, failed, missed = doc["rows"][:3]
    wrong.update(check={"err": 0.5, "passed": False}, us=None, note="wrong result: not timed")
    failed.update(check=None, us=None, note="OutOfMemoryError: CUDA out of memory")
    missed.update(goal_us=1.0, goal_met=False)
    path.write_text(json.dumps(doc))
    capsys.readouterr()
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_digest.py"), str(path), str(tmp_path / "none.json")],
                            capture_output=True, text=True, check=True)
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"bench-quick.json: {len(doc['rows'])} rows on cpu")
    assert f"{len(doc['rows']) - 2} timed, 1 wrong, 1 not run; goal met 0 of 1" in lines[0]
    assert lines[1] == f"  wrong: kv_cache_unpack {wrong['shape']} (err 5.00e-01)"
    assert lines[2] == f"  not run: kv_cache_unpack {failed['shape']}: OutOfMemoryError: CUDA out of memory"
    assert lines[3].startswith(f"  goal missed: sparse_attention_fp8 {missed['shape']}: ") and lines[3].endswith("> 1.0 us")
    assert lines[4].startswith("none.json: not read (FileNotFoundError")

