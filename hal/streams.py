"""Two independent pieces of a step at once: the second on a side stream of the device.

A decode step is a chain of small kernels, most of which leave the GPU half idle (a one-token
GEMM streams its weights from a few dozen SMs; the FP4 experts' decode is bound by ALU work, not
bandwidth). Where the model has two branches that read the same inputs and meet only at a sum
(the shared expert beside the gate and the routed experts), :func:`side_by_side` issues the
second on a side stream, so that its kernels fill what the first leaves free:

    main stream:  ──fork──[ main() kernels ]──────join──▶
                      └───[ side() kernels ]──────┘
    side stream

``fork``: the side stream waits for everything issued on the current stream so far (side's inputs
are ready); ``join``: the current stream waits for everything issued on the side stream. Both are
stream-ordered events, so the same code is captured into a CUDA graph as two parallel branches
(torch's capture follows work forked onto other streams that wait on the capturing one and rejoin
before the capture ends). The kernels and their inputs are those of the sequential order, so the
results are bit for bit the same; only when each kernel runs changes.

Memory: side's intermediates are allocated and freed on the side stream (stream-ordered); its
inputs stay referenced by the caller until after the join. Its outputs are allocated on the side
stream and read on the current one after the join; when the caller frees them, the caching
allocator may hand their blocks to the side stream again, which happens only in a later
:func:`side_by_side`, whose fork first waits for the current stream's work so far, readers of the
old outputs included. That is why nothing but this function issues work on the side stream.

Opt-in (``SEAHAL_SIDE_STREAM=1``, read at each call: a graph captured with it keeps it) until a
GPU measurement shows it faster; on devices whose torch module has no streams (the CPU) the two
run one after the other. Device-generic: the stream API of ``torch.<device type>`` (``torch.cuda``,
and the same API of vendor modules such as ``torch.npu`` and ``torch.mlu``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch

SIDE_STREAM_VARIABLE = "SEAHAL_SIDE_STREAM"
"""Set to 1 to run :func:`side_by_side`'s second branch on a side stream (default: one after the other)."""

A = TypeVar("A")
B = TypeVar("B")

_SIDE_STREAMS: dict[torch.device, Any] = {}
"""One side stream per device, created at first use and kept: kernels that keep per-stream state
(the cuda backend's arrival counters) find the state an earlier, uncaptured step made, as a CUDA
graph capture needs."""


def side_streams_enabled() -> bool:
    """Whether ``SEAHAL_SIDE_STREAM=1`` is set now."""
    return os.environ.get(SIDE_STREAM_VARIABLE) == "1"


def _stream_module(device: torch.device) -> Any | None:
    """``torch.cuda`` (or a vendor's ``torch.npu`` / ``torch.mlu``) where ``device`` has streams
    and they are enabled, else None."""
    if device.type == "cpu" or not side_streams_enabled():
        return None
    module = getattr(torch, device.type, None)
    needed = ("Stream", "current_stream", "stream")
    return module if module is not None and all(hasattr(module, name) for name in needed) else None


def side_stream(device: torch.device) -> Any:
    """The side stream of ``device`` (created once; the device's torch module must have streams)."""
    stream = _SIDE_STREAMS.get(device)
    if stream is None:
        stream = _SIDE_STREAMS[device] = getattr(torch, device.type).Stream(device=device)
    return stream


def side_by_side(device: torch.device, main: Callable[[], A], side: Callable[[], B]) -> tuple[A, B]:
    """``(main(), side())``, with ``side``'s work on ``device``'s side stream beside ``main``'s.

    ``main`` and ``side`` must not depend on each other's work (neither reads what the other
    writes); each may allocate, launch kernels and return tensors. ``side`` must not drop the last
    reference to a tensor made on the current stream that its own kernels read (a lazily rebuilt
    weight, say): the caching allocator could hand that memory to ``main`` while they still run.
    Off a device with streams, or without ``SEAHAL_SIDE_STREAM=1``, they run one after the other.
    The returned tensors are ready for any later work on the current stream.
    """
    module = _stream_module(device)
    if module is None:
        return main(), side()
    if device.index is None:
        device = torch.device(device.type, module.current_device())
    current = module.current_stream(device)
    other = side_stream(device)
    other.wait_stream(current)  # fork: side's inputs are ready
    with module.stream(other):
        side_result = side()
    main_result = main()
    current.wait_stream(other)  # join
    return main_result, side_result
