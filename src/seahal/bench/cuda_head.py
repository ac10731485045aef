"""Benchmark of the output head (``head_logits``) at decode: V4's 129280-row head streamed once.

Rows: 1, 4 and 64 tokens (sequences decoding; the GEMV, and the split-x tensor-core kernel at 64)
at V4-Flash's and V4-Pro's dims, the head in bf16 as the checkpoint stores it, x in fp32. Memory-bound: bytes are the head read once plus x and the fp32
logits, against 3.0 TB/s. Peers on the same GPU: ``F.linear`` on an fp32 copy of the head (what the
official code keeps, twice the bytes) and the CPU reference's code (row blocks widened to fp32,
then cuBLAS). The check: within the conformance rule's bound (fp32 sums), relative 1e-5.

    seahal bench --backend cuda --ops head_logits [--quick] [--json out.json]
"""

from __future__ import annotations

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
)

OPS = ("head_logits",)
VOCAB = 129280
"""V4's vocabulary (v4_ops.md §1)."""
TOKENS = (1, 4, 64)


def head_cost(tokens: int, vocab: int, dim: int, weight_bytes: int = 2) -> tuple[int, int]:
    """FLOPs ``2 T V D``; bytes: the head once, x (fp32) and the fp32 logits."""
    return 2 * tokens * vocab * dim, weight_bytes * vocab * dim + 4 * tokens * dim + 4 * tokens * vocab


def _head(dims: ModelDims, tokens: int, vocab: int, device: torch.device) -> Workload:
    torch.manual_seed(tokens)
    x = torch.randn(tokens, dims.dim, device=device)
    weight = (torch.randn(vocab, dims.dim, device=device) * dims.dim**-0.5).to(torch.bfloat16)
    kernel = implementation("head_logits", "head", "head", device)
    peers = {"reference": partial(reference("head_logits", "head"), x, weight)}
    if device.type == "cuda":
        fp32_head = weight.float()
        peers["fp32 head (F.linear)"] = partial(F.linear, x, fp32_head)
    return Workload(partial(kernel, x, weight), peers, close(1e-5))


def cases(device: torch.device, quick: bool) -> list[Case]:
    vocab = VOCAB if device.type == "cuda" else 1000
    out = []
    for dims in models(device)[: 1 if quick else None]:
        for tokens in TOKENS:
            out.append(Case("head_logits", f"{dims.name} head {vocab}x{dims.dim} bf16, T={tokens}",
                            *head_cost(tokens, vocab, dims.dim), PEAK_BF16_TFLOPS,
                            partial(_head, dims, tokens, vocab), {"tokens": tokens, "vocab": vocab, "dim": dims.dim}))
    return out


def rows(ops: list[str], device: torch.device, quick: bool) -> list[dict]:
    """Rows of ``head_logits`` in the common schema."""
    return measure_all(cases(device, quick), device, quick)
