"""The one registry of backends and kernels, and entry-point plugin discovery.

A backend is data: a name, the torch device type it serves, an availability probe that explains
itself, and the toolchain versions it was verified with. Kernels are registered per op with a
priority, declared capabilities, and an optional ``supports(ctx)`` predicate. Built-in backends and
third-party plugins register the same way: the ``seahal.backends`` entry point names a zero-argument
callable that calls :func:`register_backend` and :func:`register_kernel`.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import threading
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import RegistryError
from .spec import get_spec

ENTRY_POINT_GROUP = "seahal.backends"


@dataclass(frozen=True)
class Availability:
    """Whether a backend can run here; ``reason`` says why not (or what was found)."""

    ok: bool
    reason: str = ""
    chip: str | None = None
    """The chip family found (``"sm90"``, ``"ascend910b"``...), matched against kernel capabilities."""
    emulated_on: str | None = None
    """Set only when the probe found a *test emulation* of the vendor package (see
    :func:`emulated_placement`): the torch device type the backend's tensors really live on
    (``"cpu"``) instead of its ``device_type``. Plans, ``seahal info`` and conformance reports say so."""

    def __bool__(self) -> bool:
        return self.ok


EMULATION_MARKER = "__seahal_emulated_on__"
"""Module attribute by which a test emulation of a vendor package (``tests/vendor_packages``)
declares itself and the torch device type its tensors live on. No real package has it."""


def emulated_placement(vendor_module: Any) -> str | None:
    """The torch device type a test emulation of ``vendor_module`` keeps tensors on, or None for
    the real package. Probes pass it on as ``Availability(..., emulated_on=...)``."""
    return getattr(vendor_module, EMULATION_MARKER, None)


@dataclass
class Backend:
    """A named implementation provider for one torch device type."""

    name: str
    device_type: str
    probe: Callable[[], Availability]
    aliases: tuple[str, ...] = ()
    description: str = ""
    verified_with: Mapping[str, str] = field(default_factory=dict)
    """Toolchain versions this backend was verified with, e.g. ``{"torch": "2.13.0"}``."""
    verified_on_hardware: bool = True
    source: str = "built-in"
    priority: int = 0
    """Among available backends serving the same device type, ``device="auto"`` prefers higher."""
    collective_backend: str | None = None
    """The ``torch.distributed`` backend its devices communicate through (``"nccl"``, ``"hccl"``,
    ``"cncl"``, ``"gloo"``); None: this backend cannot run a model split over processes."""
    weight_conversions: Callable[[str | None], Mapping[str, str]] | None = None
    """For a chip, ``{op: dtype}``: quantised weights a model would feed to ``op`` are dequantised
    to ``dtype`` at load instead, because the backend has no kernel for that format on that chip
    (e.g. ``{"fp8_gemm": "bfloat16"}`` on an Ascend 910B, which has no FP8 GEMM)."""
    opt_in: bool = False
    """Its kernels serve only plans made for this backend by name (or an override naming it): an
    alternative implementation of a device type another backend serves (onnxruntime for cpu
    tensors) never enters, nor is listed in, that backend's plans."""

    _availability: Availability | None = field(default=None, repr=False)

    def availability(self) -> Availability:
        """Run the probe once; a probe that raises counts as unavailable with its error."""
        if self._availability is None:
            try:
                self._availability = self.probe()
            except Exception as exc:  # a probe must never take seahal down
                self._availability = Availability(False, f"availability probe raised {exc!r}")
        return self._availability

    def tensor_device_type(self) -> str:
        """The torch device type this backend's tensors live on: ``device_type``, or where a test
        emulation of its vendor package places them (:attr:`Availability.emulated_on`)."""
        return self.availability().emulated_on or self.device_type

    def conversions(self, chip: str | None) -> dict[str, str]:
        """:attr:`weight_conversions` for ``chip`` (none if the backend declares none)."""
        return dict(self.weight_conversions(chip)) if self.weight_conversions is not None else {}


@dataclass(frozen=True)
class PlanContext:
    """What a kernel's ``supports`` predicate sees: the device, its chip, and the model's needs."""

    device_type: str
    chip: str | None
    requirements: Mapping[str, Any]
    backend: str | None = None
    """The backend the plan is made for (None outside plans, e.g. in conformance runs)."""


Predicate = Callable[[PlanContext], "str | None"]
"""Returns None when the kernel supports the context, else the reason it does not."""


@dataclass
class Kernel:
    """One implementation of one op by one backend."""

    op: str
    backend: str
    name: str
    impl: Callable[..., Any] | str
    """The kernel function, or ``"module:qualname"`` imported when first bound."""
    priority: int = 0
    capabilities: Mapping[str, tuple] = field(default_factory=dict)
    """Declared capability data, e.g. ``{"dtype": ("bfloat16", "float32"), "head_dim": (512,)}``:
    a requirement key the kernel declares must have its value listed."""
    supports: Predicate | None = None
    portable: bool = False
    """Runs on tensors of any device type (pure torch, no host sync): the fallback of every plan."""
    device_position: bool = False
    """Takes the op's position argument (:attr:`OpSpec.position`) as a 0-d device tensor as well
    as an int, and never reads the tensor on the host: a decode step through it can be captured in
    a CUDA graph. Other kernels get such a call with the position read on the host."""

    _resolved: Callable[..., Any] | None = field(default=None, repr=False)

    @property
    def qualified_name(self) -> str:
        return f"{self.backend}.{self.name}"

    def resolve(self) -> Callable[..., Any]:
        """The kernel function, importing ``"module:qualname"`` on first use."""
        if self._resolved is None:
            obj: Any = self.impl
            if isinstance(obj, str):
                module, _, attr = obj.partition(":")
                obj = importlib.import_module(module)
                for part in attr.split("."):
                    obj = getattr(obj, part)
            self._resolved = obj
        return self._resolved

    def unresolve(self) -> None:
        """Forget the imported function: the next :meth:`resolve` imports ``impl`` again (tests
        that swap a vendor package in and out re-import the kernel modules)."""
        self._resolved = None

    def rejection(self, ctx: PlanContext) -> str | None:
        """Why this kernel cannot serve ``ctx``, or None if it can."""
        if ctx.chip is not None and "chip" in self.capabilities and ctx.chip not in self.capabilities["chip"]:
            return f"chip {ctx.chip} not in {list(self.capabilities['chip'])}"
        if ctx.requirements.get("position") == "per-sequence" and not self.device_position:
            return "takes one position for the batch (not registered device_position)"
        for key, value in ctx.requirements.items():
            allowed = self.capabilities.get(key)
            if allowed is not None and value not in allowed:
                return f"{key}={value!r} not in {list(allowed)}"
        if self.supports is not None:
            return self.supports(ctx)
        return None


@dataclass(frozen=True)
class PluginFailure:
    """An entry point that failed to load or register, kept for ``seahal info``."""

    entry_point: str
    error: str
    traceback: str


class Registry:
    """Backends and kernels by name; populated lazily from entry points."""

    def __init__(self) -> None:
        self.backends: dict[str, Backend] = {}
        self.kernels: dict[str, list[Kernel]] = {}
        self.failures: list[PluginFailure] = []
        self._discovered = False
        self._lock = threading.RLock()
        self._current_source = "built-in"

    # -- registration -------------------------------------------------------------------------
    def add_backend(self, backend: Backend) -> Backend:
        with self._lock:
            if backend.source == "built-in":
                backend.source = self._current_source
            existing = self.backends.get(backend.name)
            if existing is not None:
                if (existing.device_type, existing.source) == (backend.device_type, backend.source):
                    return existing  # idempotent re-registration
                raise RegistryError(
                    f"backend {backend.name!r} is already registered by {existing.source} "
                    f"(device type {existing.device_type!r})"
                )
            self.backends[backend.name] = backend
            return backend

    def add_kernel(self, kernel: Kernel) -> Kernel:
        get_spec(kernel.op)  # unknown op names fail here, with the list of known ones
        with self._lock:
            if kernel.backend not in self.backends:
                raise RegistryError(
                    f"kernel {kernel.qualified_name} for {kernel.op!r}: register backend "
                    f"{kernel.backend!r} before its kernels"
                )
            kernels = self.kernels.setdefault(kernel.op, [])
            for i, existing in enumerate(kernels):
                if (existing.backend, existing.name) == (kernel.backend, kernel.name):
                    kernels[i] = kernel  # re-registration replaces (idempotent)
                    break
            else:
                kernels.append(kernel)
            kernels.sort(key=lambda k: -k.priority)
            return kernel

    # -- discovery ----------------------------------------------------------------------------
    def discover(self) -> None:
        """Load every ``seahal.backends`` entry point once; failures are recorded, not raised."""
        with self._lock:
            if self._discovered:
                return
            self._discovered = True
            for ep in _entry_points():
                self.load_entry_point(ep.name, ep.value, ep.load, _distribution(ep))

    def load_entry_point(self, name: str, value: str, load: Callable[[], Any], dist: str | None) -> bool:
        builtin = value.startswith("seahal.backends.")
        self._current_source = "built-in" if builtin else f"plugin {dist or name} ({value})"
        backends_before = dict(self.backends)
        kernels_before = {op: list(kernels) for op, kernels in self.kernels.items()}
        try:
            register = load()
            register()
            return True
        except Exception as exc:
            # skipped means skipped: drop whatever the plugin registered before it failed
            self.backends.clear()
            self.backends.update(backends_before)
            self.kernels.clear()
            self.kernels.update(kernels_before)
            failure = PluginFailure(f"{name} = {value}", f"{type(exc).__name__}: {exc}", traceback.format_exc())
            self.failures.append(failure)
            warnings.warn(
                f"seahal: backend plugin {failure.entry_point} failed and was skipped: {failure.error} "
                "(see `seahal info` for the traceback)",
                RuntimeWarning,
                stacklevel=3,
            )
            return False
        finally:
            self._current_source = "built-in"

    def kernels_for(self, op: str) -> list[Kernel]:
        self.discover()
        return list(self.kernels.get(op, []))


def portable_fallback(backend: str, op: str, reason: str) -> Callable[..., Any]:
    """The best portable kernel of ``op`` (the CPU reference's device-resident code runs on any
    device), for one call that ``backend``'s own kernel cannot take (a shape outside a vendor
    operator's documented limits, say: rules plans have no vocabulary for). Warns once per
    (backend, op, reason); :data:`PORTABLE_CALLS` counts every such call."""
    if (backend, op, reason) not in PORTABLE_CALLS:
        message = f"seahal: {backend} runs {op} on the portable kernel for this call: {reason}"
        warnings.warn(message, RuntimeWarning, stacklevel=3)
    PORTABLE_CALLS[(backend, op, reason)] += 1
    kernel = next((k for k in REGISTRY.kernels_for(op) if k.portable), None)
    if kernel is None:
        raise RegistryError(f"{backend}: no portable kernel is registered for {op!r} to fall back to ({reason})")
    return kernel.resolve()


PORTABLE_CALLS: Counter[tuple[str, str, str]] = Counter()
"""(backend, op, reason) -> calls a backend sent to the portable kernel (:func:`portable_fallback`)."""


def _entry_points():
    return importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)


def _distribution(ep) -> str | None:
    dist = getattr(ep, "dist", None)
    return f"{dist.name} {dist.version}" if dist is not None else None


REGISTRY = Registry()


def register_backend(
    name: str,
    *,
    device_type: str,
    probe: Callable[[], Availability],
    aliases: tuple[str, ...] = (),
    description: str = "",
    verified_with: Mapping[str, str] | None = None,
    verified_on_hardware: bool = True,
    priority: int = 0,
    collective_backend: str | None = None,
    weight_conversions: Callable[[str | None], Mapping[str, str]] | None = None,
    opt_in: bool = False,
) -> Backend:
    """Declare a backend. Call from the zero-argument callable your entry point names.

    ``collective_backend`` names the ``torch.distributed`` backend that tensor and expert
    parallelism initialise their process group with on this backend's devices.
    ``weight_conversions(chip)`` says which ops' quantised weights a model dequantises at load
    on that chip (:attr:`Backend.weight_conversions`). ``opt_in``: see :attr:`Backend.opt_in`.
    """
    return REGISTRY.add_backend(
        Backend(
            name=name,
            device_type=device_type,
            probe=probe,
            aliases=tuple(aliases),
            description=description,
            verified_with=dict(verified_with or {}),
            verified_on_hardware=verified_on_hardware,
            priority=priority,
            collective_backend=collective_backend,
            weight_conversions=weight_conversions,
            opt_in=opt_in,
        )
    )


def register_kernel(
    op: str,
    backend: str,
    name: str,
    impl: Callable[..., Any] | str,
    *,
    priority: int = 0,
    capabilities: Mapping[str, tuple] | None = None,
    supports: Predicate | None = None,
    portable: bool = False,
    device_position: bool = False,
) -> Kernel:
    """Register ``impl`` as kernel ``backend.name`` of ``op``.

    ``impl`` must accept the op's arguments as its spec's schema names them and return what the
    spec's contract describes. Higher ``priority`` wins among kernels whose capabilities and
    ``supports`` predicate accept the plan's context. ``device_position``: see
    :attr:`Kernel.device_position`.
    """
    return REGISTRY.add_kernel(
        Kernel(
            op=op,
            backend=backend,
            name=name,
            impl=impl,
            priority=priority,
            capabilities={k: tuple(v) for k, v in (capabilities or {}).items()},
            supports=supports,
            portable=portable,
            device_position=device_position,
        )
    )


def backends() -> dict[str, Backend]:
    """Every registered backend (after discovery), by name."""
    REGISTRY.discover()
    return dict(REGISTRY.backends)


def plugin_failures() -> list[PluginFailure]:
    REGISTRY.discover()
    return list(REGISTRY.failures)
