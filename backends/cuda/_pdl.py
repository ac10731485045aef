"""Programmatic dependent launch (PDL, sm_90): a kernel may start before the one ahead of it on the
stream has finished, and waits for it in its first statement.

Without PDL a kernel starts only once its predecessor has completed and its writes are flushed: in
a CUDA-graph decode step of ~200 kernels the H100 spent 373 of 2049 us between kernels (2026-11-26,
81df42b). With ``SEAHAL_CUDA_PDL=1`` every Triton kernel of this backend is launched with the PDL
attribute and begins with :func:`wait_for_prior_grid`: ``griddepcontrol.wait`` (blocks until the
previous grid has completed and its memory is visible; before any load or store, so neither a
read-after-write nor a write-after-read across kernels can race), then
``griddepcontrol.launch_dependents`` (once every program of this grid has passed its wait, the next
kernel may be scheduled onto free SMs, where it waits in turn). A kernel that follows a non-Triton
kernel (cuBLAS, aten) waits for it the same way. On the H100 (567d97d) the 4-layer V4-Flash decode
graph took 1759 us with it against 1836 us; at d2669c9 its bit-for-bit GPU test
(``test_pdl_launches_decode_the_same_on_a_gpu``) passed, but the FP8+FP4 graph took 1914 us with it
against 1811 us (bf16: 1777 against 1844). Opt-in until it wins both: off, the kernels compile
exactly as before (the wait is a constexpr branch)."""

from __future__ import annotations

import os

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from ._cache_keys import settle_cache_keys

PDL_VARIABLE = "SEAHAL_CUDA_PDL"
"""Set to 1 to launch the backend's Triton kernels with programmatic dependent launch."""


def pdl_options() -> dict[str, bool]:
    """Keyword arguments every launch of this backend passes: the kernel's ``PDL`` constexpr and,
    when enabled (:data:`PDL_VARIABLE`, never under the interpreter), Triton's ``launch_pdl``."""
    if os.environ.get(PDL_VARIABLE) == "1" and not triton.knobs.runtime.interpret:
        return {"PDL": True, "launch_pdl": True}
    return {"PDL": False}


@triton.jit
def wait_for_prior_grid(PDL: tl.constexpr):
    """A kernel's first statement: with PDL, wait for the previous grid on the stream, then let the
    next one launch (:mod:`._pdl`); without, nothing."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


settle_cache_keys(globals())  # last: every function of this module defined (see _cache_keys)
