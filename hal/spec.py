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
    position: str | None = None
    """The ``int`` argument holding a token position that may also be passed as an integer tensor
    on the op's device (``start_pos``), 0-d or one position per sequence ([B]): the position as
    data, so that one captured CUDA graph, or one traced graph, serves every position, and
    sequences at different positions run in one call. The contract then describes outputs whose
    row count depends on the position at its largest, valid rows first and zeros after."""

    @property
    def doc(self) -> str:
        return self.contract.__doc__ or ""

    @property
    def summary(self) -> str:
        return self.doc.strip().splitlines()[0] if self.doc.strip() else self.name

    @property
    def position_schema(self) -> str:
        """The schema with the position argument a ``Tensor`` (see :attr:`position`)."""
        if self.position is None:
            raise RegistryError(f"op {self.name!r} has no position argument")
        return self.schema.replace(f"int {self.position}", f"Tensor {self.position}")

    def position_index(self) -> int:
        """The position argument's index among the schema's arguments."""
        arguments = torch._C.parse_schema(f"op{self.schema}").arguments
        return [a.name for a in arguments].index(self.position)

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


def define_op(
    name: str, *, family: str, schema: str, mutates: tuple[str, ...] = (), position: str | None = None
):
    """Decorator that turns a contract function into a registered :class:`OpSpec`."""

    def wrap(contract: Callable[..., Any]) -> OpSpec:
        if name in _SPECS:
            raise RegistryError(f"op {name!r} is defined twice")
        if position is not None and f"int {position}" not in schema:
            raise RegistryError(f"op {name!r}: position argument {position!r} is not an int of its schema")
        spec = OpSpec(
            name=name, family=family, schema=schema, contract=contract, mutates=mutates, position=position
        )
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


def as_torch_op(spec: OpSpec, backend: str, kernel: str, fn: Callable[..., Any], positional: bool = False):
    """Register ``fn`` as the torch op ``seahal::<op>__<backend>_<kernel>`` and return its overload.

    ``positional``: the op's twin taking its position argument as a tensor
    (``seahal::<op>__<backend>_<kernel>_at``, schema :attr:`OpSpec.position_schema`). The op's fake
    is the spec's contract. torch ops cannot be redefined, so a kernel re-registered under the
    same name with a different function gets a fresh name (``..._v2``) instead of silently running
    the first function.
    """
    base = torch_op_name(spec.name, backend, kernel) + ("_at" if positional else "")
    name, version = base, 1
    while name in _TORCH_OPS:
        known_fn, op = _TORCH_OPS[name]
        if known_fn is fn:
            return op
        version += 1
        name = f"{base}_v{version}"
    _LIB.define(name + (spec.position_schema if positional else spec.schema))
    _LIB.impl(name, fn, "CompositeExplicitAutograd")
    torch.library.register_fake(f"seahal::{name}", spec.fake, lib=_LIB)
    op = getattr(torch.ops.seahal, name).default
    _TORCH_OPS[name] = (fn, op)
    return op


def bound_function(op: Any) -> Callable[..., Any] | None:
    """The Python function behind ``op`` when :func:`as_torch_op` registered it, else None."""
    name = op.name() if hasattr(op, "name") else ""
    known = _TORCH_OPS.get(name.removeprefix("seahal::"))
    return known[0] if known is not None and known[1] is op else None


_HOST_POSITION: dict[tuple[str, Callable[..., Any]], Callable[..., Any]] = {}


def position_on_host(spec: OpSpec, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn``, a kernel taking the position as an int, behind the tensor-position calling
    convention: the position is read on the host (a device sync: such a call cannot be captured in
    a CUDA graph) and outputs are zero-padded to the rows the contract gives a tensor position.
    Per-sequence positions must all be equal (one int serves the batch). One wrapper per kernel
    function (its torch op is registered once)."""
    key = (spec.name, fn)
    if key not in _HOST_POSITION:
        _HOST_POSITION[key] = _read_position_on_host(spec, fn)
    return _HOST_POSITION[key]


def _read_position_on_host(spec: OpSpec, fn: Callable[..., Any]) -> Callable[..., Any]:
    index = spec.position_index()
    kernel = getattr(fn, "__qualname__", "kernel")

    def one_position(value: torch.Tensor) -> int:
        positions = set(value.reshape(-1).tolist())
        if len(positions) > 1:
            raise NotImplementedError(
                f"{spec.name}: kernel {kernel} takes one {spec.position} for the whole batch, got per-sequence "
                f"positions {sorted(positions)[:8]}; a kernel registered with device_position=True takes them"
            )
        return positions.pop() if positions else 0

    def call(*args: Any, **kwargs: Any) -> Any:
        meta = spec.contract(*args, **kwargs)
        if spec.position in kwargs:
            kwargs = {**kwargs, spec.position: one_position(kwargs[spec.position])}
        else:
            args = (*args[:index], one_position(args[index]), *args[index + 1 :])
        result = fn(*args, **kwargs)
        if isinstance(result, torch.Tensor):
            return _zero_padded(result, meta.shape)
        if result is None:
            return None
        return tuple(_zero_padded(r, m.shape) for r, m in zip(result, meta))

    call.__name__ = call.__qualname__ = f"{getattr(fn, '__name__', 'kernel')}_position_on_host"
    return call


def _zero_padded(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    if tuple(t.shape) == tuple(shape):
        return t
    padded = t.new_zeros(shape)
    padded[tuple(slice(0, n) for n in t.shape)] = t
    return padded
