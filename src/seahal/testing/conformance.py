"""The backend conformance suite: every kernel a backend registers, against the CPU reference.

For each op and each of the backend's kernels for it, every case of :mod:`seahal.testing.cases`
runs through the kernel (bound as its torch op, after the contract check) on the backend's device,
and is compared with the CPU reference kernel evaluated in float64 where the contract allows it,
using the tolerances of :mod:`seahal.testing.tolerances`. A case the kernel's declared
capabilities reject (``Kernel.rejection`` on the case's requirements), or any case of a backend
that is unavailable here, is reported *unsupported* with the reason. Property-based cases
(hypothesis, derandomised) run after the fixed ones.

    $ seahal conformance --backend cpu --json report.json
    >>> report = run_conformance("cpu", ops=["rope"])
    >>> report.ok, report.counts()["rope"]
"""

from __future__ import annotations

import contextlib
import inspect
import json
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from seahal.hal.errors import SeahalError
from seahal.hal.plan import BoundOp
from seahal.hal.registry import REGISTRY, Kernel, PlanContext, backends
from seahal.hal.spec import OpSpec, Out, get_spec, specs

from . import triton_interpreter
from .cases import Case, cases_for, requirements, strategy
from .compare import Verdict, bit_pattern
from .guard_bands import GuardBands
from .tolerances import checks_for, reference_in_float64

if TYPE_CHECKING:
    from .triton_compile import Launch

PROPERTY_EXAMPLES = 8
"""Hypothesis examples per (op, kernel) in CLI runs (``--examples``; reproducible for a seed)."""

REFERENCE = ("cpu", "reference")
STATUSES = ("pass", "fail", "unsupported")


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


@dataclass
class CaseResult:
    """The outcome of one case on one kernel. ``worst`` is the largest error / allowed error."""

    op: str
    kernel: str
    case: str
    status: str
    detail: str = ""
    max_abs: float | None = None
    max_rel: float | None = None
    worst: float | None = None
    tolerance: str = ""
    seconds: float = 0.0


@dataclass
class Report:
    """Every case result of one conformance run."""

    backend: str
    device: str
    results: list[CaseResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def failures(self) -> list[CaseResult]:
        return [r for r in self.results if r.status == "fail"]

    def counts(self) -> dict[str, dict[str, int]]:
        """op -> {"pass": n, "fail": n, "unsupported": n}."""
        table: dict[str, dict[str, int]] = {}
        for r in self.results:
            row = table.setdefault(r.op, dict.fromkeys(STATUSES, 0))
            row[r.status] += 1
        return table

    def summary(self, verbose: bool = False) -> str:
        """Per op and kernel: passed / failed / unsupported counts, then every failure."""
        lines = [f"seahal conformance: backend {self.backend} on {self.device}"]
        groups: dict[tuple[str, str], list[CaseResult]] = {}
        for r in self.results:
            groups.setdefault((r.op, r.kernel), []).append(r)
        width = max((len(op) + len(k) for op, k in groups), default=10) + 3
        for (op, kernel), results in groups.items():
            n = {s: sum(r.status == s for r in results) for s in STATUSES}
            counts = f"{n['pass']:3d} passed  {n['fail']:3d} failed  {n['unsupported']:3d} unsupported"
            line = f"  {op + ' [' + kernel + ']':<{width}} {counts}"
            reasons = sorted({r.detail for r in results if r.status == "unsupported"})
            if reasons and n["unsupported"] == len(results):
                line += f"  ({reasons[0]})"
            lines.append(line)
            if verbose:
                for r in results:
                    lines.append(f"      {r.status:<11} {r.case}" + _measure(r) + (f"  {r.detail}" if r.detail else ""))
        total = {s: sum(r.status == s for r in self.results) for s in STATUSES}
        lines.append(f"total: {total['pass']} passed, {total['fail']} failed, {total['unsupported']} unsupported")
        if self.failures:
            lines.append("failures:")
            for r in self.failures:
                lines.append(f"  {r.op} [{r.kernel}] {r.case}:{_measure(r)}\n      {r.detail}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "device": self.device,
            "ok": self.ok,
            "counts": self.counts(),
            "results": [asdict(r) for r in self.results],
        }


def _measure(r: CaseResult) -> str:
    if r.worst is None:
        return ""
    parts = [f"error/tolerance {r.worst:.3g}"]
    if r.max_abs is not None:
        parts.append(f"max abs {r.max_abs:.3g}, max rel {r.max_rel:.3g}")
    if r.tolerance:
        parts.append(f"tolerance: {r.tolerance}")
    return " (" + "; ".join(parts) + ")"


# --------------------------------------------------------------------------------------------
# Targets: the kernels under test
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One kernel of the backend under test for one op, on one device. ``kernel`` is None when
    the backend registers no kernel for the op; ``unavailable`` says why nothing can run."""

    op: str
    backend: str
    kernel: Kernel | None
    device: torch.device
    chip: str | None = None
    unavailable: str | None = None
    interpret: bool = False

    @property
    def label(self) -> str:
        return self.kernel.qualified_name if self.kernel is not None else f"{self.backend}.-"


def targets(
    backend: str,
    ops: Iterable[str] | None = None,
    device: str | torch.device | None = None,
    kernel: str | None = None,
    *,
    interpret: bool = False,
) -> list[Target]:
    """Every (op, kernel) of ``backend`` to test, in op order; ``kernel`` keeps one kernel name."""
    known = backends()
    if backend not in known:
        raise SeahalError(f"unknown backend {backend!r}; registered backends: {', '.join(sorted(known))}")
    b = known[backend]
    op_names = list(specs()) if ops is None else [get_spec(op).name for op in ops]
    availability = triton_interpreter.availability() if interpret else b.availability()
    unavailable = None if availability else f"backend {backend} unavailable: {availability.reason}"
    if interpret:
        torch_device = torch.device("cpu")
    elif unavailable is None or device is not None:
        torch_device = torch.device(device or b.tensor_device_type())
    else:  # nothing will run; the type may be unknown to torch without the vendor's package (mlu)
        torch_device = torch.device("meta")
    found = []
    for op in op_names:
        kernels = [k for k in REGISTRY.kernels_for(op) if k.backend == backend and kernel in (None, k.name)]
        if not kernels:
            what = f"kernel {kernel!r}" if kernel else "kernel"
            why = f"backend {backend} registers no {what} for {op}"
            found.append(Target(op, backend, None, torch_device, unavailable=why))
        for k in kernels:
            why = unavailable or _device_mismatch(k, b.tensor_device_type(), torch_device, interpret)
            found.append(Target(op, backend, k, torch_device, availability.chip, why, interpret))
    return found


def _device_mismatch(kernel: Kernel, device_type: str, device: torch.device, interpret: bool) -> str | None:
    if kernel.portable or device.type == device_type or interpret:
        return None
    return f"{kernel.qualified_name} serves {device_type} tensors and is not portable; asked to run on {device}"


# --------------------------------------------------------------------------------------------
# Running a case
# --------------------------------------------------------------------------------------------


@dataclass
class _Run:
    """A case's results: each call's outputs, and the mutated (state) arguments after the last call."""

    outputs: list[tuple[torch.Tensor, ...]]
    states: tuple[torch.Tensor, ...]


class KernelError(Exception):
    """A kernel broke the calling convention (wrong outputs, aliasing, mutating an input)."""


def _reference_kernel(op: str) -> Kernel:
    for k in REGISTRY.kernels_for(op):
        if (k.backend, k.name) == REFERENCE:
            return k
    raise SeahalError(f"no cpu.reference kernel registered for {op!r}: the conformance suite needs it")


def _mutated_positions(spec: OpSpec) -> frozenset[int]:
    names = _parameters(spec)
    return frozenset(names.index(m) for m in spec.mutates)


def _parameters(spec: OpSpec) -> list[str]:
    return list(inspect.signature(spec.contract).parameters)


def float64_positions(op: str, args: tuple) -> frozenset[int]:
    """Argument positions the reference gets as float64: the bf16/fp16/fp32 tensors, upcast all
    together if the contract accepts that, else one by one where it does (state tensors and
    scales the contract keeps fp32 stay fp32; quantised codes and integers are never touched)."""
    if not reference_in_float64(op, args):
        return frozenset()
    spec = get_spec(op)
    low = (torch.bfloat16, torch.float16, torch.float32)
    floats = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.dtype in low]

    def accepted(upcast: set[int]) -> bool:
        meta = tuple(
            torch.empty(a.shape, dtype=torch.float64 if i in upcast else a.dtype, device="meta")
            if isinstance(a, torch.Tensor) else a
            for i, a in enumerate(args)
        )
        try:
            spec.check(*meta)
            return True
        except SeahalError:
            return False

    if accepted(set(floats)):
        return frozenset(floats)
    chosen: set[int] = set()
    for i in floats:
        if accepted(chosen | {i}):
            chosen.add(i)
    return frozenset(chosen)


def _materialise(
    calls: tuple[tuple, ...], device: torch.device, upcast: frozenset[int], guards: GuardBands | None = None
) -> list[tuple]:
    """The calls' arguments on ``device``, upcast positions as float64, strides kept (a dim of
    stride 0, e.g. a pool of cache rows expanded over the batch, stays an expansion of one copy),
    and a tensor shared between calls (the state) still shared; with ``guards``, each inside
    poisoned guard bands (:mod:`seahal.testing.guard_bands`)."""
    memo: dict[tuple[int, bool], torch.Tensor] = {}

    def place(i: int, value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        key = (id(value), i in upcast)
        if key not in memo:
            dtype = torch.float64 if i in upcast else value.dtype
            source = value
            for dim, stride in enumerate(value.stride()):
                if stride == 0:
                    source = source.narrow(dim, 0, min(1, value.shape[dim]))
            if guards is None:
                copy = torch.empty_strided(source.shape, source.stride(), dtype=dtype, device=device)
            else:
                copy = guards.empty_strided(i, source.shape, source.stride(), dtype, device)
            copy.copy_(source)
            memo[key] = copy if source is value else copy.expand(value.shape)
        return memo[key]

    return [tuple(place(i, a) for i, a in enumerate(args)) for args in calls]


def _as_tuple(result: Any) -> tuple[torch.Tensor, ...]:
    if result is None:
        return ()
    return (result,) if isinstance(result, torch.Tensor) else tuple(result)


def _check_outputs(spec: OpSpec, args: tuple, outputs: tuple[torch.Tensor, ...], device: torch.device) -> None:
    """Outputs as the contract describes them, on the device, never aliasing an input."""
    meta = spec.check(*args)
    expected = (meta,) if isinstance(meta, Out) else tuple(meta or ())
    if len(outputs) != len(expected):
        raise KernelError(f"returned {len(outputs)} output(s), the contract describes {len(expected)}")
    inputs = [a for a in args if isinstance(a, torch.Tensor) and a.numel()]
    for i, (out, want) in enumerate(zip(outputs, expected)):
        if not isinstance(out, torch.Tensor):
            raise KernelError(f"output {i} is a {type(out).__name__}, not a tensor")
        if tuple(out.shape) != tuple(want.shape) or out.dtype != want.dtype:
            contract = f"{list(want.shape)} {want.dtype}"
            raise KernelError(f"output {i} is {list(out.shape)} {out.dtype}, the contract says {contract}")
        if out.device.type != device.type:
            raise KernelError(f"output {i} is on {out.device}, inputs were on {device}")
        if out.numel() and any(out.untyped_storage().data_ptr() == a.untyped_storage().data_ptr() for a in inputs):
            raise KernelError(f"output {i} aliases an input (kernels must return fresh tensors)")


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(torch.equal(bit_pattern(a.cpu()), bit_pattern(b.cpu())))


def execute(
    kernel: Kernel, case: Case, device: torch.device, *, upcast: frozenset[int] = frozenset(), strict: bool = True
) -> _Run:
    """Run a case's calls through ``kernel`` (as its bound torch op) on ``device``.

    ``strict`` also holds the kernel to the calling convention: outputs shaped as the contract
    says, fresh (no aliasing), no input modified except the declared mutated ones, and nothing
    read or written past an argument (each lies between guard bands: reading them poisons the
    output, writing them is reported here).
    """
    spec = get_spec(case.op)
    bound = BoundOp(spec, kernel)
    mutated = _mutated_positions(spec)
    guards = GuardBands() if strict else None
    calls = _materialise(case.calls, device, upcast, guards)
    outputs = []
    for args in calls:
        watched = [i for i, a in enumerate(args) if strict and isinstance(a, torch.Tensor) and i not in mutated]
        inputs = [(i, args[i].clone()) for i in watched]
        result = _as_tuple(bound(*args))
        if strict:
            _check_outputs(spec, args, result, device)
            changed = [i for i, before in inputs if not _bits_equal(before, args[i])]
            if changed:
                raise KernelError(f"modified input(s) {[_parameters(spec)[i] for i in changed]} (not declared mutable)")
            if outside := guards.overwritten():
                where = ", ".join(f"{extent} {_parameters(spec)[i]!r}" for i, extent in outside)
                raise KernelError(f"wrote outside its arguments: {where}")
        outputs.append(tuple(t.detach().cpu() for t in result))
    states = tuple(calls[-1][i].detach().cpu().clone() for i in sorted(mutated))
    return _Run(outputs, states)


class ReferenceCache:
    """Reference results per case (computed once, shared by every kernel under test)."""

    def __init__(self) -> None:
        self._runs: dict[int, tuple[Case, _Run]] = {}

    def get(self, case: Case) -> _Run:
        if id(case) not in self._runs:
            upcast = float64_positions(case.op, case.calls[0])
            run = execute(_reference_kernel(case.op), case, torch.device("cpu"), upcast=upcast, strict=False)
            self._runs[id(case)] = (case, run)
        return self._runs[id(case)][1]


def _compare(case: Case, got: _Run, want: _Run) -> list[tuple[str, Any, Verdict]]:
    """Every comparison of a case: each call's outputs, then (after the last call) the states."""
    verdicts = []
    last = len(case.calls) - 1
    for i, args in enumerate(case.calls):
        n_outputs = len(got.outputs[i])
        got_values = got.outputs[i] + (got.states if i == last else ())
        want_values = want.outputs[i] + (want.states if i == last else ())
        for item in checks_for(case.op, args):
            at = item.outputs if isinstance(item.outputs, tuple) else (item.outputs,)
            if max(at) >= n_outputs and i != last:
                continue  # states are compared after the last call
            label = f"call {i}: {item.label}" if last else item.label
            verdict = item.check.compare(_select(got_values, item.outputs), _select(want_values, item.outputs))
            verdicts.append((label, item.check, verdict))
    return verdicts


def _select(values: tuple[torch.Tensor, ...], outputs: int | tuple[int, ...]) -> Any:
    return tuple(values[j] for j in outputs) if isinstance(outputs, tuple) else values[outputs]


def failed_checks(op: str, args: tuple, outputs: tuple[torch.Tensor, ...]) -> list[str]:
    """``outputs``, one call of ``op`` on ``args`` computed by the caller, against the CPU reference
    under the op's conformance rules (what :func:`run_case` compares): each failed check's label
    and detail, none when every output is within its rule."""
    case = Case(op, "given outputs", (args,), requirements(op, args))
    got = _Run([tuple(outputs)], ())
    return [f"{label}: {verdict.detail}" for label, _, verdict in _compare(case, got, ReferenceCache().get(case))
            if not verdict.ok]


def run_case(target: Target, case: Case, reference: ReferenceCache | None = None) -> CaseResult:
    """One case on one target: pass, fail (with errors and tolerance) or unsupported (with why)."""
    result = _unsupported(target, case)
    if result is not None:
        return result
    result = CaseResult(case.op, target.label, case.name, "fail")
    start = time.perf_counter()
    try:
        want = (reference or ReferenceCache()).get(case)
    except Exception as exc:
        result.detail = f"the cpu reference failed on this case: {type(exc).__name__}: {exc}"
        return result
    try:
        got = execute(target.kernel, case, target.device)
    except Exception as exc:  # any kernel failure is a conformance failure, reported with its message
        result.detail = f"{type(exc).__name__}: {exc}".strip()
        result.seconds = time.perf_counter() - start
        return result
    _record(result, _compare(case, got, want))
    result.seconds = time.perf_counter() - start
    return result


def _unsupported(target: Target, case: Case) -> CaseResult | None:
    """The result of a case ``target`` cannot run (its backend is unavailable, or its kernel's
    capabilities reject the case's requirements), with why; None if it can."""
    why = target.unavailable
    if why is None:
        rejection = target.kernel.rejection(PlanContext(target.device.type, target.chip, dict(case.requirements)))
        why = None if rejection is None else f"capabilities: {rejection}"
    return None if why is None else CaseResult(case.op, target.label, case.name, "unsupported", why)


def _record(result: CaseResult, verdicts: list[tuple[str, Any, Verdict]]) -> None:
    """Fill a result from a case's comparisons: status, worst error/tolerance, the failures."""
    failed = [(label, check, v) for label, check, v in verdicts if not v.ok]
    result.status = "fail" if failed else "pass"
    worst_label, worst_check, worst = max(verdicts, key=lambda lcv: -1.0 if lcv[2].worst is None else lcv[2].worst)
    result.worst = worst.worst
    result.max_abs = max((v.max_abs for _, _, v in verdicts if v.max_abs is not None), default=None)
    result.max_rel = max((v.max_rel for _, _, v in verdicts if v.max_rel is not None), default=None)
    result.tolerance = f"{worst_label}: {worst_check.describe()}"
    if failed:
        result.detail = "; ".join(f"{label}: {v.detail}" for label, _, v in failed[:3])
        result.tolerance = "; ".join(f"{label}: {check.describe()}" for label, check, _ in failed[:3])


def describe_args(args: tuple) -> str:
    """``[3, 128] bfloat16 (strided), 64, 'fp32'``: a call's arguments in one line."""
    parts = []
    for a in args:
        if isinstance(a, torch.Tensor):
            layout = "" if a.is_contiguous() else " (strided)"
            parts.append(f"{list(a.shape)} {str(a.dtype).removeprefix('torch.')}{layout}")
        else:
            parts.append(repr(a))
    return ", ".join(parts)


class _CaseFailed(AssertionError):
    pass


def run_property(
    target: Target,
    examples: int = PROPERTY_EXAMPLES,
    run: Callable[[Target, Case], CaseResult] = run_case,
    seed: int = 0,
) -> CaseResult:
    """Hypothesis-drawn cases on one target: pass, or fail with a failing example's arguments and
    errors. Seed 0 draws the same examples on every run and reports the first failure as drawn
    (derandomised, no shrinking: what CI runs); any other seed draws its own examples, the same
    for that seed on every run, and shrinks a failure to a small example (a campaign:
    ``seahal conformance --examples 1000 --seed 7``). ``run`` runs one drawn case
    (:func:`launch_case` draws the same examples and only launches them)."""
    from hypothesis import HealthCheck, Phase, Verbosity, assume, given, settings
    from hypothesis import seed as hypothesis_seed
    from hypothesis.errors import Unsatisfiable

    name = f"property-based ({examples} examples" + (f", seed {seed})" if seed else ")")
    result = CaseResult(target.op, target.label, name, "unsupported")
    if target.unavailable is not None:
        result.detail = target.unavailable
        return result
    start = time.perf_counter()
    worst: list[float] = [0.0]

    phases = (Phase.explicit, Phase.generate) + ((Phase.shrink,) if seed else ())

    @hypothesis_seed(seed)
    @settings(
        max_examples=examples, derandomize=not seed, database=None, deadline=None, verbosity=Verbosity.quiet,
        phases=phases, suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy(target.op))
    def check(case: Case) -> None:
        outcome = run(target, case)
        assume(outcome.status != "unsupported")
        if outcome.status == "fail":
            more = f" (+{len(case.calls) - 1} calls)" if len(case.calls) > 1 else ""
            raise _CaseFailed(f"{describe_args(case.calls[0])}{more}: {outcome.detail}")
        worst[0] = max(worst[0], outcome.worst or 0.0)

    try:
        check()
        result.status, result.worst = "pass", worst[0]
    except Unsatisfiable:
        result.detail = "the kernel's capabilities rejected every drawn case"
    except _CaseFailed as exc:
        result.status, result.detail = "fail", str(exc)
    except Exception as exc:  # a drawn case the suite itself cannot build or run
        result.status, result.detail = "fail", f"property run raised {type(exc).__name__}: {exc}"
    result.seconds = time.perf_counter() - start
    return result


def launch_case(target: Target, case: Case) -> CaseResult:
    """A case's calls through ``target``'s kernel, nothing compared: what :func:`captured_launches`
    runs, where the kernel's Triton launches are recorded and nothing executes. pass: the calls
    went through; fail: the kernel's wrapper raised (one that reads tensor values on the host
    cannot run on meta tensors)."""
    result = _unsupported(target, case)
    if result is not None:
        return result
    result = CaseResult(case.op, target.label, case.name, "pass")
    bound = BoundOp(get_spec(case.op), target.kernel)
    try:
        for args in _materialise(case.calls, target.device, frozenset()):
            bound(*args)
    except Exception as exc:  # reported; the launches made before it stay recorded
        result.status, result.detail = "fail", f"{type(exc).__name__}: {exc}".strip()
    return result


def captured_launches(
    backend: str,
    ops: Iterable[str] | None = None,
    kernel: str | None = None,
    *,
    sms: int,
    capability: tuple[int, int],
    property_examples: int = PROPERTY_EXAMPLES,
    seed: int = 0,
) -> tuple[list[Launch], list[CaseResult]]:
    """The Triton launches a run of the suite on a CUDA backend makes (the same cases and drawn
    examples as :func:`run_conformance`), on a GPU of compute ``capability`` with ``sms``
    multiprocessors, recorded by :func:`~seahal.testing.triton_compile.capture_launches`: nothing
    runs, no GPU is needed. Also each case's :func:`launch_case` result (fail: its launches may
    be missing)."""
    from .triton_compile import RunKernelFunctions, capture_launches

    device = torch.device(backends()[backend].tensor_device_type())
    chip = f"sm{capability[0]}{capability[1]}"
    found = [Target(t.op, backend, t.kernel, device, chip) for t in targets(backend, ops, kernel=kernel) if t.kernel]
    results = []
    with capture_launches(sms, capability) as launches, RunKernelFunctions():
        for target in found:
            results += [launch_case(target, case) for case in cases_for(target.op, seed)]
            if property_examples:
                results.append(run_property(target, property_examples, run=launch_case, seed=seed))
    return launches, results


# --------------------------------------------------------------------------------------------
# The suite
# --------------------------------------------------------------------------------------------


def run_conformance(
    backend: str,
    ops: Iterable[str] | None = None,
    device: str | torch.device | None = None,
    kernel: str | None = None,
    *,
    interpret: bool = False,
    property_examples: int = PROPERTY_EXAMPLES,
    seed: int = 0,
    progress: Any = None,
    jobs: int = 1,
) -> Report:
    """Run every case of every op (default: all) on every kernel ``backend`` registers for it
    (or only ``kernel``), on ``device`` (default: the backend's device type), against the float64
    CPU reference. ``interpret`` runs Triton kernels through the interpreter on CPU tensors;
    ``property_examples`` hypothesis examples per kernel (0: none); ``progress(result)`` is called
    after each result. ``jobs`` > 1 runs the ops in that many processes (:func:`_run_ops_in_processes`):
    the same results in the same order, in less time where the cases are CPU-bound."""
    if interpret:
        triton_interpreter.enable()
    found = targets(backend, ops, device, kernel, interpret=interpret)
    where = "cpu" if interpret else device or backends()[backend].tensor_device_type()
    report = Report(backend, str(where))
    op_names = list(dict.fromkeys(target.op for target in found))
    if jobs > 1 and len(op_names) > 1:
        settings = {"backend": backend, "device": device, "kernel": kernel, "interpret": interpret,
                    "property_examples": property_examples, "seed": seed}
        for result in _run_ops_in_processes(op_names, settings, jobs):
            report.results.append(result)
            if progress is not None:
                progress(result)
        return report
    cases_by_op: dict[str, list[Case]] = {}
    reference = ReferenceCache()
    with triton_interpreter.bf16_dot_fix() if interpret else contextlib.nullcontext():
        for target in found:
            _run_target(target, cases_by_op, reference, report, property_examples, seed, progress)
    return report


def _run_ops_in_processes(op_names: list[str], settings: dict[str, Any], jobs: int) -> Iterator[CaseResult]:
    """Each op's :func:`run_conformance` (``settings`` its arguments) in one of ``jobs`` fresh
    processes (spawn: a parent's CUDA context is never forked), its results yielded in op order.
    An op's cases and references do not depend on the other ops', so the results are the serial run's."""
    import functools
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    run_op = functools.partial(_op_results, settings)
    with ProcessPoolExecutor(min(jobs, len(op_names)), multiprocessing.get_context("spawn")) as pool:
        for results in pool.map(run_op, op_names):
            yield from results


def _op_results(settings: dict[str, Any], op: str) -> list[CaseResult]:
    """One op's conformance results (worker side of :func:`_run_ops_in_processes`)."""
    return run_conformance(ops=[op], **settings).results


def _run_target(
    target: Target,
    cases_by_op: dict[str, list[Case]],
    reference: ReferenceCache,
    report: Report,
    property_examples: int,
    seed: int,
    progress: Any,
) -> None:
    """Append ``target``'s results (one per case, plus the property run) to ``report``."""
    if target.kernel is None:
        results = [CaseResult(target.op, target.label, "(all cases)", "unsupported", target.unavailable or "")]
    else:
        cases = cases_by_op.setdefault(target.op, cases_for(target.op, seed))
        results = [run_case(target, case, reference) for case in cases]
        if property_examples:
            results.append(run_property(target, property_examples, seed=seed))
    for r in results:
        report.results.append(r)
        if progress is not None:
            progress(r)


def main(args: Any) -> int:
    """``seahal conformance``: print the summary, write ``--json``; exit 1 if any case failed."""
    if args.interpret:
        triton_interpreter.enable()
    ops = [op.strip() for op in args.ops.split(",") if op.strip()] if args.ops else None
    examples = PROPERTY_EXAMPLES if args.examples is None else args.examples
    precompiled = args.jobs > 0 and not args.interpret
    try:
        if precompiled:
            from .triton_precompile import cache_entries, describe_entries, precompile_conformance

            print(precompile_conformance(args.backend, ops, args.kernel, args.device, args.jobs, examples, args.seed),
                  flush=True)
            entries = cache_entries()
        report = run_conformance(args.backend, ops, args.device, args.kernel, interpret=args.interpret,
                                 property_examples=examples, seed=args.seed,
                                 jobs=args.jobs if args.interpret else 1)
    except (SeahalError, KeyError) as exc:
        print(f"seahal conformance: {exc}", file=sys.stderr)
        return 2
    print(report.summary(verbose=args.verbose))
    if precompiled:  # what the precompile missed: the run compiled it itself
        print(f"Triton cache entries the run added: {describe_entries(cache_entries() - entries)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report.to_dict(), f, indent=2)
        print(f"wrote {args.json}")
    return 0 if report.ok else 1


__all__ = [
    "CaseResult",
    "Report",
    "Target",
    "describe_args",
    "execute",
    "float64_positions",
    "main",
    "run_case",
    "run_conformance",
    "run_property",
    "targets",
]
