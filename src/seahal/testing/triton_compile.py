"""Compiling Triton kernels for a GPU on a machine without one: the launches a wrapper makes, to PTX.

The interpreter (:mod:`seahal.testing.triton_interpreter`) checks what a kernel computes, not that
it compiles: it accepts code the GPU compiler rejects (and runs kernels with the interpreter's
small CPU launch configs). This module closes that gap in two steps:

1. :func:`capture_launches` runs a backend's Python wrappers as if on an H100: tensors made for
   ``"cuda"`` are meta tensors that report ``cuda:0``, the CUDA device queries answer for an H100,
   and each ``kernel[grid](...)`` is recorded instead of run. The wrappers pick their GPU launch
   configs; no memory is allocated and nothing is launched.
2. :func:`compile_launch` hands a recorded launch to Triton's compiler for a :class:`GPUTarget`
   (default sm_90) with the same specialisation a real launch would get (argument types, 16-byte
   alignment, integer constants), through to ptxas, and returns the PTX or the compiler's error,
   with the registers, stack (spill) bytes and shared memory the compiled kernel uses, from which
   :meth:`CompileResult.resident_programs` says how many of its programs one SM holds at once.

Triton's wheel bundles ptxas and cuobjdump (``triton/backends/nvidia/bin``), so this runs on any CPU machine with
``pip install triton``. It relies on two private pieces of Triton's launcher (the binder from
``create_function_from_signature`` and ``JITFunction._pack_args``), checked with Triton 3.9.
Meta tensors have data pointer 0: every argument counts as 16-byte aligned, as fresh CUDA
allocations are.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import re
import subprocess
import tempfile
import types
from collections.abc import Iterator
from typing import Any
from unittest import mock

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

H100_SMS = 132
"""Multiprocessors of an H100 SXM: what the wrappers' launch heuristics see while capturing."""


@dataclasses.dataclass(frozen=True)
class SMLimits:
    """What one SM shares among the programs (thread blocks) resident on it."""

    registers: int = 65536
    shared_bytes: int = 228 * 1024
    shared_reserved_per_block: int = 1024
    """Shared memory the runtime takes per resident block (sm_80 onwards)."""
    threads: int = 2048
    blocks: int = 32
    register_unit: int = 256
    """Registers are allocated per warp in units of this many."""


SM90 = SMLimits()
"""An H100 / H200 SM (CUDA's occupancy tables for compute capability 9.0)."""


@dataclasses.dataclass
class Launch:
    """One recorded ``kernel[grid](*args, **kwargs)``."""

    kernel: Any
    """The ``triton.runtime.jit.JITFunction``."""
    args: tuple
    kwargs: dict
    grid: Any

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    def describe(self) -> str:
        """The kernel and its constexprs / launch options, e.g. ``_kernel(BLOCK_M=64, num_warps=4)``."""
        options = ", ".join(f"{k}={v}" for k, v in self.kwargs.items())
        return f"{self.name}({options})"


@dataclasses.dataclass
class CompileResult:
    """What compiling one launch gave: PTX and the kernel's shared memory bytes, or the compiler's error."""

    launch: Launch
    ptx: str | None = None
    error: str | None = None
    shared_bytes: int | None = None
    """Shared memory a program asks for at launch (Triton's dynamic shared memory)."""
    registers: int | None = None
    """Registers a thread uses, as ptxas allocated them (255 at most)."""
    stack_bytes: int | None = None
    """Per-thread stack frame: registers spilled to local memory, and local arrays."""
    loop_barriers: int | None = None
    """``BAR.SYNC`` instructions in the kernel's longest loop (sm_90 SASS): the block-wide barriers
    a streaming loop waits on every step, layout conversions through shared memory among them."""
    loop_byte_loads: int | None = None
    """One-byte shared-memory loads (``LDS.U8`` / ``LDS.S8``) in the kernel's longest loop: a lane
    reading packed data a byte at a time."""
    loop_instructions: int | None = None
    """SASS instructions in the kernel's longest loop: what a warp issues per step of it."""
    instructions: int | None = None
    """SASS instructions in the whole kernel (loops counted once; slow paths that rarely run too)."""
    barriers: int | None = None
    """``BAR.SYNC`` instructions in the whole kernel."""

    @property
    def ok(self) -> bool:
        return self.error is None

    def resident_programs(self, sm: SMLimits = SM90) -> int:
        """How many programs of this launch one SM holds at once: the least of what its registers,
        shared memory, threads and the block limit allow (CUDA's occupancy arithmetic)."""
        warps = self.launch.kwargs.get("num_warps", 4)
        warp_registers = -(-self.registers * 32 // sm.register_unit) * sm.register_unit
        return min(
            sm.registers // (warps * warp_registers),
            sm.shared_bytes // (self.shared_bytes + sm.shared_reserved_per_block),
            sm.threads // (32 * warps),
            sm.blocks,
        )


def toolchain_missing() -> str | None:
    """Why kernels cannot be compiled here (no triton, no NVIDIA backend, no ptxas), else None."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    try:
        from triton import knobs

        ptxas = knobs.nvidia.ptxas.path
    except Exception as error:  # the NVIDIA backend or its bundled tools are missing
        return f"triton's NVIDIA backend has no ptxas: {error}"
    return None if ptxas else "no ptxas found (triton's bundled binary or TRITON_PTXAS_PATH)"


class _CudaAsMeta(TorchFunctionMode):
    """Tensors requested on a CUDA device (``device=`` or a ``.to`` target) are made on ``meta``;
    outside torch's own code they report ``cuda:0`` (see :func:`capture_launches`)."""

    def __init__(self) -> None:
        super().__init__()
        self.depth = 0

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "meta"
        if func is torch.Tensor.to:  # t.to("cuda"), t.to(device, dtype)
            args = tuple("meta" if _is_cuda(a) else a for a in args)
        self.depth += 1  # torch's own code (meta kernels, decompositions) must see "meta"
        try:
            return func(*args, **kwargs)
        finally:
            self.depth -= 1


def _is_cuda(device: Any) -> bool:
    """Whether ``device`` names a CUDA device (a ``torch.device``, ``"cuda"`` or ``"cuda:N"``)."""
    if isinstance(device, str):
        return re.fullmatch(r"cuda(:\d+)?", device) is not None
    return isinstance(device, torch.device) and device.type == "cuda"


@contextlib.contextmanager
def capture_launches(sms: int = H100_SMS, capability: tuple[int, int] = (9, 0)) -> Iterator[list[Launch]]:
    """Within the context, Triton launches are recorded into the yielded list instead of run, and
    code sees a CUDA device of ``capability`` with ``sms`` multiprocessors.

    Make inputs with ``torch.empty(..., device="cuda")``; they (and everything derived from them)
    are meta tensors whose ``.device`` reads ``cuda:0``. Only shapes, dtypes and strides exist, so
    a wrapper that reads tensor values on the host cannot be captured.
    """
    from triton.runtime.jit import JITFunction

    launches: list[Launch] = []
    mode = _CudaAsMeta()
    meta_device = torch.Tensor.device

    def device(t: torch.Tensor) -> torch.device:
        found = meta_device.__get__(t)
        return torch.device("cuda", 0) if found.type == "meta" and mode.depth == 0 else found

    def run(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, kwargs, grid))

    properties = types.SimpleNamespace(multi_processor_count=sms, name="captured", major=capability[0],
                                       minor=capability[1])
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(JITFunction, "run", run))
        stack.enter_context(mock.patch.object(torch.Tensor, "device", property(device)))
        stack.enter_context(mock.patch("torch.cuda.get_device_capability", lambda *_: capability))
        stack.enter_context(mock.patch("torch.cuda.get_device_properties", lambda *_: properties))
        stack.enter_context(mock.patch("torch.cuda.current_stream", lambda *_: types.SimpleNamespace(cuda_stream=0)))
        stack.enter_context(mode)
        yield launches


class RunKernelFunctions(TorchFunctionMode):
    """Call each HAL op's kernel function instead of the op: on meta tensors the op runs its fake
    (the contract), which launches nothing; its function makes the launches a GPU would get. Enter
    it inside ``capture_launches()``, so that the function sees its tensors on ``cuda:0``."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        from seahal.hal.spec import bound_function

        return (bound_function(func) or func)(*args, **(kwargs or {}))


class _HostData(TorchFunctionMode):
    """Records tensors made on a device from host data (``torch.tensor(..., device=...)``): a copy
    from the host that dispatch modes never see."""

    FROM_HOST = (torch.tensor, torch.as_tensor, torch.asarray)

    def __init__(self, record: list[str]) -> None:
        super().__init__()
        self.record = record

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        device = (kwargs or {}).get("device")
        if func in self.FROM_HOST and device is not None and torch.device(device).type != "cpu" \
                and not isinstance(args[0], torch.Tensor):
            self.record.append(f"{func.__module__}.{func.__name__}")
        return func(*args, **(kwargs or {}))


class AtenKernels(TorchDispatchMode):
    """Records the aten ops dispatched inside it that would launch a device kernel: all but views
    and allocations (with :func:`capture_launches`: what a call launches besides Triton kernels),
    and in ``host_transfers`` every copy from the host to a device (which a CUDA graph cannot
    capture): ``.to(device)`` or ``copy_`` of a host tensor, and tensors made from host data.

    Under ``torch.inference_mode`` torch (2.13) does not show dtype conversions (``.to``) of
    inference tensors to dispatch modes: count such code under ``torch.no_grad`` instead.
    """

    NOT_KERNELS = ("empty", "empty_strided", "_unsafe_view")
    """Allocations, and the view that is not flagged as one (``reshape`` of a fresh result)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.host_transfers: list[str] = []
        self._host_data = _HostData(self.host_transfers)

    def __enter__(self):
        self._host_data.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        return self._host_data.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not func.is_view and name not in self.NOT_KERNELS:
            self.ops.append(str(func))
        out = func(*args, **(kwargs or {}))
        source = {"_to_copy": 0, "copy_": 1}.get(name)
        if source is not None and args[source].is_cpu and not out.is_cpu:
            self.host_transfers.append(str(func))
        return out


def sm90():
    """``GPUTarget("cuda", 90, 32)``: Hopper (H100 / H200)."""
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", 90, 32)


def compile_launch(launch: Launch, target=None, sass: bool = True) -> CompileResult:
    """Compile ``launch`` for ``target`` (default :func:`sm90`) as Triton would before running it.

    Argument types, alignment and integer specialisation come from Triton's own launch binder;
    constexprs and options (num_warps, num_stages, ...) from the launch's keyword arguments.
    ``sass=False`` leaves the SASS counts (``loop_*``, ``instructions``, ``barriers``) None: the
    disassembler takes about 0.4 s a kernel, several times the rest when Triton's cache holds it.
    """
    import triton
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = target or sm90()
    kernel = launch.kernel
    backend = make_backend(target)
    if kernel.is_gluon():  # a Gluon kernel is compiled from its own AST source
        from triton.experimental.gluon._runtime import GluonASTSource as source
    else:
        source = ASTSource
    try:
        binder = create_function_from_signature(kernel.signature, kernel.params, backend)
        bound, specialization, options = binder(*launch.args, **launch.kwargs)
        options, signature, constexprs, attrs = kernel._pack_args(
            backend, launch.kwargs, bound, specialization, options
        )
        compiled = triton.compile(
            source(kernel, signature, constexprs, attrs), target=target, options=options.__dict__
        )
    except Exception as error:  # the compiler's diagnostics are the result, down to the first cause
        chain = [error]
        while chain[-1].__cause__ is not None and len(chain) < 16:
            chain.append(chain[-1].__cause__)
        return CompileResult(launch, error="\n".join(f"{type(e).__name__}: {e}" for e in chain))
    registers, stack = _resource_usage(compiled.asm["cubin"])
    sass = _sass(compiled.asm["cubin"]) if sass else None
    loop = None if sass is None else _longest_loop(sass)
    return CompileResult(launch, ptx=compiled.asm["ptx"], shared_bytes=compiled.metadata.shared,
                         registers=registers, stack_bytes=stack, loop_barriers=_count(loop, BARRIER),
                         loop_byte_loads=_count(loop, r"\bLDS\.[US]8\b"), loop_instructions=_count(loop, INSTRUCTION),
                         instructions=_count(sass, INSTRUCTION), barriers=_count(sass, BARRIER))


INSTRUCTION = r"/\*[0-9a-f]{4}\*/\s+\S"
"""A line of nvdisasm's output that holds an instruction (its address comment, then the opcode)."""
BARRIER = r"BAR\.SYNC"


def _binary_tool_output(name: str, args: list[str], cubin: bytes) -> str | None:
    """The stdout of one of the CUDA binary tools Triton bundles beside ptxas, run on ``cubin``
    (written to a temporary file) with ``args``; None where Triton has no such tool."""
    from triton import knobs

    path = os.path.join(os.path.dirname(knobs.nvidia.ptxas.path), name)
    if not os.path.exists(path):
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        return subprocess.run([path, *args, file.name], capture_output=True, text=True, check=True).stdout


def _sass(cubin: bytes) -> list[str] | None:
    """The lines of nvdisasm's listing of the kernel in ``cubin``; None without nvdisasm."""
    sass = _binary_tool_output("nvdisasm", ["-c"], cubin)
    return None if sass is None else sass.splitlines()


def _longest_loop(lines: list[str]) -> list[str]:
    """The SASS lines of the longest loop in a kernel's listing (a backward branch's body); []
    without a loop."""
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\.L_x_\d+):", line))}
    loops = [
        lines[labels[m.group(1)]: i + 1]
        for i, line in enumerate(lines)
        if (m := re.search(r"BRA\s+`\((\.L_x_\d+)\)", line)) and labels.get(m.group(1), i) < i
    ]
    return max(loops, key=len) if loops else []


def _count(lines: list[str] | None, pattern: str) -> int | None:
    """How many of ``lines`` match ``pattern``; None where there are no lines to read."""
    return None if lines is None else sum(bool(re.search(pattern, line)) for line in lines)


def _resource_usage(cubin: bytes) -> tuple[int | None, int | None]:
    """(registers, stack bytes) of the one kernel in ``cubin``, read by the cuobjdump beside ptxas
    (Triton bundles both); (None, None) where there is none."""
    usage = _binary_tool_output("cuobjdump", ["--dump-resource-usage"], cubin)
    if usage is None:
        return None, None
    found = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    if found is None:
        raise RuntimeError(f"cuobjdump reported no resource usage: {usage[-500:]}")
    return int(found.group(1)), int(found.group(2))


def launch_table(results: list[CompileResult]) -> str:
    """A markdown table of compiled launches: resources, programs an SM, and SASS counts (whole
    kernel and its longest loop, per warp), or the compiler's first error line."""
    lines = ["| launch | registers | shared KB | programs / SM | instructions | barriers | loop instructions | loop barriers |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if not r.ok:
            lines.append(f"| {r.launch.describe()} | error: {r.error.splitlines()[0][:120]} |||||||")
            continue
        resident = r.resident_programs() if r.registers else None
        lines.append(f"| {r.launch.describe()} | {r.registers} | {r.shared_bytes / 1024:.1f} | {resident} | "
                     f"{r.instructions} | {r.barriers} | {r.loop_instructions} | {r.loop_barriers} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m seahal.testing.triton_compile -c CODE``: run CODE as if on an H100 (tensors made
    with ``device="cuda"`` are meta tensors; ``torch`` is imported), compile every Triton launch it
    makes for sm_90, and print :func:`launch_table`. No GPU needed; e.g.

        python -m seahal.testing.triton_compile -c "from seahal.backends.cuda import moe_gate
        moe_gate.route(torch.empty(1, 16384, 256, device='cuda'), torch.empty(256, device='cuda'), 6, route_warps=1)"
    """
    import argparse

    parser = argparse.ArgumentParser(prog="python -m seahal.testing.triton_compile", description=main.__doc__.split("\n")[0])
    parser.add_argument("-c", dest="code", required=True, help="Python code making the launches")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("TRITON_INTERPRET=1 is set: under the interpreter kernels run on the CPU and never compile")
    missing = toolchain_missing()
    if missing:
        parser.error(f"cannot compile here: {missing}")
    with capture_launches() as launches:
        exec(compile(args.code, "<-c>", "exec"), {"torch": torch})  # noqa: S102 - the command's purpose
    if not launches:
        print("the code made no Triton launch")
        return 1
    print(launch_table([compile_launch(launch) for launch in launches]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
