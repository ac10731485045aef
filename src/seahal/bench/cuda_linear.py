"""Benchmark of ``fp32_linear`` at decode: the output head and the compressors' projections.

Rows, at V4-Flash's and V4-Pro's dims, W in bf16 as the checkpoint stores it, x in fp32: the head
(129280 rows) at 1, 4 and 64 tokens (the GEMV; the split-x tensor-core kernel at 64), and a CSA
compressor's stacked [wkv; wgate] (4 x 512 rows, one call in the model) at 1 token. Memory-bound: bytes are W read once plus x and the
fp32 output, against 3.0 TB/s. Peers on the same GPU: ``F.linear`` on an fp32 copy of W (what the
official code keeps, twice the bytes) and the CPU reference's code (row blocks widened to fp32,
then cuBLAS). The check: relative 1e-5 (fp32 sums).

    seahal bench --backend cuda --ops fp32_linear [--quick] [--json out.json]
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial

import torch
from torch.nn import functional as F

from seahal.bench.common import (
    PEAK_BF16_TFLOPS,
    Case,
    ModelDims,
    Workload,
    close,
    implementation,
    measure_all,
    models,
    reference,
    workload_calls,
)

OPS = ("fp32_linear",)
VOCAB = 129280
"""V4's vocabulary (v4_ops.md §1)."""
HEAD_TOKENS = (1, 4, 64)


def linear_cost(tokens: int, rows: int, dim: int, weight_bytes: int = 2) -> tuple[int, int]:
    """FLOPs ``2 T N D``; bytes: W once, x (fp32) and the fp32 output."""
    return 2 * tokens * rows * dim, weight_bytes * rows * dim + 4 * tokens * dim + 4 * tokens * rows


def _linear(dim: int, tokens: int, rows: int, device: torch.device) -> Workload:
    torch.manual_seed(tokens)
    x = torch.randn(tokens, dim, device=device)
    weight = (torch.randn(rows, dim, device=device) * dim**-0.5).to(torch.bfloat16)
    kernel = implementation("fp32_linear", "linear", "linear", device)
    peers = {"reference": partial(reference("fp32_linear", "linear"), x, weight)}
    if device.type == "cuda":
        peers["fp32 copy of W (F.linear)"] = partial(F.linear, x, weight.float())
    return Workload(partial(kernel, x, weight), peers, close(1e-5))


def _case(dims: ModelDims, what: str, tokens: int, rows: int) -> Case:
    return Case("fp32_linear", f"{dims.name} {what} {rows}x{dims.dim} bf16, T={tokens}",
                *linear_cost(tokens, rows, dims.dim), PEAK_BF16_TFLOPS, partial(_linear, dims.dim, tokens, rows),
                {"tokens": tokens, "rows": rows, "dim": dims.dim, "weight": what})


def cases(device: torch.device, quick: bool) -> list[Case]:
    vocab = VOCAB if device.type == "cuda" else 1000
    out = []
    for dims in models(device)[: 1 if quick else None]:
        out += [_case(dims, "head", tokens, vocab) for tokens in HEAD_TOKENS]
        out.append(_case(dims, "CSA compressor [wkv; wgate]", 1, 4 * dims.head_dim))
    return out


def rows(ops: list[str], device: torch.device, quick: bool) -> list[dict]:
    """Rows of ``fp32_linear`` in the common schema."""
    return measure_all(cases(device, quick), device, quick)


def calls(ops: list[str], device: torch.device, quick: bool) -> Iterator[Callable[[], object]]:
    """Every kernel call of the rows, unchecked and untimed (:func:`.common.workload_calls`)."""
    return workload_calls(cases(device, quick), device)
