"""What every ``seahal bench`` module shares: the H100 limits, one timer, one row schema, the table,
the JSON document and the roofline plot.

A benchmark module describes each measurement as a :class:`Case` (its FLOPs and the fewest bytes it
must move, computed from the shape alone, and a ``build`` that allocates inputs on a device and
returns the kernel, the peer and a checker); :func:`measure` turns a case into a row:

    {op, shape, kernel, <shape parameters>, flops, bytes, bound, us, tflops, gbps, fraction_of_limit,
     check: {err, passed}, peer: {name: {us, tflops, gbps}}, speedup, timing, note,
     variant: {name: {us, tflops, gbps} or {check}}}

``fraction_of_limit`` is the roofline fraction ``max(flops / peak, bytes / bandwidth) / time``: 1.0
means the row runs at the H100's limit for its arithmetic intensity. A kernel whose result fails its
check is reported with ``us`` None and not timed. A case whose issue states a goal carries
``goal_us`` (the time the goal allows) in its parameters; its row then says ``goal_met``.
"""

from __future__ import annotations

import contextlib
import json
import functools
import math
import statistics
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

PEAK_BF16_TFLOPS = 989.0
"""H100 SXM dense bf16 tensor-core spec."""
PEAK_FP8_TFLOPS = 1979.0
"""H100 SXM dense FP8 tensor-core spec."""
COPY_TBPS = {"H200": 4.3, "H100": 3.0}
"""Device-to-device copy bandwidth measured per chip (bytes read plus written; H100: ../shared/perf/
h100_peers.json, H200: /work/.library/device/KINDS.md), not the 3.35 / 4.8 TB/s specs. The two
chips share their tensor-core rates, so only the memory roof differs."""


@functools.cache
def peak_tbps() -> float:
    """The memory roof of the visible GPU, from :data:`COPY_TBPS` by its name; the H100's where
    the GPU is another or there is none (CPU rows are never compared with a roof)."""
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    return next((tbps for chip, tbps in COPY_TBPS.items() if chip in name), COPY_TBPS["H100"])

SKIP_ON_OOM = "out of device memory: not run"


@dataclass
class Workload:
    """One case's tensors, bound into calls: ``kernel()`` and each peer return the op's outputs;
    ``check(out, ref) -> (error, passed)`` compares the kernel's outputs with ``oracle()``'s, or
    with the first peer's when there is no oracle."""

    kernel: Callable[[], object]
    peers: dict[str, Callable[[], object]]
    check: Callable[[object, object], tuple[float, bool]]
    oracle: Callable[[], object] | None = None
    """Expected outputs, called once and not timed: where the timed peer is not the reference
    itself (the reference too slow to time at the row's shape, checked on a sample instead)."""
    variants: dict[str, Callable[[], object]] = field(default_factory=dict)
    """The kernel under other launches (tiles, splits, warps): each checked as the kernel is and,
    when right, timed beside it, so that one run says which launch a shape should take."""


@dataclass
class Case:
    """One benchmark row before it runs: ``flops`` and ``nbytes`` are the work a perfect kernel
    must do (every input read once, every output written once), ``peak_tflops`` the tensor-core
    rate the op's operands allow; ``build(device)`` allocates the inputs."""

    op: str
    shape: str
    flops: float
    nbytes: float
    peak_tflops: float
    build: Callable[[torch.device], Workload] | None = None
    """None for rows a module measured its own way (the GEMM, gate and quantiser benchmarks)."""
    params: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ModelDims:
    """The dimensions the benchmarks take from a V4 model (v4_ops.md §1)."""

    name: str
    dim: int
    heads: int
    index_topk: int
    experts: int
    inter: int
    top_k: int = 6
    head_dim: int = 512
    rope_dim: int = 64
    window: int = 128
    index_heads: int = 64
    index_dim: int = 128
    hc: int = 4
    kv_tile: int = 64
    """Width of the FP8 cache records' nope tiles (one e8m0 scale each, v4_ops.md §12)."""
    o_groups: int = 8
    o_lora_rank: int = 1024
    """The grouped output projection wo_a: o_groups groups of o_lora_rank rows (v4_ops.md §8)."""


V4_FLASH = ModelDims("V4-Flash", dim=4096, heads=64, index_topk=512, experts=256, inter=2048)
V4_PRO = ModelDims("V4-Pro", dim=7168, heads=128, index_topk=1024, experts=384, inter=3072, o_groups=16)
TINY = ModelDims("tiny", dim=128, heads=4, index_topk=8, experts=8, inter=128, top_k=2, head_dim=64, rope_dim=16,
                 window=8, index_heads=4, index_dim=32, kv_tile=16, o_groups=2, o_lora_rank=64)
"""CPU smoke mode: every dimension small, the same code paths."""


def models(device: torch.device) -> tuple[ModelDims, ...]:
    """V4-Flash and V4-Pro on a GPU; the tiny model in CPU smoke mode."""
    return (V4_FLASH, V4_PRO) if device.type == "cuda" else (TINY,)


CONTEXTS = (4096, 65536, 262144, 1 << 20)
QUICK_CONTEXTS = (4096, 1 << 20)
BATCHES = (1, 64)


def decode_grid(device: torch.device, quick: bool) -> list[tuple[int, int]]:
    """(batch, context) pairs of the decode rows: 4k-1M tokens at batch 1 and 64 on a GPU, tiny on CPU."""
    if device.type != "cuda":
        return [(1, 64), (2, 256)]
    return [(b, ctx) for ctx in (QUICK_CONTEXTS if quick else CONTEXTS) for b in BATCHES]


def token_counts(device: torch.device, quick: bool) -> tuple[int, ...]:
    """Token counts of the per-token ops: decode batches 1 and 64, prefill 4k and 16k (tiny on CPU)."""
    if device.type != "cuda":
        return (1, 16)
    return (1, 4096) if quick else (1, 64, 4096, 16384)


def kernel_label(device: torch.device) -> str:
    """What the rows' ``kernel`` column names: ``triton`` on a GPU, ``reference`` in CPU smoke mode."""
    return "triton" if device.type == "cuda" else "reference"


def implementation(op: str, cuda_module: str, reference_module: str, device: torch.device) -> Callable:
    """The function under test: ``seahal.backends.cuda.<cuda_module>.<op>`` (Triton) on a GPU, called
    directly so that kernels not yet verified on a GPU run without SEAHAL_CUDA_UNVERIFIED (each row
    is checked against the reference before it is timed); in CPU smoke mode the reference itself."""
    import importlib

    if device.type == "cuda":
        return getattr(importlib.import_module(f"seahal.backends.cuda.{cuda_module}"), op)
    return reference(op, reference_module)


def reference(op: str, module: str) -> Callable:
    """``seahal.backends.cpu.reference.<module>.<op>``: the peer, run on the benchmark's device."""
    import importlib

    return getattr(importlib.import_module(f"seahal.backends.cpu.reference.{module}"), op)


# -- timing ---------------------------------------------------------------------------------------
_FLUSH: list[torch.Tensor] = []


def time_cuda(fn: Callable[[], object], quick: bool) -> float:
    """Median microseconds of ``fn`` replayed from a CUDA graph, timed with CUDA events, L2 flushed
    before every replay by reading 256 MB (a read leaves no dirty lines to write back during the
    timed call, unlike a memset flush; the replay's host cost hides behind the flush)."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):  # compile, and allocate workspaces, outside the capture
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        fn()
    for _ in range(3):
        graph.replay()
    us = _median_cuda_events(graph.replay, quick)
    del graph
    return us


TIMING_BUDGET_US = 2e6
"""Timed calls of one function stop at about this much device time (at least 3 calls, or 1 of a
call longer than the budget): what keeps the slow rows (the 64k-token prefills' reference peers,
~1 s a call; the experts' per-expert peer at 8192 tokens, 5-16 s) inside a device session."""


def repeats(first_us: float, quick: bool) -> int:
    """Timed calls counting a first one of ``first_us``: 10 (quick) or 30, fewer when that would
    overrun :data:`TIMING_BUDGET_US`, never under 3 but for a first call past the budget, which
    stands alone (a multi-second peer: its run-to-run spread is far below the kernel's lead)."""
    if first_us > TIMING_BUDGET_US:
        return 1
    return max(3, min(10 if quick else 30, int(TIMING_BUDGET_US // max(first_us, 1.0))))


def _median_cuda_events(launch: Callable[[], object], quick: bool) -> float:
    """Median microseconds of ``launch`` between CUDA events, the L2 flushed (a 256 MB read) before
    each; the first call's time sets the number of calls (:func:`repeats`)."""
    if not _FLUSH:
        _FLUSH.append(torch.ones(64 << 20, dtype=torch.float32, device="cuda"))

    def timed() -> tuple[torch.cuda.Event, torch.cuda.Event]:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        _FLUSH[0].sum()
        start.record()
        launch()
        end.record()
        return start, end

    first = timed()
    torch.cuda.synchronize()
    events = [first] + [timed() for _ in range(repeats(1e3 * first[0].elapsed_time(first[1]), quick) - 1)]
    torch.cuda.synchronize()
    return 1e3 * statistics.median(start.elapsed_time(end) for start, end in events)


def _time_host(fn: Callable[[], object], quick: bool) -> float:
    """Median microseconds of ``fn`` by the host clock after one warm-up call (CPU smoke mode)."""
    fn()
    times = []
    for _ in range(3 if quick else 10):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(times)


def time_us(fn: Callable[[], object], device: torch.device, quick: bool) -> tuple[float, str]:
    """Median microseconds of one call of ``fn`` on ``device`` and how it was timed: ``graph``
    (:func:`time_cuda`); ``eager`` where capture fails (code that syncs with the host, e.g. the
    reference's data-dependent indexing: launch gaps then count); ``host`` (CPU smoke mode)."""
    if device.type != "cuda":
        return _time_host(fn, quick), "host"
    # Code that syncs runs up to its first sync in this check, the only warm-up of its eager timing:
    # a median of 3 or more calls, or one call of seconds, leaves first-call costs out of the figure.
    if not syncs_with_host(fn):
        try:
            return time_cuda(fn, quick), "graph"
        except RuntimeError:  # capture refused an operation the sync check does not see
            torch.cuda.synchronize()
            fn()
    return _median_cuda_events(fn, quick), "eager"


ALLOCATOR_EVENTS = ("num_alloc_retries", "num_sync_all_streams", "num_device_alloc", "num_device_free")
"""torch's CUDA caching-allocator counters that mean a trip to the driver: a failed cudaMalloc
flushed and retried, every stream synchronized to free cached blocks, a device allocation, a free."""


def allocator_events(fn: Callable[[], object]) -> dict[str, int]:
    """How many of :data:`ALLOCATOR_EVENTS` one call of ``fn`` caused (those this torch counts).
    A warm call should cause none: a retry or a stream synchronisation stalls the host on the
    device, and a cudaMalloc or cudaFree in the loop is a cache the call keeps outgrowing."""
    before = torch.cuda.memory_stats()
    fn()
    after = torch.cuda.memory_stats()
    return {name: after[name] - before.get(name, 0) for name in ALLOCATOR_EVENTS if name in after}


def syncs_with_host(fn: Callable[[], object]) -> bool:
    """Whether one eager call of ``fn`` waits on the device (``.item()``, ``nonzero``, a copy to
    the host), run under torch's sync debug mode "error". Such code cannot be captured, and is not
    tried: a capture that fails midway can leave the CUDA generator marked as capturing, and every
    later random draw on the device then fails ("Offset increment outside graph capture", the
    H100 run of 2026-11-26, after the experts' reference peer)."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
    except RuntimeError:
        return True
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    return False


def kernel_profile(fn: Callable[[], object], top: int = 25) -> dict:
    """Where one call of ``fn`` spends device time, by kernel (torch.profiler, CUDA activity; the
    call launched eagerly): see :func:`tally_kernels`. ``busy_us`` beside the call's wall time is
    what launch gaps and host work cost it."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return summarize_profile(prof.events(), top)


def summarize_profile(events: Iterable, top: int = 25) -> dict:
    """Profiler events (``name``, ``device_type``, ``time_range``) -> :func:`tally_kernels` of the
    device's kernels, plus ``host_api``: the host's CUDA runtime and driver calls the same way
    (``{"calls", "us", "top"}``, the 8 longest by total time, the closing synchronize included),
    where a call that waits on the device (a synchronize, a copy to the host, a ``cudaMalloc`` or
    a launch into a full queue) shows as long."""
    events = list(events)
    kernels = [(e.name, e.time_range.elapsed_us()) for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    api = [(e.name, e.time_range.elapsed_us()) for e in events
           if e.device_type == torch.autograd.DeviceType.CPU and is_cuda_api(e.name)]
    calls = tally_kernels(api, 8)
    return {**tally_kernels(kernels, top), "host_api": {"calls": calls["kernels"], "us": calls["busy_us"],
                                                        "top": calls["top"]}}


def is_cuda_api(name: str) -> bool:
    """Whether a profiler event is a CUDA runtime (``cudaLaunchKernel``, ``cudaStreamSynchronize``)
    or driver (``cuLaunchKernelEx``) call."""
    return name.startswith("cuda") or (name.startswith("cu") and name[2:3].isupper())


PROFILE_BUDGET_S = 20.0
"""Host seconds a process spends in :func:`kernel_breakdown` at most (a profiler start and stop per
row): the breakdowns must not push a device session's bench steps past their limits."""
_profiled_s = [0.0]


def kernel_breakdown(fn: Callable[[], object], top: int = 6) -> dict:
    """:func:`kernel_profile` of one call for a bench row: which of an op's launches (split-K and
    its merge, the indexer's scores, selection and ranking) its time goes to. One eager call with
    the L2 warm, so shares rather than the row's time. ``{"error": ...}`` where the profiler fails
    or :data:`PROFILE_BUDGET_S` is spent: the row's timing stands without it."""
    if _profiled_s[0] >= PROFILE_BUDGET_S:
        return {"error": f"not profiled: this process spent its {PROFILE_BUDGET_S:g} s of profiling"}
    start = time.perf_counter()
    try:
        return kernel_profile(fn, top)
    except Exception as exc:  # noqa: BLE001 - the profiler (CUPTI) is optional to a bench row
        return {"error": f"{type(exc).__name__}: {str(exc)[:160]}"}
    finally:
        _profiled_s[0] += time.perf_counter() - start


def host_profile(fn: Callable[[], object], top: int = 20) -> dict:
    """Where one call of ``fn`` spends host time, by Python function (cProfile, which slows every
    call it sees: shares, not times): ``{"profiled_us": the call under the profiler, "top":
    [{"function", "calls", "self_us", "total_us"}]}``, the ``top`` functions by time spent in
    their own code (C calls such as a kernel launch included), longest first."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.runcall(fn)
    profiled_us = 1e6 * (time.perf_counter() - start)
    stats = pstats.Stats(profiler).stats  # (file, line, name) -> (calls, primitive, self s, total s, callers)
    ranked = sorted(stats.items(), key=lambda item: -item[1][2])[:top]
    return {"profiled_us": profiled_us, "top": [
        {"function": f"{Path(file).name}:{line}({name})" if line else name, "calls": calls,
         "self_us": 1e6 * own, "total_us": 1e6 * total}
        for (file, line, name), (_, calls, own, total, _) in ranked
    ]}


def tally_kernels(kernels: Iterable[tuple[str, float]], top: int = 25) -> dict:
    """``{"kernels": launches, "busy_us": their summed microseconds, "top": [{"name", "calls",
    "us"}]}`` of (name, microseconds) pairs, the ``top`` names by total time, longest first."""
    calls: dict[str, int] = {}
    total: dict[str, float] = {}
    for name, us in kernels:
        calls[name] = calls.get(name, 0) + 1
        total[name] = total.get(name, 0.0) + us
    ranked = sorted(total, key=lambda name: -total[name])[:top]
    return {"kernels": sum(calls.values()), "busy_us": sum(total.values()),
            "top": [{"name": name, "calls": calls[name], "us": total[name]} for name in ranked]}


# -- checks -----------------------------------------------------------------------------------------
def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64; inf when out holds a NaN or inf."""
    diff = torch.linalg.vector_norm(out.double() - ref.double()) / torch.linalg.vector_norm(ref.double()).clamp(min=1e-300)
    return float(diff) if torch.isfinite(diff) else float("inf")


def close(tolerance: float) -> Callable[[object, object], tuple[float, bool]]:
    """Checker: the largest relative error over the output tensors, within ``tolerance``."""

    def check(out, ref) -> tuple[float, bool]:
        pairs = zip(out, ref, strict=True) if isinstance(out, tuple) else [(out, ref)]
        err = max(rel_err(o, r) for o, r in pairs)
        return err, err <= tolerance

    return check


# -- rows -------------------------------------------------------------------------------------------
def figures(case: Case, us: float) -> dict:
    """Throughput of ``case`` run in ``us`` microseconds: TFLOP/s, GB/s and the roofline fraction."""
    floor_us = max(case.flops / (case.peak_tflops * 1e6), case.nbytes / (peak_tbps() * 1e6))
    return {"us": us, "tflops": case.flops / us / 1e6, "gbps": case.nbytes / us / 1e3, "fraction_of_limit": floor_us / us}


def bound(case: Case) -> str:
    """Which roof limits ``case``: ``compute`` or ``memory``."""
    return "compute" if case.flops / (case.peak_tflops * 1e6) > case.nbytes / (peak_tbps() * 1e6) else "memory"


def new_row(case: Case, kernel: str) -> dict:
    """A row of ``case`` with nothing measured yet: the schema every module's rows share."""
    return {"op": case.op, "shape": case.shape, "kernel": kernel, **case.params, "flops": case.flops, "bytes": case.nbytes,
            "bound": bound(case), "us": None, "tflops": None, "gbps": None, "fraction_of_limit": None, "check": None,
            "peer": {}}


def record(row: dict, case: Case, us: float | None, peers_us: dict[str, float]) -> dict:
    """Fill ``row`` with the kernel's time (None: not timed) and each peer's; speedup over the first
    peer; ``goal_met`` where the case states a ``goal_us`` (the time an issue's goal allows)."""
    if us is not None:
        row.update(figures(case, us))
        if "goal_us" in case.params:
            row["goal_met"] = us <= case.params["goal_us"]
    for name, peer_us in peers_us.items():
        row["peer"][name] = {k: v for k, v in figures(case, peer_us).items() if k != "fraction_of_limit"}
    if us is not None and peers_us:
        row["speedup"] = next(iter(peers_us.values())) / us
    return row


def measure(case: Case, device: torch.device, quick: bool) -> dict:
    """Build ``case`` on ``device``, check the kernel against the first peer, time both (the
    kernel only when its check passed). Out-of-memory shapes come back as a row with a note."""
    row = new_row(case, kernel_label(device))
    try:
        work = case.build(device)
        expected = (work.oracle or next(iter(work.peers.values())))()  # once: the reference can take seconds
        err, passed = work.check(work.kernel(), expected)
        row["check"] = {"err": err, "passed": passed}
        if not passed:
            row["note"] = "wrong result: not timed"
        timing = {"kernel": time_us(work.kernel, device, quick)} if passed else {}
        timing.update({name: time_us(fn, device, quick) for name, fn in work.peers.items()})
        for name, fn in work.variants.items():
            v_err, v_passed = work.check(fn(), expected)
            row.setdefault("variant", {})[name] = {"check": {"err": v_err, "passed": v_passed}}
            if v_passed:
                timing[name] = time_us(fn, device, quick)
                row["variant"][name].update(figures(case, timing[name][0]))
        row["timing"] = {name: method for name, (_, method) in timing.items()}
        record(row, case, timing["kernel"][0] if passed else None,
               {name: timing[name][0] for name in work.peers})
        if passed and device.type == "cuda":  # which of the op's launches the time goes to
            row["kernels"] = kernel_breakdown(work.kernel)
    except torch.OutOfMemoryError:
        row["note"] = SKIP_ON_OOM
    except Exception as exc:  # noqa: BLE001 - a kernel that fails to compile or launch is a finding, not the end of the run
        row["note"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
    finally:
        work = expected = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def unavailable_row(op: str, why: str) -> dict:
    """A row saying why ``op`` was not measured."""
    return {**new_row(Case(op, "-", 0, 0, PEAK_BF16_TFLOPS), "-"), "bound": None, "note": why}


_ROW_HOOKS: list[Callable[[dict], None]] = []


@contextlib.contextmanager
def on_each_row(hook: Callable[[dict], None]) -> Iterator[None]:
    """Within the block, every row :func:`measure_all` measures or a module hands to
    :func:`row_measured` goes to ``hook`` at once (``seahal bench --json`` keeps what a run cut
    short by a device session's limit measured)."""
    _ROW_HOOKS.append(hook)
    try:
        yield
    finally:
        _ROW_HOOKS.remove(hook)


def workload_calls(cases: Iterable[Case], device: torch.device) -> Iterator[Callable[[], object]]:
    """Each case's kernel call, then its variants', built on ``device`` (one case at a time),
    nothing checked or timed: what ``python -m seahal.testing.triton_precompile bench`` runs on
    meta tensors to compile a benchmark's kernels ahead of it."""
    for case in cases:
        if case.build is not None:
            work = case.build(device)
            yield from (work.kernel, *work.variants.values())


def measure_all(cases: Iterable[Case], device: torch.device, quick: bool) -> list[dict]:
    """:func:`measure` each case, printing one progress line per row (with the seconds it took:
    compiles and slow peers are what a device session's budget goes on)."""
    rows = []
    for case in cases:
        started = time.perf_counter()
        rows.append(measure(case, device, quick))
        r = rows[-1]
        print(f"{r['op']} {r['shape']}: {_fmt(r['us'], '.1f')} us, check {r['check']} {r.get('note', '')}"
              f"({time.perf_counter() - started:.1f} s)", flush=True)
        row_measured(r)
    return rows


def row_measured(row: dict) -> None:
    """Hand ``row`` to the :func:`on_each_row` hooks (modules that measure their rows without
    :func:`measure_all` call it for each row they make)."""
    for hook in _ROW_HOOKS:
        hook(row)


# -- output ---------------------------------------------------------------------------------------
def _fmt(value, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "-"


def format_table(rows: list[dict]) -> str:
    """Markdown table: ours beside each peer and variant, the roofline fraction and the check."""
    lines = ["| op | shape | kernel | us | TFLOP/s | GB/s | % of limit | bound | peer us | speedup | check |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        others = {**r["peer"], **r.get("variant", {})}
        peers = ", ".join(f"{name} {_fmt(p.get('us'), '.1f') if 'us' in p else 'WRONG'}" for name, p in others.items()) or "-"
        check = "-" if r["check"] is None else f"{'ok' if r['check']['passed'] else 'FAIL'} {r['check']['err']:.1e}"
        fraction = None if r["fraction_of_limit"] is None else 100 * r["fraction_of_limit"]
        if "goal_met" in r:
            check += f"; goal {r['goal_us']:.1f} us {'met' if r['goal_met'] else 'MISSED'}"
        lines.append(f"| {r['op']} | {r['shape']} | {r['kernel']} | {_fmt(r['us'], '.1f')} | {_fmt(r['tflops'], '.1f')} | "
                     f"{_fmt(r['gbps'], '.0f')} | {_fmt(fraction, '.0f')} | {r['bound']} | {peers} | "
                     f"{_fmt(r.get('speedup'), '.2f')} | {r.get('note') or check} |")
    return "\n".join(lines)


def environment(device: torch.device) -> dict:
    """Device name and the torch / triton versions the rows were measured with."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    return {"device": name, "torch": torch.__version__, "triton": triton_version,
            "limits": {"bf16_tflops": PEAK_BF16_TFLOPS, "fp8_tflops": PEAK_FP8_TFLOPS, "tbps": peak_tbps()}}


def write_json(path: str, device: torch.device, rows: list[dict]) -> None:
    """One document: ``{device, torch, triton, limits, rows}``."""
    with open(path, "w") as f:
        json.dump({**environment(device), "rows": rows}, f, indent=1)


def plot_roofline(rows: list[dict], path: str, title: str) -> bool:
    """Draw every timed row (dots) and its peers (crosses) at its arithmetic intensity against the
    GPU's rooflines (bf16 and FP8 compute roofs over its copy-bandwidth slope, :func:`peak_tbps`); False, with a message, when
    matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"--plot {path}: matplotlib is not installed (pip install matplotlib); no plot drawn")
        return False
    placed = [r for r in rows if r["flops"] and r["bytes"]]
    intensities = [r["flops"] / r["bytes"] for r in placed] or [1.0]
    low, high = math.log10(min(intensities) / 4), math.log10(max(4 * max(intensities), 2e3))
    x = [10 ** (low + (high - low) * i / 199) for i in range(200)]
    fig, ax = plt.subplots(figsize=(10, 7))
    tbps = peak_tbps()
    for peak, style in ((PEAK_FP8_TFLOPS, "--"), (PEAK_BF16_TFLOPS, "-")):
        ax.plot(x, [min(peak, tbps * i) for i in x], "k" + style, lw=1, label=f"roof {peak:.0f} TFLOP/s, {tbps} TB/s")
    colors = {op: plt.cm.tab20(i % 20) for i, op in enumerate(dict.fromkeys(r["op"] for r in placed))}
    for r in placed:
        intensity = r["flops"] / r["bytes"]
        if r["tflops"] is not None:
            ax.scatter(intensity, r["tflops"], color=colors[r["op"]], marker="o", s=25)
        for peer in r["peer"].values():
            ax.scatter(intensity, peer["tflops"], color=colors[r["op"]], marker="x", s=20)
    for op, color in colors.items():
        ax.scatter([], [], color=color, marker="o", label=op)
    ax.scatter([], [], color="gray", marker="x", label="peer")
    ax.set(xscale="log", yscale="log", xlabel="arithmetic intensity (FLOP / byte)", ylabel="achieved TFLOP/s", title=title)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(True, which="both", lw=0.3)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True


def replace_config_table(text: str, annotation: str, body: str) -> str:
    """``text`` (a kernel module's source) with its ``SM90_CONFIGS: <annotation> = {...}`` literal
    holding ``body`` (a tuner's entries, one a line; empty: ``{}``)."""
    import re

    table = f"SM90_CONFIGS: {annotation} = {{\n{body}\n}}" if body else f"SM90_CONFIGS: {annotation} = {{}}"
    text, count = re.subn(rf"SM90_CONFIGS: {annotation} = \{{[^}}]*\}}", lambda _: table, text)
    if count != 1:
        raise RuntimeError(f"expected one SM90_CONFIGS: {annotation} literal, found {count}")
    return text


def write_config_table(module: str, annotation: str, body: str) -> str:
    """:func:`replace_config_table` in the file of ``seahal.backends.cuda.<module>``; returns its path."""
    import importlib.util

    path = importlib.util.find_spec(f"seahal.backends.cuda.{module}").origin
    with open(path) as f:
        text = replace_config_table(f.read(), annotation, body)
    with open(path, "w") as f:
        f.write(text)
    return path
