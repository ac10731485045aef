"""Native CPU fast paths from ``seahal._native`` (C++17, pybind11, OpenMP).

The C++ functions take raw data pointers and sizes; this module is the thin, typed wrapper that
checks layout and hands them contiguous tensors.
"""

from __future__ import annotations

from seahal.hal import register_kernel


def native_module():
    """``seahal._native``, or None when the package was not built with it."""
    try:
        from seahal import _native
    except ImportError:
        return None
    return _native


def register_native_kernels() -> None:
    """Register the native kernels above the reference (priority 10) when the module is built."""
    if native_module() is None:
        return
