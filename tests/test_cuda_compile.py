"""Every Triton kernel of the cuda backend compiles for sm_90 (H100) with the launches its wrappers make.

The interpreter tests (tests/test_cuda_*.py) check the numbers but not that the GPU compiler accepts
the code, nor the GPU launch configs. Here each wrapper runs at V4-Flash shapes (dim 4096, 64 heads of
512, indexer 64 x 128, 256 experts of 2048, hc_mult 4), decode and prefill, with its launches
captured instead of run (:mod:`seahal.testing.triton_compile`); each distinct launch is compiled to
PTX for sm_90 with Triton's bundled ptxas. No GPU is needed.

The compiling runs in a child process: the interpreter tests set ``TRITON_INTERPRET=1`` for this
process, and a kernel module imported under it never compiles.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from unittest import mock

import pytest

from seahal.testing.triton_interpreter import require_triton

B = 1
DIM, HEADS, HEAD_DIM, ROPE_DIM = 4096, 64, 512, 64
INDEX_HEADS, INDEX_DIM, INDEX_TOPK = 64, 128, 512
EXPERTS, INTER, TOP_K, HC = 256, 2048, 6, 4
EXPERTS_BUILT = 8
"""Expert count of the weight tensors handed to moe_experts: the kernels do not depend on it."""
TOKENS = {"decode": 1, "prefill": 4096}


def _empty(*shape, dtype=None):
    import torch

    return torch.empty(shape, dtype=dtype or torch.float32, device="cuda")


def _gemms():
    """The committed sm90 GEMM configs (plus the heuristic's), one per code shape, at a shape using it,
    the persistent variant of each prefill (M >= 512) Triton config and, for FP4, each config with e8m0
    scales both decoded to bf16 (the tables' form, also what fp32 scales take) and through
    ``tl.dot_scaled`` (``fp4_mx=True``: a tuner candidate),
    and the Gluon ping-pong FP8 kernel (``pingpong=True``)."""
    import dataclasses

    import torch

    from seahal.backends.cuda import _gemm, fp4_gemm, fp8_gemm

    for module, launch, b_cols, b_dtype, sb_cols in (
        (fp8_gemm, fp8_gemm.launch_fp8_gemm, lambda k: k, torch.float8_e4m3fn, lambda k: k // 128),
        (fp4_gemm, fp4_gemm.launch_fp4_gemm, lambda k: k // 2, torch.uint8, lambda k: k // 32),
    ):
        table = {**module.CONFIGS["sm90"], (1, 7168, 2048): _gemm.heuristic_config(1, 7168, 2048, 132)}
        chosen = {}  # one config per code shape: num_stages and group_m only change the pipelining
        for key, c in table.items():
            variants = [c, dataclasses.replace(c, persistent=1)] if key[0] >= 512 and not c.pingpong else [c]
            if module is fp4_gemm:
                variants += [dataclasses.replace(v, fp4_mx=True) for v in variants]
            for v in variants:
                code_shape = (v.block_m, v.block_n, v.num_warps, v.split_k > 1, v.tma, v.persistent > 0, v.fp4_mx,
                              v.pingpong)
                chosen.setdefault(code_shape, (v, key))
        for config, (m, n, k) in chosen.values():
            a, sa = _empty(m, k, dtype=torch.float8_e4m3fn), _empty(m, k // 128)
            b = _empty(n, b_cols(k), dtype=b_dtype)
            sb_rows = -(-n // 128) if module is fp8_gemm else n
            formats = ((torch.float32, torch.bfloat16), (torch.float8_e8m0fnu, torch.float32))
            mx = module is fp4_gemm and config.fp4_mx  # e8m0 scales only (fp32 ones: the bf16 form, compiled above)
            for scale_dtype, out_dtype in formats[1:] if mx else formats:
                sb = _empty(sb_rows, sb_cols(k), dtype=scale_dtype)
                launch(a, sa, b, sb, _empty(m, n, dtype=out_dtype), config)
                if config.split_k == 1:
                    break  # the e8m0 / fp32-output variant with the split-K configs only
    # the Gluon ping-pong kernel (in the table at M >= 4096 where it won on the H100, a tuner and
    # bench candidate from M = 512): both tile widths, each with fp32 weight scales and bf16
    # output, and with e8m0 scales and fp32 output
    m, n, k = 4096, 4096, 8192
    fp8 = torch.float8_e4m3fn
    # and the Triton kernel's 128-row TMA tiles, what a ping-pong entry runs on a Triton without Gluon
    for config in (_gemm.GemmConfig(128, 128, 4, 4, pingpong=True), _gemm.GemmConfig(128, 64, 4, 6, pingpong=True),
                   _gemm.GemmConfig(128, 128, 8, 3, tma=True), _gemm.GemmConfig(128, 128, 8, 3, tma=True, persistent=1)):
        for scale_dtype, out_dtype in ((torch.float32, torch.bfloat16), (torch.float8_e8m0fnu, torch.float32)):
            fp8_gemm.launch_fp8_gemm(
                _empty(m, k, dtype=fp8), _empty(m, k // 128), _empty(n, k, dtype=fp8),
                _empty(n // 128, k // 128, dtype=scale_dtype), _empty(m, n, dtype=out_dtype), config,
            )


def _moe(t: int):
    import dataclasses

    import torch

    from seahal.backends.cuda import moe_experts, moe_gate
    from seahal.bench.cuda_moe_experts import tile_variants

    x = _empty(t, DIM, dtype=torch.bfloat16)
    ids = torch.empty((t,), dtype=torch.int64, device="cuda")
    tid2eid = torch.empty((129280, TOP_K), dtype=torch.int32, device="cuda")
    gate_weight = _empty(EXPERTS, DIM, dtype=torch.bfloat16)
    moe_gate.moe_gate(x, gate_weight, _empty(EXPERTS), TOP_K)
    moe_gate.moe_gate(x, gate_weight, None, TOP_K, input_ids=ids, tid2eid=tid2eid)
    moe_gate.route(moe_gate.gate_logits(x, gate_weight), _empty(EXPERTS), TOP_K, route_warps=1)  # a bench row
    weights, top = _empty(t, TOP_K), torch.empty((t, TOP_K), dtype=torch.int64, device="cuda")
    e = EXPERTS_BUILT
    fp8, e8m0, shapes = torch.float8_e4m3fn, torch.float8_e8m0fnu, ((INTER, DIM), (INTER, DIM), (DIM, INTER))
    fp8_weights = [w for r, c in shapes for w in (_empty(e, r, c, dtype=fp8), _empty(e, r // 128, c // 128, dtype=e8m0))]

    def fp4_weights(scale_dtype):
        return [w for r, c in shapes
                for w in (_empty(e, r, c // 2, dtype=torch.uint8), _empty(e, r, c // 32, dtype=scale_dtype))]

    moe_experts.moe_experts(x, weights, top, *fp8_weights)  # FP8 weights, e8m0 scales
    if t <= 16:  # and the CUDA-core GEMV (a bench variant)
        moe_experts.moe_experts(x, weights, top, *fp8_weights, config=moe_experts.FP8_GEMV)
    default = moe_experts.experts_config(t * TOP_K, "fp4", x.device)
    for scale_dtype, mx in ((torch.float32, False), (e8m0, False), (e8m0, True)):
        # FP4 weights decoded to bf16 (the default), and e8m0 through tl.dot_scaled
        moe_experts.moe_experts(x, weights, top, *fp4_weights(scale_dtype), config=dataclasses.replace(default, fp4_mx=mx))
    prefill = t * TOP_K > moe_experts.QUANT_IN_GEMM_MAX_ROWS
    variants = tile_variants(default, "prefill" if prefill else "decode")  # the bench's other tiles
    if not prefill:  # and its decode rows' x quantised by a launch of its own, the codes read a byte at a time
        variants += [dataclasses.replace(default, quant_in_gemm=False), dataclasses.replace(default, fp4_words=False)]
    else:  # and its prefill rows' activations as bf16 values
        variants.append(dataclasses.replace(default, round_trip=True))
        fp8_default = moe_experts.experts_config(t * TOP_K, "fp8", x.device)
        moe_experts.moe_experts(x, weights, top, *fp8_weights, config=dataclasses.replace(fp8_default, quant_in_gemm=False))
        for config in tile_variants(fp8_default, "prefill"):  # and the FP8 prefill rows' other tiles
            moe_experts.moe_experts(x, weights, top, *fp8_weights, config=config)
    for config in variants:
        moe_experts.moe_experts(x, weights, top, *fp4_weights(e8m0), config=config)
    tokens = min(t, moe_experts.ROUTE_KERNEL_MAX_ROWS // TOP_K)  # the one-launch routing, 256 experts
    moe_experts.route_small(weights[:1].expand(tokens, TOP_K), top[:1].expand(tokens, TOP_K), EXPERTS, 16)
    moe_experts.route_blocked(weights, top, EXPERTS, 64)  # and the blocked routing, 256 experts
    dense = torch.bfloat16
    moe_experts.moe_experts(
        x, weights, top, _empty(e, INTER, DIM, dtype=dense), None, _empty(e, INTER, DIM, dtype=dense), None,
        _empty(e, DIM, INTER, dtype=dense), None,
    )


def _quant(t: int):
    import torch

    from seahal.backends.cuda import kv_unpack, quant
    from seahal.hal.formats import index_key_bytes

    x = _empty(t, DIM, dtype=torch.bfloat16)
    quant.fp8_act_quant(x, 128, "ue8m0")
    quant.fp8_act_quant(_empty(t, DIM), 128, "fp32")
    quant.fp4_quant(_empty(t, INTER, dtype=torch.bfloat16), 32)
    quant.kv_cache_pack(_empty(B, t, HEAD_DIM, dtype=torch.bfloat16))
    ring = _empty(B, 128 + t, 584, dtype=torch.uint8)  # a decode step's ring slots, a prefill's new rows
    quant.kv_cache_store(_empty(B, t, HEAD_DIM, dtype=torch.bfloat16), ring, _empty(B, t, dtype=torch.int64))
    rotation = (_empty(B, t, dtype=torch.int64), _empty(32), _empty(HEAD_DIM), 1e-6)  # the projection normalised
    quant.kv_cache_store(_empty(B, t, HEAD_DIM, dtype=torch.bfloat16), ring, _empty(B, t, dtype=torch.int64), 64, 64,
                         *rotation)
    for dtype in (torch.bfloat16, torch.float32):  # the indexer's query (64 heads) and keys
        quant.hadamard_rotate(_empty(B, t, 64, 128, dtype=dtype), 32)
        quant.hadamard_rotate(_empty(B, t, 64, 128, dtype=dtype), 32, _empty(B, t, dtype=torch.int64), _empty(32))
        quant.hadamard_rotate(_empty(B, t, 128, dtype=dtype), 0)
        for key_format in ("fp4", "fp8"):
            quant.index_key_pack(_empty(B, t, 128, dtype=dtype), key_format)
            store = _empty(B, t + 4, index_key_bytes(128, key_format), dtype=torch.uint8)
            quant.index_key_store(_empty(B, t, 128, dtype=dtype), store, _empty(B, t, dtype=torch.int64), key_format)
    kv_unpack.kv_cache_unpack(_empty(B, t, 584, dtype=torch.uint8), HEAD_DIM)


def _attention(t: int):
    import torch

    from seahal.backends.cuda import compressor, indexer, sparse_attention

    start = 0 if t > 1 else 8191
    # the CSA and HCA main compressors and the indexer's (d 128); one launch each, state update included
    for ratio, overlap, dim in ((4, True, HEAD_DIM), (128, False, HEAD_DIM), (4, True, INDEX_DIM)):
        coff = 2 if overlap else 1
        compressor.kv_compress(
            _empty(B, t, coff * dim), _empty(B, t, coff * dim), _empty(ratio, coff * dim),
            _empty(dim, dtype=torch.bfloat16), _empty(ROPE_DIM // 2),
            _empty(B, coff * ratio, coff * dim), _empty(B, coff * ratio, coff * dim),
            ratio, overlap, start,
        )
        if dim == HEAD_DIM:  # the main compressors' entries packed into 584-byte FP8 records in the same launch
            compressor.kv_compress_fp8(
                _empty(B, t, coff * dim), _empty(B, t, coff * dim), _empty(ratio, coff * dim),
                _empty(dim, dtype=torch.bfloat16), _empty(ROPE_DIM // 2),
                _empty(B, coff * ratio, coff * dim), _empty(B, coff * ratio, coff * dim),
                ratio, overlap, start,
            )
    entries = (start + t) // 4
    for dtype in (torch.bfloat16, torch.float32):
        indexer.indexer_topk(
            _empty(B, t, INDEX_HEADS, INDEX_DIM, dtype=dtype), _empty(B, t, INDEX_HEADS),
            _empty(B, entries, INDEX_DIM, dtype=dtype), 4, start, INDEX_TOPK,
        )
        for key_format, record_bytes in (("fp4", 68), ("fp8", 132)):  # the packed key records, decoded in registers
            indexer.indexer_topk_packed(
                _empty(B, t, INDEX_HEADS, INDEX_DIM, dtype=dtype), _empty(B, t, INDEX_HEADS),
                _empty(B, entries, record_bytes, dtype=torch.uint8), key_format, 4, start, INDEX_TOPK,
            )
        # decode (B * t = 1 query: 4 head blocks on 132 SMs) takes the split-K launch and its merge
        # (attention_splits: 20 splits), prefill the unsplit one (HEADS64_WIDE tiles)
        sparse_attention.sparse_attention(
            _empty(B, t, HEADS, HEAD_DIM, dtype=dtype), _empty(B, entries + 128, HEAD_DIM, dtype=dtype),
            torch.empty((B, t, INDEX_TOPK + 128), dtype=torch.int32, device="cuda"), _empty(HEADS), 0.04,
        )
        for rotation in ((), (torch.empty((B, t), dtype=torch.int64, device="cuda"), _empty(ROPE_DIM // 2))):
            sparse_attention.sparse_attention_fp8(  # the same kernel reading the 584-byte FP8 records; the
                # model's call rotates the output back as it stores it
                _empty(B, t, HEADS, HEAD_DIM, dtype=dtype), _empty(B, entries + 128, 584, dtype=torch.uint8),
                torch.empty((B, t, INDEX_TOPK + 128), dtype=torch.int32, device="cuda"), _empty(HEADS), 0.04,
                64, 64, *rotation,
            )
    if t == 1:
        # batched decode: 32 sequences, dense rows on the DECODE tiles and FP8 records on HEADS64,
        # both split; 40 over dense rows on WIDE; 64 over FP8 records and 66 over dense rows on
        # HEADS64 in 2 splits
        for batch, attend, row in ((32, sparse_attention.sparse_attention, (HEAD_DIM, torch.bfloat16)),
                                   (32, sparse_attention.sparse_attention_fp8, (584, torch.uint8)),
                                   (40, sparse_attention.sparse_attention, (HEAD_DIM, torch.bfloat16)),
                                   (64, sparse_attention.sparse_attention_fp8, (584, torch.uint8)),
                                   (66, sparse_attention.sparse_attention, (HEAD_DIM, torch.bfloat16))):
            attend(
                _empty(batch, 1, HEADS, HEAD_DIM, dtype=torch.bfloat16), _empty(batch, entries + 128, row[0], dtype=row[1]),
                torch.empty((batch, 1, INDEX_TOPK + 128), dtype=torch.int32, device="cuda"), _empty(HEADS), 0.04,
            )


def _position_as_data():
    """Decode with start_pos as a device tensor (a CUDA graph replays one launch at every position):
    the compressors and the indexer load it in the kernel. A 0-d int64 position (every sequence),
    and one int32 position per sequence of a batch of 4 ([B]: the kernels load ``pos_ptr + b *
    stride``, the stride not specialised, so only the pointer's dtype makes it a variant of its
    own). A host read of either would fail here (a meta tensor has no value)."""
    import torch

    from seahal.backends.cuda import compressor, indexer

    for batch, position in (
        (B, torch.empty((), dtype=torch.int64, device="cuda")),
        (4, torch.empty((4,), dtype=torch.int32, device="cuda")),
    ):
        for ratio, overlap in ((4, True), (128, False)):
            coff = 2 if overlap else 1
            args = (
                _empty(batch, 1, coff * HEAD_DIM), _empty(batch, 1, coff * HEAD_DIM), _empty(ratio, coff * HEAD_DIM),
                _empty(HEAD_DIM, dtype=torch.bfloat16), _empty(ROPE_DIM // 2),
                _empty(batch, coff * ratio, coff * HEAD_DIM), _empty(batch, coff * ratio, coff * HEAD_DIM),
                ratio, overlap, position,
            )
            compressor.kv_compress(*args)
            compressor.kv_compress_fp8(*args)
            # the records stored at their slots (a decode step's cache write): a store past a ring's rows
            store = _empty(batch, 4096 + 2048, 584, dtype=torch.uint8)[:, 4096:]
            compressor.kv_compress_store(*args, store, torch.empty((batch, 1), dtype=torch.int64, device="cuda"))
        q, weights = _empty(batch, 1, INDEX_HEADS, INDEX_DIM, dtype=torch.bfloat16), _empty(batch, 1, INDEX_HEADS)
        keys = _empty(batch, 2048, INDEX_DIM, dtype=torch.bfloat16)
        indexer.indexer_topk(q, weights, keys, 4, position, INDEX_TOPK)
        for key_format, record_bytes in (("fp4", 68), ("fp8", 132)):
            keys = _empty(batch, 2048, record_bytes, dtype=torch.uint8)
            indexer.indexer_topk_packed(q, weights, keys, key_format, 4, position, INDEX_TOPK)


def _indexer_variants():
    """The indexer launches the bench's V4-Flash decode rows also time (``INDEXER_VARIANTS``: key
    tiles of 32 and 128 entries, 8 warps, other split and chunk counts), 64 sequences at a 64k
    context (16k entries), each key format: they are timed only on a GPU, so they compile here first."""
    import torch

    from seahal.backends.cuda.indexer import launch_indexer
    from seahal.bench.cuda_attention import INDEXER_VARIANTS

    q, weights = _empty(64, 1, INDEX_HEADS, INDEX_DIM, dtype=torch.bfloat16), _empty(64, 1, INDEX_HEADS)
    for key_format, width, dtype in (("dense", INDEX_DIM, torch.bfloat16), ("fp4", 68, torch.uint8), ("fp8", 132, torch.uint8)):
        keys = _empty(64, 16384, width, dtype=dtype)
        for launch in INDEXER_VARIANTS.values():
            launch_indexer(q, weights, keys, key_format, 4, 65535, INDEX_TOPK, **launch)


def _mhc_rope(t: int):
    import torch

    from seahal.backends.cuda import mhc, rope

    x = _empty(B, t, HC, DIM, dtype=torch.bfloat16)
    mix = (2 + HC) * HC
    pre_params = (_empty(mix, HC * DIM), _empty(mix), _empty(3))
    head_params = (_empty(HC, HC * DIM), _empty(HC), _empty(1))
    norm_weight = _empty(DIM)
    for weight in (None, norm_weight):  # plain, and normalised as the model calls them
        mhc.hc_pre(x, *pre_params, 20, 1e-6, 1e-6, weight)  # one launch at decode, two at prefill
        mhc.hc_head(x, *head_params, 1e-6, 1e-6, weight)
        if t <= mhc.ONE_LAUNCH_MAX_TOKENS:  # the two launches at decode; one launch on a 64-token tile
            for tokens, one_launch in ((t, False), (64, True)):
                x_t = _empty(B, tokens, HC, DIM, dtype=torch.bfloat16)
                for args, head in (((*pre_params, 20), False), ((*head_params, 1), True)):
                    mhc.collapse_streams(x_t, *args, 1e-6, 1e-6, head=head, norm_weight=weight, one_launch=one_launch)
    f = _empty(B, t, DIM, dtype=torch.bfloat16)
    mhc.hc_post(f, x, _empty(B, t, HC), _empty(B, t, HC, HC))
    for addend in (None, f):  # the attention's and the MoE's boundary, as the model calls them
        mhc.hc_post_pre(f, x, _empty(B, t, HC), _empty(B, t, HC, HC), *pre_params, 20, 1e-6, 1e-6, norm_weight, addend)
    positions = torch.empty((B, t), dtype=torch.int64, device="cuda")
    for inverse in (False, True):
        rope.rope(_empty(B, t, HEADS, HEAD_DIM, dtype=torch.bfloat16), positions, _empty(ROPE_DIM // 2), inverse)


def _norm(t: int):
    """The model's norms: attn / ffn (dim), q (q LoRA 1024), kv (head dim), per-head q (unweighted)."""
    import torch

    from seahal.backends.cuda import norm

    for width, rows in ((DIM, t), (1024, t), (HEAD_DIM, t), (HEAD_DIM, t * HEADS)):
        weight = _empty(width) if rows == t else None
        norm.rms_norm(_empty(rows, width, dtype=torch.bfloat16), weight, 1e-6)


def _head():
    """The output head at decode: V4's 129280 x 4096 bf16 head; the GEMV at 1, 2 and 4 tokens, the
    split-x tensor-core kernel at 8, 64 and 128 (bf16 and fp32 x)."""
    import torch

    from seahal.backends.cuda import linear

    weight = _empty(129280, DIM, dtype=torch.bfloat16)
    for tokens, dtype in ((1, torch.bfloat16), (2, torch.float32), (4, torch.bfloat16), (8, torch.float32),
                          (64, torch.bfloat16), (128, torch.float32)):
        linear.fp32_linear(_empty(tokens, DIM, dtype=dtype), weight)


def _grouped_linear():
    """The attention's wo_a over its FP8 weight (V4-Flash: 8 groups of 1024 rows, 4096 columns):
    the GEMV at 1, 2 and 4 tokens (e8m0 and fp32 scales, bf16 and fp32 x, with K splits and
    without), the tensor-core path at 16 and 64 (16- and 64-token blocks), the one-launch
    dequantisation at 65."""
    import torch

    from seahal.backends.cuda import linear

    weight = _empty(8 * 1024, DIM, dtype=torch.float8_e4m3fn)
    for tokens, dtype, scale_dtype, split_k in ((1, torch.bfloat16, torch.float8_e8m0fnu, None),
                                                (2, torch.float32, torch.float32, 1),
                                                (4, torch.bfloat16, torch.float32, None),
                                                (16, torch.bfloat16, torch.float8_e8m0fnu, None),
                                                (64, torch.bfloat16, torch.float32, 1),
                                                (65, torch.bfloat16, torch.float8_e8m0fnu, None)):
        scale = _empty(8 * 1024 // 128, DIM // 128, dtype=scale_dtype)
        linear.grouped_linear(_empty(tokens, 8, DIM, dtype=dtype), weight, scale, split_k=split_k)


def _model():
    """Every launch of the benchmarked model (4-layer V4-Flash, 64 experts, one shared expert) at
    prefill and decode, in the release layout and in bf16: launches the wrappers' own calls above
    do not make (the first GPU run of the model failed to compile one: the shared expert's down
    GEMM at one token, where the sorted-row count 1 is specialised to a constant)."""
    from seahal.testing.model_on_meta import LAYOUTS, model_steps
    from seahal.testing.triton_compile import RunKernelFunctions

    for layout in LAYOUTS:
        for _, run in model_steps(layout, context=256):
            with RunKernelFunctions():
                run()


def _specialisation(arg) -> str:
    """What a launch's compiled code depends on for ``arg``: a tensor's dtype; an int's value when
    it is 1 (a constant), whether it is divisible by 16, and its width."""
    if hasattr(arg, "dtype"):
        return str(arg.dtype)
    if hasattr(arg, "block_shape"):  # a TMA descriptor: the tensor's dtype and the tile it moves
        return f"{arg.base.dtype}{list(arg.block_shape)}"
    if isinstance(arg, int) and not isinstance(arg, bool):
        return "1" if arg == 1 else f"int{'64' if abs(arg) >= 2**31 else '32'}{'/16' if arg % 16 == 0 else ''}"
    return type(arg).__name__


def _signature(launch) -> str:
    """The kernel, its constexprs/options and argument specialisations: launches that compile alike."""
    return f"{launch.describe()}[{','.join(map(_specialisation, launch.args))}]"


BLOCK_BARRIER = re.compile(r"\b(?:bar|barrier)\.sync(?:\.aligned)?\s+\d+;")
"""A block-wide PTX barrier: ``bar.sync N;`` without a thread count."""


def _block_barriers_in_mma_loops(ptx: str) -> int:
    """Block-wide barriers (``bar.sync N;`` without a thread count) in the innermost loops of
    ``ptx`` that issue wgmma: what makes all of a program's warpgroups meet every K step."""
    lines = ptx.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"^(\$L__BB\d+_\d+):", line))}
    loops = [(labels[m.group(1)], i) for i, line in enumerate(lines)
             if (m := re.search(r"\bbra(?:\.uni)?\s+(\$L__BB\d+_\d+);", line)) and labels.get(m.group(1), i) < i]
    mma = [(a, b) for a, b in loops if any("wgmma.mma_async" in line for line in lines[a:b])]
    innermost = [(a, b) for a, b in mma if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in mma)]
    return sum(bool(BLOCK_BARRIER.search(line)) for a, b in innermost for line in lines[a:b + 1])


def _barriers_among_cg_loads(ptx: str) -> int:
    """Block-wide barriers between the first and the last L2 load (``ld.global.cg``) of ``ptx``:
    where a last-arriving program reads other programs' partial sums, each such barrier is one
    more dependent trip through L2 on its serial tail."""
    lines = ptx.splitlines()
    loads = [i for i, line in enumerate(lines) if "ld.global.cg" in line]
    if not loads:
        return 0
    return sum(bool(BLOCK_BARRIER.search(line)) for line in lines[loads[0]:loads[-1]])


def _pdl_launches() -> list:
    """A decode step's norms, quantisers, mHC and rope launched with SEAHAL_CUDA_PDL=1."""
    from seahal.backends.cuda._pdl import PDL_VARIABLE
    from seahal.testing.triton_compile import capture_launches

    with mock.patch.dict(os.environ, {PDL_VARIABLE: "1"}), capture_launches() as launches:
        _norm(TOKENS["decode"])
        _quant(TOKENS["decode"])
        _mhc_rope(TOKENS["decode"])
    return launches


STREAMING_LOOPS = ("_fp32_gemv_kernel", "_mix_kernel", "_rope_kernel", "_logits_kernel")
"""Kernels whose loop streams weight or activation rows at decode with no data shared across warps."""


def _streams_at_decode(record: dict) -> bool:
    """A launch of :data:`STREAMING_LOOPS` as the released model's decode makes it: the mix kernel's
    CUDA-core GEMV (up to 4 tokens; more stage tensor-core operands in shared memory), the head and
    compressor GEMVs with x and W both bf16 (an fp32 x or W loads in another vector width than the
    other operand, and Triton converts one of them through shared memory)."""
    if record["kernel"] == "_mix_kernel":  # not hc_post_pre's: see test_posted_mix_steps_once_a_program
        return int(re.search(r"BLOCK_T=(\d+)", record["launch"]).group(1)) <= 4 and "POST=True" not in record["launch"]
    if record["kernel"] == "_logits_kernel":  # the router's GEMV over the model's fp32 gate weight
        return "GEMV=True" in record["launch"]
    if record["kernel"] == "_fp32_gemv_kernel":
        return record["launch"].split("[", 1)[1].startswith("torch.bfloat16,torch.bfloat16,")
    return True


def _release_fp4_decode(record: dict) -> bool:
    """A launch decoding the release's FP4 formats in its loop (e8m0 scales, the bf16 form, not the
    mx form): the routed experts' top-6, fp4_gemm, the FP4 indexer keys under bf16 queries at their
    default 64-key tiles."""
    kernel, launch = record["kernel"], record["launch"]
    if "MX=True" in launch:
        return False
    if kernel == "_fp4_gemm_kernel":
        return "SCALE_E8M0=True" in launch
    if kernel == "_grouped_gemm_kernel":
        return "TOP_K=6," in launch and "FORMAT=2" in launch and "W_SCALE_E8M0=True" in launch
    if kernel == "_scores_kernel":
        return all(f in launch for f in ("KEY_FORMAT=fp4", "D_PAD=128", "BLOCK_N=64,", "LOW_PRECISION_DOT=True"))
    return False


def _reads_sass(record: dict) -> bool:
    """Whether a test reads the SASS counts of this launch (its ``kernel`` and ``launch`` key): only
    those are disassembled, at about 0.4 s a launch (for all ~400 launches, most of this file's time)."""
    streams = record["kernel"] in STREAMING_LOOPS and _streams_at_decode(record)
    return streams or _release_fp4_decode(record)


def _compile_all(shard: int = 0, shards: int = 1) -> list[dict]:
    """Capture every wrapper's launches, compile each distinct one for sm_90: one record per launch
    (SASS counts where :func:`_reads_sass`, else None); of the distinct launches in
    capture order, every ``shards``-th from the ``shard``-th."""
    from seahal.testing.triton_compile import capture_launches, compile_launch

    with capture_launches() as launches:
        _gemms()
        for t in TOKENS.values():
            _moe(t)
            _quant(t)
            _attention(t)
            _mhc_rope(t)
            _norm(t)
        _head()
        _grouped_linear()
        _position_as_data()
        _indexer_variants()
        _model()
    launches += _pdl_launches()
    distinct = {_signature(launch): launch for launch in launches}
    results = []
    for key, launch in list(distinct.items())[shard::shards]:
        result = compile_launch(launch, sass=_reads_sass({"kernel": launch.name, "launch": key}))
        ptx = result.ptx or ""
        names = launch.kernel.arg_names[: len(launch.args)]  # the rest come as keywords, if at all
        position = launch.args[names.index("pos_ptr")] if "pos_ptr" in names else launch.kwargs.get("pos_ptr")
        results.append({
            "kernel": launch.name, "launch": key, "error": result.error, "shared": result.shared_bytes,
            "registers": result.registers, "stack": result.stack_bytes, "loop_barriers": result.loop_barriers,
            "loop_byte_loads": result.loop_byte_loads, "loop_instructions": result.loop_instructions,
            "resident": result.resident_programs() if result.ok and result.registers else None,
            "wgmma": "wgmma.mma_async" in ptx, "mma": "mma.sync" in ptx, "tma": "cp.async.bulk.tensor" in ptx,
            "mma_loop_block_barriers": _block_barriers_in_mma_loops(ptx),
            "counter_resets": re.findall(r"\batom\.global\.gpu\.(\w+)\.exch\b", ptx),
            "barriers_among_cg_loads": _barriers_among_cg_loads(ptx),
            "pdl": bool(launch.kwargs.get("launch_pdl")),
            "waits_on_prior_grid": "griddepcontrol.wait" in ptx and "griddepcontrol.launch_dependents" in ptx,
            "position": str(getattr(position, "dtype", None)),
        })
    return results


def _kernels_in_backend() -> set[str]:
    """Names of the cuda backend's launched kernels: every @triton.jit or @gluon.jit function whose
    name ends in ``_kernel``."""
    import ast
    import pathlib

    import seahal.backends.cuda as cuda

    names = set()
    for path in pathlib.Path(cuda.__file__).parent.glob("*.py"):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.name.endswith("_kernel") and ast.unparse(
                node.decorator_list[0] if node.decorator_list else ast.Constant(None)
            ).startswith(("triton.jit", "gluon.jit")):
                names.add(node.name)
    return names


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> list[dict]:
    require_triton()
    from seahal.testing.triton_compile import toolchain_missing

    missing = toolchain_missing()
    if missing:
        pytest.skip(f"cannot compile for sm_90 here: {missing}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    shards = min(os.cpu_count() or 1, 4)  # compiling is one core's work a launch: one shard a core
    folder = tmp_path_factory.mktemp("compile")
    children = []
    for shard in range(shards):  # output to files: a child never waits on a full pipe
        with open(folder / f"{shard}.out", "w") as out, open(folder / f"{shard}.err", "w") as err:
            command = [sys.executable, __file__, str(shard), str(shards)]
            children.append(subprocess.Popen(command, stdout=out, stderr=err, env=env))
    records = []
    for shard, child in enumerate(children):
        child.wait(timeout=600)
        assert child.returncode == 0, (folder / f"{shard}.err").read_text()[-4000:]
        records += json.loads((folder / f"{shard}.out").read_text().splitlines()[-1])
    return records


def test_every_kernel_compiles_for_sm90(compiled):
    failures = [f"{r['launch']}:\n{r['error']}" for r in compiled if r["error"]]
    assert not failures, "\n\n".join(failures)
    assert {r["kernel"] for r in compiled} == _kernels_in_backend()


def test_pdl_launches_wait_for_the_prior_grid(compiled):
    """With SEAHAL_CUDA_PDL=1 a kernel is launched with programmatic dependent launch and begins
    with griddepcontrol.wait and .launch_dependents; without, it compiles as before, with neither."""
    pdl = [r for r in compiled if r["pdl"]]
    assert {"_rms_norm_kernel", "_fp8_act_quant_kernel", "_mix_kernel", "_post_kernel", "_rope_kernel"} <= {
        r["kernel"] for r in pdl}
    assert all(r["waits_on_prior_grid"] and not r["error"] for r in pdl)
    assert not any(r["waits_on_prior_grid"] for r in compiled if not r["pdl"])


def test_kernels_fit_sm90_shared_memory(compiled):
    """No launch asks for more shared memory than an sm_90 block may have (227 KiB): it would fail."""
    too_big = [(r["launch"], r["shared"]) for r in compiled if r["shared"] and r["shared"] > 227 * 1024]
    assert not too_big, too_big


def test_gemms_use_hopper_tensor_cores(compiled):
    """The block-scaled GEMMs issue wgmma (sm_90's warp-group MMA, 64-row MMA tiles) or else
    mma.sync, and the TMA configs load through bulk tensor copies. The MMA's rows are the tile's
    BLOCK_M rows of A, but BLOCK_N weight rows where the product is formed weights first (FP4's
    ``tl.dot_scaled`` form, MX, and ``WEIGHTS_FIRST`` tiles, ``_gemm.weights_first``): there
    16-token decode tiles run wgmma too."""
    gemms = [r for r in compiled if r["kernel"] in ("_fp8_gemm_kernel", "_fp4_gemm_kernel")]
    assert gemms
    persistent = {(r["kernel"], "TMA=True" in r["launch"]) for r in gemms if "PERSISTENT=True" in r["launch"]}
    assert persistent == {("_fp8_gemm_kernel", False), ("_fp8_gemm_kernel", True), ("_fp4_gemm_kernel", False)}
    for r in gemms:
        weights_first = "MX=True" in r["launch"] or "WEIGHTS_FIRST=True" in r["launch"]
        mma_rows = int(re.search(r"BLOCK_N=(\d+)" if weights_first else r"BLOCK_M=(\d+)", r["launch"]).group(1))
        wide = mma_rows >= 64
        assert (r["wgmma"], r["mma"]) == (wide, not wide), r
        assert r["tma"] == ("TMA=True" in r["launch"]), r


def test_pingpong_gemm_runs_its_warpgroups_apart(compiled):
    """The Gluon FP8 GEMM (``fp8_gemm_pingpong``) issues wgmma on TMA-loaded tiles, spills nothing,
    and its consumer loops wait on no block-wide barrier (only a warpgroup's own 128-thread one
    before it releases a slot), where the Triton kernel's 128-row tiles make their two warpgroups
    meet every K block, which keeps the tensor cores idle while both promote."""
    launches = [r for r in compiled if r["kernel"] == "_fp8_gemm_pingpong_kernel"]
    assert len(launches) >= 4, [r["launch"] for r in launches]  # the table's, and both tile widths in both formats
    for r in launches:
        assert r["wgmma"] and r["tma"] and not r["mma"], r
        assert r["stack"] == 0, r
        assert r["mma_loop_block_barriers"] == 0, r
    triton_128 = [r for r in compiled if r["kernel"] == "_fp8_gemm_kernel" and "BLOCK_M=128" in r["launch"]]
    assert triton_128 and all(r["mma_loop_block_barriers"] > 0 for r in triton_128)


def test_arrival_counters_reset_without_a_fence(compiled):
    """The last program to arrive zeroes its counter with a relaxed exchange (``_gemm.reset_arrival_counter``):
    the next launch reads it after this grid ends, so an acq_rel one would only add a fence that
    waits for the program's output stores to reach L2 on the kernel's serial tail. Every kernel
    that counts arrivals resets that way, and no kernel with an ordered exchange."""
    resets = {r["kernel"] for r in compiled if r["counter_resets"]}
    assert {"_fp8_gemm_kernel", "_grouped_gemm_kernel", "_mix_kernel", "_kv_compress_kernel"} <= resets, resets
    ordered = [(r["launch"], r["counter_resets"]) for r in compiled if set(r["counter_resets"]) - {"relaxed"}]
    assert not ordered, ordered


def test_mix_tail_reads_its_partial_sums_in_one_trip(compiled):
    """hc_pre / hc_head at decode: the tile's last program loads every slice's partial sums (the
    squares, pre, post and comb mixes) before it reduces any of them, so no barrier separates the
    loads: one dependent trip through L2 on the launch's serial tail, not one per sum."""
    # (hc_post_pre's launches too, up to their collapse: it reads the streams the launch made, after
    # the barrier that publishes pre, a second trip by design)
    tails = [r for r in compiled if r["kernel"] == "_mix_kernel" and "BLOCK_T=1," in r["launch"]
             and "POST=True" not in r["launch"]]
    assert {"HEAD=True" in r["launch"] for r in tails} == {True, False}, [r["launch"] for r in tails]
    assert all(r["barriers_among_cg_loads"] == 0 for r in tails), [(r["launch"], r["barriers_among_cg_loads"]) for r in tails]


def test_positions_as_data_compile(compiled):
    """The launches that load start_pos from memory (CUDA-graph decode) compile: the compressor
    kernel's variants (entries, FP8 records, records stored at their slots) and the indexer's scores
    kernel, dense and packed, each with a 0-d int64 and a [B] int32 position
    (:func:`_position_as_data`), and those the model's graph step makes ([B] int64)."""
    launches = [r for r in compiled if "POS_FROM_PTR=True" in r["launch"]]
    kinds = Counter((r["kernel"], r["position"]) for r in launches)
    assert set(kinds) == {(kernel, dtype) for kernel in ("_kv_compress_kernel", "_scores_kernel")
                          for dtype in ("torch.int64", "torch.int32")}, kinds
    assert kinds["_kv_compress_kernel", "torch.int32"] == 6 and kinds["_scores_kernel", "torch.int32"] == 3, kinds
    stores = [r for r in launches if "STORE=True" in r["launch"]]
    assert len(stores) >= 4 and all(r["error"] is None for r in stores), stores
    packed = {re.search(r"KEY_FORMAT=(\w+)", r["launch"]).group(1) for r in launches if r["kernel"] == "_scores_kernel"}
    assert packed == {"dense", "fp4", "fp8"}, packed


def test_attention_compiles_split_and_unsplit(compiled):
    """sparse_attention compiles every way, dense rows and FP8 records: split-K (decode, merged by a
    second launch) and not split (prefill)."""
    launches = [r["launch"] for r in compiled if r["kernel"] == "_sparse_attention_kernel"]
    ways = {("SPLIT=True" in launch, "KV_FP8=True" in launch) for launch in launches}
    assert ways == {(True, False), (True, True), (False, False), (False, True)}, launches
    assert any(r["kernel"] == "_combine_splits_kernel" for r in compiled)
    # the model's FP8 reads store the output rotated back: in the unsplit kernel and in the merge
    rotating = {r["kernel"] for r in compiled if f"OUT_ROPE={ROPE_DIM // 2}" in r["launch"]}
    assert rotating == {"_sparse_attention_kernel", "_combine_splits_kernel"}, rotating


def test_attention_tiles_fit_the_sm_as_their_config_says(compiled):
    """Each GPU tile config of sparse_attention (bf16 q, dense rows and FP8 records) compiles to
    registers and shared memory that let an SM hold at least ``config.resident`` programs, the
    number :func:`attention_splits` fills the chip with (more would make its grid run in two
    waves), and spills at most a few words outside its loop. The 64-head tiles are the exception
    kept in view: Triton 3.9 spills ~400 bytes over FP8 records in HEADS64 (88 local loads in a
    1421-instruction loop iteration, still 5.5 warp instructions per (row, head) against DECODE's
    12.2) and 768 in HEADS64_WIDE, Triton 3.6, the GPU image's, 16 bytes at most; the 32-head tiles
    over FP8 records spilled 400+ bytes in both."""
    from seahal.backends.cuda.sparse_attention import (
        DECODE,
        HEADS64,
        HEADS64_WIDE,
        WIDE,
    )

    seen = set()
    for r in compiled:
        if r["kernel"] != "_sparse_attention_kernel" or "LOW_PRECISION_DOT=True" not in r["launch"]:
            continue
        tiles = tuple(int(re.search(rf"{key}=(\d+)", r["launch"]).group(1)) for key in ("BLOCK_H", "BLOCK_N", "num_warps"))
        (config,) = [c for c in (DECODE, WIDE, HEADS64, HEADS64_WIDE) if (c.block_h, c.block_n, c.num_warps) == tiles]
        fp8 = "KV_FP8=True" in r["launch"]
        seen.add((config, fp8))
        assert r["resident"] >= config.resident, (r["launch"], r["registers"], r["shared"])
        assert r["stack"] <= (768 if config.block_h == 64 else 64), (r["launch"], r["stack"])
    assert seen == {(DECODE, False), (DECODE, True), (WIDE, False), (HEADS64, False), (HEADS64, True),
                    (HEADS64_WIDE, False), (HEADS64_WIDE, True)}, seen


def test_one_token_fp4_experts_fit_two_programs_an_sm(compiled):
    """The experts' one-token FP4 gate-up tile (16x128, 8 warps, e8m0 scales: the release's) fits
    two programs an SM by its registers without a spill: 168 registers, one program, until its
    FP4 blocks decoded in lane order (``_e2m1.lane_order``); the bench's 64-column variant on 4
    warps fits more, and its variant capped at 80 registers three (spilling at most 128 bytes)."""
    one_token = [r for r in compiled if r["kernel"] == "_grouped_gemm_kernel" and "TOP_K=6," in r["launch"]
                 and "FORMAT=2" in r["launch"] and "MX=False" in r["launch"] and "W_SCALE_E8M0=True" in r["launch"]
                 and "BLOCK_M=16," in r["launch"] and "GATE_UP=True" in r["launch"]]
    tiles = {(re.search(r"BLOCK_N=(\d+)", r["launch"]).group(1), re.search(r"num_warps=(\d+)", r["launch"]).group(1))
             for r in one_token}
    assert {("128", "8"), ("64", "4")} <= tiles, tiles
    capped = [r for r in one_token if "maxnreg=80" in r["launch"]]
    assert capped, "the bench's variant capped to three programs an SM"
    for r in one_token:
        if r in capped:  # 80 registers: three programs an SM, for a little spill
            assert r["registers"] <= 80 and r["resident"] >= 3 and r["stack"] <= 128, r
        else:
            assert r["stack"] == 0 and r["resident"] >= (2 if "BLOCK_N=128" in r["launch"] else 3), r


def test_fp4_decode_loads_no_single_bytes(compiled):
    """The FP4 decode loops of the release's formats (e8m0 scales, the bf16 form: the routed
    experts, fp4_gemm, the FP4 indexer keys under bf16 queries at their default 64-key tiles) read
    their packed codes in whole words: no one-byte shared-memory load in the loop, where the stored
    K order cost one a byte (64 a lane per K block in the one-token experts' gate-up loop). (The mx
    form, Triton's own decode, still loads bytes; so do the indexer's 32- and 128-key bench variants.)"""
    fp4 = [r for r in compiled if r["error"] is None and _release_fp4_decode(r)]
    assert {r["kernel"] for r in fp4} == {"_grouped_gemm_kernel", "_fp4_gemm_kernel", "_scores_kernel"}, fp4
    for r in fp4:
        assert r["loop_byte_loads"] == 0, (r["launch"], r["loop_byte_loads"])


EXPERTS_LOOP_BY_FIELD = """
import dataclasses, json, sys, torch
from seahal.backends.cuda import moe_experts
from seahal.testing.triton_compile import capture_launches, compile_launch
field, t, e = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
i, d = 2048, 4096
def fp4(rows, cols):
    return (torch.empty(e, rows, cols // 2, dtype=torch.uint8, device='cuda'),
            torch.empty(e, rows, cols // 32, dtype=torch.float8_e8m0fnu, device='cuda'))
counts = {}
for value in (False, True):
    with capture_launches() as launches:
        x, weights = torch.empty(t, d, dtype=torch.bfloat16, device='cuda'), torch.empty(t, 6, device='cuda')
        ids = torch.empty(t, 6, dtype=torch.int32, device='cuda')
        config = dataclasses.replace(moe_experts.experts_config(6 * t, "fp4", x.device), **{field: value})
        moe_experts.moe_experts(x, weights, ids, *fp4(i, d), *fp4(i, d), *fp4(d, i), config=config)
    for launch in launches:
        if launch.name == "_grouped_gemm_kernel":
            counts[f"{launch.kwargs['GATE_UP']} {value}"] = compile_launch(launch).loop_instructions
print(json.dumps(counts))
"""


def _experts_loop_instructions(field: str, tokens: int, experts: int) -> dict[str, int]:
    """{"<gate-up> <value>": loop instructions a warp} of the V4-Flash FP4 experts' two GEMMs at
    ``tokens`` tokens (top-6 of ``experts``), compiled for sm_90 with the default launch's
    ``ExpertsConfig.<field>`` False and True."""
    require_triton()
    from seahal.testing.triton_compile import toolchain_missing

    missing = toolchain_missing()
    if missing:
        pytest.skip(f"cannot compile for sm_90 here: {missing}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", EXPERTS_LOOP_BY_FIELD, field, str(tokens), str(experts)],
                          capture_output=True, text=True, env=env, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_fp4_codes_as_words_take_fewer_loop_instructions_than_bytes():
    """The one-token FP4 experts (weights first, e8m0 scales, 4-byte aligned rows: the release's)
    decode their codes from 4-byte words (``_e2m1.e2m1_bf16_words``): sm_90 SASS (Triton 3.6) of
    the gate-up loop 607 instructions a warp against 691 a byte at a time, the down loop 320
    against 362. Asserted: at least 8% fewer in both."""
    counts = _experts_loop_instructions("fp4_words", 1, 8)
    for gate_up in ("True", "False"):
        assert counts[f"{gate_up} True"] <= 0.92 * counts[f"{gate_up} False"], counts


def test_fp4_prefill_on_bf16_activation_values_takes_fewer_loop_instructions():
    """The end-to-end 1k-token prefill's FP4 experts (64x64 tiles, activations first) with x and h
    as the bf16 values of their FP8 quantisation (``ExpertsConfig.round_trip``): no code widened, no
    block product scaled in the loop. sm_90 SASS (Triton 3.6): gate-up 640 loop instructions a warp
    against 807, down 371 against 506. Asserted: at least 15% fewer in both."""
    counts = _experts_loop_instructions("round_trip", 1024, 64)
    for gate_up in ("True", "False"):
        assert counts[f"{gate_up} True"] <= 0.85 * counts[f"{gate_up} False"], counts


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(__file__))
    print(json.dumps(_compile_all(*map(int, sys.argv[1:3]))))


def test_posted_mix_steps_once_a_program():
    """hc_post_pre's decode mix (``POST``) broadcasts each token's new streams to its mix rows through
    shared memory: two barriers in its K loop, which :func:`test_streaming_loops_wait_on_no_barrier`
    forbids in a streaming loop. At V4's decode shapes that loop runs once a program (K slices of
    one BLOCK_K step: V4-Flash 128 of 128, V4-Pro 224 of 128), so the barriers are two a program,
    not two a step of a stream."""
    from types import SimpleNamespace

    from seahal.backends.cuda import mhc

    device = SimpleNamespace(type="cuda")
    with mock.patch("torch.cuda.get_device_properties", return_value=SimpleNamespace(multi_processor_count=132)):
        for d in (4096, 7168):
            k = HC * d
            config = mhc.mix_config(1, k, (2 + HC) * HC, device)
            assert mhc.slices(k, config)[0] == config.block_k, (d, config)


def test_streaming_loops_wait_on_no_barrier(compiled):
    """The decode GEMVs (the output head, hc_pre's mix, the router's logits) and rope loop without a
    block-wide barrier: each step's loads are independent of the other warps. A barrier there is a
    layout conversion through shared memory, as the head GEMV had until 2026-11-26 (x and W
    broadcast to the product's shape: six barriers a step of a 1 GB stream)."""
    loops = [r for r in compiled if r["kernel"] in STREAMING_LOOPS and r["error"] is None and _streams_at_decode(r)]
    assert {r["kernel"] for r in loops} == set(STREAMING_LOOPS)
    for r in loops:
        assert r["loop_barriers"] in (0, None), r
