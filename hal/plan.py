"""Load-time plans: every op resolved once to a concrete kernel for one device.

``plan("cuda", ops=..., policy="fallback")`` walks each op's kernels, keeps those whose backend
serves the device and whose capabilities accept the requirements, binds the best by priority, and
records why every other kernel was passed over. Under ``policy="fallback"`` an op without a native
kernel runs on a portable kernel (the CPU reference's pure-torch code runs on any device), with a
warning; under ``policy="strict"`` that is an error. The environment can override choices for
debugging: ``SEAHAL_BACKEND=name`` (every op) and ``SEAHAL_OPS="fp8_gemm=cpu,moe_gate=cpu.reference"``.

Kernels are matched against the device type the plan's backend *serves* (``npu`` for Ascend). That
is also the tensors' device type, except under a test emulation of the vendor package, where the
tensors live on ``Plan.emulated_on`` (cpu) and the plan says so. A plan also carries the backend's
load-time weight conversions for the chip (``Plan.weight_conversions``).
"""

from __future__ import annotations

import os
import sys
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch

from .device import resolve_device
from .errors import PlanError
from .registry import REGISTRY, Backend, Kernel, PlanContext
from .spec import OpSpec, as_torch_op, get_spec, position_on_host, specs

POLICIES = ("fallback", "strict")


class BoundOp:
    """An op bound to one kernel: checks the contract, then makes one dispatcher call.

    An op with a position argument (:attr:`OpSpec.position`) called with the position as a tensor
    goes to the kernel's tensor-position twin (``position_op``): the kernel itself when it declares
    :attr:`Kernel.device_position`, else the kernel behind a host read of the position.
    """

    __slots__ = ("spec", "kernel", "torch_op", "position_op", "_position_index")

    def __init__(self, spec: OpSpec, kernel: Kernel):
        self.spec = spec
        self.kernel = kernel
        fn = kernel.resolve()
        self.torch_op = as_torch_op(spec, kernel.backend, kernel.name, fn)
        self.position_op = None
        if spec.position is not None:
            twin = fn if kernel.device_position else position_on_host(spec, fn)
            self.position_op = as_torch_op(spec, kernel.backend, kernel.name, twin, positional=True)
            self._position_index = spec.position_index()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.spec.contract(*args, **kwargs)
        if self.position_op is not None and isinstance(self._position(args, kwargs), torch.Tensor):
            return self.position_op(*args, **kwargs)
        return self.torch_op(*args, **kwargs)

    @property
    def reads_position_on_host(self) -> bool:
        """Whether a tensor position is read on the host (a sync that breaks CUDA-graph capture)."""
        return self.spec.position is not None and not self.kernel.device_position

    def _position(self, args: tuple, kwargs: dict) -> Any:
        if self.spec.position in kwargs:
            return kwargs[self.spec.position]
        return args[self._position_index] if len(args) > self._position_index else None

    def __repr__(self) -> str:
        return f"<{self.spec.name} -> {self.kernel.qualified_name}>"


@dataclass
class PlanEntry:
    """How one op was resolved."""

    op: str
    kernel: Kernel
    reason: str
    rejected: list[tuple[str, str]] = field(default_factory=list)
    fallback: bool = False

    @property
    def label(self) -> str:
        return self.kernel.qualified_name


@dataclass
class Plan:
    """Every requested op bound once for ``device``; call them as ``plan.ops.<op>(...)``."""

    device: torch.device
    backend: Backend
    policy: str
    entries: dict[str, PlanEntry]
    weight_conversions: dict[str, str] = field(default_factory=dict)
    """``{op: dtype}``: quantised weights for ``op`` are dequantised to ``dtype`` at load (the
    backend has no fast kernel for their format on this chip); see ``Backend.weight_conversions``."""
    ops: SimpleNamespace = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.ops = SimpleNamespace(**{op: BoundOp(get_spec(op), e.kernel) for op, e in self.entries.items()})

    def __getitem__(self, op: str) -> BoundOp:
        return getattr(self.ops, op)

    @property
    def host_position_ops(self) -> list[str]:
        """Ops whose kernel reads a tensor position on the host (:attr:`BoundOp.reads_position_on_host`):
        a decode step through them cannot be captured in a CUDA graph."""
        return [op for op in self.entries if self[op].reads_position_on_host]

    @property
    def fallbacks(self) -> list[str]:
        return [op for op, e in self.entries.items() if e.fallback]

    @property
    def emulated_on(self) -> str | None:
        """The tensors' device type when the backend runs on a test emulation of its vendor
        package, else None."""
        return self.backend.availability().emulated_on

    @property
    def placement(self) -> str:
        """``cuda:0``, or ``npu emulated on cpu`` under a test emulation."""
        if self.emulated_on:
            return f"{self.backend.device_type} emulated on {self.device}"
        return str(self.device)

    def summary(self) -> str:
        """One line: ``plan(cuda): 9 ops cuda.triton, 1 op cpu.reference [fallback: fp4_gemm]``."""
        counts = Counter(e.label for e in self.entries.values())
        parts = [f"{n} op{'s' if n != 1 else ''} {label}" for label, n in counts.most_common()]
        line = f"plan({self.placement}): " + ", ".join(parts)
        if self.fallbacks:
            line += f" [fallback: {', '.join(self.fallbacks)}]"
        return line

    def table(self) -> str:
        """A readable table: op, kernel, why chosen, why the others were not."""
        rows = [("op", "kernel", "why", "not chosen")]
        for op, e in self.entries.items():
            others = "; ".join(f"{k}: {r}" for k, r in e.rejected) or "-"
            rows.append((op, e.label + (" (fallback)" if e.fallback else ""), e.reason, others))
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [
            "  ".join(r[i].ljust(widths[i]) for i in range(3)) + "  " + r[3]
            for r in rows
        ]
        lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * 10)
        for op, dtype in self.weight_conversions.items():
            lines.append(f"weights converted at load: quantised {op} weights -> {dtype} (no fast {op} kernel for their format here)")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": str(self.device),
            "backend": self.backend.name,
            "emulated_on": self.emulated_on,
            "policy": self.policy,
            "weight_conversions": dict(self.weight_conversions),
            "host_position_ops": self.host_position_ops,
            "ops": {
                op: {
                    "kernel": e.label,
                    "reason": e.reason,
                    "fallback": e.fallback,
                    "rejected": [{"kernel": k, "reason": r} for k, r in e.rejected],
                }
                for op, e in self.entries.items()
            },
        }

    def __str__(self) -> str:
        return self.summary() + "\n" + self.table()


def _parse_overrides(environ: Mapping[str, str]) -> dict[str, str]:
    """``SEAHAL_OPS="fp8_gemm=cpu,moe_gate=cpu.reference"`` -> {op: "backend[.kernel]"}."""
    text = environ.get("SEAHAL_OPS", "").strip()
    overrides: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        op, sep, target = item.partition("=")
        if not (op.strip() and sep and target.strip()):
            raise PlanError(f"SEAHAL_OPS entry {item!r} must look like op=backend or op=backend.kernel")
        get_spec(op.strip())
        overrides[op.strip()] = target.strip()
    return overrides


def _matches(kernel: Kernel, target: str) -> bool:
    backend, _, name = target.partition(".")
    return kernel.backend == backend and (not name or kernel.name == name)


def _resolve_op(
    op: str,
    device_type: str,
    ctx: PlanContext,
    policy: str,
    forced: str | None,
) -> PlanEntry:
    rejected: list[tuple[str, str]] = []
    native: list[Kernel] = []
    portable: list[Kernel] = []
    for kernel in REGISTRY.kernels_for(op):
        backend = REGISTRY.backends[kernel.backend]
        if backend.opt_in and backend.name != ctx.backend and not (forced and _matches(kernel, forced)):
            continue  # an opt-in backend's kernel: only its own plans, or an override naming it
        serves_device = backend.device_type == device_type
        if not serves_device and not kernel.portable:
            continue  # another device's kernel: not a candidate, not worth listing
        if forced is not None and not _matches(kernel, forced):
            rejected.append((kernel.qualified_name, f"override selects {forced}"))
            continue
        if serves_device and not backend.availability():
            rejected.append((kernel.qualified_name, f"backend unavailable: {backend.availability().reason}"))
            continue
        why_not = kernel.rejection(ctx)
        if why_not is not None:
            rejected.append((kernel.qualified_name, why_not))
            continue
        (native if serves_device else portable).append(kernel)

    if native:
        chosen, rest = native[0], native[1:]
        reason = f"override {forced}" if forced else f"highest priority ({chosen.priority}) for {device_type}"
        rejected += [(k.qualified_name, f"lower priority ({k.priority})") for k in rest]
        rejected += [(k.qualified_name, f"portable fallback, not needed on {device_type}") for k in portable]
        return PlanEntry(op, chosen, reason, rejected)
    if portable and (policy == "fallback" or forced is not None):
        chosen = portable[0]
        reason = f"override {forced}" if forced else f"no {device_type} kernel: portable fallback"
        rejected += [(k.qualified_name, f"lower priority ({k.priority})") for k in portable[1:]]
        return PlanEntry(op, chosen, reason, rejected, fallback=forced is None)
    details = "; ".join(f"{k}: {r}" for k, r in rejected) or f"no {device_type} kernel registered"
    if policy == "strict" and portable:
        raise PlanError(
            f"policy='strict': no {device_type} kernel for {op!r} ({details}); "
            f"policy='fallback' would run {portable[0].qualified_name}"
        )
    raise PlanError(f"no kernel can run {op!r} on {device_type}: {details}")


def plan(
    device: str | torch.device | None = "auto",
    ops: Iterable[str] | Mapping[str, Mapping[str, Any]] | None = None,
    policy: str = "fallback",
    *,
    announce: bool = True,
    environ: Mapping[str, str] | None = None,
) -> Plan:
    """Resolve ops to kernels once for ``device``.

    ``ops``: op names (default: every op), or ``{op: requirements}`` where requirements such as
    ``{"dtype": "bfloat16", "weight_format": "fp4", "head_dim": 512}`` are matched against each
    kernel's declared capabilities and ``supports`` predicate. ``policy``: ``"fallback"`` (warn and
    use a portable kernel) or ``"strict"`` (raise :class:`PlanError`). ``announce`` prints the
    one-line placement summary to stderr.
    """
    if policy not in POLICIES:
        raise PlanError(f"policy must be one of {list(POLICIES)}, got {policy!r}")
    environ = os.environ if environ is None else environ
    torch_device, backend = resolve_device(device)
    requested: Mapping[str, Mapping[str, Any]]
    if ops is None:
        requested = {name: {} for name in specs()}
    elif isinstance(ops, Mapping):
        requested = ops
    else:
        requested = {name: {} for name in ops}
    overrides = _parse_overrides(environ)
    forced_backend = environ.get("SEAHAL_BACKEND", "").strip() or None
    chip = backend.availability().chip

    entries = {}
    for op, requirements in requested.items():
        get_spec(op)
        ctx = PlanContext(backend.device_type, chip, dict(requirements), backend=backend.name)
        forced = overrides.get(op, forced_backend)
        entries[op] = _resolve_op(op, backend.device_type, ctx, policy, forced)

    result = Plan(torch_device, backend, policy, entries, backend.conversions(chip))
    if result.fallbacks:
        warnings.warn(
            f"seahal: {len(result.fallbacks)} op(s) have no {backend.device_type} kernel and run on a "
            f"portable fallback: {', '.join(result.fallbacks)}",
            RuntimeWarning,
            stacklevel=2,
        )
    if announce and environ.get("SEAHAL_QUIET", "") != "1":
        print(result.summary(), file=sys.stderr)
    return result
