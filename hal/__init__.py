"""seahal.hal: operator contracts, the backend registry, device resolution and load-time plans.

This package imports no backend and no model: it knows backends only through the registry, which
is filled from the ``seahal.backends`` entry points (built-ins and plugins alike).

    >>> from seahal import hal
    >>> p = hal.plan("cpu")                      # resolve every op once
    >>> q, s = p.ops.fp8_act_quant(x)            # bound kernel, contract-checked
"""

from .device import resolve_device
from .errors import DeviceError, PlanError, RegistryError, SeahalError, SpecError
from .plan import BoundOp, Plan, PlanEntry, plan
from .registry import (
    Availability,
    Backend,
    Kernel,
    PlanContext,
    PluginFailure,
    backends,
    emulated_placement,
    plugin_failures,
    register_backend,
    register_kernel,
)
from .spec import OpSpec, Out, get_spec, specs

__all__ = [
    "Availability",
    "Backend",
    "BoundOp",
    "DeviceError",
    "Kernel",
    "OpSpec",
    "Out",
    "Plan",
    "PlanContext",
    "PlanEntry",
    "PlanError",
    "PluginFailure",
    "RegistryError",
    "SeahalError",
    "SpecError",
    "backends",
    "emulated_placement",
    "get_spec",
    "plan",
    "plugin_failures",
    "register_backend",
    "register_kernel",
    "resolve_device",
    "specs",
]
