"""Benchmark of the FP8 cache decoder (``kv_cache_unpack``): 584-byte records -> bf16 [T, 512].

Rows at the token counts of the ``kv_cache_pack`` rows (1, 64, 4096, 65536), so the two directions
compare. Memory-bound: bytes are the records read and the bf16 vectors written, against 3.0 TB/s
(the goal: the same fraction as ``kv_cache_pack``). In the decode path this op disappears into
``sparse_attention_fp8``'s register decode; standalone it serves conversions. The records are
packed from normal vectors by the reference; the check is exact (decoding is exact, v4_ops.md §12).
The peer is the CPU reference's code on the GPU tensors.

    seahal bench --backend cuda --ops kv_cache_unpack [--quick] [--json out.json]
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial

import torch

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
from seahal.hal.ops.quant import kv_record_bytes

OPS = ("kv_cache_unpack",)
TOKENS = (1, 64, 4096, 65536)
"""As ``cuda_quant.KV_TOKENS`` (the pack rows); quick runs every other one."""


def unpack_cost(tokens: int, dim: int, record: int) -> tuple[int, int]:
    """FLOPs 0 (a decode, not arithmetic worth counting); bytes: ``tokens * record`` read and
    ``tokens * dim * 2`` bf16 written."""
    return 0, tokens * record + 2 * tokens * dim


def _unpack(dims: ModelDims, tokens: int, device: torch.device) -> Workload:
    torch.manual_seed(tokens)
    kv = torch.randn(tokens, dims.head_dim, device=device, dtype=torch.bfloat16)
    args = (reference("kv_cache_pack", "quant")(kv, dims.rope_dim, dims.kv_tile), dims.head_dim, dims.rope_dim,
            dims.kv_tile)
    kernel = implementation("kv_cache_unpack", "kv_unpack", "quant", device)
    return Workload(partial(kernel, *args), {"reference": partial(reference("kv_cache_unpack", "quant"), *args)},
                    close(0.0))


def cases(device: torch.device, quick: bool) -> list[Case]:
    """One model's geometry (V4-Flash and V4-Pro share the 512-d, 584-byte record; tiny on CPU)."""
    dims = models(device)[0]
    record = kv_record_bytes(dims.head_dim, dims.rope_dim, dims.kv_tile)
    counts = (1, 16) if device.type != "cuda" else TOKENS[::2] if quick else TOKENS
    return [Case("kv_cache_unpack", f"{tokens}x{record} B -> {tokens}x{dims.head_dim} bf16",
                 *unpack_cost(tokens, dims.head_dim, record), PEAK_BF16_TFLOPS, partial(_unpack, dims, tokens),
                 {"tokens": tokens, "dim": dims.head_dim})
            for tokens in counts]


def rows(ops: list[str], device: torch.device, quick: bool) -> list[dict]:
    """Rows of ``kv_cache_unpack`` in the common schema."""
    return measure_all(cases(device, quick), device, quick)


def calls(ops: list[str], device: torch.device, quick: bool) -> Iterator[Callable[[], object]]:
    """Every kernel call of the rows, unchecked and untimed (:func:`.common.workload_calls`)."""
    return workload_calls(cases(device, quick), device)
