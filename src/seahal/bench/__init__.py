"""``seahal bench``: kernel benchmarks per backend, printed as a table and optionally written as JSON.

    seahal bench --backend cpu [--ops fp8_gemm,fp4_gemm] [--json out.json] [--quick]
    seahal bench --backend cuda --ops A,B,C [--json out.json] [--plot roofline.png] [--quick] [--device cpu]
    seahal bench --backend cuda --ops model [--quick] [--contexts 4096]

For the cuda backend each op's rows come from its own module (:data:`CUDA_OPS`) in the schema of
:mod:`seahal.bench.common`, merged into one table and one JSON document. ``--device cpu`` is a smoke
mode: the modules that support it run the CPU reference at tiny shapes (no Triton, no GPU), which
exercises the shape tables, the FLOP/byte formulas, the JSON and the plot. ``--ops model`` is the
whole model end to end against transformers (:mod:`seahal.bench.model_e2e`).
"""

from __future__ import annotations

import argparse
import importlib
import sys

BENCHMARKS = {"cpu": "seahal.bench.cpu_gemm"}
"""backend -> module whose ``main(args)`` benchmarks that backend's kernels (cuda: see CUDA_OPS)."""
CUDA_OPS = {
    "fp8_gemm": "cuda_gemm",
    "fp4_gemm": "cuda_gemm",
    "moe_gate": "cuda_moe_gate",
    "fp8_act_quant": "cuda_quant",
    "fp4_quant": "cuda_quant",
    "kv_cache_pack": "cuda_quant",
    "hadamard_rotate": "cuda_quant",
    "moe_experts": "cuda_moe_experts",
    "sparse_attention": "cuda_attention",
    "indexer_topk": "cuda_attention",
    "sparse_attention_fp8": "cuda_attention",
    "indexer_topk_packed": "cuda_attention",
    "kv_compress": "cuda_compressor",
    "kv_compress_fp8": "cuda_compressor",
    "kv_cache_unpack": "cuda_kv_cache",
    "hc_pre": "cuda_mhc_rope",
    "hc_post": "cuda_mhc_rope",
    "hc_head": "cuda_mhc_rope",
    "rope": "cuda_mhc_rope",
    "rms_norm_rope": "cuda_mhc_rope",
    "fp32_linear": "cuda_linear",
    "grouped_linear": "cuda_linear",
    "model": "model_e2e",
}
"""op -> module of seahal.bench with ``rows(ops, device, quick)`` for it."""
ALIASES = {"indexer": ("indexer_topk", "indexer_topk_packed"), "mhc": ("hc_pre", "hc_post", "hc_head"),
           "sparse_attention": ("sparse_attention", "sparse_attention_fp8"),
           "kv_compress": ("kv_compress", "kv_compress_fp8")}
"""Names the issues use for groups of ops (issue #6's ``sparse_attention`` and ``kv_compress`` cover
the dense and the FP8-record variants)."""
GPU_ONLY = {"cuda_gemm", "cuda_moe_gate", "cuda_quant"}
"""Modules with no CPU smoke mode (they measure on CUDA tensors only)."""
DEFAULT_CUDA_OPS = "fp8_gemm"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``seahal bench`` (also ``python -m seahal.bench``)."""
    parser.add_argument("--backend", default="cpu")
    parser.add_argument("--ops", help="comma-separated ops (default: the backend's benchmarked ops)")
    parser.add_argument("--json", metavar="PATH", help="write results as JSON")
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    parser.add_argument("--plot", metavar="PNG", help="cuda: draw achieved throughput against the roofline (matplotlib)")
    parser.add_argument("--device", default="cuda", help="cuda: 'cpu' runs the smoke mode (reference at tiny shapes)")
    parser.add_argument("--contexts", metavar="N,M", type=parse_contexts,
                        help="--ops model: these prompt lengths (default 1024,4096; --quick 1024)")


def parse_contexts(text: str) -> tuple[int, ...]:
    """``"1024,4096"`` -> (1024, 4096): the model bench's prompt lengths, each a positive integer."""
    try:
        contexts = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated prompt lengths such as 4096, got {text!r}") from None
    if min(contexts) < 1:
        raise argparse.ArgumentTypeError(f"prompt lengths must be positive, got {text!r}")
    return contexts


def expand_ops(spec: str) -> list[str]:
    """``"indexer,rope,rope"`` -> ``["indexer_topk", "rope"]``: aliases expanded, order kept, duplicates dropped."""
    names = [name.strip() for name in spec.split(",") if name.strip()]
    return list(dict.fromkeys(op for name in names for op in ALIASES.get(name, (name,))))


def modules_of(ops: list[str]) -> dict[str, list[str]]:
    """The :data:`CUDA_OPS` modules that benchmark ``ops``, each with its ops, in order."""
    modules: dict[str, list[str]] = {}
    for op in ops:
        modules.setdefault(CUDA_OPS[op], []).append(op)
    return modules


def run_cuda(ops: list[str], device, quick: bool = False, json_path: str | None = None,
             plot_path: str | None = None, contexts: tuple[int, ...] | None = None) -> list[dict]:
    """Rows of ``ops`` on ``device`` from each op's module, in one table (printed last), one JSON
    document at ``json_path`` (rewritten after each row, so a run cut short keeps what it
    measured) and one roofline plot at ``plot_path``; ``contexts``: the model rows' prompt lengths."""
    import torch

    from seahal.bench import common

    device = torch.device(device)
    rows: list[dict] = []
    for module, module_ops in modules_of(ops).items():
        measured: list[dict] = []  # the module's rows so far

        def checkpoint(row: dict) -> None:
            measured.append(row)
            if json_path:
                common.write_json(json_path, device, rows + measured)

        if device.type != "cuda" and module in GPU_ONLY:
            rows += [common.unavailable_row(op, "needs a CUDA device (no CPU smoke mode)") for op in module_ops]
        else:
            options = {"contexts": contexts} if module == CUDA_OPS["model"] and contexts else {}
            with common.on_each_row(checkpoint):
                rows += importlib.import_module(f"seahal.bench.{module}").rows(module_ops, device, quick, **options)
        if json_path:
            common.write_json(json_path, device, rows)
    if plot_path and common.plot_roofline(rows, plot_path, f"seahal bench on {common.environment(device)['device']}"):
        print(f"roofline written to {plot_path}")
    print(common.environment(device))
    print(common.format_table(rows))
    return rows


def main(args: argparse.Namespace) -> int:
    """Run the benchmark of ``args.backend`` (args also carries .ops, .json, .quick, and for cuda .plot, .device)."""
    if args.backend != "cuda":
        module = BENCHMARKS.get(args.backend)
        if module is None:
            print(f"no benchmark for backend {args.backend!r}; have: cpu, cuda", file=sys.stderr)
            return 2
        return importlib.import_module(module).main(args)
    ops = expand_ops(getattr(args, "ops", None) or DEFAULT_CUDA_OPS)
    unknown = [op for op in ops if op not in CUDA_OPS]
    if unknown:
        print(f"no cuda benchmark for {', '.join(unknown)}; have: {', '.join(CUDA_OPS)} (aliases: "
              f"{', '.join(ALIASES)})", file=sys.stderr)
        return 2
    contexts = getattr(args, "contexts", None)
    if contexts and "model" not in ops:
        print("--contexts sets the prompt lengths of --ops model; no model rows were asked for", file=sys.stderr)
        return 2
    device = getattr(args, "device", None) or "cuda"
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print("seahal bench --backend cuda needs a CUDA device; `python -m seahal.bench --backend cuda --device cpu`"
                  " runs the smoke mode", file=sys.stderr)
            return 2
    run_cuda(ops, device, quick=getattr(args, "quick", False), json_path=getattr(args, "json", None),
             plot_path=getattr(args, "plot", None), contexts=contexts)
    return 0
