"""Triton cache keys that do not depend on which kernels a process compiled first.

Before Triton 3.8, a function's cache key takes in the ``tl.constexpr`` globals of the helpers it
calls (``INTERPRETED``, ``FP8_MAX``, ...) only where each helper's own key was computed before it:
``DependenciesFinder._update_hash`` merges a helper's ``used_global_vals`` before it asks for the
helper's key, and an uncomputed helper has none yet. The same kernel then had different keys in
processes that compiled in different orders, so the on-disk cache missed: a warm machine's next
step compiled again what the last had compiled, and ``seahal.testing.triton_precompile``'s
workers filed kernels under keys the run did not look up (Triton 3.6, the H100 image's: 6 of the
attention and indexer benchmarks' 40 specialisations, whose helpers read ``INTERPRETED``).

:func:`settle_cache_keys` computes the keys of a module's functions again until none changes, each pass
merging every helper's globals from the one before: the fixed point, the key a process gets
whatever it compiles first. Each kernel module calls it last (the helpers it imports were settled
by their own modules' imports); from Triton 3.8 on it does nothing.
"""

from __future__ import annotations

import triton
from triton.runtime.jit import JITFunction

ORDER_DEPENDENT = tuple(int(part) for part in triton.__version__.split(".")[:2]) < (3, 8)
"""Whether this Triton computes a key from its helpers' globals only where they came first."""
MAX_PASSES = 8
"""Passes before giving up (each reaches one call level deeper; the kernels nest 3-4 deep)."""


def settle_cache_keys(namespace: dict) -> None:
    """Settle the cache keys of the ``triton.jit`` functions defined in the module whose globals
    are ``namespace`` (call at the end of the module). Where a key cannot be computed here (a
    function Triton would reject when compiling it), every key is left for Triton to compute as
    usual: an import must not fail on it."""
    if not ORDER_DEPENDENT or triton.knobs.runtime.interpret:
        return
    functions = [f for f in namespace.values()
                 if isinstance(f, JITFunction) and f.fn.__module__ == namespace["__name__"]]
    keys = [None] * len(functions)
    try:
        for _ in range(MAX_PASSES):
            for f in functions:
                f.hash = None
            settled, keys = keys, [f.cache_key for f in functions]
            if keys == settled:
                return
    except Exception:  # Triton reports it when it compiles the function
        for f in functions:
            f.hash = None
