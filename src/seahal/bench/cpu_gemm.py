"""CPU benchmark of the native block-scaled GEMMs (fp8_gemm, fp4_gemm) beside their peers.

Per (op, weight shape, M) row, four ways to compute the same ``C = (A sA) @ (B sB)^T``:

- ``native``: the cpu.native kernel (csrc/gemm.cpp), reading the quantised weight bytes directly;
- ``reference``: the cpu.reference kernel (plain PyTorch, per-K-step matmuls);
- ``matmul_fp32``: ``torch.matmul`` on an fp32 weight dequantised once beforehand (fast, but keeps
  a 4-byte copy of every weight: 4x the FP8 bytes, 8x the FP4 bytes);
- ``dequant_matmul``: the memory-light naive path, dequantising the weight to fp32 on every call,
  then ``torch.matmul``.

Times are medians of several ``time.perf_counter`` runs after a warm-up, all with torch's thread
count. GB/s counts the bytes each way must at least move: for native, reference and
dequant_matmul the quantised weight and its scales, the e4m3 activation and its scales and the
bf16 output; for matmul_fp32 the fp32 weight, activation and output. GFLOP/s = 2 M N K / t.
Weight shapes are V4-Flash linears (hidden 4096) scaled down to suit a small CPU.

    seahal bench --backend cpu [--ops fp8_gemm,fp4_gemm] [--json out.json] [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch

from seahal.backends.cpu import native
from seahal.backends.cpu.reference import gemm as reference
from seahal.hal.formats import (
    FP8_AMAX_FLOOR,
    FP8_MAX,
    block_scales,
    dequantize_weight,
    fp4_quantize,
    fp8_dequantize,
    fp8_quantize,
)

SHAPES = {  # op -> {name: (N, K)}
    "fp8_gemm": {"q_a": (1024, 4096), "wo_b_like": (4096, 1024), "shexp_up": (2048, 4096), "shexp_down": (4096, 2048)},
    "fp4_gemm": {"expert_up": (2048, 4096), "expert_down": (4096, 2048)},
}
QUICK_SHAPES = {"fp8_gemm": ("q_a",), "fp4_gemm": ("expert_up",)}
MS = (1, 16, 128)
QUICK_MS = (1, 16)
PEERS = ("reference", "matmul_fp32", "dequant_matmul")


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (platform's description elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_label() -> str:
    return f"cpu: {cpu_name()}, {torch.get_num_threads()} threads"


def make_operands(op: str, m: int, n: int, k: int, seed: int = 0):
    """(a, a_scale, b, b_scale) as a model holds them: ue8m0-scaled e4m3 activations; FP8 weights
    in 128x128 blocks with e8m0 scales, FP4 weights packed with 1x32 e8m0 scales."""
    gen = torch.Generator().manual_seed(seed)
    a, a_scale = fp8_quantize(torch.randn(m, k, generator=gen), 128)
    w = torch.randn(n, k, generator=gen) * 0.02
    if op == "fp4_gemm":
        b, b_scale = fp4_quantize(w, 32)
    else:  # N, K multiples of 128 here
        amax = w.reshape(n // 128, 128, k // 128, 128).abs().amax(dim=(1, 3))
        b_scale = block_scales(amax, FP8_MAX, FP8_AMAX_FLOOR, "ue8m0")
        b = (w / b_scale.repeat_interleave(128, 0).repeat_interleave(128, 1)).clamp(-FP8_MAX, FP8_MAX)
        b = b.to(torch.float8_e4m3fn)
    return a, a_scale, b, b_scale.to(torch.float8_e8m0fnu)


def implementations(op: str, a, a_scale, b, b_scale) -> dict[str, Callable[[], torch.Tensor]]:
    a32 = fp8_dequantize(a, a_scale, 128)
    w32 = dequantize_weight(b, b_scale)
    return {
        "native": lambda: getattr(native, op)(a, a_scale, b, b_scale),
        "reference": lambda: getattr(reference, op)(a, a_scale, b, b_scale),
        "matmul_fp32": lambda: a32 @ w32.T,
        "dequant_matmul": lambda: fp8_dequantize(a, a_scale, 128) @ dequantize_weight(b, b_scale).T,
    }


def median_seconds(fn: Callable[[], torch.Tensor], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def moved_bytes(op: str, name: str, m: int, n: int, k: int) -> int:
    """Least bytes an implementation moves (see the module docstring)."""
    if name == "matmul_fp32":
        return 4 * (n * k + m * k + m * n)
    weight = n * k + (-(-n // 128)) * (k // 128) if op == "fp8_gemm" else n * k // 2 + n * (k // 32)
    return weight + m * k + 4 * m * (k // 128) + 2 * m * n


def bench_row(op: str, shape: str, m: int, quick: bool) -> dict:
    n, k = SHAPES[op][shape]
    a, a_scale, b, b_scale = make_operands(op, m, n, k)
    impls = implementations(op, a, a_scale, b, b_scale)
    expected = impls["reference"]().float()
    rel_diff = ((impls["native"]().float() - expected).abs().max() / expected.abs().max()).item()
    row: dict = {"device": device_label(), "op": op, "shape": shape, "M": m, "N": n, "K": k, "native_rel_diff": rel_diff}
    repeats = 3 if quick else 7
    for name, fn in impls.items():
        seconds = median_seconds(fn, repeats)
        row[name] = {
            "seconds": seconds,
            "GB/s": moved_bytes(op, name, m, n, k) / seconds / 1e9,
            "GFLOP/s": 2 * m * n * k / seconds / 1e9,
        }
    for peer in PEERS:
        row[f"speedup_vs_{peer}"] = row[peer]["seconds"] / row["native"]["seconds"]
    return row


def format_table(rows: list[dict]) -> str:
    header = ("op", "shape", "M", "N", "K", "native ms", "GB/s", "GFLOP/s", "ref ms", "fp32 mm ms", "deq+mm ms",
              "x ref", "x fp32 mm", "x deq+mm")  # fmt: skip
    lines = [header]
    for r in rows:
        lines.append(
            (r["op"], r["shape"], str(r["M"]), str(r["N"]), str(r["K"]),
             f"{r['native']['seconds'] * 1e3:.3f}", f"{r['native']['GB/s']:.2f}", f"{r['native']['GFLOP/s']:.1f}",
             f"{r['reference']['seconds'] * 1e3:.2f}", f"{r['matmul_fp32']['seconds'] * 1e3:.3f}",
             f"{r['dequant_matmul']['seconds'] * 1e3:.2f}",
             f"{r['speedup_vs_reference']:.1f}", f"{r['speedup_vs_matmul_fp32']:.2f}",
             f"{r['speedup_vs_dequant_matmul']:.1f}")  # fmt: skip
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


def run(ops: list[str], quick: bool = False, json_path: str | None = None) -> list[dict]:
    header = {
        "device": device_label(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "simd": native.native_module().simd_variant(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": quick,
    }
    print(f"{header['device']}; torch {header['torch']}; native kernels: {header['simd']}")
    rows = []
    for op in ops:
        for shape in QUICK_SHAPES[op] if quick else SHAPES[op]:
            for m in QUICK_MS if quick else MS:
                rows.append(bench_row(op, shape, m, quick))
                print(f"  {op} {shape} M={m}: native {rows[-1]['native']['seconds'] * 1e3:.3f} ms", flush=True)
    print(format_table(rows))
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"header": header, "rows": rows}, f, indent=2)
        print(f"wrote {json_path}")
    return rows


def main(args: argparse.Namespace) -> int:
    """``seahal bench --backend cpu``: args.ops (comma-separated), args.quick, args.json."""
    if native.native_module() is None:
        print("seahal._native is not built: nothing to benchmark on the cpu backend", file=sys.stderr)
        return 2
    ops = (getattr(args, "ops", None) or "fp8_gemm,fp4_gemm").split(",")
    unknown = sorted(set(ops) - set(SHAPES))
    if unknown:
        print(f"the cpu bench covers {', '.join(SHAPES)}, not {', '.join(unknown)}", file=sys.stderr)
        return 2
    run(ops, quick=getattr(args, "quick", False), json_path=getattr(args, "json", None))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", default="fp8_gemm,fp4_gemm")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json")
    sys.exit(main(parser.parse_args()))
