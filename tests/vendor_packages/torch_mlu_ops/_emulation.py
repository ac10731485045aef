"""Settings and call log of the torch_mlu_ops emulation."""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch

CALLS: list[tuple[str, int, tuple[str, ...]]] = []
"""(function, positional argument count, keyword names) of every call, in order."""

V4_FUNCTIONS = (
    "moe_softplus_topk", "fused_compress_multi_kv", "hc_split_sinkhorn", "fused_mhc_post",
)
"""The DeepSeek-V4 additions (first seen in vllm-mlu @b9925203); absent from older releases."""

FP32_ROTARY_FROM = (1, 12)
"""First release whose emulated ``apply_rotary`` takes float32: the v1.3.2 manual lists fp16/bf16
only, later callers pass float32; which release added it is not published (assumed 1.12 here)."""

settings = {"fp8": True, "fp32_rotary": True}
_package: ModuleType | None = None
_removed: dict[str, Any] = {}


def bind(package: ModuleType) -> None:
    global _package
    _package = package


def recorded(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Log each call's shape of arguments (not values) in :data:`CALLS`."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        CALLS.append((fn.__name__, len(args), tuple(kwargs)))
        return fn(*args, **kwargs)

    return wrapper


def configure(version: str | None = None, fp8: bool | None = None, **torch_mlu_settings: Any) -> None:
    """``version``: the tmo release to report (releases before 1.12 lack :data:`V4_FUNCTIONS`);
    ``fp8``: whether the emulated chip runs FP8 ``scaled_matmul``; the version also sets whether
    ``apply_rotary`` takes float32 (:data:`FP32_ROTARY_FROM`); other keywords (``chip``,
    ``device_count``) configure the torch_mlu emulation."""
    if fp8 is not None:
        settings["fp8"] = fp8
    if version is not None:
        _package.__version__ = version
        release = tuple(int(p) for p in version.split("+")[0].split(".")[:2])
        settings["fp32_rotary"] = release >= FP32_ROTARY_FROM
        old = release < (1, 12)
        for name in V4_FUNCTIONS:
            if old and hasattr(_package, name):
                _removed[name] = getattr(_package, name)
                delattr(_package, name)
            elif not old and name in _removed:
                setattr(_package, name, _removed.pop(name))
    if torch_mlu_settings:
        import torch_mlu

        torch_mlu._emulation.configure(**torch_mlu_settings)


def check(condition: bool, message: str) -> None:
    """tmo's TORCH_CHECK: a RuntimeError with the message."""
    if not condition:
        raise RuntimeError(message)


def check_dtype(name: str, t: torch.Tensor, dtypes: tuple[torch.dtype, ...]) -> None:
    check(t.dtype in dtypes, f"{name} dtype must be one of {[str(d) for d in dtypes]}, but got {t.dtype}")


def unsupported(what: str) -> NotImplementedError:
    return NotImplementedError(f"torch_mlu_ops emulation: {what} is not documented precisely enough to emulate")


FLOATS = (torch.float32, torch.float16, torch.bfloat16)
