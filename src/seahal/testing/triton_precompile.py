"""Compiling the Triton kernels a run will launch before it starts, in parallel processes.

A cold run compiles each kernel specialisation when it first launches, one after another on one
core: the cuda conformance suite makes ~430 of them (its fixed cases and drawn examples, with
``SEAHAL_CUDA_UNVERIFIED=1``), over 240 s on an H100 host whose 16 cores idled meanwhile (41 s once
Triton's on-disk cache held them); the end-to-end bench ~130. Here the run's launches are found
without running anything, and compiled into that cache by a pool of processes:

1. the launches are captured (:func:`seahal.testing.triton_compile.capture_launches`: meta
   tensors posing as the GPU; see :func:`seahal.testing.conformance.captured_launches`);
2. each goes through Triton's own launch path (``JITFunction.run``) up to where it would compile,
   where ``knobs.runtime.jit_cache_hook`` takes the specialisation Triton serialises for
   ``JITFunction.preload`` and stops it (:func:`specialisations`): the argument types, alignment,
   constants and options the real launch gets, found by the code that finds them for it;
3. worker processes ``preload`` the distinct specialisations (:func:`precompile`): Triton
   compiles each into its cache (``TRITON_CACHE_DIR``), where the run's own launches find them.

No step needs a CUDA context: Triton's driver is replaced by one that only names the device, its
stream and the compile target, so the workers never touch the GPU. A launch whose wrapper cannot
run on meta tensors, or a specialisation that fails to compile, is reported and left to the run.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from .conformance import PROPERTY_EXAMPLES
from .triton_compile import Launch

CAPTURE_DEVICE = "precompile"
"""The device key Triton's per-device caches get under :func:`compile_target`: never a real one,
so nothing compiled here lands in the in-memory cache of a device the process also launches on."""


@dataclass(frozen=True)
class Specialisation:
    """One kernel specialisation to compile: the ``JITFunction`` by module and name, and the JSON
    Triton's launch path serialises for ``JITFunction.preload``."""

    module: str
    name: str
    data: str


@dataclass
class PrecompileReport:
    """What :func:`precompile` did: the specialisations compiled, those that failed with the
    compiler's error, and the wall-clock seconds."""

    compiled: list[Specialisation] = field(default_factory=list)
    failed: list[tuple[Specialisation, str]] = field(default_factory=list)
    launchers: int = 0
    """Of the compiled, those whose launcher was built too (see :func:`_build_launcher`)."""
    seconds: float = 0.0
    workers: int = 0

    def summary(self) -> str:
        line = (f"{len(self.compiled)} kernel specialisations compiled ({self.launchers} with their launchers) in "
                f"{self.seconds:.1f} s by {self.workers} processes")
        failures = [f"\n  {spec.name}: {error.splitlines()[0] if error else ''}" for spec, error in self.failed]
        return line + (f", {len(self.failed)} failed:" + "".join(failures) if failures else "")


class _TargetDriver:
    """Triton's active driver while specialising and compiling: the current device, its stream and
    the compile target, which is all the launch path asks before it compiles."""

    def __init__(self, target: Any) -> None:
        self.target = target

    def get_current_device(self) -> str:
        return CAPTURE_DEVICE

    def get_current_stream(self, device: Any = None) -> int:
        return 0

    def get_current_target(self) -> Any:
        return self.target


@contextlib.contextmanager
def compile_target(target: Any) -> Iterator[None]:
    """Within the context, Triton's launch path compiles for ``target`` (a ``GPUTarget``) without a
    GPU: the active driver is a :class:`_TargetDriver` (restored after)."""
    from triton.runtime.driver import driver

    saved = driver._active
    driver.set_active(_TargetDriver(target))
    try:
        yield
    finally:
        driver._active = saved


def cuda_target(capability: tuple[int, int]) -> Any:
    """``GPUTarget("cuda", 10 * major + minor, 32)``: what Triton's CUDA driver reports for a GPU of
    compute ``capability``."""
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", 10 * capability[0] + capability[1], 32)


def specialisations(launches: Iterable[Launch], target: Any) -> tuple[list[Specialisation], list[str]]:
    """The distinct specialisations ``launches`` compile on ``target``, in first-launch order, and
    the launches Triton's launch path rejected (``"kernel(options): error"``).

    Each launch runs through ``JITFunction.run`` with ``knobs.runtime.jit_cache_hook`` answering
    that the kernel is taken care of, so run stops before compiling or launching (and caches
    nothing): every launch reaches the hook, and launches of one specialisation hand it the same
    serialised data.
    """
    from triton import knobs

    found: dict[str, Specialisation] = {}
    rejected = []

    def hook(*, fn: Any, compile: dict, **_: Any) -> bool:
        function = fn.jit_function.fn
        data = compile["specialization_data"]
        found.setdefault(data, Specialisation(function.__module__, function.__qualname__, data))
        return True

    saved = knobs.runtime.jit_cache_hook
    knobs.runtime.jit_cache_hook = hook
    try:
        with compile_target(target):
            for launch in launches:
                try:
                    launch.kernel.run(*launch.args, grid=launch.grid, warmup=False, **launch.kwargs)
                except Exception as exc:  # noqa: BLE001 - left to the run, which reports it where it matters
                    rejected.append(f"{launch.describe()}: {type(exc).__name__}: {exc}")
    finally:
        knobs.runtime.jit_cache_hook = saved
    return list(found.values()), rejected


def precompile(specs: list[Specialisation], target: Any, workers: int | None = None) -> PrecompileReport:
    """Compile ``specs`` for ``target`` into Triton's on-disk cache with ``workers`` processes
    (default: one a core; at most one a specialisation), each started fresh (spawn: a parent's
    CUDA context is never forked)."""
    import multiprocessing

    workers = max(1, min(workers or os.cpu_count() or 1, len(specs)))
    report = PrecompileReport(workers=workers)
    if not specs:
        return report
    start = time.perf_counter()
    with ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"), _enter_target, (target,)) as pool:
        for spec, (error, launcher) in zip(specs, pool.map(_compile, specs)):
            if error is None:
                report.compiled.append(spec)
                report.launchers += launcher
            else:
                report.failed.append((spec, error))
    report.seconds = time.perf_counter() - start
    return report


def _enter_target(target: Any) -> None:
    """Worker initialiser: every compile of this process is for ``target``, without a GPU (the
    worker only compiles, so its driver stays replaced)."""
    from triton.runtime.driver import driver

    driver.set_active(_TargetDriver(target))


def _compile(spec: Specialisation) -> tuple[str | None, bool]:
    """Compile one specialisation (worker side): (None or the error, whether its launcher was built)."""
    try:
        kernel = getattr(importlib.import_module(spec.module), spec.name).preload(spec.data)
    except Exception as exc:  # noqa: BLE001 - the compiler's diagnostics are the result
        return f"{type(exc).__name__}: {exc}", False
    return None, _build_launcher(kernel)


def _build_launcher(kernel: Any) -> bool:
    """Build the kernel's launcher where Triton compiles one per signature (3.6: a C module, a gcc
    run at the first launch, cached beside the kernels); False where it has none to build (3.9's
    launcher is generic) or cannot build it here (no libcuda to link)."""
    try:
        from triton.backends.nvidia.driver import CudaLauncher

        CudaLauncher(kernel.src, kernel.metadata)
    except Exception:  # noqa: BLE001 - left to the first launch, as without precompiling
        return False
    return True


def cache_entries() -> set[str]:
    """Entries of Triton's on-disk cache (one directory a compiled kernel, launcher or utility
    module): listed before and after a run, the difference is what the run itself compiled (see
    :func:`describe_entries`); empty without Triton (or one older than its ``knobs``)."""
    try:
        from triton import knobs

        directory = knobs.cache.dir
    except (ImportError, AttributeError):
        return set()
    return set(os.listdir(directory)) if directory and os.path.isdir(directory) else set()


def describe_entries(entries: set[str]) -> str:
    """``entries``' count and what each holds, by the name of its first file (a kernel's name, or
    a launcher's or utility module's), e.g. ``2 (_rope_kernel, cuda_utils)``."""
    from triton import knobs

    names = []
    for entry in sorted(entries):
        files = sorted(f for f in os.listdir(os.path.join(knobs.cache.dir, entry)) if not f.startswith("__grp__"))
        names.append(files[0].split(".")[0] if files else entry)
    return f"{len(entries)}" + (f" ({', '.join(sorted(names))})" if names else "")


def precompile_conformance(
    backend: str, ops: list[str] | None, kernel: str | None, device: str | None, workers: int | None,
    examples: int = PROPERTY_EXAMPLES, seed: int = 0,
) -> str:
    """Compile what ``seahal conformance --backend backend`` (with ``examples`` property examples a
    kernel drawn for ``seed``) will launch on ``device`` (default the backend's device type; a CUDA
    GPU) with ``workers`` processes; the line to print.

    The capture runs in a child process (``python -m seahal.testing.triton_precompile``): wrappers
    cache per-device buffers and constant tables (arrival counters, e2m1 and Hadamard tables), and
    the meta tensors a capture leaves there would be handed to this process's real launches.
    """
    command = [sys.executable, "-m", __name__, "--jobs", str(workers or 0), *(["--device", device] if device else []),
               "conformance", "--backend", backend, "--examples", str(examples), "--seed", str(seed)]
    for flag, value in (("--ops", ",".join(ops or ())), ("--kernel", kernel)):
        command += [flag, value] if value else []
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = done.stdout.strip().splitlines()
    if done.returncode or not lines:
        why = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        return f"precompile: failed ({why}); the run compiles as it goes"
    return lines[-1]


def _conformance_launches(args: argparse.Namespace, sms: int, capability: tuple[int, int]) -> tuple[list, list[str]]:
    """The conformance run's launches, and which cases could not be captured."""
    from .conformance import captured_launches

    ops = [op for op in (args.ops or "").split(",") if op] or None
    launches, results = captured_launches(args.backend, ops, args.kernel, sms=sms, capability=capability,
                                          property_examples=args.examples, seed=args.seed)
    failed = [f"{r.op} {r.case}" for r in results if r.status == "fail"]
    return launches, [f"{len(failed)} cases not captured ({', '.join(failed[:3])})"] if failed else []


def _model_launches(args: argparse.Namespace, sms: int, capability: tuple[int, int]) -> tuple[list, list[str]]:
    """The launches of ``seahal bench --ops model`` (``--quick``: its 1k context only; ``--contexts``
    as the bench's): the 4-layer V4-Flash model's prefill, decode, graph decode and captured
    prefill, with the release checkpoint's formats and in bf16, at each context with the bench's
    cache rows."""
    import torch

    from seahal.bench.model_e2e import scale

    from .model_on_meta import LAYOUTS, model_steps

    bench = scale(torch.device("cuda"), args.quick, args.contexts)
    sources = [(run for _, run in model_steps(layout, context, capacity=bench.capacity(context)))
               for context in bench.contexts for layout in LAYOUTS]
    return _run_calls(sources, sms, capability, [])


def _bench_launches(args: argparse.Namespace, sms: int, capability: tuple[int, int]) -> tuple[list, list[str]]:
    """The launches of ``seahal bench --backend cuda --ops OPS``: its rows' default launches and
    variants, through each benchmark module's ``calls``."""
    import importlib

    import torch

    from seahal.bench import expand_ops, modules_of

    modules = {importlib.import_module(f"seahal.bench.{name}"): ops
               for name, ops in modules_of(expand_ops(args.ops)).items()}
    sources = [module.calls(ops, torch.device("cuda"), args.quick) for module, ops in modules.items()
               if hasattr(module, "calls")]
    notes = [f"{module.__name__} has no calls()" for module in modules if not hasattr(module, "calls")]
    return _run_calls(sources, sms, capability, notes)


def _tune_launches(args: argparse.Namespace, sms: int, capability: tuple[int, int]) -> tuple[list, list[str]]:
    """The launches of ``python -m seahal.bench.cuda_moe_experts --tune`` with the same filters
    (:func:`seahal.bench.cuda_moe_experts.tune_calls`)."""
    import torch

    from seahal.bench.cuda_moe_experts import token_filter, tune_calls

    calls = tune_calls(torch.device("cuda"), args.quick, token_filter(args.tokens), args.model)
    return _run_calls([calls], sms, capability, [])


def _run_calls(sources: list, sms: int, capability: tuple[int, int], notes: list[str]) -> tuple[list, list[str]]:
    """Capture the launches of every call the ``sources`` (iterators of calls) yield; a call that
    raises is noted and skipped (its kernels compile when the run reaches them)."""
    from .triton_compile import RunKernelFunctions, capture_launches

    failed = []
    with capture_launches(sms, capability) as launches, RunKernelFunctions():
        for source in sources:
            while True:
                try:
                    call = next(source)
                except StopIteration:
                    break
                except Exception as exc:  # noqa: BLE001 - building a call failed, which ends its source
                    failed.append(f"{type(exc).__name__}: {exc} (and the rest of its source)")
                    break
                try:
                    call()
                except Exception as exc:  # noqa: BLE001 - noted; its kernels compile when the run reaches them
                    failed.append(f"{type(exc).__name__}: {exc}")
    return launches, notes + ([f"{len(failed)} calls not captured ({failed[0]})"] if failed else [])


def _precompile_here(args: argparse.Namespace) -> str:
    """The child's work: capture the launches, specialise, compile; the line to print."""
    import torch

    from seahal.hal.registry import backends

    where = torch.device(args.device or backends()[args.backend].tensor_device_type())
    if where.type != "cuda" or not torch.cuda.is_available():
        return f"precompile: nothing to compile ahead for {where} (a CUDA GPU's Triton kernels only)"
    properties = torch.cuda.get_device_properties(where)
    capability = (properties.major, properties.minor)
    start = time.perf_counter()
    launches, notes = args.launches(args, properties.multi_processor_count, capability)
    target = cuda_target(capability)
    specs, rejected = specialisations(launches, target)
    found = time.perf_counter() - start
    report = precompile(specs, target, args.jobs or None)
    notes += [f"{len(rejected)} launches rejected ({rejected[0]})"] if rejected else []
    return (f"precompile: {len(launches)} launches captured in {found:.1f} s; {report.summary()}"
            + "".join(f"; {note}" for note in notes))


def main(argv: list[str] | None = None) -> int:
    """``python -m seahal.testing.triton_precompile conformance|model|bench|tune-experts ...``:
    compile ahead what ``seahal conformance``, ``seahal bench --ops model``, ``seahal bench --ops
    OPS`` or the experts' tuner will launch on this machine's GPU.
    Prints one line; exits 0 whatever it could compile (a run compiles what is missing)."""
    from seahal.bench import parse_contexts

    parser = argparse.ArgumentParser(prog="python -m seahal.testing.triton_precompile", description=main.__doc__)
    parser.add_argument("--jobs", type=int, default=0, help="worker processes (default: one a core)")
    parser.add_argument("--device", help="the GPU (default: cuda)")
    runs = parser.add_subparsers(required=True)
    conformance = runs.add_parser("conformance", help="what `seahal conformance` launches")
    conformance.add_argument("--backend", required=True)
    conformance.add_argument("--ops", help="comma-separated ops (default: all)")
    conformance.add_argument("--kernel")
    conformance.add_argument("--examples", type=int, default=PROPERTY_EXAMPLES, help="as `seahal conformance`'s")
    conformance.add_argument("--seed", type=int, default=0, help="as `seahal conformance`'s")
    conformance.set_defaults(launches=_conformance_launches)
    model = runs.add_parser("model", help="what `seahal bench --ops model` launches")
    model.add_argument("--quick", action="store_true", help="as `seahal bench --quick`: the 1k context only")
    model.add_argument("--contexts", type=parse_contexts, help="as `seahal bench --contexts`: these prompt lengths")
    model.set_defaults(launches=_model_launches, backend="cuda")
    bench = runs.add_parser("bench", help="what `seahal bench --backend cuda --ops OPS` launches")
    bench.add_argument("--ops", required=True, help="as the bench's --ops (modules with calls())")
    bench.add_argument("--quick", action="store_true", help="as the bench's --quick")
    bench.set_defaults(launches=_bench_launches, backend="cuda")
    tune = runs.add_parser("tune-experts", help="what `python -m seahal.bench.cuda_moe_experts --tune` launches")
    tune.add_argument("--quick", action="store_true")
    tune.add_argument("--tokens", help="only the rows of these token counts, e.g. 1,16")
    tune.add_argument("--model", help="only this model's rows")
    tune.set_defaults(launches=_tune_launches, backend="cuda")
    args = parser.parse_args(argv)
    try:
        print(_precompile_here(args))
    except Exception as exc:  # noqa: BLE001 - the run that follows compiles what this could not
        print(f"precompile: failed ({type(exc).__name__}: {exc}); the run compiles as it goes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
