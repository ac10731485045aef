"""The ``seahal`` command line: ``run``, ``convert``, ``info``, ``support-matrix``, ``conformance``, ``bench``,
``plan-memory``, ``export-onnx``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _info(args: argparse.Namespace) -> int:
    from seahal.hal import info

    data = info.collect()
    print(json.dumps(data, indent=2) if args.json else info.format_text(data))
    return 0


def _support_matrix(args: argparse.Namespace) -> int:
    from seahal.hal.info import support_matrix_markdown

    text = support_matrix_markdown()
    if args.check:
        current = Path(args.check).read_text() if Path(args.check).exists() else ""
        if current != text:
            print(f"{args.check} is out of date: run `seahal support-matrix --write {args.check}`", file=sys.stderr)
            return 1
        return 0
    if args.write:
        Path(args.write).parent.mkdir(parents=True, exist_ok=True)
        Path(args.write).write_text(text)
        print(f"wrote {args.write}")
    else:
        print(text, end="")
    return 0


def _conformance(args: argparse.Namespace) -> int:
    from seahal.testing.conformance import main as conformance_main

    return conformance_main(args)


def _bench(args: argparse.Namespace) -> int:
    from seahal.bench import main as bench_main

    return bench_main(args)


def _export_onnx(args: argparse.Namespace) -> int:
    from seahal.onnx.export import main as export_main

    return export_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="seahal", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="torch, devices, backends (with reasons), plugin errors, op coverage")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_info)

    p = sub.add_parser("support-matrix", help="the op x backend matrix as markdown (docs/support-matrix.md)")
    p.add_argument("--write", metavar="PATH", help="write the markdown to PATH")
    p.add_argument("--check", metavar="PATH", help="exit 1 if PATH differs from the generated matrix")
    p.set_defaults(func=_support_matrix)

    p = sub.add_parser("conformance", help="check a backend's kernels against the CPU reference")
    p.add_argument("--backend", required=True, help="backend name (cpu, cuda, ascend, cambricon, a plugin)")
    p.add_argument("--ops", help="comma-separated ops (default: all)")
    p.add_argument("--json", metavar="PATH", help="write the report as JSON")
    p.add_argument("--device", help="device to run on (default: the backend's device type)")
    p.add_argument("--interpret", action="store_true", help="Triton interpreter on CPU tensors (cuda backend)")
    p.add_argument("--kernel", help="only this kernel name of the backend (default: every kernel)")
    p.add_argument("--jobs", type=int, default=0, metavar="N",
                   help="N processes: with --interpret the ops run in N processes; otherwise every Triton "
                        "kernel the run will launch on a CUDA GPU is first compiled in N processes (into "
                        "Triton's cache; a cold run otherwise compiles them one by one)")
    p.add_argument("--examples", type=int, metavar="N",
                   help="hypothesis-drawn cases per kernel beside the fixed ones (default 8; 0: none)")
    p.add_argument("--seed", type=int, default=0, metavar="S",
                   help="another sample: the fixed cases' values and the drawn cases come from seed S, the "
                        "same on every run (with one hypothesis version), and a failing drawn case is shrunk to a "
                        "small one (default 0: the sample CI runs, failures reported as drawn)")
    p.add_argument("-v", "--verbose", action="store_true", help="print every case")
    p.set_defaults(func=_conformance)

    p = sub.add_parser("bench", help="benchmark kernels; writes JSON with achieved and peak figures")
    from seahal.bench import add_arguments as add_bench_arguments

    add_bench_arguments(p)
    p.set_defaults(func=_bench)

    p = sub.add_parser("export-onnx", help="export a prefill or decode step to ONNX, HAL ops as seahal functions")
    p.add_argument("--model", metavar="PATH", help="checkpoint folder (default: the built-in tiny V4, cached)")
    p.add_argument("--out", required=True, metavar="PATH", help="the .onnx file to write")
    p.add_argument(
        "--mode", choices=("prefill", "decode"), default="prefill",
        help="prefill: --prompt-len tokens from an empty cache; decode: one token at the position the "
        "graph input start_pos gives (one graph for every step)",
    )
    p.add_argument("--prompt-len", type=int, default=16, metavar="N", help="prefill prompt length (default 16)")
    p.add_argument("--batch-size", type=int, default=1, metavar="B", help="sequences per call (default 1)")
    p.add_argument("--max-seq-len", type=int, metavar="N", help="cache capacity (default: the model's max_seq_len)")
    p.add_argument("--cache-format", choices=("dense", "fp8"), help="cache storage (default: the model's)")
    p.add_argument("--last-only", action="store_true", help="logits of the last token only")
    p.add_argument("--external-data", action="store_true", help="weights in a file beside the model (auto over 2 GB)")
    p.set_defaults(func=_export_onnx)

    from seahal.plan_memory import add_parser as add_plan_memory_parser
    from seahal.run import add_parsers as add_model_parsers

    add_model_parsers(sub)
    add_plan_memory_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
