"""CPU benchmark of the native kernels (fp8_gemm, fp4_gemm, grouped_linear) beside their peers.

Per (op, weight shape, M) row, the native kernel and the other ways to compute the same product:

- ``native``: the cpu.native kernel (csrc/gemm.cpp), reading the quantised weight bytes directly,
  in the best instruction-set variant this CPU has (the header's ``simd``);
- ``native_avx2`` (GEMMs, on a CPU whose best variant is AVX512-BF16): the same kernel held to its
  AVX2 variant (fp32 panels and FMAs), what such a CPU ran before the bf16 variant;
- ``reference``: the cpu.reference kernel (plain PyTorch: per-K-step matmuls for the GEMMs; for
  grouped_linear the official einsum in bf16 over the weight dequantised on every call);
- ``matmul_fp32`` (GEMMs): ``torch.matmul`` on an fp32 weight dequantised once beforehand (fast,
  but keeps a 4-byte copy of every weight: 4x the FP8 bytes, 8x the FP4 bytes);
- ``dequant_matmul`` (GEMMs): the memory-light naive path, dequantising the weight to fp32 on
  every call, then ``torch.matmul``;
- ``einsum_at_load`` (grouped_linear): the reference's einsum over a bf16 weight dequantised once
  beforehand (what a plan without the native kernel converts wo_a to at load: twice the FP8 bytes).

Times are medians of several ``time.perf_counter`` runs after a warm-up, all with torch's thread
count. The native kernel's GB/s is also given as a fraction of this machine's copy bandwidth,
measured at the start of the run (:func:`copy_bandwidth`): the limit of a row that streams its
weight (M = 1), as the GPU benches take the H100's measured copy rate. GB/s counts the bytes each way must at least move: the quantised weight and its scales (a
dequantised-at-load weight at its own width), the activation (e4m3 and its scales for the GEMMs,
bf16 for grouped_linear) and the bf16 output. GFLOP/s = 2 M N K / t, N the weight's rows (all
groups') and K its columns. Weight shapes are V4-Flash's (hidden 4096; the GEMMs' scaled down to
suit a small CPU, wo_a whole: 8 groups of 1024 rows).

    seahal bench --backend cpu [--ops fp8_gemm,fp4_gemm,grouped_linear] [--json out.json] [--quick]
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
from seahal.backends.cpu.reference import linear as reference_linear
from seahal.hal.formats import (
    FP8_AMAX_FLOOR,
    FP8_MAX,
    block_scales,
    dequantize_weight,
    e8m0_scales,
    fp4_quantize,
    fp8_dequantize,
    fp8_quantize,
    ue8m0_encode,
)

SHAPES = {  # op -> {name: (N, K)}; grouped_linear: (G, R, I), N = G R and K = I
    "fp8_gemm": {"q_a": (1024, 4096), "wo_b_like": (4096, 1024), "shexp_up": (2048, 4096), "shexp_down": (4096, 2048)},
    "fp4_gemm": {"expert_up": (2048, 4096), "expert_down": (4096, 2048)},
    "grouped_linear": {"wo_a": (8, 1024, 4096)},
}
QUICK_SHAPES = {"fp8_gemm": ("q_a",), "fp4_gemm": ("expert_up",), "grouped_linear": ("wo_a",)}
MS = (1, 16, 128)
QUICK_MS = (1, 16)
AVX2, BF16 = "avx2+fma+f16c", "avx512bf16"
PEER_LABELS = {"native_avx2": "avx2", "reference": "ref", "matmul_fp32": "fp32 mm", "dequant_matmul": "deq+mm",
               "einsum_at_load": "bf16 at load"}


def peers(op: str) -> tuple[str, ...]:
    """The ways timed beside ``native`` for ``op`` on this CPU (the module docstring says what each is)."""
    if op == "grouped_linear":
        return ("reference", "einsum_at_load")
    avx2 = ("native_avx2",) if native.native_module().simd_variants()[-1] == BF16 else ()
    return (*avx2, "reference", "matmul_fp32", "dequant_matmul")


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


def make_operands(op: str, m: int, shape: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, ...]:
    """The operands as a model holds them. GEMMs: (a, a_scale, b, b_scale), ue8m0-scaled e4m3
    activations and FP8 weights in 128x128 blocks with e8m0 scales, or FP4 weights packed with 1x32
    e8m0 scales. grouped_linear: (x [M, G, I] bf16, weight [G R, I] FP8, its e8m0 block scales)."""
    gen = torch.Generator().manual_seed(seed)
    if op == "grouped_linear":
        g, r, i = shape
        x = torch.randn(m, g, i, generator=gen).to(torch.bfloat16)
        return (x, *_fp8_weight(torch.randn(g * r, i, generator=gen) * 0.02))
    n, k = shape
    a, a_scale = fp8_quantize(torch.randn(m, k, generator=gen), 128)
    w = torch.randn(n, k, generator=gen) * 0.02
    if op == "fp8_gemm":
        return a, a_scale, *_fp8_weight(w)
    b, b_scale = fp4_quantize(w, 32)
    return a, a_scale, b, e8m0_scales(ue8m0_encode(b_scale))


def _fp8_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` [N, K] (multiples of 128) in e4m3 with its 128x128 blocks' e8m0 scales."""
    n, k = w.shape
    amax = w.reshape(n // 128, 128, k // 128, 128).abs().amax(dim=(1, 3))
    scale = block_scales(amax, FP8_MAX, FP8_AMAX_FLOOR, "ue8m0")
    codes = (w / scale.repeat_interleave(128, 0).repeat_interleave(128, 1)).clamp(-FP8_MAX, FP8_MAX)
    return codes.to(torch.float8_e4m3fn), e8m0_scales(ue8m0_encode(scale))


def implementations(op: str, *operands: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
    """``native`` and the op's :func:`peers`, each a call computing the row's product."""
    if op == "grouped_linear":
        x, w, s = operands
        at_load = dequantize_weight(w, s, torch.bfloat16)
        return {
            "native": lambda: native.grouped_linear(x, w, s),
            "reference": lambda: reference_linear.grouped_linear(x, w, s),
            "einsum_at_load": lambda: reference_linear.grouped_linear(x, at_load),
        }
    a, a_scale, b, b_scale = operands
    a32 = fp8_dequantize(a, a_scale, 128)
    w32 = dequantize_weight(b, b_scale)
    ways = {
        "native": lambda: getattr(native, op)(a, a_scale, b, b_scale),
        "native_avx2": _in_simd_variant(AVX2, lambda: getattr(native, op)(a, a_scale, b, b_scale)),
        "reference": lambda: getattr(reference, op)(a, a_scale, b, b_scale),
        "matmul_fp32": lambda: a32 @ w32.T,
        "dequant_matmul": lambda: fp8_dequantize(a, a_scale, 128) @ dequantize_weight(b, b_scale).T,
    }
    return {name: fn for name, fn in ways.items() if name == "native" or name in peers(op)}


def _in_simd_variant(variant: str, fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """``fn`` run with the native kernels held to ``variant`` (the variant they had again afterwards)."""
    module = native.native_module()

    def call() -> torch.Tensor:
        previous = module.simd_variant()
        module.set_simd(variant)
        try:
            return fn()
        finally:
            module.set_simd(previous)

    return call


def median_seconds(fn: Callable[[], torch.Tensor], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def moved_bytes(op: str, name: str, m: int, dims: tuple[int, ...]) -> int:
    """Least bytes an implementation moves (see the module docstring); ``dims``: the op's :data:`SHAPES` entry."""
    if op == "grouped_linear":
        g, r, i = dims
        weight = 2 * g * r * i if name == "einsum_at_load" else g * r * i + (g * r // 128) * (i // 128)
        return weight + 2 * m * g * i + 2 * m * g * r
    n, k = dims
    if name == "matmul_fp32":
        return 4 * (n * k + m * k + m * n)
    weight = n * k + (-(-n // 128)) * (k // 128) if op == "fp8_gemm" else n * k // 2 + n * (k // 32)
    return weight + m * k + 4 * m * (k // 128) + 2 * m * n


def weight_shape(op: str, shape: str) -> tuple[int, int]:
    """(N, K) of ``shape``: the weight's rows (every group's) and columns."""
    dims = SHAPES[op][shape]
    return (dims[0] * dims[1], dims[2]) if op == "grouped_linear" else dims


COPY_BYTES = 256 * 2**20
"""Size of the buffer :func:`copy_bandwidth` copies: far past any CPU's last-level cache."""


def copy_bandwidth(repeats: int = 5) -> float:
    """This machine's memory bandwidth in GB/s as a copy measures it (bytes read plus written over
    the median time of ``repeats`` copies of :data:`COPY_BYTES`, torch's threads): the limit a row
    that streams its weight is measured against, as a GPU row is against its measured copy rate."""
    src = torch.ones(COPY_BYTES // 4)
    dst = torch.empty_like(src)
    return 2 * COPY_BYTES / median_seconds(lambda: dst.copy_(src), repeats) / 1e9


def bench_row(op: str, shape: str, m: int, quick: bool, copy_gbps: float) -> dict:
    n, k = weight_shape(op, shape)
    impls = implementations(op, *make_operands(op, m, SHAPES[op][shape]))
    expected = impls["reference"]().float()
    rel_diff = ((impls["native"]().float() - expected).abs().max() / expected.abs().max()).item()
    row: dict = {"device": device_label(), "op": op, "shape": shape, "M": m, "N": n, "K": k, "native_rel_diff": rel_diff}
    repeats = 3 if quick else 7
    for name, fn in impls.items():
        seconds = median_seconds(fn, repeats)
        row[name] = {
            "seconds": seconds,
            "GB/s": moved_bytes(op, name, m, SHAPES[op][shape]) / seconds / 1e9,
            "GFLOP/s": 2 * m * n * k / seconds / 1e9,
        }
    row["native"]["fraction_of_copy_bandwidth"] = row["native"]["GB/s"] / copy_gbps
    for peer in peers(op):
        row[f"speedup_vs_{peer}"] = row[peer]["seconds"] / row["native"]["seconds"]
    return row


def format_table(rows: list[dict]) -> str:
    """One table per op: the native kernel's time and rates, then each peer's time and the speedup over it."""
    return "\n\n".join(_op_table([r for r in rows if r["op"] == op]) for op in dict.fromkeys(r["op"] for r in rows))


def _op_table(rows: list[dict]) -> str:
    ways = peers(rows[0]["op"])
    header = ("op", "shape", "M", "N", "K", "native ms", "GB/s", "of copy", "GFLOP/s",
              *(f"{PEER_LABELS[p]} ms" for p in ways), *(f"x {PEER_LABELS[p]}" for p in ways))
    lines = [header]
    for r in rows:
        native_row = r["native"]
        lines.append(
            (r["op"], r["shape"], str(r["M"]), str(r["N"]), str(r["K"]), f"{native_row['seconds'] * 1e3:.3f}",
             f"{native_row['GB/s']:.2f}", f"{native_row['fraction_of_copy_bandwidth']:.0%}", f"{native_row['GFLOP/s']:.1f}",
             *(f"{r[p]['seconds'] * 1e3:.3f}" for p in ways), *(f"{r[f'speedup_vs_{p}']:.2f}" for p in ways))
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
        "copy_GB/s": copy_bandwidth(),
    }
    print(f"{header['device']}; torch {header['torch']}; native kernels: {header['simd']}; "
          f"copy bandwidth {header['copy_GB/s']:.1f} GB/s")
    rows = []
    for op in ops:
        for shape in QUICK_SHAPES[op] if quick else SHAPES[op]:
            for m in QUICK_MS if quick else MS:
                rows.append(bench_row(op, shape, m, quick, header["copy_GB/s"]))
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
    ops = (getattr(args, "ops", None) or ",".join(SHAPES)).split(",")
    unknown = sorted(set(ops) - set(SHAPES))
    if unknown:
        print(f"the cpu bench covers {', '.join(SHAPES)}, not {', '.join(unknown)}", file=sys.stderr)
        return 2
    run(ops, quick=getattr(args, "quick", False), json_path=getattr(args, "json", None))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", default=",".join(SHAPES))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json")
    sys.exit(main(parser.parse_args()))
