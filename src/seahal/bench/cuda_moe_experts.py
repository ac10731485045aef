"""Benchmark of the grouped routed experts (``moe_experts``) at V4-Flash and V4-Pro expert shapes.

Rows: prefill, 8192 tokens routed top-6 (about 192 rows per expert of 256, the regime of the issue's
45%-of-FP8-peak goal), and decode, 1, 16 and 64 tokens (a few rows on each touched expert: the goal is
70% of 3.0 TB/s over the touched experts' bytes); FP4 weights (the checkpoint's routed-expert
format) for both models, FP8 for V4-Flash, and bf16 for V4-Flash's prefill (a bf16 checkpoint's
experts). Routing is uniform random, distinct experts per token.
The peer is the CPU reference's code on the GPU tensors, run per touched expert on its own tokens
(:func:`reference_by_expert`: gather, dequantise, matmul, add back), the naive port a user would
write; the check is against the reference itself on a sample of the tokens, given only the experts
they route to (the reference runs every expert it is given over every token: about 30 s a call at
8192 tokens, which timed out the first GPU runs; :func:`touched_experts`).
Every row also times a 4-warp default tile on 8 warps and the other column width
(:func:`tile_variants`; 64 columns: h quantised after the gate-up GEMM, more programs an SM), the
one-token FP4 rows their tile capped to fit three programs an SM (:func:`three_programs_an_sm`),
prefill rows also 128x64 tiles on 8 warps (each decoded FP4 block serving 128 rows); FP4 decode
rows the codes read a byte at a time rather than as 4-byte words (``fp4_words=False``: what the
words took off), FP4 prefill rows x and h as the bf16 values of their FP8 quantisation
(``round_trip=True``: no widening or block scaling in the loop); the ``tl.dot_scaled`` form,
``fp4_mx=True``, is no longer a row's variant (it lost every row it was timed on, 1.09-1.9x
slower, backends/cuda/TUNING.md); decode rows
x quantised by a launch of its own rather than in every gate-up program (``quant_in_gemm=False``);
FP8 decode rows up to 16 tokens the CUDA-core GEMV (``ExpertsConfig.gemv``, :data:`FP8_GEMV`).

    seahal bench --backend cuda --ops moe_experts [--quick] [--json out.json]
    python -m seahal.bench.cuda_moe_experts --tune [--quick] [--tokens 1,16] [--model V4-Flash] [--json tune.json] [--write]

``--tune`` also sweeps the expert calls of the end-to-end bench's prefill (:func:`end_to_end_rows`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Iterator
from functools import partial
from typing import TYPE_CHECKING

import torch

from seahal.bench.common import (
    PEAK_BF16_TFLOPS,
    PEAK_FP8_TFLOPS,
    Case,
    ModelDims,
    Workload,
    close,
    implementation,
    measure_all,
    models,
    reference,
    time_us,
    workload_calls,
)
from seahal.hal.formats import e8m0_scales, gather_rows

if TYPE_CHECKING:
    from seahal.backends.cuda.moe_experts import ExpertsConfig

OPS = ("moe_experts",)
BF16_TOL = 1e-2
"""bf16 output; both sides FP8-quantise the GEMM inputs at the same points in 1x128 ue8m0 tiles, so
only accumulation order and an occasional e4m3 rounding flip of h (2^-4 relative, one element) differ."""
SWIGLU_LIMIT = 10.0


def expert_bytes(fmt: str, dim: int, inter: int) -> int:
    """Bytes of one expert's w1, w3 [I, D] and w2 [D, I] with their scales.

    fp4: ``3 * I * D / 2`` packed e2m1 plus ``3 * I * D / 32`` one-byte e8m0 scales;
    fp8: ``3 * I * D`` e4m3 plus ``3 * (I / 128) * (D / 128)`` fp32 block scales; dense: bf16.
    """
    if fmt == "fp4":
        return 3 * inter * dim // 2 + 3 * inter * dim // 32
    if fmt == "dense":
        return 3 * inter * dim * 2
    return 3 * inter * dim + 4 * 3 * (inter // 128) * (dim // 128)


def experts_cost(tokens: int, top_k: int, dim: int, inter: int, touched: int, fmt: str) -> tuple[int, int]:
    """FLOPs and bytes of routed experts: ``6 * T * k * D * I`` (gate, up and down GEMMs over every
    routed row); the ``touched`` experts' weights once, bf16 x read and y written (``2 * T * D * 2``),
    fp32 routing weights and int32 ids (``T * k * 8``)."""
    return 6 * tokens * top_k * dim * inter, touched * expert_bytes(fmt, dim, inter) + 4 * tokens * dim + 8 * tokens * top_k


def routing(tokens: int, experts: int, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform random distinct experts per token (int32 [T, k]) and weights summing to 1 (fp32 [T, k]), on CPU."""
    gen = torch.Generator().manual_seed(tokens)
    ids = torch.rand(tokens, experts, generator=gen).argsort(dim=-1)[:, :top_k].int()
    weights = torch.rand(tokens, top_k, generator=gen) + 0.1
    return ids, weights / weights.sum(-1, keepdim=True)


def _random_weight(
    fmt: str, experts: int, rows: int, cols: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Random codes drawn directly as bytes (no fp32 master copy: V4-Pro's experts are 25 G weights).

    fp4: every byte is two valid e2m1 codes; scales 2^-9..2^-7 as e8m0. fp8: e4m3 bytes with the
    NaN codes (0x7F, 0xFF) moved to 0x7E; fp32 block scales 2^-13..2^-11. dense: bf16 normal
    values of deviation 2^-6 (about the FP8 weights' spread), no scale."""
    if fmt == "dense":
        return torch.randn(experts, rows, cols, dtype=torch.bfloat16, device=device).mul_(2**-6), None
    if fmt == "fp4":
        packed = torch.randint(0, 256, (experts, rows, cols // 2), dtype=torch.uint8, device=device)
        scale = torch.randint(118, 121, (experts, rows, cols // 32), dtype=torch.uint8, device=device)
        return packed, e8m0_scales(scale)
    codes = torch.randint(0, 256, (experts, rows, cols), dtype=torch.uint8, device=device)
    codes = torch.where(codes & 0x7F == 0x7F, codes - 1, codes)
    scale = torch.exp2(-torch.randint(11, 14, (experts, -(-rows // 128), cols // 128), device=device).float())
    return codes.view(torch.float8_e4m3fn), scale


def _arguments(dims: ModelDims, fmt: str, tokens: int, device: torch.device) -> tuple:
    """moe_experts' arguments for a row: x, routing, the three stacked weights and the limit."""
    torch.manual_seed(tokens)
    ids, weights = (t.to(device) for t in routing(tokens, dims.experts, dims.top_k))
    x = torch.randn(tokens, dims.dim, device=device, dtype=torch.bfloat16)
    w1, s1 = _random_weight(fmt, dims.experts, dims.inter, dims.dim, device)
    w3, s3 = _random_weight(fmt, dims.experts, dims.inter, dims.dim, device)
    w2, s2 = _random_weight(fmt, dims.experts, dims.dim, dims.inter, device)
    return x, weights, ids, w1, s1, w3, s3, w2, s2, SWIGLU_LIMIT


def reference_by_expert(
    x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
    w1: torch.Tensor, w1_scale: torch.Tensor | None, w3: torch.Tensor, w3_scale: torch.Tensor | None,
    w2: torch.Tensor, w2_scale: torch.Tensor | None, swiglu_limit: float,
) -> torch.Tensor:
    """The reference ``moe_experts`` run expert by expert on the tokens routed to it, added back
    in expert order. Each token's math is the reference's (a token's GEMM inputs are quantised per
    row, so gathering changes nothing) and so is its order of addition; the cost is a naive
    port's: one host sync, then per touched expert a gather, its dequantised weights and 3 GEMMs."""
    moe = reference("moe_experts", "moe")
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in topk_ids.unique().tolist():
        if e < 0:
            continue
        tokens, slots = (topk_ids == e).nonzero(as_tuple=True)
        one = slice(e, e + 1)
        part = moe(x[tokens], topk_weights[tokens, slots, None], torch.zeros_like(tokens)[:, None],
                   w1[one], None if w1_scale is None else w1_scale[one], w3[one],
                   None if w3_scale is None else w3_scale[one], w2[one],
                   None if w2_scale is None else w2_scale[one], swiglu_limit)
        y.index_add_(0, tokens, part.float())
    return y.to(x.dtype)


def touched_experts(topk_ids: torch.Tensor, *weights_and_limit: object) -> tuple:
    """``(topk_ids, w1, w1_scale, w3, w3_scale, w2, w2_scale, limit)`` cut down to the experts
    ``topk_ids`` routes to, renumbered in their order: the reference loops over every expert it is
    given (a masked pass of each, its weights dequantised), and an untouched one adds only zeros,
    so its output is the same while a decode row's oracle runs 6 or ~80 experts instead of 256 or
    384 (seconds to tens of seconds each on the H100)."""
    *stacked, limit = weights_and_limit
    touched = topk_ids[topk_ids >= 0].unique()  # ascending: the reference's order of addition
    if touched.numel() == stacked[0].shape[0]:
        return (topk_ids, *weights_and_limit)
    renumbered = torch.where(topk_ids >= 0, torch.searchsorted(touched, topk_ids.clamp(min=0)), -1)
    return (renumbered.to(topk_ids.dtype), *(None if w is None else gather_rows(w, touched) for w in stacked), limit)


def reference_over_touched(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                           *weights_and_limit: object) -> torch.Tensor:
    """The reference ``moe_experts`` given only the experts ``topk_ids`` routes to (:func:`touched_experts`):
    the same output (a call, so that building a row's workload reads no routing on the host)."""
    return reference("moe_experts", "moe")(x, topk_weights, *touched_experts(topk_ids, *weights_and_limit))


CHECKED_TOKENS = 256
"""Tokens of a row the reference checks (every T / 256th): its cost grows with every expert times
every token."""


def _experts(dims: ModelDims, fmt: str, stage: str, tokens: int, device: torch.device) -> Workload:
    args = _arguments(dims, fmt, tokens, device)
    kernel = implementation("moe_experts", "moe_experts", "moe", device)
    sample = torch.arange(0, tokens, max(1, tokens // CHECKED_TOKENS), device=device)
    x, weights, ids, *rest = args
    oracle = partial(reference_over_touched, x[sample], weights[sample], ids[sample], *rest)
    check = close(BF16_TOL)
    peers = {"reference, per expert": partial(reference_by_expert, *args)}
    variants = {}
    if device.type == "cuda":
        from seahal.backends.cuda.moe_experts import FP8_GEMV, select_experts_config

        config = select_experts_config(tokens * dims.top_k, fmt, dims.inter, dims.dim, device)  # the default launch
        if fmt == "fp8" and tokens <= GEMV_MAX_TOKENS:  # each routed row on the CUDA cores
            variants["gemv"] = partial(kernel, *args, config=FP8_GEMV)
        for c in tile_variants(config, stage):
            cap = f", {c.max_registers} registers" if c.max_registers else ""
            variants[f"{c.block_m}x{c.block_n} tiles, {c.num_warps} warps{cap}"] = partial(kernel, *args, config=c)
        if stage == "decode":  # x (and a narrow tile's h) quantised by a launch of its own, not per program
            apart = dataclasses.replace(config, quant_in_gemm=False)
            variants["x quantised apart"] = partial(kernel, *args, config=apart)
        if fmt == "fp4" and stage == "decode":  # the weights-first decode's codes a byte at a time
            variants["codes a byte at a time"] = partial(kernel, *args, config=dataclasses.replace(config, fp4_words=False))
        if fmt == "fp4" and stage == "prefill":  # x and h as the bf16 values of their FP8 quantisation
            round_trip = dataclasses.replace(config, round_trip=True)
            variants["activations as bf16 values"] = partial(kernel, *args, config=round_trip)
    return Workload(partial(kernel, *args), peers, lambda out, ref: check(out[sample], ref), oracle, variants)


def three_programs_an_sm(config: ExpertsConfig) -> ExpertsConfig:
    """``config`` capped at :data:`~seahal.backends.cuda.moe_experts.THREE_PROGRAMS_AN_SM` registers
    on 3 pipeline stages: the one-token FP4 tiles in one wave instead of two, spilling a little."""
    from seahal.backends.cuda.moe_experts import THREE_PROGRAMS_AN_SM

    return dataclasses.replace(config, max_registers=THREE_PROGRAMS_AN_SM, num_stages=3)


def tile_variants(config: ExpertsConfig, stage: str) -> list[ExpertsConfig]:
    """The tiles a row times beside its default ``config``: a 4-warp default's tile on 8 warps
    (about half the registers a thread, against programs an SM; the 8-warp defaults won against 4,
    and their tiles on 4 warps would spill or, at one FP4 token, load bytes), a one-token 8-warp
    default capped to fit three programs an SM (:func:`three_programs_an_sm`), the other column
    width (64 columns, 4 warps: 2-5 programs an SM in the sm_90 compile; 128 columns, 8 warps for
    64-row tiles, else 4: the FP4 default until 14a3a20) and, at prefill, 128-row tiles of the
    default's columns on 8 warps (each weight tile loaded, and FP4 decoded, once for 128 rows: FP4
    128x64 about 1/3 fewer instructions a row; FP8 128x128 31-35% fewer loop instructions a
    multiply-add than the 64x128 default, with m64n128 wgmma steps a warpgroup for m64n64, in the
    sm_90 SASS of Triton 3.6)."""
    tiles = [dataclasses.replace(config, num_warps=8)] if config.num_warps == 4 else []
    if stage == "decode" and config.num_warps == 8 and config.block_m == 16:  # one token's FP4 tile
        tiles.append(three_programs_an_sm(config))
    if config.block_n == 128:
        tiles.append(dataclasses.replace(config, block_n=64, num_warps=4))
    else:
        tiles.append(dataclasses.replace(config, block_n=128, num_warps=8 if config.block_m >= 64 else 4))
    if stage == "prefill":
        tiles.append(dataclasses.replace(config, block_m=128, num_warps=8))
    return tiles


GEMV_MAX_TOKENS = 16
"""FP8 decode rows up to this many tokens also time ``ExpertsConfig.gemv`` (about one routed row an
expert; past it the GEMV would read an expert's weights once per row)."""


def _token_counts(device: torch.device, quick: bool) -> tuple[tuple[str, int], ...]:
    """(stage, tokens) of the rows: prefill 8192, decode 1 (one sequence), 16 and 64 (tiny counts
    in CPU smoke mode)."""
    if device.type != "cuda":
        return (("prefill", 16), ("decode", 4))
    return (("prefill", 8192), ("decode", 1), ("decode", 16)) + (("decode", 64),) * (not quick)


SHARED_TOKENS = (1, 16)
"""Decode token counts of the shared-expert rows."""


def _rows(device: torch.device, quick: bool) -> list[tuple[ModelDims, str, str, int]]:
    """(dims, weight format, stage, tokens) of the rows: each model's routed experts (FP4, and FP8
    for V4-Flash unless quick) at :func:`_token_counts`, V4-Flash's in bf16 at prefill unless
    quick (the bf16 end-to-end rows' experts: one 4-warp program an SM by its registers and shared
    memory in the sm_90 compile of their default tile), then its shared expert (FP8, the release's
    format; one expert every token routes to, with weight 1) at :data:`SHARED_TOKENS` tokens: the
    end-to-end decode step's one-row calls, which a routed row's launch config does not cover."""
    rows = []
    for dims in models(device):
        for fmt in ("fp4",) if dims.name == "V4-Pro" or quick else ("fp4", "fp8"):
            rows += [(dims, fmt, stage, tokens) for stage, tokens in _token_counts(device, quick)]
        if dims.name != "V4-Pro" and not quick:  # a bf16 checkpoint's experts, at prefill
            rows += [(dims, "dense", stage, tokens) for stage, tokens in _token_counts(device, quick) if stage == "prefill"]
        shared = dataclasses.replace(dims, experts=1, top_k=1)
        rows += [(shared, "fp8", "decode", tokens) for tokens in SHARED_TOKENS]
    return rows


def cases(device: torch.device, quick: bool) -> list[Case]:
    out = []
    for dims, fmt, stage, tokens in _rows(device, quick):
        touched = int(routing(tokens, dims.experts, dims.top_k)[0].unique().numel())
        flops, nbytes = experts_cost(tokens, dims.top_k, dims.dim, dims.inter, touched, fmt)
        out.append(Case("moe_experts", f"{dims.name} {fmt} {stage} T={tokens} top{dims.top_k}/{dims.experts}",
                        flops, nbytes, PEAK_BF16_TFLOPS if fmt == "dense" else PEAK_FP8_TFLOPS,
                        partial(_experts, dims, fmt, stage, tokens),
                        {"model": dims.name, "weights": fmt, "tokens": tokens, "touched_experts": touched}))
    return out


def _route(dims: ModelDims, tokens: int, device: torch.device) -> Workload:
    """The routing tables alone: ``route`` (decode: one Triton launch, ``route_small``; prefill:
    three, ``route_blocked``) against torch's sort (``route_sorted``), which builds the same
    tables; in CPU smoke mode the sort on both sides."""
    from seahal.backends.cuda.moe_experts import (
        route,
        route_sorted,
        select_experts_config,
    )

    ids, weights = (t.to(device) for t in routing(tokens, dims.experts, dims.top_k))
    block_m = select_experts_config(tokens * dims.top_k, "fp4", dims.inter, dims.dim, device).block_m
    args = (weights, ids, dims.experts, block_m)
    kernel = route if device.type == "cuda" else route_sorted
    return Workload(partial(kernel, *args), {"torch sort": partial(route_sorted, *args)}, _same_tables)


def _same_tables(out, ref) -> tuple[float, bool]:
    """Routing tables are integers and exact fp32 sums: equal or wrong."""
    same = all(torch.equal(getattr(out, f), getattr(ref, f)) for f in ("tiles", "slots", "weights", "positions", "n_valid"))
    return (0.0 if same else 1.0), same


def route_cases(device: torch.device, quick: bool) -> list[Case]:
    """The routing kernels on their own (inside the rows above): T*k rows in, tables out."""
    out = []
    for dims in models(device):
        for stage, tokens in _token_counts(device, quick):
            rows_in = tokens * dims.top_k
            nbytes = 8 * rows_in + 4 * (3 * rows_in + tokens * dims.top_k + 3 * rows_in)  # ids+weights in; tables out
            out.append(Case("moe_experts", f"{dims.name} route T={tokens} top{dims.top_k}/{dims.experts}", 0, nbytes,
                            PEAK_FP8_TFLOPS, partial(_route, dims, tokens), {"model": dims.name, "tokens": tokens,
                                                                             "part": "routing tables only"}))
    return out


def rows(ops: list[str], device: torch.device, quick: bool) -> list[dict]:
    """Rows of ``moe_experts``' routing alone (seconds in all), then of the whole op in the common
    schema (20-50 s a row on the H100, mostly compiling the variants' kernels): a step cut at its
    limit, as the H100's were after 9 or 10 of the op's 12 rows, still has the routing's."""
    return measure_all(route_cases(device, quick) + cases(device, quick), device, quick)


# -- tuning -----------------------------------------------------------------------------------------
def tune_candidates(tokens: int, fp4: bool) -> list:
    """The launch configs ``--tune`` times for a row of ``tokens`` tokens: decode (<= 64 tokens)
    16-row tiles (and 32 past :data:`GEMV_MAX_TOKENS` tokens, where a touched expert has a few
    rows) and K splits (None: ``decode_splits``' choice), prefill 32-128-row tiles;
    each with 128- and 64-column tiles on 4 and 8 warps (64: h quantised after the gate-up GEMM;
    two to five 4-warp programs fit an SM where the 128-column ones fit one or two, and each
    program's loop waits on its own MMAs and barriers; 128x64 on 8 warps decodes each FP4 block
    for 128 rows at about a third fewer instructions a row than 64x128). FP4 blocks are decoded
    to bf16: the ``tl.dot_scaled`` form lost in every row measured. Decode rows also each tile
    with x quantised by a launch of its own (``quant_in_gemm=False``, at the heuristic's K splits);
    FP4 rows of up to two tokens the 16x128 8-warp tile capped to three programs an SM
    (:func:`three_programs_an_sm`); FP4 prefill rows each tile with x and h as the bf16 values of
    their FP8 quantisation (``round_trip``). FP8 weights up to :data:`GEMV_MAX_TOKENS` tokens also the
    CUDA-core GEMV (``gemv``) at 16 and 32 weight rows a program."""
    from seahal.backends.cuda.moe_experts import ExpertsConfig

    decode = tokens <= 64
    gemv = [ExpertsConfig(16, rows, warps, gemv=True) for rows in (16, 32) for warps in (4, 8)]
    tiles = [
        ExpertsConfig(block_m, block_n, warps, 4 if decode else 3, split_k=split)
        for block_m in (((16,) if tokens <= GEMV_MAX_TOKENS else (16, 32)) if decode else (32, 64, 128))
        for block_n, warps in ((128, 4), (128, 8), (64, 4), (64, 8))
        for split in ((None, 1, 2, 4) if decode else (1,))
    ]
    apart = [dataclasses.replace(c, quant_in_gemm=False) for c in tiles if decode and c.split_k is None]
    one_token = fp4 and tokens <= 2
    capped = [three_programs_an_sm(ExpertsConfig(16, 128, 8, split_k=split)) for split in (None, 4)] if one_token else []
    round_trip = [dataclasses.replace(c, round_trip=True) for c in tiles] if fp4 and not decode else []
    return tiles + apart + capped + round_trip + (gemv if tokens <= GEMV_MAX_TOKENS and not fp4 else [])


def tune_row(run: Callable, candidates: list, expected: torch.Tensor, time: Callable[[Callable], float]) -> dict:
    """Time ``run(config)`` for each candidate whose output is within BF16_TOL of ``expected``;
    {"best": config as a dict, "us", "trials": [{config, us or None, err}]}, best None if none passed."""
    trials = []
    for config in candidates:
        err, passed = close(BF16_TOL)(run(config), expected)
        us = time(partial(run, config)) if passed else None
        trials.append({"config": dataclasses.asdict(config), "us": us, "err": err})
    timed = [t for t in trials if t["us"] is not None]
    best = min(timed, key=lambda t: t["us"]) if timed else None
    return {"best": best and best["config"], "us": best and best["us"], "trials": trials}


def tune(device: torch.device, quick: bool = False, tokens_only: Collection[int] | None = None,
         model: str | None = None, done: Callable[[list[dict]], None] = lambda results: None) -> list[dict]:
    """For every row of :func:`cases` (those of ``tokens_only`` tokens and the ``model`` named, if
    given): the default launch's time and the fastest of :func:`tune_candidates` (what a committed
    config table would hold), printed as one line a row; ``done(results so far)`` after each row."""
    from seahal.backends.cuda.moe_experts import moe_experts

    results = []
    for dims, fmt, stage, tokens in _tuned_rows(device, quick, tokens_only, model):
        args, default, candidates = _sweep(dims, fmt, tokens, device)
        rows = tokens * dims.top_k
        expected = reference_by_expert(*args)
        tuned = tune_row(lambda config, args=args: moe_experts(*args, config=config), candidates, expected,
                         lambda fn: time_us(fn, device, quick)[0])
        default_us = time_us(partial(moe_experts, *args, config=default), device, quick)[0]
        results.append({"shape": f"{dims.name} {fmt} {stage} T={tokens} top{dims.top_k}/{dims.experts}",
                        "format": fmt, "rows": rows, "inter": dims.inter, "dim": dims.dim,
                        "default": dataclasses.asdict(default), "default_us": default_us, **tuned})
        r = results[-1]
        print(f"{r['shape']}: default {default_us:.1f} us, best {r['us'] and round(r['us'], 1)} us "
              f"{r['best']}", flush=True)
        done(results)
    return results


def token_filter(text: str | None) -> set[int] | None:
    """``--tokens 1,8192`` -> {1, 8192}: the token counts of the rows to tune (None: every row)."""
    return None if text is None else {int(t) for t in text.split(",")}


def _sweep(dims: ModelDims, fmt: str, tokens: int, device: torch.device) -> tuple[tuple, ExpertsConfig, list]:
    """One swept row's ``moe_experts`` arguments, its default launch config and the candidates."""
    from seahal.backends.cuda.moe_experts import select_experts_config

    default = select_experts_config(tokens * dims.top_k, fmt, dims.inter, dims.dim, device)
    return _arguments(dims, fmt, tokens, device), default, tune_candidates(tokens, fmt == "fp4")


def end_to_end_rows(device: torch.device) -> list[tuple[ModelDims, str, str, int]]:
    """(dims, weight format, stage, tokens) of the expert calls in the end-to-end bench's prefills
    (``seahal bench --ops model``, :func:`seahal.bench.model_e2e.scale`: the 4-layer V4-Flash of 64
    experts at 1k and 4k tokens): its routed FP4 experts (about 96 rows an expert at 1k, where the
    8192-token row of 256 experts has about 192) and its FP8 shared expert over every token. None
    in CPU smoke mode.

    Tuned, not benched: their row counts key table entries (:func:`~seahal.backends.cuda.moe_experts.rows_class`)
    that no bench row reaches, and these grouped GEMMs were 9.8 of the 15.3 ms of kernels in the
    captured 1k prefill on the H100 (14a3a20)."""
    from seahal.bench.model_e2e import scale

    if device.type != "cuda":
        return []
    e2e = scale(device, quick=False)
    c = e2e.config
    routed = dataclasses.replace(models(device)[0], dim=c["dim"], inter=c["moe_inter_dim"],
                                 experts=c["n_routed_experts"], top_k=c["n_activated_experts"])
    shared = dataclasses.replace(routed, experts=1, top_k=1)
    return [row for tokens in e2e.contexts for row in ((routed, "fp4", "prefill", tokens), (shared, "fp8", "prefill", tokens))]


def _tuned_rows(device: torch.device, quick: bool, tokens_only: Collection[int] | None,
                model: str | None) -> list[tuple[ModelDims, str, str, int]]:
    """The rows :func:`tune` sweeps, those of ``tokens_only`` tokens and the ``model`` named where
    given: the end-to-end prefill's first (:func:`end_to_end_rows`), then the bench's (:func:`_rows`)."""
    return [(dims, fmt, stage, tokens) for dims, fmt, stage, tokens in end_to_end_rows(device) + _rows(device, quick)
            if (model is None or dims.name == model) and (tokens_only is None or tokens in tokens_only)]


def calls(ops: list[str], device: torch.device, quick: bool) -> Iterator[Callable[[], object]]:
    """Every kernel call of the rows (the routing rows', then each row's default launch and
    variants), unchecked and untimed (:func:`.common.workload_calls`; a row's 20-50 s on the H100
    were mostly compiling its variants)."""
    return workload_calls(route_cases(device, quick) + cases(device, quick), device)


def tune_calls(device: torch.device, quick: bool, tokens_only: Collection[int] | None = None,
               model: str | None = None) -> Iterator[Callable[[], object]]:
    """Every kernel call of :func:`tune`'s sweep (each swept row's default launch and candidates),
    unchecked and untimed: what ``python -m seahal.testing.triton_precompile tune-experts``
    compiles ahead of it."""
    from seahal.backends.cuda.moe_experts import moe_experts

    for dims, fmt, _, tokens in _tuned_rows(device, quick, tokens_only, model):
        args, default, candidates = _sweep(dims, fmt, tokens, device)
        yield from (partial(moe_experts, *args, config=c) for c in (default, *candidates))


TABLE_MIN_GAIN = 1.1
"""A tuned config enters the committed table when it is this much faster than the default launch:
less is within the run-to-run spread the H100 showed for one-token rows (85-96 us, TUNING.md)."""


def experts_table_source(results: list[dict], min_gain: float = TABLE_MIN_GAIN) -> str:
    """The entries of ``moe_experts.SM90_CONFIGS`` for the tuned ``results`` whose best config is
    at least ``min_gain`` times faster than the default launch, one a line."""
    from seahal.backends.cuda.moe_experts import ExpertsConfig, rows_class

    lines = []
    for r in results:
        if r["us"] is None or r["us"] * min_gain > r["default_us"]:
            continue
        c = r["best"]
        fields = [f"{c['block_m']}, {c['block_n']}"] + [  # the tile, then every field off its default
            f"{f.name}={c[f.name]!r}" for f in dataclasses.fields(ExpertsConfig)[2:] if c[f.name] != f.default]
        lines.append(f'    ("{r["format"]}", {rows_class(r["rows"])}, {r["inter"]}, {r["dim"]}): '
                     f'ExpertsConfig({", ".join(fields)}),  # {r["shape"]}: {r["us"]:.1f} us, default {r["default_us"]:.1f}')
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``--tune`` on a GPU (results to ``--json``); ``--write`` commits the winners to
    ``moe_experts.SM90_CONFIGS``, from this run or, with ``--from-json``, from a run's saved results
    (no GPU needed: the device hands back only its result files)."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tune", action="store_true", help="time every tune_candidates config of each row")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tokens", help="only the rows of these token counts, e.g. 1,16")
    parser.add_argument("--model", choices=[dims.name for dims in models(torch.device("cuda"))], help="only this model's rows")
    parser.add_argument("--json", help="write the tuning results here (rewritten after every row)")
    parser.add_argument("--from-json", metavar="PATH", help="the results of an earlier --tune --json, instead of tuning")
    parser.add_argument("--write", action="store_true",
                        help=f"replace moe_experts.SM90_CONFIGS with the configs >= {TABLE_MIN_GAIN}x faster than the default")
    args = parser.parse_args(argv)
    if args.tune == bool(args.from_json):
        parser.error("give --tune (on a GPU) or --from-json (results of one); the rows run through "
                     "`seahal bench --backend cuda --ops moe_experts`")

    def save(results: list[dict]) -> None:
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)

    if args.from_json:
        with open(args.from_json) as f:
            results = json.load(f)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("tuning moe_experts needs a CUDA device")
        results = tune(torch.device("cuda"), args.quick, token_filter(args.tokens), args.model, done=save)
        save(results)
    if args.write:
        from seahal.bench.common import write_config_table

        print(f"tuned table written to {write_config_table('moe_experts', 'ExpertsTable', experts_table_source(results))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
