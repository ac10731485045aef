"""``seahal bench``: kernel benchmarks per backend, printed as a table and optionally written as JSON.

    seahal bench --backend cpu [--ops fp8_gemm,fp4_gemm] [--json out.json] [--quick]
"""

from __future__ import annotations

import argparse
import importlib
import sys

BENCHMARKS = {"cpu": "seahal.bench.cpu_gemm", "cuda": "seahal.bench.cuda_gemm"}
"""backend -> module whose ``main(args)`` benchmarks that backend's kernels."""
OP_BENCHMARKS = {("cuda", "moe_gate"): "seahal.bench.cuda_moe_gate"}
"""(backend, --ops) -> module with its own benchmark for that op."""


def main(args: argparse.Namespace) -> int:
    """Run the benchmark of ``args.backend`` (args also carries .ops, .json, .quick)."""
    module = OP_BENCHMARKS.get((args.backend, getattr(args, "ops", None))) or BENCHMARKS.get(args.backend)
    if module is None:
        print(f"no benchmark for backend {args.backend!r}; have: {', '.join(sorted(BENCHMARKS))}", file=sys.stderr)
        return 2
    return importlib.import_module(module).main(args)
