"""A kernel's Triton cache key does not depend on what a process compiled before it
(``backends/cuda/_cache_keys.py``).

Triton before 3.8 (3.6 is the H100 image's) merged a helper's ``tl.constexpr`` globals into a
caller's key only where the helper's key came first. Here that order of ``_update_hash`` is put
back into whatever Triton is installed, in child processes (an import settles the keys once): each
imports the kernel modules in another order, and the settled keys of every kernel must agree;
without settling, the attention's split combiner gets two keys from two orders.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from seahal.testing.triton_interpreter import require_triton

MODULES = ["sparse_attention", "indexer", "moe_experts", "quant", "mhc", "compressor", "norm", "rope", "linear",
           "fp8_gemm_pingpong"]


def _update_hash_before_38(self, func) -> None:
    """Triton 3.6's ``DependenciesFinder._update_hash``: the helper's globals merged before its key
    is computed (so none, if it was not computed yet)."""
    self.used_global_vals.update(func.used_global_vals)
    self.hasher.update((func.cache_key + str(getattr(func, "noinline", False))).encode("utf-8"))


def _keys(order: list[str], settle: bool, combiner_first: bool) -> dict[str, str]:
    """Every cuda kernel function's cache key after importing ``order`` (settled on import when
    ``settle``), computed helpers first, or the attention's split combiner before all else."""
    import importlib

    import triton.runtime.jit as jit

    jit.DependenciesFinder._update_hash = _update_hash_before_38
    from seahal.backends.cuda import _cache_keys

    _cache_keys.ORDER_DEPENDENT = settle
    modules = [importlib.import_module(f"seahal.backends.cuda.{name}") for name in order]
    functions = {f"{m.__name__}.{name}": f for m in modules for name, f in vars(m).items()
                 if isinstance(f, jit.JITFunction) and f.fn.__module__ == m.__name__}
    if combiner_first:
        functions[COMBINER].cache_key
    for name in sorted(functions, key=lambda name: name.endswith("_kernel")):
        functions[name].cache_key
    return {name: f.cache_key for name, f in sorted(functions.items())}


def _child(order: list[str], settle: bool, combiner_first: bool) -> dict[str, str]:
    require_triton()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    request = json.dumps([order, settle, combiner_first])
    done = subprocess.run([sys.executable, __file__, request], capture_output=True, text=True, env=env, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.splitlines()[-1])


COMBINER = "seahal.backends.cuda.sparse_attention._combine_splits_kernel"


def test_settled_keys_do_not_depend_on_the_import_order():
    forward = _child(MODULES, settle=True, combiner_first=True)
    backward = _child(MODULES[::-1], settle=True, combiner_first=False)
    assert len(forward) > 50
    assert forward == backward


def test_without_settling_the_combiner_s_key_depends_on_what_came_first():
    helpers_first = _child(MODULES, settle=False, combiner_first=False)
    combiner_first = _child(MODULES, settle=False, combiner_first=True)
    assert helpers_first[COMBINER] != combiner_first[COMBINER]
    # settled: the key a process gets where the helpers came first
    assert helpers_first[COMBINER] == _child(MODULES, settle=True, combiner_first=True)[COMBINER]


if __name__ == "__main__":
    print(json.dumps(_keys(*json.loads(sys.argv[1]))))
