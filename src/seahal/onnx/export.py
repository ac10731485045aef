"""Export the DeepSeek-V4 graph to ONNX, every HAL operator a ``seahal``-domain function node.

The exported graph is one forward step with the decode cache as explicit state: ``input_ids``
[B, S] and, for a decode step, each sequence's position ``start_pos`` ([B] int64) and every cache tensor
(``past.<name>``) in; ``logits`` [B, S, vocab] fp32 (or [B, 1, vocab]) and every updated cache
tensor (``present.<name>``) out. ``<name>`` is :meth:`seahal.model.cache.Cache.named_tensors`'s
``layers.<i>.<tensor>``. Two steps are offered: ``prefill`` (``prompt_len`` tokens from an
empty cache) and ``decode`` (one token at any position: one graph serves a generation loop).

The graph is traced by ``torch.export``: each HAL op is the opaque torch op its plan bound
(``seahal::<op>__<backend>_<kernel>``; a mutating op through a pure twin that returns the new
state), translated through ``custom_translation_table`` into a node calling the function
:func:`seahal.onnx.functions.select` picks -- domain ``seahal``, its body of standard ops carried
by the model. Everything else (embedding, norms, dense projections, cache reads and writes) is
ordinary PyTorch and becomes standard ONNX ops.

A decode step is traced with the positions as a [B] tensor (sequences of different lengths step
together): the ops taking ``start_pos`` are
called through twins that take it as a tensor (kv_compress's entries padded to the most a step
can complete, as its ONNX function returns them), and the cache
(:class:`seahal.model.cache.TracedLayerCache`) offers every compressed row to attention (masked
by index) and scatters each step's entries into their rows, so no shape or traced value depends
on the position. A prefill step passes the int position 0 and keeps the first rows, the entries
it completes.
Batch size and cache capacity are static (``metadata_props``, ``seahal.*``).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

try:
    import onnx
    import onnxscript
    from onnx.defs import OpSchema
    from onnxscript import ir
    from onnxscript.function_libs.torch_lib.ops.core import aten_bitwise_right_shift_tensor_scalar

    from . import functions as hal_functions
    from .functions import op as opset
except ImportError as exc:  # the optional dependencies of the `onnx` extra
    raise ImportError(f"ONNX export needs onnx and onnxscript (pip install 'seahal[onnx]'): {exc}") from exc

from seahal.hal import Plan
from seahal.hal.formats import E8M0_DTYPE, decode_scale
from seahal.hal.ops.compressor import new_entries
from seahal.hal.plan import BoundOp
from seahal.model import load
from seahal.model.cache import Cache
from seahal.model.transformer import MODEL_OPS, Transformer

MODES = ("prefill", "decode")
MIN_TORCH = (2, 6)
"""Older torch cannot export the step: 2.5's ``torch.export`` refuses the model's per-step
bookkeeping (a memo object made in a dataclass's default factory, ``copy.copy`` of the cache's
stores, an ``out=`` view with gaps) and its ONNX exporter finds no translation of the ``seahal``
ops (checked with 2.5.1; the exporter is tested with 2.13)."""


def require_export_torch() -> None:
    """Raise unless this torch can export the step (:data:`MIN_TORCH`)."""
    version = torch.torch_version.TorchVersion(torch.__version__)
    if version < MIN_TORCH:
        minimum = ".".join(map(str, MIN_TORCH))
        raise RuntimeError(f"ONNX export needs torch >= {minimum} (its torch.export and ONNX exporter), got torch {version}")


@dataclass(frozen=True)
class ExportedGraph:
    """What :func:`export_onnx` wrote: the file, the step it computes and its I/O names in order."""

    path: Path
    mode: str
    start_pos: int | None
    """Position of the first input token: 0 for prefill, None for decode (the graph input
    ``start_pos``)."""
    n_tokens: int
    batch_size: int
    cache_capacity: int
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    hal_nodes: Mapping[str, int]
    """Nodes per HAL op in the main graph (each a call of the op's ``seahal`` function)."""


def export_onnx(
    model_or_path: Transformer | str | os.PathLike,
    out: str | os.PathLike,
    mode: str = "prefill",
    prompt_len: int = 16,
    batch_size: int = 1,
    max_seq_len: int | None = None,
    last_only: bool = False,
    external_data: bool | None = None,
) -> ExportedGraph:
    """Export one forward step of a DeepSeek-V4 model to the ONNX file ``out``.

    ``model_or_path``: a loaded model (traced with its own plan and dtype) or a checkpoint folder
    (loaded on the CPU in fp32, every op on the ``cpu.reference`` kernel). ``mode``: ``"prefill"``
    (``prompt_len`` tokens from an empty cache) or ``"decode"`` (one token at the position the
    graph input ``start_pos`` [B] gives per sequence, the cache holding the tokens before it:
    one graph serves every step; ``prompt_len`` is unused). ``max_seq_len``: the cache capacity
    (default the model's ``max_seq_len``), which fixes the cache tensors' shapes; steps meant to
    feed each other must share it and the batch size. ``last_only``: logits of the last token
    only. ``external_data``: store the weights beside the model (default: when over 2 GB).
    """
    require_export_torch()
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    if prompt_len < 1 or batch_size < 1:
        raise ValueError(f"prompt_len and batch_size must be >= 1, got {prompt_len} and {batch_size}")
    model = model_or_path if isinstance(model_or_path, Transformer) else reference_model(model_or_path)
    capacity = max_seq_len or model.config.max_seq_len
    decode = mode == "decode"
    start, n_tokens = (None, 1) if decode else (0, prompt_len)
    if n_tokens > capacity:
        raise ValueError(f"a {mode} step of {n_tokens} tokens needs max_seq_len >= {n_tokens}, got {capacity}")

    layout = Cache.new(model.config, batch_size, capacity, model.dtype, "meta", model.ops)
    names = list(layout.named_tensors())
    inputs = ["input_ids"] + (["start_pos", *(f"past.{n}" for n in names)] if decode else [])
    outputs = ["logits"] + [f"present.{n}" for n in names]
    example = [torch.zeros(batch_size, n_tokens, dtype=torch.long, device=model.device)]
    if decode:  # the positions' values are irrelevant: nothing traced depends on them
        example.append(torch.zeros(batch_size, dtype=torch.long, device=model.device))
        example += [torch.zeros(t.shape, dtype=t.dtype, device=model.device) for t in layout.named_tensors().values()]

    with _pure_bindings(model.plan, positional=decode) as bindings, _decoded_scales(model):
        program = torch.export.export(_Step(model, layout, decode, last_only), tuple(example))
    hal_nodes = _hal_nodes(program, bindings)
    table = {torch_op: _translation(op, torch_op) for torch_op, op in bindings.items() if op in hal_nodes}
    table.update(_ATEN_FIXES)
    onnx_program = torch.onnx.export(
        program, dynamo=True, custom_translation_table=table, input_names=inputs, output_names=outputs,
        opset_version=hal_functions.OPSET, optimize=False, verbose=False,
    )
    _attach_functions(onnx_program.model)
    props = onnx_program.model.metadata_props
    props.update({
        "seahal.mode": mode,
        **({} if decode else {"seahal.start_pos": str(start)}),
        "seahal.n_tokens": str(n_tokens),
        "seahal.batch_size": str(batch_size),
        "seahal.cache_capacity": str(capacity),
        "seahal.last_only": str(last_only),
        "seahal.config": json.dumps(model.config.to_dict()),
    })
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx_program.save(path, external_data=external_data)
    return ExportedGraph(path, mode, start, n_tokens, batch_size, capacity, tuple(inputs), tuple(outputs), hal_nodes)


def reference_model(path: str | os.PathLike, **overrides: Any) -> Transformer:
    """The checkpoint on the CPU in fp32 with every op on its ``cpu.reference`` kernel, the source
    graph of an export; ``overrides`` replace config fields (e.g. ``cache_format="fp8"``)."""
    environ = {"SEAHAL_OPS": ",".join(f"{op}=cpu.reference" for op in MODEL_OPS)}
    return load(path, device="cpu", dtype=torch.float32, announce=False, environ=environ, **overrides)


def main(args: argparse.Namespace) -> int:
    """``seahal export-onnx``: see :func:`export_onnx` for the arguments."""
    from seahal.model.tiny import default_checkpoint

    path = Path(args.model) if args.model else default_checkpoint()[0]
    overrides = {"cache_format": args.cache_format} if args.cache_format else {}
    start = time.perf_counter()
    graph = export_onnx(
        reference_model(path, **overrides), args.out, args.mode, args.prompt_len, args.batch_size,
        args.max_seq_len, args.last_only, True if args.external_data else None,
    )
    ops = ", ".join(f"{op} x{n}" for op, n in sorted(graph.hal_nodes.items()))
    print(f"wrote {graph.path} ({graph.path.stat().st_size / 2**20:.1f} MiB) in {time.perf_counter() - start:.1f} s")
    where = "the position input start_pos" if graph.start_pos is None else f"position {graph.start_pos}"
    print(
        f"{graph.mode}: {graph.n_tokens} token(s) at {where}, batch {graph.batch_size}, "
        f"cache capacity {graph.cache_capacity}; {len(graph.inputs)} inputs, {len(graph.outputs)} outputs"
    )
    print(f"seahal nodes: {ops}")
    return 0


class _Step(nn.Module):
    """One forward step with explicit cache state -> logits and the present cache tensors.

    Prefill: ``input_ids`` from an empty cache. Decode: ``input_ids``, ``start_pos`` ([B] int64)
    and the past cache tensors, cloned before the model writes them (the traced graph is pure)
    into a cache whose positions are that tensor (:class:`seahal.model.cache.TracedLayerCache`).
    """

    def __init__(self, model: Transformer, layout: Cache, decode: bool, last_only: bool):
        super().__init__()
        self.model, self.layout, self.decode, self.last_only = model, layout, decode, last_only

    def forward(self, input_ids: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.decode:
            start_pos, *past = state
            named = dict(zip(self.layout.named_tensors(), (t.clone() for t in past)))
            cache = self.layout.with_tensors(named, start_pos)
        else:
            cache = self.model.new_cache(input_ids.shape[0], self.layout.capacity)
        logits = self.model(input_ids, cache=cache, last_only=self.last_only)
        return (logits, *cache.named_tensors().values())


@contextlib.contextmanager
def _decoded_scales(model: nn.Module) -> Iterator[None]:
    """While tracing, hold every e8m0 block scale decoded to fp32 (``2^(e-127)``, exact): the
    exporter has no e8m0 element type, and the seahal functions take fp32 scales."""
    saved = []
    for module in model.modules():
        for name, value in list(vars(module).items()) + list(module._buffers.items()):
            if isinstance(value, torch.Tensor) and value.dtype == E8M0_DTYPE:
                saved.append((module, name, value))
                setattr(module, name, decode_scale(value))
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


# --------------------------------------------------------------------------------------------
# HAL ops as pure torch ops
# --------------------------------------------------------------------------------------------

_PURE_LIB = torch.library.Library("seahal_pure", "FRAGMENT")
_PURE_OPS: dict[str, torch._ops.OpOverload] = {}

_INT_POSITION_ROWS = {
    op: lambda call: new_entries(call["start_pos"], call["kv"].shape[1], call["ratio"])
    for op in ("kv_compress", "kv_compress_fp8")
}
"""HAL ops whose first output's row count depends on ``start_pos``: their ONNX functions return
the rows of a tensor position (the most any position gives, zeros after the new ones), of which a
call at an int position keeps this many (kv_compress: tokens [p, p+S) complete
floor((p+S)/m) - floor(p/m) <= ceil(S/m) entries)."""


def _pure_op(bound: BoundOp, positional: bool) -> torch._ops.OpOverload:
    """``seahal_pure::<kernel op>``: a kernel op as a pure one, returning its outputs and then the
    new value of each argument in ``spec.mutates`` (the inputs are left untouched).

    ONNX values are immutable, so the op's ONNX function returns the updated state the same way.
    ``positional``: the op's tensor-position twin (``BoundOp.position_op``, ``..._at``), so the
    traced graph takes the position as data (an output whose rows depend on it padded to the most).
    """
    spec = bound.spec
    kernel_op = bound.position_op if positional else bound.torch_op
    name = kernel_op._schema.name.split("::")[1]
    if name in _PURE_OPS:
        return _PURE_OPS[name]
    arg_names = [a.name for a in kernel_op._schema.arguments]
    outs = [str(r.type) for r in kernel_op._schema.returns] + ["Tensor"] * len(spec.mutates)
    schema = spec.position_schema if positional else spec.schema
    signature = re.sub(r"\(\w!\)", "", schema.rpartition("->")[0]).strip()

    def named(args: tuple, kwargs: dict) -> dict[str, Any]:
        return {**dict(zip(arg_names, args)), **kwargs}

    def impl(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, ...]:
        call = named(args, kwargs)
        call.update({m: call[m].clone() for m in spec.mutates})
        results = _as_tuple(kernel_op(**call))
        return _single_or_tuple((*results, *(call[m] for m in spec.mutates)))

    def fake(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, ...]:
        call = named(args, kwargs)
        results = _as_tuple(spec.fake(**call))
        return _single_or_tuple((*results, *(torch.empty_like(call[m]) for m in spec.mutates)))

    _PURE_LIB.define(f"{name}{signature} -> ({', '.join(outs)})")
    _PURE_LIB.impl(name, impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"seahal_pure::{name}", fake, lib=_PURE_LIB)
    _PURE_OPS[name] = getattr(torch.ops.seahal_pure, name).default
    return _PURE_OPS[name]


def _as_tuple(out: Any) -> tuple:
    return () if out is None else out if isinstance(out, tuple) else (out,)


def _single_or_tuple(results: tuple) -> Any:
    """What an op with ``len(results)`` returns: a schema's one ``(Tensor)`` is a bare tensor."""
    return results[0] if len(results) == 1 else results


class _PureCall:
    """Calls an op through its pure form (:func:`_pure_op`), then copies the new state into the
    arguments: ``torch.export`` functionalises the copies, so the traced graph holds only the pure
    op. ``positional``: ``start_pos`` is a tensor."""

    def __init__(self, bound: BoundOp, positional: bool):
        self.bound, self.pure_op = bound, _pure_op(bound, positional)
        self.arg_names = [a.name for a in bound.torch_op._schema.arguments]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        call = {**dict(zip(self.arg_names, args)), **kwargs}
        self.bound.spec.contract(**call)
        results = _as_tuple(self.pure_op(**call))
        mutates = self.bound.spec.mutates
        for name, value in zip(mutates, results[len(results) - len(mutates) :]):
            call[name].copy_(value)
        outs = results[: len(results) - len(mutates)]
        return outs[0] if len(outs) == 1 else outs or None


@contextlib.contextmanager
def _pure_bindings(plan: Plan, positional: bool) -> Iterator[dict[torch._ops.OpOverload, str]]:
    """While tracing, bind the plan's mutating ops (and, ``positional``, those taking
    ``start_pos``) to :class:`_PureCall`; yields {torch op: HAL op} for every op the traced graph
    may call."""
    bindings, saved = {}, {}
    for op in plan.entries:
        bound = plan[op]
        takes_position = positional and bound.spec.position is not None
        if bound.spec.mutates or takes_position:
            saved[op] = bound
            pure = _PureCall(bound, takes_position)
            setattr(plan.ops, op, pure)
            bindings[pure.pure_op] = op
        else:
            bindings[bound.torch_op] = op
    try:
        yield bindings
    finally:
        for op, bound in saved.items():
            setattr(plan.ops, op, bound)


# --------------------------------------------------------------------------------------------
# Torch op -> seahal ONNX function
# --------------------------------------------------------------------------------------------


def _hal_nodes(program: torch.export.ExportedProgram, bindings: Mapping[torch._ops.OpOverload, str]) -> dict[str, int]:
    """Count the traced HAL op calls; every one needs an ONNX function."""
    counts: dict[str, int] = {}
    for node in program.graph.nodes:
        if node.op == "call_function" and node.target in bindings:
            op = bindings[node.target]
            counts[op] = counts.get(op, 0) + 1
    missing = sorted(op for op in counts if op not in hal_functions.OPS)
    if missing:
        raise NotImplementedError(f"no ONNX function for HAL op(s) {missing} in seahal.onnx.functions")
    return counts


def _translation(op: str, torch_op: torch._ops.OpOverload) -> Callable[..., Any]:
    """The ``custom_translation_table`` entry of ``torch_op``: one ``seahal`` node calling the
    function :func:`seahal.onnx.functions.select` picks for the call's arguments, with the
    inputs and attributes that function's calling convention names (schema defaults filled in).

    The node is a plain custom-domain node while torch converts the graph -- torch's opset
    conversion would inline a function it knew -- and the definitions are attached after.
    """
    schema = torch_op._schema
    names = [a.name for a in schema.arguments]
    defaults = {a.name: a.default_value for a in schema.arguments if a.has_default_value()}
    positional = any(a.name == "start_pos" and str(a.type) == "Tensor" for a in schema.arguments)
    keep = None if positional else _INT_POSITION_ROWS.get(op)

    def translate(*args: Any, **kwargs: Any) -> Any:
        call = {**defaults, **dict(zip(names, args)), **kwargs}
        function = hal_functions.select(op, call)
        node = _node_op(function, schema)
        outputs = node(*(call[name] for name in function.inputs), **function.attribute_values(call))
        if keep:
            outputs = (_first_rows(outputs[0], keep(call)), *outputs[1:])
        return outputs

    translate.__name__ = f"seahal_{op}"
    return translate


_ANY_TENSOR = [f"tensor({name.lower()})" for name, code in onnx.TensorProto.DataType.items() if code]
_ATTRIBUTE_TYPES = {"int": OpSchema.AttrType.INT, "float": OpSchema.AttrType.FLOAT, "str": OpSchema.AttrType.STRING}


@functools.cache
def _node_op(function: hal_functions.OpFunction, schema: torch.FunctionSchema) -> onnxscript.values.Op:
    """``seahal::<function>`` as an onnxscript op following its calling convention: tensor inputs
    of any type (an integer argument, e.g. start_pos, an int64 scalar or [B]), attributes typed as the
    torch schema types them (bool and ScalarType as INT), ``n_outputs`` outputs."""
    arguments = {a.name: a for a in schema.arguments}
    inputs = [
        (name, ["tensor(int64)"] if arguments[name].type.annotation_str == "int" else _ANY_TENSOR)
        for name in function.inputs
    ]
    attributes = []
    for name in function.attributes:
        kind = arguments[name].type.annotation_str.removeprefix("Optional[").removesuffix("]")
        attributes.append((name, _ATTRIBUTE_TYPES.get(kind, OpSchema.AttrType.INT)))
    return _custom_op(hal_functions.DOMAIN, function.name, inputs, attributes, function.n_outputs)


def _custom_op(
    domain: str, name: str, inputs: list[tuple[str, list[str]]], attributes: list[tuple[str, Any]], n_outputs: int
) -> onnxscript.values.Op:
    """An onnxscript op for the custom node ``domain::name`` with an ``OpSchema`` of its inputs
    (name, allowed types), optional attributes (name, type) and outputs (any tensor type): called
    while torch translates, it records a plain node (no function, nothing torch would inline)."""
    constraints = [(f"T_{n}", types, "") for n, types in inputs]
    constraints += [(f"T_out{i}", _ANY_TENSOR, "") for i in range(n_outputs)]
    op_schema = OpSchema(
        name, domain, 1,
        inputs=[OpSchema.FormalParameter(n, f"T_{n}") for n, _ in inputs],
        outputs=[OpSchema.FormalParameter(f"out{i}", f"T_out{i}") for i in range(n_outputs)],
        type_constraints=constraints,
        attributes=[OpSchema.Attribute(n, t, required=False) for n, t in attributes],
    )
    return onnxscript.values.Op(onnxscript.values.Opset(domain, 1), name, op_schema)


def _first_rows(x: Any, rows: int) -> Any:
    """x [B, n, ...] -> x[:, :rows] (what a :data:`_INT_POSITION_ROWS` op returns at an int position)."""
    starts, ends, axes = (opset.Constant(value_ints=[v]) for v in (0, rows, 1))
    return opset.Slice(x, starts, ends, axes)


def _right_shift(x: Any, shift: int) -> Any:
    """``x >> shift`` for an integer tensor and a Python int. Unsigned types (the model shifts
    packed FP4 bytes) get a logical ``BitShift`` in their own type: torchlib's translation (onnxscript
    0.7) returns the signed type of the same width there, which the checker rejects."""
    if x.dtype.is_signed():
        return aten_bitwise_right_shift_tensor_scalar(x, shift)
    return opset.BitShift(x, opset.Constant(value=ir.tensor(shift, dtype=x.dtype)), direction="RIGHT")


def _view_as_dtype(x: Any, dtype: int) -> Any:
    """``x.view(dtype)``: torchlib has no translation; the model only reinterprets a tensor as its
    own dtype (FP4 cache scales, already uint8, through ``decode_scale``), an identity."""
    if dtype != x.dtype:
        raise NotImplementedError(f"reinterpreting {x.dtype} as {ir.DataType(dtype)} has no ONNX translation here")
    return opset.Identity(x)


def _frexp(x: Any) -> tuple[Any, Any]:
    """``torch.frexp`` (``x = m 2^e``, ``0.5 <= |m| < 1``; 0 gives (0, 0)) for fp32 x, which ONNX
    lacks: e = floor(log2 |x|) + 1 from the seahal.lib helpers, exact (FP4 cache scales are
    encoded to e8m0 through it)."""
    floor_log2 = _custom_op(hal_functions.LIB_DOMAIN, "floor_log2", [("mag", ["tensor(float)"])], [], 1)
    pow2 = _custom_op(hal_functions.LIB_DOMAIN, "pow2", [("e", ["tensor(int64)"])], [], 1)
    mag = opset.Abs(x)
    e = opset.Where(opset.Equal(mag, 0.0), 0, opset.Add(floor_log2(mag), 1))
    return opset.Div(x, pow2(e)), opset.Cast(e, to=onnx.TensorProto.INT32)


_ATEN_FIXES = {
    torch.ops.prims.frexp.default: _frexp,
    torch.ops.aten.__rshift__.Scalar: _right_shift,
    torch.ops.aten.bitwise_right_shift.Tensor_Scalar: _right_shift,
    torch.ops.aten.view.dtype: _view_as_dtype,
}
"""Translations of ordinary torch ops the model uses where torchlib (onnxscript 0.7) has none or
a wrong one."""


def _attach_functions(model: ir.Model) -> None:
    """Give ``model`` every ``seahal`` / ``seahal.lib`` function definition and their opset imports
    (what :func:`seahal.onnx.functions.complete_model` does for a ``ModelProto``)."""
    for proto in hal_functions.function_protos():
        model.functions[(proto.domain, proto.name, proto.overload)] = ir.serde.deserialize_function(proto)
    for domain in (hal_functions.DOMAIN, hal_functions.LIB_DOMAIN):
        model.opset_imports[domain] = 1
