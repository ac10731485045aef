"""GPU benchmark of the cuda backend's MoE router (op ``moe_gate``) beside the reference run in torch.

Rows: the whole op (gate GEMM + routing) at E=256, top-6, D=4096 for several token counts, over a
bf16 W and over an fp32 W (the model's gate: a GEMV up to 4 tokens, W's three bf16 parts on the
tensor cores above); the
routing stage alone from fp32 logits [T, 256] (what the anchors'
"16384 x 256" goal counts: 16.8 MB read -> 5.6 us at 3.0 TB/s), also on one warp a program
(``route_warps=1``, no block barrier in the top-k rounds); hash routing. The peer is the CPU
reference kernel's code on the same GPU tensors (fp32 matmul, torch.sort). Each row is checked
(indices vs the peer) before timing; times are medians of CUDA-graph replays, L2 flushed before each
(``common.time_cuda``).

    python -m seahal.bench.cuda_moe_gate [--quick] [--json PATH]
    seahal bench --backend cuda --ops moe_gate
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

E, TOP_K, D = 256, 6, 4096
FULL_TOKENS = (1, 16, 64, 256, 4001, 16384)
QUICK_FULL_TOKENS = (1, 256, 16384)
FP32_W_TOKENS = (1, 1024, 16384)
QUICK_FP32_W_TOKENS = (1024,)
ROUTE_TOKENS = (256, 4001, 16384)


def _inputs(t: int, weight_dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(t)
    x = torch.randn(t, D, device="cuda", generator=gen).bfloat16()
    weight = (torch.randn(E, D, device="cuda", generator=gen) * D**-0.5).to(weight_dtype)
    return x, weight, torch.randn(E, device="cuda", generator=gen) * 0.1


def _peer_route(logits: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference kernel's routing from fp32 logits (sqrtsoftplus, bias, stable sort, renorm)."""
    from seahal.backends.cpu.reference.moe import _scores, _topk_indices

    scores = _scores(logits, "sqrtsoftplus")
    indices = _topk_indices(scores + bias, TOP_K)
    weights = scores.gather(-1, indices)
    return weights / (weights.sum(-1, keepdim=True) + 1e-20) * 1.5, indices.int()


def _two_launch(x, weight, bias, top_k, score_func, route_scale, n_groups=1, topk_groups=1, input_ids=None,
               tid2eid=None):
    """``moe_gate`` by its two launches, whatever SEAHAL_CUDA_UNVERIFIED says."""
    from seahal.backends.cuda.moe_gate import gate_logits, route

    return route(gate_logits(x, weight), bias, top_k, score_func, route_scale, input_ids, tid2eid)


def _row(name: str, t: int, ours: Callable, peer: Callable, nbytes: int, quick: bool) -> dict:
    (w, idx), (ref_w, ref_idx) = ours(), peer()
    same = (idx == ref_idx).all(dim=1)
    row = {"row": name, "T": t, "bytes": nbytes, "same_indices": float(same.float().mean()),
           "max_w_err": float((w[same] - ref_w[same]).abs().max()) if same.any() else float("nan")}
    row["us"] = _bench(ours, quick)
    row["peer_us"] = _bench(peer, quick)
    row["speedup"] = row["peer_us"] / row["us"]
    row["GB/s"] = nbytes / row["us"] / 1e3
    row["%peak_bw"] = 100 * row["GB/s"] / (peak_tbps() * 1e3)
    return row


def run(quick: bool = False, json_path: str | None = None) -> list[dict]:
    """Benchmark the rows; print the table last; write JSON to ``json_path`` (or $OUT)."""
    if not torch.cuda.is_available():
        raise SystemExit("seahal bench --backend cuda needs a CUDA device")
    from seahal.backends.cpu.reference.moe import moe_gate as reference
    from seahal.backends.cuda.moe_gate import ROUTE_WARPS, gate_logits, route

    rows = []
    full = [("full", torch.bfloat16, t) for t in (QUICK_FULL_TOKENS if quick else FULL_TOKENS)]
    full += [("full, fp32 W", torch.float32, t) for t in (QUICK_FP32_W_TOKENS if quick else FP32_W_TOKENS)]
    for name, weight_dtype, t in full:
        x, weight, bias = _inputs(t, weight_dtype)
        nbytes = x.nbytes + weight.nbytes + bias.nbytes + t * TOP_K * 8
        args = (x, weight, bias, TOP_K, "sqrtsoftplus", 1.5)
        rows.append(_row(name, t, partial(_two_launch, *args), partial(reference, *args), nbytes, quick))
        print(rows[-1], flush=True)
    for t in ROUTE_TOKENS:
        x, weight, bias = _inputs(t)
        logits = gate_logits(x, weight).sum(0)
        for name, warps in (("route from fp32 logits", ROUTE_WARPS), ("route from fp32 logits, one warp a program", 1)):
            ours = partial(route, logits[None], bias, TOP_K, "sqrtsoftplus", 1.5, route_warps=warps)
            rows.append(_row(name, t, ours, partial(_peer_route, logits, bias), logits.nbytes + t * TOP_K * 8, quick))
            print(rows[-1], flush=True)
    x, weight, bias = _inputs(256)
    tid2eid = torch.stack([torch.randperm(E, device="cuda")[:TOP_K] for _ in range(4096)]).int()
    ids = torch.randint(0, 4096, (256,), device="cuda")
    args = (x, weight, bias, TOP_K, "sqrtsoftplus", 1.5, 1, 1, ids, tid2eid)
    rows.append(_row("full, hash routing", 256, partial(_two_launch, *args), partial(reference, *args),
                     x.nbytes + weight.nbytes + 256 * TOP_K * 12, quick))
    path = json_path or (os.path.join(os.environ["OUT"], "cuda_moe_gate.json") if os.environ.get("OUT") else None)
    if path:
        with open(path, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)
    print(format_table(rows))
    return rows


def format_table(rows: list[dict]) -> str:
    """Markdown table of the rows."""
    lines = ["| row | T | ours us | peer us | speedup | GB/s | % of copy bandwidth | same indices | max w err |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['row']} | {r['T']} | {r['us']:.1f} | {r['peer_us']:.1f} | {r['speedup']:.1f}x | "
                     f"{r['GB/s']:.0f} | {r['%peak_bw']:.0f} | {r['same_indices']:.4f} | {r['max_w_err']:.1e} |")
    return "\n".join(lines)


MIN_SAME_INDICES = 0.99
"""Tokens whose expert set must match the reference's: fp32 logits summed in another order can swap
near-tied experts of a few tokens, nothing more."""


def rows(ops: list[str], device: torch.device, quick: bool) -> list[dict]:
    """:func:`run`'s rows (its own table printed too) in the common schema of ``seahal bench``;
    FLOPs are the gate GEMM's ``2 * T * D * E`` on the rows that include it."""
    from seahal.bench.common import PEAK_BF16_TFLOPS, Case, new_row, record

    out = []
    for r in run(quick=quick):
        flops = 2 * r["T"] * D * E if r["row"].startswith("full") else 0
        case = Case("moe_gate", f"{r['row']} T={r['T']} E={E} top{TOP_K}", flops, r["bytes"], PEAK_BF16_TFLOPS,
                    params={"tokens": r["T"]})
        row = new_row(case, "triton")
        row["check"] = {"err": 1 - r["same_indices"], "passed": r["same_indices"] >= MIN_SAME_INDICES}
        out.append(record(row, case, r["us"], {"reference": r["peer_us"]}))
    return out


def main(args: argparse.Namespace) -> int:
    """``seahal bench --backend cuda --ops moe_gate``: args.quick, args.json."""
    run(quick=getattr(args, "quick", False), json_path=getattr(args, "json", None))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", help="write rows as JSON here (default $OUT/cuda_moe_gate.json when $OUT is set)")
    sys.exit(main(parser.parse_args()))
