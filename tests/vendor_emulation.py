"""Test emulations of vendor packages: run a vendor backend's own code without its chip.

The fake packages live in ``tests/vendor_packages/`` (``torch_npu``, ...). Each is written from the
vendor's documentation (argument names, keyword-only parameters, layouts, dtypes, and the vendor's
own checks on misuse) and computes on CPU tensors. Each declares itself with the module attribute
``__seahal_emulated_on__ = "cpu"`` (``seahal.hal.registry.EMULATION_MARKER``), which the backend's
probe reports as ``Availability(emulated_on="cpu")``: plans then run the backend's kernels on CPU
tensors and say ``plan(npu emulated on cpu)``, and ``seahal info`` marks the backend EMULATED.

Nothing outside ``tests/`` imports these packages; they are on ``sys.path`` only inside
:func:`emulated` (or :func:`installed_modules`):

    with emulated("torch_npu", backend="ascend", settings={"soc_version": 220}) as torch_npu:
        model = load(path, device="ascend")      # runs the Ascend backend on CPU tensors
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

from seahal.hal.registry import REGISTRY

PACKAGES = Path(__file__).resolve().parent / "vendor_packages"


def _owned(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _reset_backend(backend: str) -> None:
    """Forget the backend's probe result and its kernels' imported functions."""
    REGISTRY.discover()
    REGISTRY.backends[backend]._availability = None
    for kernels in REGISTRY.kernels.values():
        for kernel in kernels:
            if kernel.backend == backend:
                kernel.unresolve()


@contextlib.contextmanager
def installed_modules(modules: Mapping[str, ModuleType], backend: str) -> Iterator[None]:
    """Make ``import <name>`` give ``modules[name]`` while the context lasts.

    The backend's kernel modules (``seahal.backends.<backend>.*``, not the package that registers
    it) are dropped from ``sys.modules`` on entry and on exit, so they import the installed modules
    afresh; the backend's availability is re-probed and its kernels re-resolved. Everything that was
    in ``sys.modules`` before is restored afterwards.
    """
    prefixes = (*modules, f"seahal.backends.{backend}")
    saved = {name: mod for name, mod in sys.modules.items() if _owned(name, prefixes)}
    keep = f"seahal.backends.{backend}"

    def purge() -> None:
        for name in [n for n in sys.modules if _owned(n, prefixes) and n != keep]:
            _bind(name, None)
            del sys.modules[name]

    purge()
    sys.modules.update(modules)
    _reset_backend(backend)
    try:
        yield
    finally:
        purge()
        sys.modules.update(saved)
        for name, module in saved.items():
            _bind(name, module)
        _reset_backend(backend)


def _bind(name: str, module: ModuleType | None) -> None:
    """Set (or, with None, remove) submodule ``name`` as an attribute of its parent package:
    ``from package import sub`` reads that attribute before ``sys.modules``."""
    parent_name, _, leaf = name.rpartition(".")
    parent = sys.modules.get(parent_name)
    if parent is None:
        return
    if module is not None:
        setattr(parent, leaf, module)
    elif getattr(parent, leaf, None) is sys.modules.get(name):
        delattr(parent, leaf)


@contextlib.contextmanager
def emulated(
    packages: str | tuple[str, ...], backend: str, settings: Mapping[str, Any] | None = None
) -> Iterator[Any]:
    """Import a fresh emulation of ``packages`` from ``tests/vendor_packages`` and install it for
    ``backend`` (see :func:`installed_modules`); yields the package (a dict of them for several).

    ``settings`` go to the first package's ``_emulation.configure(**settings)`` (e.g. the chip's
    SoC version or the torch_npu version to pretend to be).
    """
    names = (packages,) if isinstance(packages, str) else tuple(packages)
    sys.path.insert(0, str(PACKAGES))
    try:
        fresh = _import_fresh(names)
        with installed_modules(fresh, backend):
            if settings:  # inside: configuring may import the other emulated packages
                fresh[names[0]]._emulation.configure(**settings)
            yield fresh[names[0]] if len(names) == 1 else {n: fresh[n] for n in names}
    finally:
        sys.path.remove(str(PACKAGES))


def _import_fresh(names: tuple[str, ...]) -> dict[str, ModuleType]:
    """New module objects for ``names`` and their submodules, leaving ``sys.modules`` as it was."""
    before = {n: m for n, m in sys.modules.items() if _owned(n, names)}
    for name in before:
        del sys.modules[name]
    try:
        for name in names:
            importlib.import_module(name)
        return {n: m for n, m in sys.modules.items() if _owned(n, names)}
    finally:
        for name in [n for n in sys.modules if _owned(n, names)]:
            del sys.modules[name]
        sys.modules.update(before)
