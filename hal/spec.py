"""Operator specs: the contract of one op, shared by every backend.

An :class:`OpSpec` owns the op's name, its torch schema, and its *contract*: a function that
validates a call's arguments (raising :class:`~seahal.hal.errors.SpecError` that names the
argument) and returns the metadata of the outputs. The same contract is the op's fake (meta)
implementation, so shape rules are written once and ``torch.compile`` / ``torch.export`` trace
through every kernel.

Each kernel a backend registers becomes its own ``torch.library`` op, ``seahal::<op>__<backend>_<kernel>``,
with the spec's schema and fake; a plan binds that op once, so a call costs the contract check and
one dispatcher call, never a registry lookup.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from .errors import RegistryError


class Out(NamedTuple):
    """Metadata of one output: the contract returns these instead of tensors."""

    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class OpSpec:
    """The contract of one operator.

    ``schema`` is the torch argument/return schema without the op name, e.g.
    ``"(Tensor a, Tensor b) -> Tensor"``; ``contract(*args, **kwargs)`` validates and returns an
    :class:`Out` (or a tuple of them; ``()`` for an op that only mutates its ``mutates`` args).
    """

    name: str
    family: str
    schema: str
    contract: Callable[..., Any] = field(repr=False)
    mutates: tuple[str, ...] = ()

    @property
    def doc(self) -> str:
        return self.contract.__doc__ or ""

    @property
    def summary(self) -> str:
        return self.doc.strip().splitlines()[0] if self.doc.strip() else self.name

    def check(self, *args: Any, **kwargs: Any) -> Any:
        """Validate a call; returns the output metadata."""
        return self.contract(*args, **kwargs)

    def fake(self, *args: Any, **kwargs: Any) -> Any:
        """Empty outputs with the right shapes and dtypes on the inputs' device."""
        meta = self.contract(*args, **kwargs)
        device = _first_device(args, kwargs)
        if isinstance(meta, Out):
            return torch.empty(meta.shape, dtype=meta.dtype, device=device)
        if not meta:
            return None
        return tuple(torch.empty(m.shape, dtype=m.dtype, device=device) for m in meta)


_SPECS: dict[str, OpSpec] = {}


def define_op(name: str, *, family: str, schema: str, mutates: tuple[str, ...] = ()):
    """Decorator that turns a contract function into a registered :class:`OpSpec`."""

    def wrap(contract: Callable[..., Any]) -> OpSpec:
        if name in _SPECS:
            raise RegistryError(f"op {name!r} is defined twice")
        spec = OpSpec(name=name, family=family, schema=schema, contract=contract, mutates=mutates)
        _SPECS[name] = spec
        return spec

    return wrap


def specs() -> dict[str, OpSpec]:
    """Every op spec, by name (importing the op modules on first use)."""
    from . import ops  # noqa: F401  (defines the specs)

    return dict(_SPECS)


def get_spec(name: str) -> OpSpec:
    all_specs = specs()
    if name not in all_specs:
        raise KeyError(f"unknown op {name!r}; known ops: {', '.join(sorted(all_specs))}")
    return all_specs[name]


def _first_device(args: tuple, kwargs: dict) -> torch.device:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------
# Binding kernels as torch.library ops
# --------------------------------------------------------------------------------------------

_LIB = torch.library.Library("seahal", "FRAGMENT")
_TORCH_OPS: dict[str, tuple[Callable[..., Any], Any]] = {}


def torch_op_name(op: str, backend: str, kernel: str) -> str:
    """``fp8_gemm__cpu_native``: a valid torch op name for one kernel."""
    raw = f"{op}__{backend}_{kernel}"
    return re.sub(r"[^0-9A-Za-z_]", "_", raw)


def as_torch_op(spec: OpSpec, backend: str, kernel: str, fn: Callable[..., Any]):
    """Register ``fn`` as the torch op ``seahal::<op>__<backend>_<kernel>`` and return its overload.

    The op's fake is the spec's contract. torch ops cannot be redefined, so a kernel re-registered
    under the same name with a different function gets a fresh name (``..._v2``) instead of
    silently running the first function.
    """
    base = torch_op_name(spec.name, backend, kernel)
    name, version = base, 1
    while name in _TORCH_OPS:
        known_fn, op = _TORCH_OPS[name]
        if known_fn is fn:
            return op
        version += 1
        name = f"{base}_v{version}"
    _LIB.define(name + spec.schema)
    _LIB.impl(name, fn, "CompositeExplicitAutograd")
    torch.library.register_fake(f"seahal::{name}", spec.fake, lib=_LIB)
    op = getattr(torch.ops.seahal, name).default
    _TORCH_OPS[name] = (fn, op)
    return op
