"""Precompiling a run's Triton kernels (:mod:`seahal.testing.triton_precompile`): what the worker
processes put in Triton's cache is what the launch path then looks up, for every launch.

The launch path is Triton's own ``JITFunction.run`` for sm_90, without a GPU: the cache lookup
happens inside Triton's ``compile``, which on a miss goes on to the backend's compile stages and on
a hit returns the cached kernel. Here the stages raise (a miss) and the hook Triton calls after a
compile succeeds raises another error (a hit), so no launch is attempted. Runs in a child process:
the interpreter tests set ``TRITON_INTERPRET=1`` for this one, under which nothing compiles.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from seahal.testing.triton_interpreter import require_triton

OPS = ["hc_post"]
"""Ops whose conformance launches are compiled here: hc_post's 14 cases on its two kernels (the
one pass, and after torch's add the plain kernel) launch 13 specialisations, a few seconds of
compiling."""
SM90 = (9, 0)


class _Miss(Exception):
    """Triton's compile went past its cache lookup."""


class _Hit(Exception):
    """Triton's compile returned a kernel without compiling it."""


def _precompile_then_launch() -> dict:
    """Precompile hc_post's conformance launches into TRITON_CACHE_DIR, then run each launch through
    ``JITFunction.run``: how many found their kernel in the cache, how many would have compiled."""
    from unittest import mock

    from triton import knobs
    from triton.backends.nvidia.compiler import CUDABackend

    from seahal.backends.cuda import UNVERIFIED_VARIABLE
    from seahal.testing import triton_precompile as precompile
    from seahal.testing.conformance import captured_launches

    os.environ[UNVERIFIED_VARIABLE] = "1"  # as the GPU session's conformance step: every kernel serves
    launches, results = captured_launches("cuda", OPS, sms=132, capability=SM90, property_examples=0)
    target = precompile.cuda_target(SM90)
    specs, rejected = precompile.specialisations(launches, target)
    again, _ = precompile.specialisations(captured_launches("cuda", OPS, sms=132, capability=SM90,
                                                            property_examples=0)[0], target)

    def lookups(launches: list) -> dict[str, int]:
        """Each launch through Triton's launch path: found in the cache (hit) or compiled (miss)."""

        def hit(**_):
            raise _Hit

        outcomes = {"hit": 0, "miss": 0}
        with precompile.compile_target(target), mock.patch.object(CUDABackend, "add_stages", side_effect=_Miss), \
                mock.patch.object(knobs.runtime, "jit_post_compile_hook", hit):
            for launch in launches:
                launch.kernel.device_caches.pop(precompile.CAPTURE_DEVICE, None)  # no in-memory kernel: ask the cache
                try:
                    launch.kernel.run(*launch.args, grid=launch.grid, warmup=False, **launch.kwargs)
                except _Hit:
                    outcomes["hit"] += 1
                except _Miss:
                    outcomes["miss"] += 1
        return outcomes

    cold = lookups(launches[:1])
    report = precompile.precompile(specs, target, workers=2)
    entries = precompile.cache_entries()
    warm = lookups(launches)
    return {
        "cases": len(results), "captured": sum(r.status == "pass" for r in results), "launches": len(launches),
        "specialisations": len(specs), "same_again": [s.data for s in again] == [s.data for s in specs],
        "rejected": rejected, "compiled": len(report.compiled), "failed": [e for _, e in report.failed],
        "entries": sorted(entries), "entries_after_launching": sorted(precompile.cache_entries()), "cold": cold,
        "warm": warm,
    }


def test_the_entries_a_run_added_are_named_by_their_files(tmp_path, monkeypatch):
    """What ``seahal conformance --jobs`` prints when its run compiled something the precompile missed."""
    require_triton()
    from seahal.testing import triton_precompile as precompile

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    for entry, files in {"A": ["__grp___rope_kernel.json", "_rope_kernel.cubin", "_rope_kernel.json"],
                         "B": ["cuda_utils.so"], "C": []}.items():
        (tmp_path / entry).mkdir()
        for name in files:
            (tmp_path / entry / name).touch()
    before = precompile.cache_entries()
    assert before == {"A", "B", "C"}
    assert precompile.describe_entries(before - {"B"}) == "2 (C, _rope_kernel)"
    assert precompile.describe_entries(before) == "3 (C, _rope_kernel, cuda_utils)"
    assert precompile.describe_entries(set()) == "0"


def _bench_specialisations(what: str) -> dict:
    """A benchmark's launches and the distinct specialisations among them: ``model`` the end-to-end
    bench (``--quick``), ``experts`` the experts' rows, ``tune`` the experts' one-token sweep,
    ``decode`` the attention, indexer and wo_a rows, ``mhc`` the other modules' rows."""
    import argparse

    from seahal.testing import triton_precompile as precompile

    if what == "model":
        launches, notes = precompile._model_launches(argparse.Namespace(quick=True, contexts=None), 132, SM90)
    else:
        ops = {"experts": "moe_experts", "tune": None, "decode": "sparse_attention,indexer,grouped_linear",
               "mhc": "mhc,kv_compress,rope,kv_cache_unpack,fp32_linear"}[what]
        options = argparse.Namespace(ops=ops, quick=what == "tune", tokens="1", model="V4-Flash")
        launches, notes = (precompile._tune_launches if ops is None else precompile._bench_launches)(options, 132, SM90)
    specs, rejected = precompile.specialisations(launches, precompile.cuda_target(SM90))
    return {"launches": len(launches), "specialisations": len(specs), "kernels": sorted({s.name for s in specs}),
            "rejected": rejected, "notes": notes}


def _child(what: str, cache: str) -> dict:
    """Run this file's ``what`` in a child process without the interpreter, compiling into ``cache``."""
    require_triton()
    from seahal.testing.triton_compile import toolchain_missing

    if why := toolchain_missing():
        pytest.skip(why)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = cache
    done = subprocess.run([sys.executable, __file__, what], capture_output=True, text=True, env=env, timeout=600,
                          check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_every_launch_finds_its_precompiled_kernel(tmp_path):
    got = _child("conformance", str(tmp_path))
    assert got["captured"] == got["cases"] > 0
    assert got["rejected"] == [] and got["failed"] == []
    # the launches repeat a few specialisations; the capture is deterministic
    assert 1 < got["specialisations"] < got["launches"] and got["same_again"]
    assert got["compiled"] == got["specialisations"] <= len(got["entries"])
    assert got["cold"] == {"hit": 0, "miss": 1}  # before precompiling, the lookup misses
    assert got["warm"] == {"hit": got["launches"], "miss": 0}
    assert got["entries_after_launching"] == got["entries"]


@pytest.mark.parametrize("bench, kernels, repeats", [
    # the model repeats its kernels layer after layer: ~1100 launches, ~130 specialisations
    ("model", {"_grouped_gemm_kernel", "_sparse_attention_kernel", "_fp8_gemm_kernel", "_mix_kernel"}, 4),
    # the experts' rows (~450 launches, ~160 specialisations) and the tuner's one-token sweep (~200, ~80)
    ("experts", {"_grouped_gemm_kernel", "_route_kernel", "_combine_kernel", "_gemv_kernel"}, 2),
    ("tune", {"_grouped_gemm_kernel", "_route_kernel", "_fp8_act_quant_kernel"}, 2),
    # the attention, indexer and wo_a rows: ~860 launches of ~50 specialisations (contexts share them)
    ("decode", {"_sparse_attention_kernel", "_scores_kernel", "_select_kernel", "_grouped_gemv_kernel",
                "_grouped_mma_kernel", "_dequantize_kernel"}, 10),
    # the mHC, rope, compressor, cache-unpack and fp32-linear rows: ~75 launches, ~35 specialisations
    ("mhc", {"_mix_kernel", "_post_kernel", "_kv_compress_kernel", "_rope_kernel", "_fp32_gemv_kernel"}, 2),
])
def test_a_benchmark_s_launches_are_specialised_without_a_gpu(tmp_path, bench, kernels, repeats):
    got = _child(bench, str(tmp_path))
    assert got["rejected"] == [] and got["notes"] == []
    assert 20 < got["specialisations"] < got["launches"] / repeats
    assert kernels <= set(got["kernels"])


def test_without_a_gpu_the_conformance_run_is_told_there_is_nothing_to_compile():
    from seahal.testing.triton_precompile import precompile_conformance

    line = precompile_conformance("cuda", ["rope"], None, "cpu", 2)
    assert line == "precompile: nothing to compile ahead for cpu (a CUDA GPU's Triton kernels only)"


if __name__ == "__main__":
    what = sys.argv[1]
    print(json.dumps(_precompile_then_launch() if what == "conformance" else _bench_specialisations(what)))
