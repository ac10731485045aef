"""What ``seahal info`` reports: torch, devices, backends with reasons, plugin failures, and the
op x backend coverage matrix generated from the kernels' declared capabilities."""

from __future__ import annotations

import platform
from typing import Any

import torch

from .registry import REGISTRY, backends, plugin_failures
from .spec import specs

_DEVICE_MODULES = ("cuda", "npu", "mlu", "xpu", "mps")


def _devices() -> dict[str, int]:
    found = {"cpu": 1}
    for name in _DEVICE_MODULES:
        module = getattr(torch, name, None)
        try:
            count = module.device_count() if module is not None and hasattr(module, "device_count") else 0
        except Exception:
            count = 0
        if count:
            found[name] = int(count)
    return found


def coverage() -> dict[str, dict[str, list[dict[str, Any]]]]:
    """op -> backend -> kernels (name, priority, portable, device_position, capabilities)."""
    backends()  # discovery
    table: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for op in specs():
        row: dict[str, list[dict[str, Any]]] = {}
        for k in REGISTRY.kernels_for(op):
            row.setdefault(k.backend, []).append(
                {
                    "kernel": k.name,
                    "priority": k.priority,
                    "portable": k.portable,
                    "device_position": k.device_position,
                    "capabilities": {key: list(v) for key, v in k.capabilities.items()},
                }
            )
        table[op] = row
    return table


def collect() -> dict[str, Any]:
    """Everything ``seahal info --json`` prints."""
    result: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "devices": _devices(),
        "backends": {},
        "plugin_failures": [
            {"entry_point": f.entry_point, "error": f.error, "traceback": f.traceback} for f in plugin_failures()
        ],
        "coverage": coverage(),
    }
    for name, b in sorted(backends().items()):
        avail = b.availability()
        result["backends"][name] = {
            "device_type": b.device_type,
            "aliases": list(b.aliases),
            "available": avail.ok,
            "reason": avail.reason,
            "chip": avail.chip,
            "emulated_on": avail.emulated_on,
            "source": b.source,
            "verified_with": dict(b.verified_with),
            "verified_on_hardware": b.verified_on_hardware,
            "description": b.description,
            "collective_backend": b.collective_backend,
        }
    return result


def _cell(kernels: list[dict[str, Any]]) -> str:
    parts = []
    for k in kernels:
        caps = "; ".join(f"{key}: {', '.join(map(str, v))}" for key, v in k["capabilities"].items())
        flags = [flag for flag in ("portable", "device_position") if k[flag]]
        parts.append(k["kernel"] + (f" ({caps})" if caps else "") + "".join(f" [{flag}]" for flag in flags))
    return "<br>".join(parts) if parts else "-"


def support_matrix_markdown() -> str:
    """The op x backend matrix as markdown; ``seahal support-matrix --write`` puts it in docs/."""
    table = coverage()
    names = sorted(backends())
    lines = [
        "# Support matrix",
        "",
        "Generated from the registry by `seahal support-matrix --write docs/support-matrix.md`;",
        "do not edit by hand. Each cell lists the backend's kernels for the op with their declared",
        "capabilities; `portable` kernels run on any device and are the fallback of every plan;",
        "`device_position` kernels take the position as a device tensor (0-d or per sequence) without",
        "reading it on the host, so a decode step through them can be captured in a CUDA graph.",
        "",
        "| op | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for op, row in table.items():
        lines.append(f"| {op} | " + " | ".join(_cell(row.get(b, [])) for b in names) + " |")
    return "\n".join(lines) + "\n"


def format_text(info: dict[str, Any]) -> str:
    """The human-readable ``seahal info``."""
    out = [f"seahal: torch {info['torch']}, python {info['python']}"]
    out.append("devices: " + ", ".join(f"{k} x{v}" for k, v in info["devices"].items()))
    out.append("")
    out.append("backends:")
    width = max([10, *map(len, info["backends"])])
    for name, b in info["backends"].items():
        state = "available" if b["available"] else "unavailable"
        chip = f", chip {b['chip']}" if b["chip"] else ""
        hw = "" if b["verified_on_hardware"] else " [NOT verified on hardware]"
        if b["emulated_on"]:
            hw += f" [EMULATED: test emulation of the vendor package, tensors on {b['emulated_on']}]"
        out.append(f"  {name:<{width}} device '{b['device_type']}': {state}{chip}{hw}")
        if b["reason"]:
            out.append(f"  {'':<{width}} {b['reason']}")
        out.append(f"  {'':<{width}} source: {b['source']}")
        if b["collective_backend"]:
            out.append(f"  {'':<{width}} collectives: torch.distributed {b['collective_backend']!r}")
        if b["verified_with"]:
            out.append(f"  {'':<{width}} verified with: " + ", ".join(f"{k} {v}" for k, v in b["verified_with"].items()))
    if info["plugin_failures"]:
        out.append("")
        out.append("plugin failures (skipped):")
        for f in info["plugin_failures"]:
            out.append(f"  {f['entry_point']}: {f['error']}")
            out.extend("    " + line for line in f["traceback"].rstrip().splitlines())
    out.append("")
    out.append("coverage (op x backend: kernels, highest priority first):")
    names = list(info["backends"])
    rows = [["op", *names]]
    for op, row in info["coverage"].items():
        rows.append([op, *(",".join(_marked(k) for k in row.get(b, [])) or "-" for b in names)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        out.append("  " + "  ".join(cell.ljust(w) for cell, w in zip(r, widths)))
    out.append("  (* = portable: runs on any device, used as fallback; ^ = takes the position as a device tensor:")
    out.append("   decode through it can be captured in a CUDA graph)")
    return "\n".join(out)


def _marked(kernel: dict[str, Any]) -> str:
    return kernel["kernel"] + ("*" if kernel["portable"] else "") + ("^" if kernel["device_position"] else "")
