"""HAL ops through onnxruntime: one InferenceSession per (function, attributes, input types,
execution providers), built on first use from a one-node model in the ``seahal`` domain (ORT
inlines the function body, or hands the node to an execution provider that claims it).

Data crosses the boundary as host memory, without copies for CPU tensors: torch tensors are
wrapped as OrtValues (IOBinding), outputs are preallocated from the op's contract and written by
ORT in place. Types numpy lacks travel as same-width views tagged with their ONNX type: bf16 as
int16 bits (BFLOAT16), FP8 e4m3 as uint8 bits (FLOAT8E4M3FN). e8m0 block scales are decoded to
fp32 first (``2^(e-127)``, exact), since the functions' opset (21) predates the e8m0 type.
Tensors on an accelerator are staged through host memory (correct, not fast). A pool of cache
rows expanded over the batch (attention's kv or records with batch stride 0: a paged cache) is
handed over once, not copied per sequence (``OpFunction.shared_batch``).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from typing import Any

import onnxruntime as ort
import torch
from onnx import TensorProto, helper

from seahal.hal.formats import E8M0_DTYPE, decode_scale
from seahal.hal.spec import Out, get_spec
from seahal.onnx.functions import OpFunction, node_model, select

PROVIDERS_VARIABLE = "SEAHAL_ORT_PROVIDERS"
"""Comma-separated execution providers to use instead of the device's default, e.g.
``MyChipExecutionProvider,CPUExecutionProvider``."""

DEVICE_PROVIDERS = {"cuda": "CUDAExecutionProvider", "npu": "CANNExecutionProvider"}
"""The execution provider for tensors of a torch device type; CPU tensors use CPUExecutionProvider."""

_BIT_VIEWS = {
    torch.bfloat16: (torch.int16, TensorProto.BFLOAT16),
    torch.float8_e4m3fn: (torch.uint8, TensorProto.FLOAT8E4M3FN),
}


def providers(device_type: str, environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """Execution providers for tensors of ``device_type``, in preference order: ``$SEAHAL_ORT_PROVIDERS``
    if set, else the device's provider (CUDA, CANN) then CPU, or CPU alone for CPU tensors.

    Raises RuntimeError naming the missing providers and the ones this onnxruntime build has.
    """
    environ = os.environ if environ is None else environ
    override = environ.get(PROVIDERS_VARIABLE, "").strip()
    if override:
        wanted = tuple(p.strip() for p in override.split(",") if p.strip())
    elif device_type in DEVICE_PROVIDERS:
        wanted = (DEVICE_PROVIDERS[device_type], "CPUExecutionProvider")
    else:
        wanted = ("CPUExecutionProvider",)
    available = ort.get_available_providers()
    missing = [p for p in wanted if p not in available]
    if missing:
        source = f"{PROVIDERS_VARIABLE}={override}" if override else f"{device_type} tensors"
        raise RuntimeError(
            f"onnxruntime {ort.__version__} lacks {', '.join(missing)} (wanted for {source}); "
            f"this build has {', '.join(available)}"
        )
    return wanted


def _host(value: torch.Tensor, shared_batch: bool = False) -> torch.Tensor:
    """A contiguous CPU tensor with an ONNX-representable dtype (e8m0 scales decoded to fp32).
    ``shared_batch`` (an input the function also takes with batch 1): a batch of views of one
    tensor (batch stride 0, e.g. a pool of cache rows expanded over the batch) becomes that one
    tensor, not B contiguous copies."""
    t = value.detach()
    if shared_batch and t.dim() and t.shape[0] > 1 and t.stride(0) == 0:
        t = t[:1]
    if t.dtype == E8M0_DTYPE:
        t = decode_scale(t)
    return t.cpu().contiguous()


def _element_type(t: torch.Tensor) -> int:
    if t.dtype in _BIT_VIEWS:
        return _BIT_VIEWS[t.dtype][1]
    return helper.np_dtype_to_tensor_dtype(t.numpy().dtype)


def _ort_value(t: torch.Tensor) -> ort.OrtValue:
    """An OrtValue sharing the memory of the contiguous CPU tensor ``t``."""
    if t.dtype in _BIT_VIEWS:
        view, onnx_type = _BIT_VIEWS[t.dtype]
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(t.view(view).numpy(), onnx_type)
    return ort.OrtValue.ortvalue_from_numpy(t.numpy())


@functools.cache
def _session(function: OpFunction, attributes: tuple, types: tuple[tuple[tuple[int, int], ...], ...], eps: tuple[str, ...]):
    """The session of one node model; ``types``: (inputs, outputs) as (ONNX element type, rank)."""
    model = node_model(function, types[0], types[1], dict(attributes))
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    return ort.InferenceSession(model.SerializeToString(), options, providers=list(eps))


def _outputs(op: str, args: Mapping[str, Any]) -> list[Out]:
    """The op's outputs as its contract describes them for ``args``."""
    meta = get_spec(op).check(**args)
    return [meta] if isinstance(meta, Out) else list(meta)


def _output_buffers(op: str, args: Mapping[str, Any], function: OpFunction) -> list[torch.Tensor]:
    """Host tensors for the node's outputs: the op's outputs, then the new values of the
    arguments it mutates."""
    buffers = [torch.empty(m.shape, dtype=m.dtype) for m in _outputs(op, args)]
    return buffers + [torch.empty(args[name].shape, dtype=args[name].dtype) for name in function.mutates]


def run(op: str, args: Mapping[str, Any]) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Run HAL op ``op`` on ``args`` (every argument by name) through onnxruntime; mutated
    arguments are updated in place, outputs are fresh tensors on the inputs' device.

    The functions take an op's position (``OpSpec.position``) as an input and return the rows a
    tensor position gives (kv_compress: the most any position completes, zeros after the new
    ones): an int position is fed as such, the outputs sized as for it as a tensor, then cut to
    the shapes the int's contract gives (a store op's function stores as many rows as its slots
    name: kv_compress_store)."""
    function = select(op, args)
    device = next(v.device for v in args.values() if isinstance(v, torch.Tensor))
    position = get_spec(op).position
    int_position = position is not None and not isinstance(args[position], torch.Tensor)
    feeds = {
        name: _host(args[name], name in function.shared_batch) if isinstance(args[name], torch.Tensor)
        else torch.tensor(args[name], dtype=torch.int64)
        for name in function.inputs
    }
    attributes = tuple(sorted(function.attribute_values(args).items()))
    # outputs sized as for a tensor position, cut below; an op with none of its own (kv_compress_store,
    # whose slots are as many as the int position's rows) is checked as called
    sized_as_tensor = int_position and not get_spec(op).schema.endswith("-> ()")
    as_tensor = {**args, position: torch.tensor(args[position], device=device)} if sized_as_tensor else args
    buffers = _output_buffers(op, as_tensor, function)
    types = tuple(tuple((_element_type(t), t.dim()) for t in group) for group in (feeds.values(), buffers))
    session = _session(function, attributes, types, providers(device.type))

    binding = session.io_binding()
    for name, t in feeds.items():
        binding.bind_ortvalue_input(name, _ort_value(t))
    for i, t in enumerate(buffers):
        binding.bind_ortvalue_output(f"out{i}", _ort_value(t))
    session.run_with_iobinding(binding)

    n_results = len(buffers) - len(function.mutates)
    for name, new in zip(function.mutates, buffers[n_results:]):
        args[name].copy_(new)
    results = buffers[:n_results]
    if int_position:
        results = [t[tuple(map(slice, out.shape))].contiguous() for t, out in zip(results, _outputs(op, args))]
    results = tuple(t.to(device) for t in results)
    return results[0] if len(results) == 1 else results
