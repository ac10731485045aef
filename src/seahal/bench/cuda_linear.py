"""Benchmark of the linear family: ``fp32_linear`` (the output head and the compressors'
projections) and ``grouped_linear`` (the attention's wo_a over its FP8 weight).

``fp32_linear`` rows, at V4-Flash's and V4-Pro's dims, W in bf16 as the checkpoint stores it, x in
fp32: the head (129280 rows) at 1, 4 and 64 tokens (the GEMV; the split-x tensor-core kernel at
64), and a CSA compressor's stacked [wkv; wgate] (4 x 512 rows, one call in the model) at 1 token.
Memory-bound: bytes are W read once plus x and the fp32 output, against 3.0 TB/s. Peers on the
same GPU: ``F.linear`` on an fp32 copy of W (what the official code keeps, twice the bytes) and the
CPU reference's code (row blocks widened to fp32, then cuBLAS). The check: relative 1e-5 (fp32 sums).

``grouped_linear`` rows: wo_a (V4-Flash 8 groups, V4-Pro 16, of 1024 rows x 4096; FP8 with e8m0
block scales, x bf16) at 1 and 4 tokens (the FP8 GEMV), at 64 (a decode batch: the tensor cores
over the FP8 weight; bytes: the FP8 weight and its scales once) and at a 1024-token prefill chunk
(dequantised in one launch, then cuBLAS). Peers: the einsum over
wo_a dequantised to bf16 at load (what the model ran before the op: twice the bytes a decode step
streams; on a GPU) and the reference (dequantised per call in torch, then the einsum). Variants: K split 1,
2, 4, 8 ways up to 64 tokens (the default splits until two programs an SM). The check: relative 2^-7
(one bf16 ulp: W' is exact for e8m0 scales, so only the output rounding and the summation order
differ from the peers).

    seahal bench --backend cuda --ops fp32_linear,grouped_linear [--quick] [--json out.json]
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
from seahal.hal.formats import dequantize_weight, e8m0_scales

OPS = ("fp32_linear", "grouped_linear")
VOCAB = 129280
"""V4's vocabulary (v4_ops.md §1)."""
HEAD_TOKENS = (1, 4, 64)
WO_A_TOKENS = (1, 4, 64, 1024)
K_SPLITS = (1, 2, 4, 8)


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


def _wo_a_shape(dims: ModelDims) -> tuple[int, int, int]:
    """wo_a's (groups G, rows a group R, columns I = heads x head_dim / G)."""
    return dims.o_groups, dims.o_lora_rank, dims.heads * dims.head_dim // dims.o_groups


def _grouped(dims: ModelDims, tokens: int, device: torch.device) -> Workload:
    g, r, i = _wo_a_shape(dims)
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, g, i, generator=gen).to(torch.bfloat16).to(device)
    weight = (torch.randn(g * r, i, generator=gen) * 96).clamp(-448, 448).to(torch.float8_e4m3fn).to(device)
    exponents = torch.randint(-10, -5, (g * r // 128, i // 128), generator=gen) + 127
    scale = e8m0_scales(exponents.to(torch.uint8)).to(device)
    kernel = implementation("grouped_linear", "linear", "linear", device)
    peers = {"reference (dequantised per call)": partial(reference("grouped_linear", "linear"), x, weight, scale)}
    variants = {}
    if device.type == "cuda":
        at_load = dequantize_weight(weight, scale, torch.bfloat16)
        peers["bf16 wo_a dequantised at load (einsum)"] = partial(reference("grouped_linear", "linear"), x, at_load)
        if tokens <= 64:
            variants = {f"K split {k}": partial(kernel, x, weight, scale, split_k=k) for k in K_SPLITS}
    return Workload(partial(kernel, x, weight, scale), peers, close(2**-7), variants=variants)


def _grouped_case(dims: ModelDims, tokens: int) -> Case:
    g, r, i = _wo_a_shape(dims)
    weight_bytes = g * r * i + (g * r // 128) * (i // 128)
    flops, nbytes = 2 * tokens * g * r * i, weight_bytes + 2 * tokens * g * (i + r)
    return Case("grouped_linear", f"{dims.name} wo_a {g}x{r}x{i} fp8, T={tokens}", flops, nbytes, PEAK_BF16_TFLOPS,
                partial(_grouped, dims, tokens), {"tokens": tokens, "groups": g, "rows": r, "dim": i})


def cases(device: torch.device, quick: bool, ops: tuple[str, ...] = OPS) -> list[Case]:
    vocab = VOCAB if device.type == "cuda" else 1000
    out = []
    for dims in models(device)[: 1 if quick else None]:
        if "fp32_linear" in ops:
            out += [_case(dims, "head", tokens, vocab) for tokens in HEAD_TOKENS]
            out.append(_case(dims, "CSA compressor [wkv; wgate]", 1, 4 * dims.head_dim))
        if "grouped_linear" in ops:
            out += [_grouped_case(dims, tokens) for tokens in WO_A_TOKENS]
    return out


def rows(ops: list[str], device: torch.device, quick: bool) -> list[dict]:
    """Rows of the requested linear ops in the common schema."""
    return measure_all(cases(device, quick, tuple(ops)), device, quick)


def calls(ops: list[str], device: torch.device, quick: bool) -> Iterator[Callable[[], object]]:
    """Every kernel call of the rows, unchecked and untimed (:func:`.common.workload_calls`)."""
    return workload_calls(cases(device, quick, tuple(ops)), device)
