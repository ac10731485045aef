"""GPU benchmark of the cuda backend's quantisers beside the reference run in torch on the same GPU.

Rows: ``fp8_act_quant`` on bf16 activations [M, K] (ue8m0 and fp32 scales), ``fp4_quant`` on bf16
[M, K], ``kv_cache_pack`` of bf16 [T, 512] vectors into 584-byte records, ``hadamard_rotate`` of
the indexer's bf16 query [M, 64 heads, 128] rounded through FP4 (what a decode step runs). All are
memory-bound: GB/s counts bytes read plus bytes written, against 3.0 TB/s. Each row is checked
bitwise against the peer (the CPU reference kernel's torch code on the GPU tensors) before timing:
the rotation's inputs are small integers times a power of two per row, so that every fp32 sum is
exact in any order. Times are medians of CUDA-graph replays with L2 flushed (``common.time_cuda``).

    python -m seahal.bench.cuda_quant [--ops fp8_act_quant,fp4_quant,kv_cache_pack,hadamard_rotate] [--quick] [--json PATH]
    seahal bench --backend cuda --ops fp8_act_quant
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from functools import partial

import torch

from seahal.bench.common import peak_tbps
from seahal.bench.common import time_cuda as _bench

OPS = ("fp8_act_quant", "fp4_quant", "kv_cache_pack", "hadamard_rotate")
ROWS = (1, 16, 512, 4096, 16384)
QUICK_ROWS = (1, 4096)
K = 7168
"""V4-Pro hidden size (V4-Flash: 4096); a multiple of 128 and of 32."""
KV_TOKENS = (1, 64, 4096, 65536)
INDEX_HEADS, INDEX_DIM = 64, 128
"""The indexer query's heads and head dim (V4-Flash and V4-Pro)."""


def _exact_sum_rows(*shape: int) -> torch.Tensor:
    """bf16 integers in [-63, 63] times 2^e per row: every fp32 partial sum of a rotation is exact,
    so the kernel and the peer agree bit for bit whatever their summation order."""
    ints = torch.randint(-63, 64, shape, device="cuda").float()
    return (ints * torch.exp2(torch.randint(-6, 6, (*shape[:-1], 1), device="cuda").float())).bfloat16()


def _row(op: str, shape: tuple[int, ...], ours: Callable, peer: Callable, nbytes: int, quick: bool, **extra) -> dict:
    out, ref = ours(), peer()
    out, ref = (out,) if isinstance(out, torch.Tensor) else out, (ref,) if isinstance(ref, torch.Tensor) else ref
    bitwise = all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(out, ref, strict=True))
    row = {"op": op, "shape": list(shape), **extra, "bytes": nbytes, "bitwise": bitwise, "us": _bench(ours, quick), "peer_us": _bench(peer, quick)}
    row["speedup"] = row["peer_us"] / row["us"]
    row["GB/s"] = nbytes / row["us"] / 1e3
    row["%peak_bw"] = 100 * row["GB/s"] / (peak_tbps() * 1e3)
    return row


def _rows(op: str, quick: bool) -> list[dict]:
    from seahal.backends.cpu.reference import quant as reference
    from seahal.backends.cuda import quant

    ours, peer = getattr(quant, op), getattr(reference, op)
    rows = []
    if op == "kv_cache_pack":
        for t in KV_TOKENS[::2] if quick else KV_TOKENS:
            kv = torch.randn(t, 512, device="cuda").bfloat16()
            rows.append(_row(op, (t, 512), partial(ours, kv), partial(peer, kv), kv.nbytes + t * 584, quick))
            print(rows[-1], flush=True)
        return rows
    if op == "hadamard_rotate":
        for m in QUICK_ROWS if quick else ROWS:
            x = _exact_sum_rows(m, INDEX_HEADS, INDEX_DIM)
            rows.append(_row(op, tuple(x.shape), partial(ours, x, 32), partial(peer, x, 32), 2 * x.nbytes, quick))
            print(rows[-1], flush=True)
        return rows
    for m in QUICK_ROWS if quick else ROWS:
        x = torch.randn(m, K, device="cuda").bfloat16()
        if op == "fp4_quant":
            rows.append(_row(op, (m, K), partial(ours, x), partial(peer, x), x.nbytes + m * K // 2 + m * K // 8, quick))
        else:
            for fmt in ("ue8m0", "fp32"):
                args = (x, 128, fmt)
                rows.append(_row(op, (m, K), partial(ours, *args), partial(peer, *args),
                                 x.nbytes + m * K + m * K // 32, quick, scale_fmt=fmt))
        print(rows[-1], flush=True)
    return rows


def run(ops: list[str], quick: bool = False, json_path: str | None = None) -> list[dict]:
    """Benchmark the rows of ``ops``; print the table last; write JSON to ``json_path`` (or $OUT)."""
    if not torch.cuda.is_available():
        raise SystemExit("seahal bench --backend cuda needs a CUDA device")
    rows = [row for op in ops for row in _rows(op, quick)]
    path = json_path or (os.path.join(os.environ["OUT"], "cuda_quant.json") if os.environ.get("OUT") else None)
    if path:
        with open(path, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)
    print(format_table(rows))
    return rows


def rows(ops: list[str], device: torch.device, quick: bool) -> list[dict]:
    """:func:`run`'s rows (its own table printed too) in the common schema of ``seahal bench``; the
    check is bitwise equality with the reference (memory-bound codecs: no FLOPs counted)."""
    from seahal.bench.common import PEAK_BF16_TFLOPS, Case, new_row, record

    out = []
    for r in run(ops, quick=quick):
        shape = "x".join(map(str, r["shape"])) + (f" {r['scale_fmt']}" if "scale_fmt" in r else "")
        case = Case(r["op"], shape, 0, r["bytes"], PEAK_BF16_TFLOPS)
        row = new_row(case, "triton")
        row["check"] = {"err": 0.0 if r["bitwise"] else 1.0, "passed": r["bitwise"]}
        out.append(record(row, case, r["us"], {"reference": r["peer_us"]}))
    return out


def format_table(rows: list[dict]) -> str:
    """Markdown table of the rows."""
    lines = ["| op | shape | scales | ours us | peer us | speedup | GB/s | % of copy bandwidth | bitwise |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['op']} | {r['shape']} | {r.get('scale_fmt', 'ue8m0')} | {r['us']:.1f} | {r['peer_us']:.1f} | "
                     f"{r['speedup']:.1f}x | {r['GB/s']:.0f} | {r['%peak_bw']:.0f} | {r['bitwise']} |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """``seahal bench --backend cuda --ops fp8_act_quant[,fp4_quant,kv_cache_pack,hadamard_rotate]``."""
    ops = (getattr(args, "ops", None) or ",".join(OPS)).split(",")
    unknown = sorted(set(ops) - set(OPS))
    if unknown:
        print(f"cuda_quant benchmarks {', '.join(OPS)}; got {', '.join(unknown)}", file=sys.stderr)
        return 2
    run(ops, quick=getattr(args, "quick", False), json_path=getattr(args, "json", None))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", help=f"comma-separated subset of {','.join(OPS)}")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", help="write rows as JSON here (default $OUT/cuda_quant.json when $OUT is set)")
    sys.exit(main(parser.parse_args()))
