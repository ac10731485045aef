"""The HAL operators as ONNX functions: domain ``seahal``, bodies of standard ONNX ops.

A runtime that knows a ``seahal`` op (a vendor's fused kernel) can match the node; one that does
not inlines the body, which computes the op's math as the CPU reference kernels do
(``backends/cpu/reference``, spec ``shared/spec/v4_ops.md``).

Calling convention (stable: the ONNX exporter and the onnxruntime backend rely on it)
------------------------------------------------------------------------------------
* :data:`FUNCTIONS` maps a *function name* to an :class:`OpFunction`. Most ops have one function,
  named like the op. Where an op's optional tensors or weight format change the graph, each case
  is its own function: ``rms_norm`` (with weight), ``rms_norm_unweighted``, ``rms_norm_rope``
  (with weight), ``rms_norm_rope_unweighted``, ``moe_gate`` (with bias), ``moe_gate_unbiased``,
  ``moe_gate_hash`` (``input_ids`` + ``tid2eid``), ``moe_experts`` (dense), ``moe_experts_fp8``,
  ``moe_experts_fp4``, ``grouped_linear`` (dense weight, no scale), ``grouped_linear_fp8``,
  ``act_quant_gemm_fp8`` and ``act_quant_gemm_fp4`` (b's format: e4m3 or packed e2m1),
  ``indexer_topk_packed_fp4`` and ``_fp8``, ``index_key_pack_fp4`` and ``_fp8``,
  ``index_key_store_fp4`` and ``_fp8`` (the ``key_format`` argument picks one; no attribute),
  ``hadamard_rotate`` (``fp4_block`` 0: no attribute) and ``hadamard_rotate_fp4``, and with
  ``positions`` and ``freqs`` (x rotated by RoPE first) ``hadamard_rotate_roped`` and
  ``hadamard_rotate_fp4_roped``, ``hc_pre``
  and ``hc_head`` (no ``norm_weight``), ``hc_pre_normed`` and ``hc_head_normed``,
  ``sparse_attention`` and ``sparse_attention_fp8`` (no ``positions``), ``sparse_attention_rotated``
  and ``sparse_attention_fp8_rotated`` (``positions`` and ``freqs``: the output's inverse RoPE),
  ``hc_post`` (no ``addend``) and ``hc_post_summed`` (the sub-layer output in two parts),
  ``hc_post_pre`` (no ``addend``, no ``norm_weight``), ``hc_post_pre_normed`` (``norm_weight``),
  ``hc_post_summed_pre`` (``addend``) and ``hc_post_summed_pre_normed`` (both): the hc_post
  function the ``addend`` picks, then the hc_pre function the ``norm_weight`` picks,
  ``kv_cache_store`` (no ``positions``), ``kv_cache_store_normed``
  (``positions``, ``freqs`` and ``norm_weight``: the vectors through ``rms_norm_rope`` first) and
  ``kv_cache_store_normed_unweighted`` (``positions`` and ``freqs``, no weight).
  :func:`select` picks the function for a call's arguments; :data:`OPS` lists each op's functions.
* Node inputs: the op's tensor arguments in the HAL schema's order, without the optional ones the
  function does not take (``OpFunction.inputs`` names them). ``start_pos`` (kv_compress,
  kv_compress_fp8, kv_compress_store and the indexer ops) is an input too, an int64 scalar or [B]
  (one position per sequence), not an attribute: decode steps advance it at run time, and a
  graph or session must not be rebuilt per position. So is the indexer ops' ``offset`` (an int64
  scalar): a prefill chunk's W + S, which would otherwise build a session per chunk length.
* Node attributes: the other non-tensor arguments under their HAL names (``OpFunction.attributes``):
  int, float and str as such (an int given for a float as a float), bool as int 0/1, ``ScalarType``
  as the ONNX ``TensorProto`` data type code (the contract's default, bf16, for None).
  :meth:`OpFunction.attribute_values` converts.
* Outputs: the op's outputs in order, then the new values of the arguments the op mutates in place
  (kv_compress: ``entries, kv_state, score_state``; kv_cache_store and index_key_store, which
  have no output of their own: the new ``cache`` / ``store`` alone; kv_compress_store, none of its
  own either: ``kv_state, score_state, store``). An output whose rows depend on the position has
  the rows the HAL contract gives a tensor ``start_pos``: kv_compress's entries (records) are
  ``ceil(S/m)`` rows, each sequence's new entries first, zeros (zero bytes) after; a caller at an
  int position keeps the first ``new_entries(start_pos, S, m)``. kv_compress_store stores the
  first ``n`` of those records, n its slots' rows (the contract's: ``new_entries`` at an int
  position, ``ceil(S/m)`` at a tensor one), so its node takes either.
* Shared rows: ``sparse_attention``'s kv and ``sparse_attention_fp8``'s records may have batch 1,
  one pool of cache rows that every sequence indexes (a paged cache; :data:`SHARED_BATCH`), and
  so may ``kv_cache_store``'s, ``index_key_store``'s and ``kv_compress_store``'s slots (the same
  rows for every sequence). A caller holding such a tensor expanded over the batch (batch
  stride 0) passes that one copy.
* Types: float inputs may be bf16, fp16, fp32 or fp64; the math is fp32 as the contracts say
  (the CPU reference upgrades to fp64 for fp64 inputs, these functions do not); outputs take the
  dtype the contract gives. FP8 codes are FLOAT8E4M3FN tensors, packed FP4 codes, KV records and
  indexer-key records uint8, block scales fp32 (e8m0 scales are decoded by the caller first:
  ``2^(e-127)``, exact).
  Ties in every top-k go to the smaller index: ONNX ``TopK`` specifies that tie-break.
* Opsets: bodies use the default domain at :data:`OPSET`, and call shared helpers that are
  functions of domain :data:`LIB_DOMAIN`. ONNX requires a model and its functions to import the
  default domain at the same version, so a model embedding these functions imports ``""`` at
  ``OPSET``, ``seahal`` and ``seahal.lib`` at 1, and carries every function of
  :func:`function_protos`; :func:`complete_model` adds the missing ones to an exported model.

No output shape depends on ``start_pos``: what depends on it (the entries a compressor call
completes, the visible entries of a query) is masked in-graph; loops over experts or K blocks are
batched into ``Einsum`` contractions, so nothing depends on Python-side values but attributes.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnxscript
import torch
from onnx import TensorProto, numpy_helper
from onnxscript import INT64
from onnxscript import opset21 as op
from onnxscript.values import Opset

OPSET = 21
"""Version of the default ONNX domain the function bodies use (float8 types need >= 19)."""
DOMAIN = "seahal"
LIB_DOMAIN = "seahal.lib"
SEAHAL = Opset(DOMAIN, 1)
LIB = Opset(LIB_DOMAIN, 1)

BFLOAT16 = TensorProto.BFLOAT16
FLOAT = TensorProto.FLOAT
FLOAT8E4M3FN = TensorProto.FLOAT8E4M3FN

NEG_INF = float("-inf")
FP8_MAX = 448.0
FP8_AMAX_FLOOR = 1e-4
FP4_MAX = 6.0
FP4_AMAX_FLOOR = 6.0 * 2.0**-126
LN2_INV = 1.0 / math.log(2.0)
POS_INF = float("inf")
NAN = float("nan")
E4M3_MIN_NORMAL = 2.0**-6
FP32_MIN_NORMAL = 2.0**-126
FP32_MIN_NORMAL_INV = 2.0**126
FP32_MANTISSA_STEP = 2.0**-23
POW2_MIN = -149
"""Smallest exponent of the power-of-two table: 2^-149 is the smallest fp32 subnormal."""

_POW2 = numpy_helper.from_array(np.ldexp(np.float32(1), np.arange(POW2_MIN, 128)).astype(np.float32), "pow2")
"""``2^k`` for k in [-149, 127], exact: ``Pow`` is not required to be exact, a table lookup is."""
_E2M1 = numpy_helper.from_array(
    np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32), "e2m1"
)
"""Values of the 16 e2m1 codes (sign << 3 | magnitude index)."""
_E2M1_MIDPOINTS = numpy_helper.from_array(np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], np.float32), "mid")
_E2M1_ROUND_UP_AT_MID = numpy_helper.from_array(np.array([0, 1, 0, 1, 0, 1, 0], bool), "even_above")
"""At the midpoint between magnitude codes i and i+1 round to the even one: up when i+1 is even."""
_E4M3 = numpy_helper.from_array(
    torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float().numpy(), "e4m3"
)
"""Values of the 256 e4m3fn bit patterns (0x7F and 0xFF are NaN)."""


# --------------------------------------------------------------------------------------------
# Helpers (domain seahal.lib): called from the op bodies, shared so no formula is written twice
# --------------------------------------------------------------------------------------------


@onnxscript.script(LIB, default_opset=op)
def pow2(e):
    """``2^e`` as fp32 for an int64 tensor e, exactly (table lookup, e clamped to [-149, 127])."""
    table = op.Constant(value=_POW2)
    return op.Gather(table, op.Clip(e, POW2_MIN, 127) - POW2_MIN)


@onnxscript.script(LIB, default_opset=op)
def floor_log2(mag):
    """``floor(log2 mag)`` as int64 for fp32 mag > 0, exactly: the Log estimate corrected by one
    step either way against exact powers of two (0 gives -149)."""
    e = op.Clip(op.Cast(op.Floor(op.Log(mag) * LN2_INV), to=TensorProto.INT64), POW2_MIN, 127)
    e = e - op.Cast(pow2(e) > mag, to=TensorProto.INT64)
    return e + op.Cast(pow2(e) * 2.0 <= mag, to=TensorProto.INT64)  # 2^128 overflows to inf: no step past 127


@onnxscript.script(LIB, default_opset=op)
def ue8m0_ceil(s):
    """``2^ceil(log2 s)`` for fp32 s > 0: the scale rounded up to a power of two, exactly."""
    p = pow2(floor_log2(s))
    return op.Where(p == s, p, p * 2.0)


@onnxscript.script(LIB, default_opset=op)
def tiles(x, tile: int):
    """[..., K] -> [..., K/tile, tile] (shapes spelled out: Reshape's -1 is ambiguous with empty dims)."""
    width = op.Reshape(op.Constant(value_int=tile), [1])
    return op.Reshape(x, op.Concat(op.Shape(x, end=-1), op.Shape(x, start=-1) / width, width, axis=0))


@onnxscript.script(LIB, default_opset=op)
def fp8_quantize_tiles(xt, scale_fmt: str):
    """(e4m3 values [..., n, tile] as fp32, fp32 scales [..., n]) of fp32 tiles xt [..., n, tile], as
    fp8_act_quant specifies: ``s = max(amax, 1e-4) / 448`` per tile (ue8m0: rounded up to a power
    of two), ``q = e4m3_rne(clamp(x / s, -448, 448))``. The values are returned as fp32 (exact)
    because onnxruntime does not pass FP8 tensors into or out of nested functions."""
    s = op.Max(op.ReduceMax(op.Abs(xt), [-1], keepdims=0), FP8_AMAX_FLOOR) / FP8_MAX
    ue8m0 = op.Equal(op.Constant(value_string=scale_fmt), op.Constant(value_string="ue8m0"))
    s = op.Where(ue8m0, ue8m0_ceil(s), s)
    return op.Cast(op.Cast(op.Clip(xt / op.Unsqueeze(s, [-1]), -FP8_MAX, FP8_MAX), to=FLOAT8E4M3FN), to=FLOAT), s


@onnxscript.script(LIB, default_opset=op)
def fp8_quantize(x, tile: int, scale_fmt: str):
    """:func:`fp8_quantize_tiles` of x [..., K] in 1 x tile tiles: (e4m3 values [..., K] as fp32,
    fp32 scales [..., K/tile])."""
    q, s = fp8_quantize_tiles(tiles(op.Cast(x, to=FLOAT), tile=tile), scale_fmt=scale_fmt)
    return op.Reshape(q, op.Shape(x)), s


@onnxscript.script(LIB, default_opset=op)
def repeat_columns(x, times: int):
    """[..., J] -> [..., J*times], each column repeated ``times`` times in place."""
    n = op.Reshape(op.Constant(value_int=times), [1])
    wide = op.Expand(op.Unsqueeze(x, [-1]), op.Concat(op.Shape(x), n, axis=0))
    return op.Reshape(wide, op.Concat(op.Shape(x, end=-1), op.Shape(x, start=-1) * n, axis=0))


@onnxscript.script(LIB, default_opset=op)
def block_scaled_matmul(a, a_scale, b, b_scale, step: int):
    """``C = sum_j (A_j @ B_j^T) * (sA[:, j] sB[:, j])`` over K steps j of width ``step``, fp32.

    a: [..., M, K], b: [..., N, K] fp32 code values, a_scale: [..., M, K/step],
    b_scale: [..., N, K/step] fp32 (leading dims equal) -> [..., M, N] fp32. Each step's product
    of codes is exact in fp32; the scales multiply per step, as the reference GEMM does.
    """
    partial = op.Einsum(tiles(a, tile=step), tiles(b, tile=step), equation="...mjs,...njs->...jmn")
    sa = op.Unsqueeze(op.Einsum(op.Cast(a_scale, to=FLOAT), equation="...mj->...jm"), [-1])
    sb = op.Unsqueeze(op.Einsum(op.Cast(b_scale, to=FLOAT), equation="...nj->...jn"), [-2])
    return op.ReduceSum(partial * (sa * sb), [-3], keepdims=0)


@onnxscript.script(LIB, default_opset=op)
def block_row_scales(scale, b):
    """128x128 block scales [..., ceil(N/128), K/128] as one scale per row of b [..., N, K]:
    [..., N, K/128], row n taking block row n // 128."""
    rows = op.Shape(b, start=-2, end=-1)
    wide = op.Einsum(repeat_columns(op.Einsum(scale, equation="...ij->...ji"), times=128), equation="...ji->...ij")
    return op.Slice(wide, [0], rows, [-2])


@onnxscript.script(LIB, default_opset=op)
def fp8_block_gemm(a, a_scale, b, b_scale):
    """FP8 x FP8 ``(A sA) @ (B sB)^T`` in fp32: a: [..., M, K] e4m3 values (as fp32) with
    [..., M, K/128] scales, b: [..., N, K] e4m3 values (as fp32) with 128x128 block scales
    [..., ceil(N/128), K/128]."""
    return block_scaled_matmul(a, a_scale, b, block_row_scales(b_scale, b), step=128)


@onnxscript.script(LIB, default_opset=op)
def grouped_matmul(x, weight):
    """``out[..., g, r] = sum_i x[..., g, i] W[g*R + r, i]`` with fp32 sums, rounded to x's dtype:
    x [..., G, I], weight [G*R, I] (rows g*R ... g*R + R - 1 are group g's) -> [..., G, R]."""
    groups = op.Shape(x, start=-2, end=-1)
    per_group = op.Concat(groups, op.Shape(weight, end=1) / groups, op.Shape(weight, start=-1), axis=0)
    w = op.Reshape(op.Cast(weight, to=FLOAT), per_group)  # [G, R, I]
    return op.CastLike(op.Einsum(op.Cast(x, to=FLOAT), w, equation="...gi,gri->...gr"), x)


@onnxscript.script(LIB, default_opset=op)
def e2m1_decode(packed):
    """[..., K/2] uint8 (element 2i in the low nibble) -> [..., K] fp32 e2m1 values."""
    byte = op.Cast(packed, to=TensorProto.INT32)
    codes = op.Concat(op.Unsqueeze(op.Mod(byte, 16), [-1]), op.Unsqueeze(op.Div(byte, 16), [-1]), axis=-1)
    codes = op.Reshape(codes, op.Concat(op.Shape(packed, end=-1), 2 * op.Shape(packed, start=-1), axis=0))
    return op.Gather(op.Constant(value=_E2M1), codes)


@onnxscript.script(LIB, default_opset=op)
def fp4_block_gemm(a, a_scale, b, b_scale):
    """FP8 x FP4 ``(A sA) @ (e2m1(B) sB)^T`` in fp32, 32-wide K steps: a: [..., M, K] e4m3 values
    (as fp32) with [..., M, K/128] scales, b: [..., N, K/2] packed e2m1 with [..., N, K/32] scales."""
    a_steps = repeat_columns(op.Cast(a_scale, to=FLOAT), times=4)
    return block_scaled_matmul(a, a_steps, e2m1_decode(b), b_scale, step=32)


@onnxscript.script(LIB, default_opset=op)
def rotate_pairs(x, angles):
    """Rotate the last r = 2R dims of x [..., D] fp32 in interleaved pairs by angles [..., R]
    (broadcast to x's leading dims): ``(a, b) -> (a cos - b sin, a sin + b cos)``."""
    width = op.Shape(x, start=-1)
    nope = width - 2 * op.Shape(angles, start=-1)
    head = op.Slice(x, [0], nope, [-1])
    pairs = tiles(op.Slice(x, nope, width, [-1]), tile=2)
    a = op.Squeeze(op.Slice(pairs, [0], [1], [-1]), [-1])
    b = op.Squeeze(op.Slice(pairs, [1], [2], [-1]), [-1])
    cos, sin = op.Cos(angles), op.Sin(angles)
    rotated = op.Concat(op.Unsqueeze(a * cos - b * sin, [-1]), op.Unsqueeze(a * sin + b * cos, [-1]), axis=-1)
    rotated = op.Reshape(rotated, op.Concat(op.Shape(rotated, end=-2), 2 * op.Shape(rotated, start=-2, end=-1), axis=0))
    return op.Concat(head, rotated, axis=-1)


@onnxscript.script(LIB, default_opset=op)
def inverse_rms(x, eps: float):
    """``rsqrt(mean(x^2) + eps)`` over the last dim of fp32 x, kept as a dim of 1."""
    return op.Reciprocal(op.Sqrt(op.ReduceMean(x * x, [-1], keepdims=1) + op.Constant(value_float=eps)))


@onnxscript.script(LIB, default_opset=op)
def weighted_rms_norm(x, weight, eps: float):
    """``w * x * rsqrt(mean(x^2) + eps)`` over the last dim of fp32 x (the compressor's order)."""
    return op.Cast(weight, to=FLOAT) * x * inverse_rms(x, eps=eps)


@onnxscript.script(LIB, default_opset=op)
def stream_mix(x, fn, norm_eps: float):
    """mHC mix: ``(x_flat @ fn^T) * rsqrt(mean(x_flat^2) + norm_eps)``, x: [B, S, n, D] -> [B, S, m] fp32."""
    flat = op.Reshape(op.Cast(x, to=FLOAT), op.Concat(op.Shape(x, end=2), op.Shape(x, start=2, end=3) * op.Shape(x, start=3), axis=0))
    inv_rms = op.Reciprocal(op.Sqrt(op.ReduceMean(flat * flat, [-1], keepdims=1) + op.Constant(value_float=norm_eps)))
    return op.MatMul(flat, op.Transpose(op.Cast(fn, to=FLOAT), perm=[1, 0])) * inv_rms


@onnxscript.script(LIB, default_opset=op)
def collapse(x, pre):
    """``y = sum_i pre_i x_i``: x [B, S, n, D], pre [B, S, n] fp32 -> [B, S, D] in x's dtype."""
    return op.CastLike(op.ReduceSum(op.Unsqueeze(pre, [-1]) * op.Cast(x, to=FLOAT), [2], keepdims=0), x)


@onnxscript.script(LIB, default_opset=op)
def gate_scores(x, weight, score_func: str):
    """Expert scores of ``logits = x W^T`` (fp32): sqrt(softplus) (threshold 20), sigmoid or softmax."""
    logits = op.MatMul(op.Cast(x, to=FLOAT), op.Transpose(op.Cast(weight, to=FLOAT), perm=[1, 0]))
    func = op.Constant(value_string=score_func)
    softplus = op.Where(logits > 20.0, logits, op.Softplus(logits))
    scores = op.Where(op.Equal(func, op.Constant(value_string="sigmoid")), op.Sigmoid(logits), op.Sqrt(softplus))
    return op.Where(op.Equal(func, op.Constant(value_string="softmax")), op.Softmax(logits, axis=-1), scores)


@onnxscript.script(LIB, default_opset=op)
def route_weights(scores, indices, score_func: str, route_scale: float):
    """``w = s[idx]``, divided by ``sum(w) + 1e-20`` unless softmax scores, times route_scale;
    returns (weights fp32, indices int32)."""
    w = op.GatherElements(scores, indices, axis=-1)
    softmax = op.Equal(op.Constant(value_string=score_func), op.Constant(value_string="softmax"))
    w = op.Where(softmax, w, w / (op.ReduceSum(w, [-1], keepdims=1) + 1e-20))
    return w * op.Constant(value_float=route_scale), op.Cast(indices, to=TensorProto.INT32)


@onnxscript.script(LIB, default_opset=op)
def select_experts(key, top_k: int, n_groups: int, topk_groups: int):
    """Indices [T, top_k] of the largest keys (ties to the smaller expert), among the experts of
    the ``topk_groups`` best of ``n_groups`` groups (group score: sum of its top-2 keys)."""
    groups = op.Reshape(op.Constant(value_int=n_groups), [1])
    grouped = op.Reshape(key, op.Concat(op.Shape(key, end=1), groups, op.Shape(key, start=-1) / groups, axis=0))
    top = op.Min(op.Shape(grouped, start=-1), [2])
    group_top, _ = op.TopK(grouped, top, axis=-1)
    group_score = op.ReduceSum(group_top, [-1], keepdims=0)
    _, best = op.TopK(group_score, op.Reshape(op.Constant(value_int=topk_groups), [1]), axis=-1)
    keep = op.ScatterElements(op.ConstantOfShape(op.Shape(group_score)), best, op.Expand(1.0, op.Shape(best)), axis=-1)
    limited = op.Reshape(op.Where(op.Unsqueeze(keep, [-1]) > 0.0, grouped, NEG_INF), op.Shape(key))
    _, indices = op.TopK(limited, op.Reshape(op.Constant(value_int=top_k), [1]), axis=-1)
    return indices


@onnxscript.script(LIB, default_opset=op)
def expert_inputs(x, w1):
    """fp32 x [T, D] broadcast to every expert: [E, T, D] (E = w1's first dim)."""
    return op.Expand(op.Unsqueeze(x, [0]), op.Concat(op.Shape(w1, end=1), op.Shape(x), axis=0))


@onnxscript.script(LIB, default_opset=op)
def routed_swiglu(x, topk_weights, topk_ids, gate, up, swiglu_limit: float):
    """``h = w * silu(min(gate, L)) * clamp(up, -L, L)`` per expert and token, 0 for tokens that did
    not pick the expert, rounded to x's dtype: gate, up [E, T, I] fp32 -> [E, T, I] (L <= 0: no clamp)."""
    experts = op.Range(0, op.Squeeze(op.Shape(gate, end=1), [0]), 1)
    one_hot = op.Equal(op.Unsqueeze(op.Cast(topk_ids, to=TensorProto.INT64), [-1]), experts)  # [T, k, E]
    weight = op.ReduceSum(op.Where(one_hot, op.Unsqueeze(op.Cast(topk_weights, to=FLOAT), [-1]), 0.0), [1], keepdims=0)
    picked = op.Cast(op.ReduceMax(op.Cast(one_hot, to=FLOAT), [1], keepdims=0), to=TensorProto.BOOL)  # [T, E]
    limit = op.Constant(value_float=swiglu_limit)
    clamp = limit > 0.0
    gate = op.Where(clamp, op.Min(gate, limit), gate)
    up = op.Where(clamp, op.Max(op.Min(up, limit), -limit), up)
    h = gate * op.Sigmoid(gate) * up * op.Unsqueeze(op.Transpose(weight, perm=[1, 0]), [-1])
    return op.CastLike(op.Where(op.Unsqueeze(op.Transpose(picked, perm=[1, 0]), [-1]), h, 0.0), x)


@onnxscript.script(LIB, default_opset=op)
def sum_experts(x, down):
    """``y = sum_e x.dtype(down_e)`` accumulated in fp32, in x's dtype: down [E, T, D] fp32."""
    return op.CastLike(op.ReduceSum(op.Cast(op.CastLike(down, x), to=FLOAT), [0], keepdims=0), x)


@onnxscript.script(LIB, default_opset=op)
def sign_bit(v):
    """Whether fp32 v has its sign bit set (-0 included: its reciprocal is -inf)."""
    return op.Or(v < 0.0, op.And(v == 0.0, op.Reciprocal(v) < 0.0))


@onnxscript.script(LIB, default_opset=op)
def fp4_quantize(x, tile: int):
    """(e2m1 codes [..., K] int32, fp32 scales [..., K/tile]) of x [..., K], as fp4_quant specifies:
    ``s = 2^ceil(log2(max(amax, 6 * 2^-126) / 6))``, ``code = e2m1_rne(clamp(x / s, -6, 6))`` with
    code = sign << 3 | magnitude index (-0 keeps its sign)."""
    xt = tiles(op.Cast(x, to=FLOAT), tile=tile)
    s = ue8m0_ceil(op.Max(op.ReduceMax(op.Abs(xt), [-1], keepdims=0), FP4_AMAX_FLOOR) / FP4_MAX)
    v = op.Clip(xt / op.Unsqueeze(s, [-1]), -FP4_MAX, FP4_MAX)
    mag = op.Unsqueeze(op.Abs(v), [-1])
    mid = op.Constant(value=_E2M1_MIDPOINTS)
    up = op.Or(mag > mid, op.And(op.Constant(value=_E2M1_ROUND_UP_AT_MID), mag == mid))
    magnitude = op.ReduceSum(op.Cast(up, to=TensorProto.INT32), [-1], keepdims=0)
    code = magnitude + 8 * op.Cast(sign_bit(v), to=TensorProto.INT32)
    return op.Reshape(code, op.Shape(x)), s


@onnxscript.script(LIB, default_opset=op)
def fp4_pack(codes):
    """e2m1 codes [..., K] int32 -> [..., K/2] uint8, element 2i in the low nibble of byte i."""
    pairs = tiles(codes, tile=2)
    low = op.Squeeze(op.Slice(pairs, [0], [1], [-1]), [-1])
    high = op.Squeeze(op.Slice(pairs, [1], [2], [-1]), [-1])
    return op.Cast(low + 16 * high, to=TensorProto.UINT8)


@onnxscript.script(LIB, default_opset=op)
def e8m0_bytes(s):
    """Power-of-two fp32 scales ``2^k`` -> their e8m0 bytes ``k + 127`` (uint8), exactly."""
    return op.Cast(floor_log2(s) + 127, to=TensorProto.UINT8)


@onnxscript.script(LIB, default_opset=op)
def sylvester_hadamard(n):
    """The Sylvester Hadamard matrix H_n [n, n] fp32 for n ([1] int64, a power of two below 2^32)
    from index arithmetic: ``H[i, j] = (-1)^popcount(i & j)``.

    The popcount's parity is folded into bit 0 by XOR-ing halves (``a ^= a >> 16``, then 8, 4, 2,
    1; a right shift of a non-negative int64 is a division by a power of two)."""
    index = op.Range(0, op.Squeeze(n, [0]), 1)
    a = op.BitwiseAnd(op.Unsqueeze(index, [-1]), index)
    a = op.BitwiseXor(a, a / 65536)
    a = op.BitwiseXor(a, a / 256)
    a = op.BitwiseXor(a, a / 16)
    a = op.BitwiseXor(a, a / 4)
    a = op.BitwiseXor(a, a / 2)
    return op.Cast(1 - 2 * op.BitwiseAnd(a, 1), to=FLOAT)


@onnxscript.script(LIB, default_opset=op)
def e4m3_bits(q):
    """The bit patterns of e4m3fn values q (given as fp32) as int32 0..255: ``sign << 7 | exponent << 3 | mantissa``
    (exponent bias 7, subnormals below 2^-6 in steps of 2^-9)."""
    v = op.Cast(q, to=FLOAT)
    mag = op.Abs(v)
    normal = mag >= E4M3_MIN_NORMAL
    e = floor_log2(mag)
    mantissa = op.Where(normal, mag / pow2(e) * 8.0 - 8.0, mag * 512.0)
    exponent = op.Where(normal, e + 7, 0)
    sign = op.Cast(sign_bit(v), to=TensorProto.INT32)
    return sign * 128 + op.Cast(exponent, to=TensorProto.INT32) * 8 + op.Cast(mantissa, to=TensorProto.INT32)


@onnxscript.script(LIB, default_opset=op)
def float_bits(v, mantissa_bits: int):
    """The bit pattern, as int64, of finite fp32 values v held in a format of fp32's 8-bit exponent
    (bias 127) and ``m = mantissa_bits`` mantissa bits (bf16: 7, fp32: 23; v must be representable):
    ``sign << (8 + m) | exponent << m | mantissa``, subnormals in steps of ``2^(-126 - m)``."""
    step = pow2(op.Constant(value_int=mantissa_bits))  # 2^m
    mag = op.Abs(v)
    normal = mag >= FP32_MIN_NORMAL
    e = floor_log2(mag)
    mantissa = op.Where(normal, (mag / pow2(e) - 1.0) * step, mag * FP32_MIN_NORMAL_INV * step)
    exponent = op.Where(normal, e + 127, 0)
    sign = op.Cast(sign_bit(v), to=TensorProto.INT64)
    return (sign * 256 + exponent) * op.Cast(step, to=TensorProto.INT64) + op.Cast(mantissa, to=TensorProto.INT64)


@onnxscript.script(LIB, default_opset=op)
def le_bytes(bits, width: int):
    """Non-negative int64 [..., r] below ``256^width`` -> [..., r * width] uint8, each value's
    ``width`` bytes least significant first (byte i = ``bits / 256^i mod 256``)."""
    n = op.Reshape(op.Constant(value_int=width), [1])
    powers = op.Cast(pow2(8 * op.Range(0, op.Squeeze(n, [0]), 1)), to=TensorProto.INT64)  # 256^i
    split = op.Mod(op.Unsqueeze(bits, [-1]) / powers, 256)
    return op.Cast(op.Reshape(split, op.Concat(op.Shape(bits, end=-1), op.Shape(bits, start=-1) * n, axis=0)), to=TensorProto.UINT8)


@onnxscript.script(LIB, default_opset=op)
def bf16_bytes(x):
    """The little-endian bytes of x rounded to bf16: [..., r] -> [..., 2r] uint8 (finite x)."""
    return le_bytes(float_bits(op.Cast(op.Cast(x, to=BFLOAT16), to=FLOAT), mantissa_bits=7), width=2)


@onnxscript.script(LIB, default_opset=op)
def fp32_bytes(x):
    """The little-endian bytes of finite fp32 x: [..., r] -> [..., 4r] uint8 (inverse of :func:`fp32_from_bytes`)."""
    return le_bytes(float_bits(x, mantissa_bits=23), width=4)


@onnxscript.script(LIB, default_opset=op)
def bf16_from_bytes(pairs):
    """Inverse of :func:`bf16_bytes`: [..., 2r] int64 bytes -> [..., r] bf16."""
    pair = tiles(pairs, tile=2)
    bits = op.Squeeze(op.Slice(pair, [0], [1], [-1]), [-1]) + 256 * op.Squeeze(op.Slice(pair, [1], [2], [-1]), [-1])
    exponent = op.Mod(bits / 128, 256)
    mantissa = op.Cast(op.Mod(bits, 128), to=FLOAT)
    normal = pow2(exponent - 127) * (1.0 + mantissa / 128.0)
    subnormal = mantissa * FP32_MIN_NORMAL / 128.0
    special = op.Where(mantissa == 0.0, POS_INF, NAN)
    mag = op.Where(exponent == 0, subnormal, op.Where(exponent == 255, special, normal))
    sign = 1.0 - 2.0 * op.Cast(bits >= 32768, to=FLOAT)
    return op.Cast(mag * sign, to=BFLOAT16)  # a product keeps the sign of zero (selecting Neg(mag) lost it in ORT)


@onnxscript.script(LIB, default_opset=op)
def fp32_from_bytes(quads):
    """[..., 4] int64 little-endian bytes -> [...] fp32 with those bits (normals, subnormals, inf,
    NaN), exactly: ``2^(e-127) * (1 + m 2^-23)``, subnormals ``m 2^-149``."""
    b0, b1 = op.Gather(quads, 0, axis=-1), op.Gather(quads, 1, axis=-1)
    b2, b3 = op.Gather(quads, 2, axis=-1), op.Gather(quads, 3, axis=-1)
    exponent = op.Mod(b3, 128) * 2 + b2 / 128
    mantissa = op.Cast(op.Mod(b2, 128) * 65536 + b1 * 256 + b0, to=FLOAT)
    normal = pow2(exponent - 127) * (1.0 + mantissa * FP32_MANTISSA_STEP)
    subnormal = mantissa * FP32_MIN_NORMAL * FP32_MANTISSA_STEP
    special = op.Where(mantissa == 0.0, POS_INF, NAN)
    mag = op.Where(exponent == 0, subnormal, op.Where(exponent == 255, special, normal))
    return mag * (1.0 - 2.0 * op.Cast(b3 >= 128, to=FLOAT))


@onnxscript.script(LIB, default_opset=op)
def indexer_select(q, weights, keys, start_pos: INT64, offset: INT64, ratio: int, topk: int, weights_scale: float):
    """The lightning-indexer top-k of :func:`indexer_topk` (its docstring has the math), keys given
    as floats [B, N, d]; start_pos a scalar or [B], one position per sequence; offset a scalar."""
    logits = op.Einsum(op.Cast(q, to=FLOAT), op.Cast(keys, to=FLOAT), equation="bshd,bnd->bshn")
    w = op.Cast(weights, to=FLOAT) * op.Constant(value_float=weights_scale)  # one fp32 product a head weight
    scores = op.ReduceSum(op.Relu(logits) * op.Unsqueeze(w, [-1]), [2], keepdims=0)
    m = op.Constant(value_int=ratio)
    k = op.Reshape(op.Constant(value_int=topk), [1])
    start = op.Reshape(op.Cast(start_pos, to=TensorProto.INT64), [-1, 1])  # [1 or B, 1]
    seq = op.Squeeze(op.Shape(q, start=1, end=2), [0])
    limit = op.Unsqueeze((op.Range(0, seq, 1) + start + 1) / m, [-1])  # [1 or B, S, 1]: entries query s sees
    entries = op.Shape(keys, start=1, end=2)
    visible = op.Range(0, op.Squeeze(entries, [0]), 1) < limit  # [1 or B, S, N]
    masked = op.Where(visible, scores, NEG_INF)
    padding = op.Expand(op.Constant(value_float=NEG_INF), op.Concat(op.Shape(q, end=2), k, axis=0))
    _, order = op.TopK(op.Concat(masked, padding, axis=-1), k, axis=-1)
    valid = op.And(order < entries, order < limit)
    return op.Cast(op.Where(valid, order + op.Cast(offset, to=TensorProto.INT64), -1), to=TensorProto.INT32)


@onnxscript.script(LIB, default_opset=op)
def take_slots(rows, index):
    """``rows[b, index[b, i]]``: rows [B, L, C], int64 index [B, n] -> [B, n, C]."""
    expanded = op.Expand(op.Unsqueeze(index, [-1]), op.Concat(op.Shape(index), op.Shape(rows, start=-1), axis=0))
    return op.GatherElements(rows, expanded, axis=1)


@onnxscript.script(LIB, default_opset=op)
def store_rows(store, slots, records):
    """``store[b, slots[b, i]] = records[b, i]``: store [B, R, C], slots [B, n] int (or [1, n]: one
    row of slots the batch shares), records [B, n, C] -> the new store [B, R, C], the other rows
    unchanged (a ScatterElements along the rows; slots distinct and in [0, R))."""
    rows = op.Expand(op.Unsqueeze(op.Cast(slots, to=TensorProto.INT64), [-1]), op.Shape(records))
    return op.ScatterElements(store, rows, records, axis=1)


@onnxscript.script(LIB, default_opset=op)
def sequence_positions(start_pos, kv):
    """start_pos, a scalar or [B] (one per sequence), as int64 [B, 1] for kv [B, S, C]."""
    start = op.Reshape(op.Cast(start_pos, to=TensorProto.INT64), [-1, 1])
    return op.Expand(start, op.Concat(op.Shape(kv, end=1), [1], axis=0))


@onnxscript.script(LIB, default_opset=op)
def completed_rows(position, kv, ratio: int):
    """[B, ceil(S/m), 1] bool: row k holds an entry tokens [p_b, p_b + S) complete, i.e.
    ``k < floor((p_b + S)/m) - floor(p_b/m)``; position [B, 1] int64, kv [B, S, C]."""
    m = op.Constant(value_int=ratio)
    seq = op.Squeeze(op.Shape(kv, start=1, end=2), [0])
    count = (position + seq) / m - position / m
    return op.Unsqueeze(op.Range(0, (seq + m - 1) / m, 1) < count, [-1])


@onnxscript.script(LIB, default_opset=op)
def scale_tiles(values, scale, tile: int):
    """values [..., n * tile] fp32 times ``scale[..., t]`` in each tile t (scale [..., n] fp32)."""
    return op.Reshape(tiles(values, tile=tile) * op.Unsqueeze(scale, [-1]), op.Shape(values))


@onnxscript.script(LIB, default_opset=op)
def e8m0_scaled(values, exponents, tile: int):
    """values [..., n * tile] times ``2^(e_t - 127)`` per tile t of ``exponents`` [..., n] (int64
    e8m0 bytes; 255 is NaN), in fp32."""
    return scale_tiles(values, op.Where(exponents == 255, NAN, pow2(exponents - 127)), tile=tile)


@onnxscript.script(LIB, default_opset=op)
def unpack_records(packed, nope, rope_dim: int, tile: int):
    """Decode KV records: packed [..., record] uint8 with ``nope`` ([1] int64) e4m3 dims ->
    [..., nope + rope_dim] bf16; nope = e4m3 * 2^(e_t - 127) per tile t (e = 255: NaN), rope = the
    stored bf16."""
    rope_bytes = 2 * op.Reshape(op.Constant(value_int=rope_dim), [1])
    data = op.Cast(packed, to=TensorProto.INT64)
    values = op.Gather(op.Constant(value=_E4M3), op.Slice(data, [0], nope, [-1]))
    n_tiles = nope / op.Reshape(op.Constant(value_int=tile), [1])
    exponents = op.Slice(data, nope + rope_bytes, nope + rope_bytes + n_tiles, [-1])
    nope_values = e8m0_scaled(values, exponents, tile=tile)
    rope = bf16_from_bytes(op.Slice(data, nope, nope + rope_bytes, [-1]))
    return op.Concat(op.Cast(nope_values, to=BFLOAT16), rope, axis=-1)


@onnxscript.script(LIB, default_opset=op)
def gather_rows(rows, indices):
    """``rows[b mod R, max(i, 0)]`` for each index ``i = indices[b, s, k]``: rows [R, N, W] with
    R = B, or R = 1 (one pool of rows shared by the batch: a paged cache), int64 indices [B, S, K]
    -> [B, S, K, W]. A GatherND of (batch row, index) pairs, so an index >= N fails as it would
    per sequence."""
    safe = op.Max(indices, 0)
    batch = op.Squeeze(op.Shape(indices, start=0, end=1), [0])
    row_batch = op.Mod(op.Range(0, batch, 1), op.Shape(rows, start=0, end=1))
    row_batch = op.Expand(op.Reshape(row_batch, [-1, 1, 1]), op.Shape(safe))
    pairs = op.Concat(op.Unsqueeze(row_batch, [-1]), op.Unsqueeze(safe, [-1]), axis=-1)
    return op.GatherND(rows, pairs, batch_dims=0)


@onnxscript.script(LIB, default_opset=op)
def attend(q, values, valid, sink, softmax_scale: float):
    """The softmax with sink over each query's gathered keys: q [B, S, H, D], values [B, S, K, D],
    valid [B, S, K] bool, sink [H] -> [B, S, H, D] in q's dtype.

    ``s_j = scale q_h . v_j``; ``o_h = sum_j exp(s_j - m) v_j / (sum_j exp(s_j - m) + exp(sink_h - m))``
    in fp32 over the valid j, m the max over keys and sink; 0 for a query with no valid key.
    """
    values = op.Where(op.Unsqueeze(valid, [-1]), op.Cast(values, to=FLOAT), 0.0)  # empty slots: whatever row they read
    logits = op.Einsum(op.Cast(q, to=FLOAT), values, equation="bshd,bskd->bshk") * op.Constant(value_float=softmax_scale)
    logits = op.Where(op.Unsqueeze(valid, [2]), logits, NEG_INF)
    sink_logits = op.Expand(op.Reshape(op.Cast(sink, to=FLOAT), [1, 1, -1, 1]), op.Concat(op.Shape(logits, end=3), [1], axis=0))
    logits = op.Concat(logits, sink_logits, axis=-1)
    peak = op.ReduceMax(logits, [-1], keepdims=1)
    peak = op.Where(op.Or(op.IsInf(peak), op.IsNaN(peak)), 0.0, peak)
    probs = op.Exp(logits - peak)
    denominator = op.ReduceSum(probs, [-1], keepdims=1)
    keys = op.Shape(values, start=2, end=3)
    out = op.Einsum(op.Slice(probs, [0], keys, [-1]), values, equation="bshk,bskd->bshd")
    return op.CastLike(op.Where(denominator > 0.0, out / denominator, 0.0), q)


# --------------------------------------------------------------------------------------------
# The operators (domain seahal), in the order the model uses them
# --------------------------------------------------------------------------------------------


@onnxscript.script(SEAHAL, default_opset=op)
def rope(x, positions, freqs, inverse: int = 0):
    """Interleaved partial RoPE: x [B, S, H, D], positions [B, S] int, freqs [R] -> x's dtype.

    ``theta = positions * freqs`` (negated when inverse) in fp32; the last 2R dims rotate in pairs.
    """
    sign = 1.0 - 2.0 * op.Cast(op.Constant(value_int=inverse), to=FLOAT)
    angles = op.Unsqueeze(op.Cast(positions, to=FLOAT), [2, 3]) * op.Cast(freqs, to=FLOAT) * sign
    return op.CastLike(rotate_pairs(op.Cast(x, to=FLOAT), angles), x)


@onnxscript.script(SEAHAL, default_opset=op)
def rms_norm(x, weight, eps: float = 1e-6):
    """RMSNorm of the last dim: x [..., D], weight [D] -> x's dtype, ``x * rsqrt(mean(x^2) + eps) * w`` in fp32."""
    xf = op.Cast(x, to=FLOAT)
    return op.CastLike(xf * inverse_rms(xf, eps=eps) * op.Cast(weight, to=FLOAT), x)


@onnxscript.script(SEAHAL, default_opset=op)
def rms_norm_unweighted(x, eps: float = 1e-6):
    """:func:`rms_norm` without a weight (the per-head q norm): ``x * rsqrt(mean(x^2) + eps)``."""
    xf = op.Cast(x, to=FLOAT)
    return op.CastLike(xf * inverse_rms(xf, eps=eps), x)


@onnxscript.script(SEAHAL, default_opset=op)
def rms_norm_rope(x, weight, positions, freqs, eps: float):
    """RMSNorm of each head, then interleaved partial RoPE: x [B, S, H, D], weight [D],
    positions [B, S] int, freqs [R] -> x's dtype.

    ``rope(rms_norm(x, weight, eps), positions, freqs)``: ``y = x * rsqrt(mean(x^2) + eps) * w``
    in fp32, rounded to x's dtype, then y's last 2R dims rotated in pairs by
    ``theta = positions * freqs`` (fp32).
    """
    return rope(rms_norm(x, weight, eps=eps), positions, freqs, inverse=0)


@onnxscript.script(SEAHAL, default_opset=op)
def rms_norm_rope_unweighted(x, positions, freqs, eps: float):
    """:func:`rms_norm_rope` without a weight (the query heads):
    ``rope(rms_norm_unweighted(x, eps), positions, freqs)``."""
    return rope(rms_norm_unweighted(x, eps=eps), positions, freqs, inverse=0)


@onnxscript.script(SEAHAL, default_opset=op)
def fp32_linear(x, weight):
    """Output head: x [..., D], weight [V, D] -> [..., V] fp32, ``x @ weight^T`` with both widened to fp32."""
    return op.MatMul(op.Cast(x, to=FLOAT), op.Transpose(op.Cast(weight, to=FLOAT), perm=[1, 0]))


@onnxscript.script(SEAHAL, default_opset=op)
def fp8_act_quant(x, block_size: int = 128, scale_fmt: str = "ue8m0"):
    """FP8 e4m3 in 1 x block_size tiles: x [..., K] -> (q [..., K] e4m3, scale [..., K/block_size] fp32)."""
    q, s = fp8_quantize(x, tile=block_size, scale_fmt=scale_fmt)
    return op.Cast(q, to=FLOAT8E4M3FN), s


@onnxscript.script(SEAHAL, default_opset=op)
def fp4_quant(x, block_size: int = 32):
    """FP4 e2m1 with 1 x block_size ue8m0 scales, packed low nibble first:
    x [..., K] -> (codes [..., K/2] uint8, scale [..., K/block_size] fp32).

    ``s = 2^ceil(log2(max(amax, 6 * 2^-126) / 6))``; ``code = e2m1_rne(clamp(x / s, -6, 6))``.
    """
    codes, s = fp4_quantize(x, tile=block_size)
    return fp4_pack(codes), s


@onnxscript.script(SEAHAL, default_opset=op)
def hadamard_rotate(x):
    """Orthonormal Hadamard rotation (``fp4_block`` = 0): x [..., n] (n a power of two) -> x's dtype,
    ``y = x @ H_n * n^-0.5`` in fp32, H_n the Sylvester matrix (:func:`sylvester_hadamard`)."""
    n = op.Shape(x, start=-1)
    scale = op.Sqrt(op.Reciprocal(op.Cast(n, to=FLOAT)))  # fp32(n^-0.5) exactly: 1/n is exact, Sqrt rounds once
    return op.CastLike(op.MatMul(op.Cast(x, to=FLOAT), sylvester_hadamard(n)) * scale, x)


@onnxscript.script(SEAHAL, default_opset=op)
def hadamard_rotate_fp4(x, fp4_block: int):
    """:func:`hadamard_rotate`, then rounded through FP4 e2m1 in 1 x fp4_block ue8m0 blocks and
    decoded back: ``e2m1(code) * s`` of ``fp4_quant(y, fp4_block)``, in x's dtype (exact)."""
    codes, s = fp4_quantize(hadamard_rotate(x), tile=fp4_block)
    return op.CastLike(scale_tiles(op.Gather(op.Constant(value=_E2M1), codes), s, tile=fp4_block), x)


@onnxscript.script(SEAHAL, default_opset=op)
def hadamard_rotate_roped(x, positions, freqs):
    """:func:`hadamard_rotate` of x rotated by RoPE first (the indexer's query heads): x [B, S, H, n],
    positions [B, S] int, freqs [R] (2R <= n) -> x's dtype, ``hadamard_rotate(rope(x, positions,
    freqs))``: each head's last 2R dims rotated in pairs by ``theta = positions * freqs`` (fp32) and
    rounded to x's dtype, then the Hadamard rotation."""
    return hadamard_rotate(rope(x, positions, freqs, inverse=0))


@onnxscript.script(SEAHAL, default_opset=op)
def hadamard_rotate_fp4_roped(x, positions, freqs, fp4_block: int):
    """:func:`hadamard_rotate_fp4` of x rotated by RoPE first, as :func:`hadamard_rotate_roped`:
    ``hadamard_rotate_fp4(rope(x, positions, freqs), fp4_block)``."""
    return hadamard_rotate_fp4(rope(x, positions, freqs, inverse=0), fp4_block=fp4_block)


@onnxscript.script(SEAHAL, default_opset=op)
def index_key_pack_fp4(keys):
    """Packed FP4 indexer keys (``key_format="fp4"``): keys [..., d] (d a multiple of 32) ->
    [..., d/2 + d/32] uint8, ``[e2m1 codes of fp4_quant(keys, 32), element 2i in the low nibble
    of byte i | e8m0 byte of each 32-block's scale]``."""
    codes, s = fp4_quantize(keys, tile=32)
    return op.Concat(fp4_pack(codes), e8m0_bytes(s), axis=-1)


@onnxscript.script(SEAHAL, default_opset=op)
def index_key_pack_fp8(keys):
    """Packed FP8 indexer keys (``key_format="fp8"``): keys [..., d] -> [..., d + 4] uint8,
    ``[e4m3 codes of fp8_act_quant(keys, d, "ue8m0") | that one fp32 scale, 4 bytes little-endian]``
    (each key one tile: ``s = 2^ceil(log2(max(amax, 1e-4) / 448))``)."""
    q, s = fp8_quantize_tiles(op.Unsqueeze(op.Cast(keys, to=FLOAT), [-2]), scale_fmt="ue8m0")  # [..., 1, d], [..., 1]
    codes = op.Cast(e4m3_bits(op.Squeeze(q, [-2])), to=TensorProto.UINT8)
    return op.Concat(codes, fp32_bytes(s), axis=-1)


@onnxscript.script(SEAHAL, default_opset=op)
def index_key_store_fp4(keys, store, slots):
    """:func:`index_key_pack_fp4`'s records stored in their rows (``key_format="fp4"``): keys
    [B, n, d], store [B, R, d/2 + d/32] uint8, slots [B, n] int (or [1, n]: one row of slots the
    batch shares) -> the new store, ``store[b, slots[b, i]] = index_key_pack(keys[b, i], "fp4")``,
    the other rows unchanged (:func:`store_rows`)."""
    return store_rows(store, slots, index_key_pack_fp4(keys))


@onnxscript.script(SEAHAL, default_opset=op)
def index_key_store_fp8(keys, store, slots):
    """:func:`index_key_pack_fp8`'s records stored in their rows (``key_format="fp8"``): keys
    [B, n, d], store [B, R, d + 4] uint8, slots as :func:`index_key_store_fp4` -> the new store."""
    return store_rows(store, slots, index_key_pack_fp8(keys))


@onnxscript.script(SEAHAL, default_opset=op)
def fp8_gemm(a, a_scale, b, b_scale, out_dtype: int = BFLOAT16):
    """``C = (A sA) @ (B sB)^T``: a [M, K] e4m3, a_scale [M, K/128], b [N, K] e4m3,
    b_scale [ceil(N/128), K/128] fp32 -> [M, N] in out_dtype; fp32 accumulation per 128-wide K block."""
    return op.Cast(fp8_block_gemm(op.Cast(a, to=FLOAT), a_scale, op.Cast(b, to=FLOAT), b_scale), to=out_dtype)


@onnxscript.script(SEAHAL, default_opset=op)
def fp4_gemm(a, a_scale, b, b_scale, out_dtype: int = BFLOAT16):
    """``C = (A sA) @ (e2m1(B) sB)^T``: a [M, K] e4m3, a_scale [M, K/128], b [N, K/2] packed e2m1,
    b_scale [N, K/32] fp32 -> [M, N] in out_dtype; fp32 accumulation per 32-wide K step."""
    return op.Cast(fp4_block_gemm(op.Cast(a, to=FLOAT), a_scale, b, b_scale), to=out_dtype)


@onnxscript.script(SEAHAL, default_opset=op)
def act_quant_gemm_fp8(x, b, b_scale, out_dtype: int = BFLOAT16):
    """A linear layer on FP8 weights: x [M, K] float (K a multiple of 128), b [N, K] e4m3,
    b_scale [ceil(N/128), K/128] fp32 -> [M, N] in out_dtype.

    ``fp8_gemm(*fp8_act_quant(x, 128, "ue8m0"), b, b_scale, out_dtype)``: x's 1x128 tiles
    quantised as :func:`fp8_act_quant` does, then :func:`fp8_gemm`. b reaches fp8_gemm through an
    ``Identity``: onnxruntime types an input that only a nested function reads without the float8
    types, and refuses an e4m3 b there; read by Identity first, b keeps its type."""
    a, a_scale = fp8_act_quant(x, block_size=128, scale_fmt="ue8m0")
    return fp8_gemm(a, a_scale, op.Identity(b), b_scale, out_dtype=out_dtype)


@onnxscript.script(SEAHAL, default_opset=op)
def act_quant_gemm_fp4(x, b, b_scale, out_dtype: int = BFLOAT16):
    """A linear layer on FP4 weights: x [M, K] float (K a multiple of 128), b [N, K/2] packed
    e2m1, b_scale [N, K/32] fp32 -> [M, N] in out_dtype.

    ``fp4_gemm(*fp8_act_quant(x, 128, "ue8m0"), b, b_scale, out_dtype)``: x's 1x128 tiles
    quantised as :func:`fp8_act_quant` does, then :func:`fp4_gemm`."""
    a, a_scale = fp8_act_quant(x, block_size=128, scale_fmt="ue8m0")
    return fp4_gemm(a, a_scale, b, b_scale, out_dtype=out_dtype)


@onnxscript.script(SEAHAL, default_opset=op)
def moe_gate(
    x, weight, bias, top_k: int, score_func: str = "sqrtsoftplus", route_scale: float = 1.0,
    n_groups: int = 1, topk_groups: int = 1,
):
    """Score routing: x [T, D], weight [E, D], bias [E] -> (weights [T, top_k] fp32, indices int32).

    ``s = score(x W^T)``; ``idx = topk(s + bias)`` within the best groups; weights from s.
    """
    scores = gate_scores(x, weight, score_func=score_func)
    key = scores + op.Cast(bias, to=FLOAT)
    indices = select_experts(key, top_k=top_k, n_groups=n_groups, topk_groups=topk_groups)
    w, idx = route_weights(scores, indices, score_func=score_func, route_scale=route_scale)
    return w, idx


@onnxscript.script(SEAHAL, default_opset=op)
def moe_gate_unbiased(
    x, weight, top_k: int, score_func: str = "sqrtsoftplus", route_scale: float = 1.0,
    n_groups: int = 1, topk_groups: int = 1,
):
    """moe_gate with ``bias=None``: selection by the scores themselves."""
    scores = gate_scores(x, weight, score_func=score_func)
    indices = select_experts(scores, top_k=top_k, n_groups=n_groups, topk_groups=topk_groups)
    w, idx = route_weights(scores, indices, score_func=score_func, route_scale=route_scale)
    return w, idx


@onnxscript.script(SEAHAL, default_opset=op)
def moe_gate_hash(x, weight, input_ids, tid2eid, top_k: int, score_func: str = "sqrtsoftplus", route_scale: float = 1.0):
    """Hash routing: ``idx = tid2eid[input_ids]`` (top_k = its width; bias and groups unused),
    weights from the learned gate's scores at those experts."""
    scores = gate_scores(x, weight, score_func=score_func)
    indices = op.Cast(op.Gather(tid2eid, op.Cast(input_ids, to=TensorProto.INT64), axis=0), to=TensorProto.INT64)
    w, idx = route_weights(scores, indices, score_func=score_func, route_scale=route_scale)
    return w, idx


@onnxscript.script(SEAHAL, default_opset=op)
def moe_experts(x, topk_weights, topk_ids, w1, w3, w2, swiglu_limit: float = 10.0):
    """Routed clamped-SwiGLU experts, dense weights: x [T, D], topk_weights [T, k] fp32,
    topk_ids [T, k] int (-1 = none), w1, w3 [E, I, D], w2 [E, D, I] -> [T, D] in x's dtype.

    ``y_t = sum_e x.dtype(W2_e x.dtype(h_e))``, h from :func:`routed_swiglu`; fp32 GEMMs.
    """
    xe = expert_inputs(op.Cast(x, to=FLOAT), w1)
    gate = op.Einsum(xe, op.Cast(w1, to=FLOAT), equation="etk,enk->etn")
    up = op.Einsum(xe, op.Cast(w3, to=FLOAT), equation="etk,enk->etn")
    h = routed_swiglu(x, topk_weights, topk_ids, gate, up, swiglu_limit=swiglu_limit)
    down = op.Einsum(op.Cast(h, to=FLOAT), op.Cast(w2, to=FLOAT), equation="etk,enk->etn")
    return sum_experts(x, down)


@onnxscript.script(SEAHAL, default_opset=op)
def moe_experts_fp8(x, topk_weights, topk_ids, w1, w1_scale, w3, w3_scale, w2, w2_scale, swiglu_limit: float = 10.0):
    """moe_experts with FP8 e4m3 weights and 128x128 block scales [E, ceil(rows/128), cols/128]:
    every GEMM input is first FP8-quantised in 1x128 ue8m0 tiles."""
    w1, w3, w2 = op.Cast(w1, to=FLOAT), op.Cast(w3, to=FLOAT), op.Cast(w2, to=FLOAT)
    q, s = fp8_quantize(expert_inputs(op.Cast(x, to=FLOAT), w1), tile=128, scale_fmt="ue8m0")
    gate = fp8_block_gemm(q, s, w1, w1_scale)
    up = fp8_block_gemm(q, s, w3, w3_scale)
    h = routed_swiglu(x, topk_weights, topk_ids, gate, up, swiglu_limit=swiglu_limit)
    hq, hs = fp8_quantize(h, tile=128, scale_fmt="ue8m0")
    return sum_experts(x, fp8_block_gemm(hq, hs, w2, w2_scale))


@onnxscript.script(SEAHAL, default_opset=op)
def moe_experts_fp4(x, topk_weights, topk_ids, w1, w1_scale, w3, w3_scale, w2, w2_scale, swiglu_limit: float = 10.0):
    """moe_experts with packed FP4 e2m1 weights [E, rows, cols/2] and 1x32 scales [E, rows, cols/32]:
    every GEMM input is first FP8-quantised in 1x128 ue8m0 tiles."""
    q, s = fp8_quantize(expert_inputs(op.Cast(x, to=FLOAT), w1), tile=128, scale_fmt="ue8m0")
    gate = fp4_block_gemm(q, s, w1, w1_scale)
    up = fp4_block_gemm(q, s, w3, w3_scale)
    h = routed_swiglu(x, topk_weights, topk_ids, gate, up, swiglu_limit=swiglu_limit)
    hq, hs = fp8_quantize(h, tile=128, scale_fmt="ue8m0")
    return sum_experts(x, fp4_block_gemm(hq, hs, w2, w2_scale))


@onnxscript.script(SEAHAL, default_opset=op)
def hc_pre(x, fn, base, scale, sinkhorn_iters: int = 20, eps: float = 1e-6, norm_eps: float = 1e-6):
    """mHC pre: x [B, S, n, D] -> (y [B, S, D] x's dtype, post [B, S, n] fp32, comb [B, S, n, n] fp32).

    mix from :func:`stream_mix`; ``pre = sigmoid(mix[:n] s0 + b[:n]) + eps``,
    ``post = 2 sigmoid(mix[n:2n] s1 + b[n:2n])``, ``comb = Sinkhorn(mix[2n:] s2 + b[2n:])``:
    softmax over j, +eps, column normalisation, then ``iters - 1`` times rows then columns.
    """
    mix = stream_mix(x, fn, norm_eps=norm_eps)
    n = op.Shape(x, start=2, end=3)
    sc = op.Cast(scale, to=FLOAT)
    bs = op.Cast(base, to=FLOAT)
    eps_t = op.Constant(value_float=eps)
    pre_logits = op.Slice(mix, [0], n, [-1]) * op.Slice(sc, [0], [1]) + op.Slice(bs, [0], n)
    post_logits = op.Slice(mix, n, 2 * n, [-1]) * op.Slice(sc, [1], [2]) + op.Slice(bs, n, 2 * n)
    comb_logits = op.Slice(mix, 2 * n, op.Shape(mix, start=-1), [-1]) * op.Slice(sc, [2], [3]) + op.Slice(bs, 2 * n, op.Shape(bs))
    comb = op.Softmax(op.Reshape(comb_logits, op.Concat(op.Shape(x, end=2), n, n, axis=0)), axis=-1) + eps_t
    comb = comb / (op.ReduceSum(comb, [-2], keepdims=1) + eps_t)
    rounds = op.Constant(value_int=sinkhorn_iters) - 1
    for _ in range(rounds):
        comb = comb / (op.ReduceSum(comb, [-1], keepdims=1) + eps_t)
        comb = comb / (op.ReduceSum(comb, [-2], keepdims=1) + eps_t)
    y = collapse(x, op.Sigmoid(pre_logits) + eps_t)
    return y, 2.0 * op.Sigmoid(post_logits), comb


@onnxscript.script(SEAHAL, default_opset=op)
def hc_pre_normed(x, fn, base, scale, norm_weight, sinkhorn_iters: int = 20, eps: float = 1e-6, norm_eps: float = 1e-6):
    """hc_pre with the sub-layer's pre-norm: norm_weight [D] -> (y, post, comb) as :func:`hc_pre`,
    with ``y = rms_norm(hc_pre's y, norm_weight, norm_eps)``: the sum rounded to x's dtype, then
    ``y * rsqrt(mean(y^2) + norm_eps) * w`` in fp32, rounded to x's dtype."""
    y, post, comb = hc_pre(x, fn, base, scale, sinkhorn_iters=sinkhorn_iters, eps=eps, norm_eps=norm_eps)
    return rms_norm(y, norm_weight, eps=norm_eps), post, comb


@onnxscript.script(SEAHAL, default_opset=op)
def hc_post(f, x, post, comb):
    """mHC post: ``x'_j = post_j f + sum_i comb[i, j] x_i`` in fp32: f [B, S, D], x [B, S, n, D],
    post [B, S, n], comb [B, S, n, n] -> [B, S, n, D] in x's dtype."""
    expanded = op.Unsqueeze(op.Cast(post, to=FLOAT), [-1]) * op.Unsqueeze(op.Cast(f, to=FLOAT), [-2])
    mixed = op.MatMul(op.Transpose(op.Cast(comb, to=FLOAT), perm=[0, 1, 3, 2]), op.Cast(x, to=FLOAT))
    return op.CastLike(expanded + mixed, x)


@onnxscript.script(SEAHAL, default_opset=op)
def hc_post_summed(f, x, post, comb, addend):
    """hc_post of a sub-layer output in two parts: addend [B, S, D] in f's dtype -> [B, S, n, D] in
    x's dtype, ``hc_post(f + addend, x, post, comb)`` with ``f + addend`` added in fp32 and rounded
    to f's dtype (as a torch add in f's dtype rounds it)."""
    summed = op.CastLike(op.Cast(f, to=FLOAT) + op.Cast(addend, to=FLOAT), f)
    return hc_post(summed, x, post, comb)


@onnxscript.script(SEAHAL, default_opset=op)
def hc_post_pre(f, x, post, comb, fn, base, scale, sinkhorn_iters: int = 20, eps: float = 1e-6, norm_eps: float = 1e-6):
    """mHC post of one sub-layer, then pre of the next -> (streams [B, S, n, D] in x's dtype, y, post',
    comb'): ``streams = hc_post(f, x, post, comb)``, ``(y, post', comb') = hc_pre(streams, fn, base,
    scale, sinkhorn_iters, eps, norm_eps)``, the streams rounded to x's dtype before hc_pre reads
    them (as the two ops in turn). The variants swap in each part's: an ``addend`` makes the post
    part :func:`hc_post_summed`, a ``norm_weight`` the pre part :func:`hc_pre_normed`."""
    streams = hc_post(f, x, post, comb)
    y, post_next, comb_next = hc_pre(
        streams, fn, base, scale, sinkhorn_iters=sinkhorn_iters, eps=eps, norm_eps=norm_eps,
    )
    return streams, y, post_next, comb_next


@onnxscript.script(SEAHAL, default_opset=op)
def hc_post_pre_normed(
    f, x, post, comb, fn, base, scale, norm_weight, sinkhorn_iters: int = 20, eps: float = 1e-6, norm_eps: float = 1e-6,
):
    """:func:`hc_post_pre` with the next sub-layer's pre-norm: its hc_pre part is :func:`hc_pre_normed`."""
    streams = hc_post(f, x, post, comb)
    y, post_next, comb_next = hc_pre_normed(
        streams, fn, base, scale, norm_weight, sinkhorn_iters=sinkhorn_iters, eps=eps, norm_eps=norm_eps,
    )
    return streams, y, post_next, comb_next


@onnxscript.script(SEAHAL, default_opset=op)
def hc_post_summed_pre(
    f, x, post, comb, fn, base, scale, addend, sinkhorn_iters: int = 20, eps: float = 1e-6, norm_eps: float = 1e-6,
):
    """:func:`hc_post_pre` of a sub-layer output in two parts: its hc_post part is :func:`hc_post_summed`."""
    streams = hc_post_summed(f, x, post, comb, addend)
    y, post_next, comb_next = hc_pre(
        streams, fn, base, scale, sinkhorn_iters=sinkhorn_iters, eps=eps, norm_eps=norm_eps,
    )
    return streams, y, post_next, comb_next


@onnxscript.script(SEAHAL, default_opset=op)
def hc_post_summed_pre_normed(
    f, x, post, comb, fn, base, scale, norm_weight, addend,
    sinkhorn_iters: int = 20, eps: float = 1e-6, norm_eps: float = 1e-6,
):
    """:func:`hc_post_pre` with both: :func:`hc_post_summed`, then :func:`hc_pre_normed` (V4's MoE
    sub-layer finishing, the next layer's attention starting)."""
    streams = hc_post_summed(f, x, post, comb, addend)
    y, post_next, comb_next = hc_pre_normed(
        streams, fn, base, scale, norm_weight, sinkhorn_iters=sinkhorn_iters, eps=eps, norm_eps=norm_eps,
    )
    return streams, y, post_next, comb_next


@onnxscript.script(SEAHAL, default_opset=op)
def hc_head(x, fn, base, scale, eps: float = 1e-6, norm_eps: float = 1e-6):
    """mHC head: ``y = sum_i (sigmoid(mix_i s0 + b_i) + eps) x_i``: x [B, S, n, D], fn [n, n*D] -> [B, S, D]."""
    pre = op.Sigmoid(stream_mix(x, fn, norm_eps=norm_eps) * op.Cast(scale, to=FLOAT) + op.Cast(base, to=FLOAT))
    return collapse(x, pre + op.Constant(value_float=eps))


@onnxscript.script(SEAHAL, default_opset=op)
def hc_head_normed(x, fn, base, scale, norm_weight, eps: float = 1e-6, norm_eps: float = 1e-6):
    """hc_head with the final norm: norm_weight [D] -> [B, S, D] in x's dtype,
    ``rms_norm(hc_head(x, fn, base, scale, eps, norm_eps), norm_weight, norm_eps)``."""
    return rms_norm(hc_head(x, fn, base, scale, eps=eps, norm_eps=norm_eps), norm_weight, eps=norm_eps)


@onnxscript.script(SEAHAL, default_opset=op)
def kv_compress(
    kv, score, ape, norm_weight, rope_freqs, kv_state, score_state, start_pos: INT64,
    ratio: int, overlap: int, norm_eps: float = 1e-6, out_dtype: int = BFLOAT16,
):
    """Streaming KV compressor -> (entries [B, ceil(S/m), d] out_dtype, kv_state', score_state').

    kv, score: [B, S, coff*d], ape: [m, coff*d], states: [B, coff*m, coff*d] fp32, start_pos a
    scalar or [B] (sequence b at p_b). Per sequence, a timeline of fixed length 2m + S starting at
    a block boundary: an m-slot previous block (the state's slots [0, m) when overlapped and
    p_b > 0), the incomplete block's ``p_b mod m`` tokens the state holds (none when p_b = 0: a
    reset), the S tokens with gate scores ``score_t + ape[t mod m]``, then empty slots (kv 0,
    score -inf); one GatherElements of an index per slot builds it from [state | empty | tokens].
    Entry k pools per channel, with a softmax over 2m slots, the a-halves (channels [0, d)) of
    timeline block k (empty unless overlapped) and the b-halves (channels [C-d, C)) of block k+1;
    it is rounded to out_dtype, RMS-normed, rounded, and rotated at ``(p_b // m + k) * m``. Rows
    past the ``new_entries(p_b, S, m)`` entries sequence b completes are zero. The new state: the
    last complete block when overlapped, then the incomplete one's tokens, then empty slots.
    """
    m = op.Constant(value_int=ratio)
    overlapped = op.Cast(op.Constant(value_int=overlap), to=TensorProto.BOOL)
    coff = 1 + op.Cast(overlapped, to=TensorProto.INT64)
    channels = op.Shape(kv, start=-1)
    d = channels / coff
    seq = op.Squeeze(op.Shape(kv, start=1, end=2), [0])
    position = sequence_positions(start_pos, kv)  # [B, 1]

    # the timeline as indices into [state (coff*m slots) | one empty slot | S tokens]
    empty = coff * m
    held = m + op.Mod(position, m)  # timeline slots before the tokens
    slot = op.Range(0, 2 * m + seq, 1)
    state_slot = slot + (coff - 2) * m  # the state's previous block (if overlapped), then its partial block
    from_state = op.And(op.And(slot < held, state_slot >= 0), position > 0)
    from_tokens = op.And(slot >= held, slot < held + seq)
    timeline = op.Where(from_state, state_slot, op.Where(from_tokens, empty + 1 + slot - held, empty))  # [B, L]

    empty_row = op.Concat(op.Shape(kv, end=1), [1], channels, axis=0)
    ape_rows = op.Mod(op.Range(0, seq, 1) + position, m)  # [B, S]
    new_score = op.Cast(score, to=FLOAT) + op.Gather(op.Cast(ape, to=FLOAT), ape_rows)
    kv_source = op.Concat(kv_state, op.Expand(op.Constant(value_float=0.0), empty_row), op.Cast(kv, to=FLOAT), axis=1)
    score_source = op.Concat(score_state, op.Expand(op.Constant(value_float=NEG_INF), empty_row), new_score, axis=1)
    timeline_kv = take_slots(kv_source, timeline)
    timeline_score = take_slots(score_source, timeline)

    rows = (seq + m - 1) / m  # ceil(S/m): the most entries S tokens complete
    blocks = op.Reshape(rows + 1, [1])
    block_shape = op.Concat(op.Shape(kv, end=1), blocks, op.Reshape(m, [1]), channels, axis=0)
    kv_blocks = op.Reshape(op.Slice(timeline_kv, [0], blocks * m, [1]), block_shape)
    score_blocks = op.Reshape(op.Slice(timeline_score, [0], blocks * m, [1]), block_shape)
    a_end = op.Concat(blocks - 1, d, axis=0)
    a_kv = op.Slice(kv_blocks, [0, 0], a_end, [1, 3])
    a_score = op.Where(overlapped, op.Slice(score_blocks, [0, 0], a_end, [1, 3]), NEG_INF)
    b_start = op.Concat([1], channels - d, axis=0)
    b_kv = op.Slice(kv_blocks, b_start, op.Concat(blocks, channels, axis=0), [1, 3])
    b_score = op.Slice(score_blocks, b_start, op.Concat(blocks, channels, axis=0), [1, 3])
    weights = op.Softmax(op.Concat(a_score, b_score, axis=2), axis=2)
    pooled = op.ReduceSum(weights * op.Concat(a_kv, b_kv, axis=2), [2], keepdims=0)  # [B, rows, d]

    rounded = op.Cast(op.Cast(pooled, to=out_dtype), to=FLOAT)
    normed = op.Cast(op.Cast(weighted_rms_norm(rounded, norm_weight, eps=norm_eps), to=out_dtype), to=FLOAT)
    entry = position / m + op.Range(0, rows, 1)  # [B, rows]: the absolute entry index
    angles = op.Unsqueeze(op.Cast(entry * m, to=FLOAT), [-1]) * op.Cast(rope_freqs, to=FLOAT)
    completed = completed_rows(position, kv, ratio=ratio)
    entries = op.Cast(op.Where(completed, rotate_pairs(normed, angles), 0.0), to=out_dtype)

    # the new state: the last (coff-1) complete blocks and the incomplete block's tokens, moved to the front
    filled = held + seq
    first = (filled / m - coff + 1) * m
    source = first + op.Range(0, coff * m, 1)  # [B, coff*m] timeline slots
    kept = op.GatherElements(timeline, op.Min(source, 2 * m + seq - 1), axis=1)
    state_index = op.Where(source < filled, kept, empty)
    return entries, take_slots(kv_source, state_index), take_slots(score_source, state_index)


@onnxscript.script(SEAHAL, default_opset=op)
def indexer_topk(q, weights, keys, start_pos: INT64, offset: INT64, ratio: int, topk: int, weights_scale: float = 1.0):
    """Lightning-indexer top-k: q [B, S, H, d], weights [B, S, H], keys [B, N, d] -> [B, S, topk] int32.

    ``I(t, j) = sum_h w_h relu(q_h . K_j)`` in fp32 with ``w = fp32(weights) * weights_scale`` (one
    fp32 product each), for query ``t = start_pos + s`` over the visible entries
    ``j < min(N, floor((t+1)/m))``; top-k by score (ties to the smaller j) over the scores padded
    with topk -inf columns, so fewer visible entries leave -1 slots; entry j is returned as
    ``offset + j``.
    """
    return indexer_select(q, weights, keys, start_pos, offset, ratio=ratio, topk=topk, weights_scale=weights_scale)


@onnxscript.script(SEAHAL, default_opset=op)
def indexer_topk_packed_fp4(
    q, weights, keys, start_pos: INT64, offset: INT64, ratio: int, topk: int, weights_scale: float = 1.0,
):
    """indexer_topk over packed FP4 keys [B, N, d/2 + d/32] uint8 (d from q): ``K = e2m1(codes) *
    2^(e-127)`` per 32 elements (e = 255: NaN), rounded to q's dtype, then :func:`indexer_topk`."""
    d = op.Shape(q, start=-1)
    half = d / 2
    values = e2m1_decode(op.Slice(keys, [0], half, [-1]))
    exponents = op.Cast(op.Slice(keys, half, half + d / 32, [-1]), to=TensorProto.INT64)
    dense = op.CastLike(e8m0_scaled(values, exponents, tile=32), q)
    return indexer_select(q, weights, dense, start_pos, offset, ratio=ratio, topk=topk, weights_scale=weights_scale)


@onnxscript.script(SEAHAL, default_opset=op)
def indexer_topk_packed_fp8(
    q, weights, keys, start_pos: INT64, offset: INT64, ratio: int, topk: int, weights_scale: float = 1.0,
):
    """indexer_topk over packed FP8 keys [B, N, d + 4] uint8 (d from q): ``K = e4m3(codes) * s``
    with s the key's little-endian fp32 scale, in fp32, rounded to q's dtype, then :func:`indexer_topk`."""
    d = op.Shape(q, start=-1)
    data = op.Cast(keys, to=TensorProto.INT64)
    values = op.Gather(op.Constant(value=_E4M3), op.Slice(data, [0], d, [-1]))
    dense = op.CastLike(values * op.Unsqueeze(fp32_from_bytes(op.Slice(data, d, d + 4, [-1])), [-1]), q)
    return indexer_select(q, weights, dense, start_pos, offset, ratio=ratio, topk=topk, weights_scale=weights_scale)


@onnxscript.script(SEAHAL, default_opset=op)
def sparse_attention(q, kv, indices, sink, softmax_scale: float):
    """Sparse MQA with sinks: q [B, S, H, D], kv [B, N, D] (or [1, N, D]: a pool of rows the batch
    shares), indices [B, S, K] (-1 = empty), sink [H] -> [B, S, H, D] in q's dtype.

    ``s_j = scale q_h . kv[idx_j]``; ``o_h = sum_j exp(s_j - m) kv[idx_j] / (sum_j exp(s_j - m) +
    exp(sink_h - m))`` in fp32, m the max over keys and sink; 0 for a query with no valid key.
    """
    idx = op.Cast(indices, to=TensorProto.INT64)
    values = gather_rows(kv, idx)  # [B, S, K, D]
    return attend(q, values, idx >= 0, sink, softmax_scale=softmax_scale)


@onnxscript.script(SEAHAL, default_opset=op)
def sparse_attention_rotated(q, kv, indices, sink, positions, freqs, softmax_scale: float):
    """sparse_attention with the output's inverse RoPE: positions [B, S] int, freqs [R] ->
    [B, S, H, D] in q's dtype.

    ``rope(sparse_attention(q, kv, indices, sink, scale), positions, freqs, inverse=1)``: o rounded
    to q's dtype, then each head's last 2R dims rotated in pairs by ``theta = -positions * freqs``
    (fp32), rounded to q's dtype."""
    return rope(sparse_attention(q, kv, indices, sink, softmax_scale=softmax_scale), positions, freqs, inverse=1)


@onnxscript.script(SEAHAL, default_opset=op)
def sparse_attention_fp8(q, records, indices, sink, softmax_scale: float, rope_dim: int = 64, tile: int = 64):
    """sparse_attention over packed FP8 KV records: q [B, S, H, D], records [B, N, record] uint8
    (or [1, N, record]: a pool the batch shares), indices [B, S, K] (-1 = empty), sink [H]
    -> [B, S, H, D] in q's dtype.

    ``sparse_attention(q, kv_cache_unpack(records, D, rope_dim, tile), indices, sink, scale)``,
    decoding only the K records each query selects (D - rope_dim = q's last dim - rope_dim)."""
    idx = op.Cast(indices, to=TensorProto.INT64)
    picked = gather_rows(records, idx)  # [B, S, K, record]
    nope = op.Shape(q, start=-1) - op.Reshape(op.Constant(value_int=rope_dim), [1])
    values = op.CastLike(unpack_records(picked, nope, rope_dim=rope_dim, tile=tile), q)
    return attend(q, values, idx >= 0, sink, softmax_scale=softmax_scale)


@onnxscript.script(SEAHAL, default_opset=op)
def sparse_attention_fp8_rotated(
    q, records, indices, sink, positions, freqs, softmax_scale: float, rope_dim: int = 64, tile: int = 64,
):
    """sparse_attention_fp8 with the output's inverse RoPE, as :func:`sparse_attention_rotated`:
    ``rope(sparse_attention_fp8(q, records, indices, sink, scale, rope_dim, tile), positions, freqs,
    inverse=1)``."""
    o = sparse_attention_fp8(q, records, indices, sink, softmax_scale=softmax_scale, rope_dim=rope_dim, tile=tile)
    return rope(o, positions, freqs, inverse=1)


@onnxscript.script(SEAHAL, default_opset=op)
def kv_cache_pack(kv, rope_dim: int = 64, tile: int = 64):
    """Pack KV vectors into FP8 cache records: kv [..., dim] -> [..., record] uint8, each
    ``[e4m3 bytes of the nope part / s_t | rope as bf16 bytes | e8m0 byte of each s_t | zero pad to 8]``
    with the nope part quantised in 1 x tile ue8m0 tiles as fp8_act_quant does."""
    width = op.Shape(kv, start=-1)
    nope = width - op.Reshape(op.Constant(value_int=rope_dim), [1])
    q, s = fp8_quantize(op.Slice(kv, [0], nope, [-1]), tile=tile, scale_fmt="ue8m0")
    codes = op.Cast(e4m3_bits(q), to=TensorProto.UINT8)
    exponents = e8m0_bytes(s)
    n_tiles = op.Shape(s, start=-1)
    padding = op.Expand(op.Cast(0, to=TensorProto.UINT8), op.Concat(op.Shape(kv, end=-1), (n_tiles + 7) / 8 * 8 - n_tiles, axis=0))
    return op.Concat(codes, bf16_bytes(op.Slice(kv, nope, width, [-1])), exponents, padding, axis=-1)


@onnxscript.script(SEAHAL, default_opset=op)
def kv_cache_store(kv, cache, slots, rope_dim: int = 64, tile: int = 64):
    """kv_cache_pack's records stored in their cache rows: kv [B, n, dim], cache [B, R, record]
    uint8, slots [B, n] int (or [1, n]: one row of slots the batch shares) -> the new cache
    [B, R, record] uint8: ``cache[b, slots[b, i]] = kv_cache_pack(kv[b, i], rope_dim, tile)``, the
    other rows unchanged (:func:`store_rows`)."""
    return store_rows(cache, slots, kv_cache_pack(kv, rope_dim=rope_dim, tile=tile))


@onnxscript.script(SEAHAL, default_opset=op)
def kv_cache_store_normed(
    kv, cache, slots, positions, freqs, norm_weight, rope_dim: int = 64, tile: int = 64, norm_eps: float = 1e-6,
):
    """kv_cache_store of the attention's KV as V4 computes it: positions [B, n] int, freqs [R],
    norm_weight [D] -> the new cache, ``kv_cache_store(rms_norm_rope(kv, norm_weight, positions,
    freqs, norm_eps), cache, slots, rope_dim, tile)`` with kv [B, n, D] as [B, n, 1, D] (one head):
    the vectors normalised in fp32 and rounded to kv's dtype, rotated and rounded again, then packed
    and stored as :func:`kv_cache_store` does."""
    normed = rms_norm_rope(op.Unsqueeze(kv, [2]), norm_weight, positions, freqs, eps=norm_eps)
    return kv_cache_store(op.Squeeze(normed, [2]), cache, slots, rope_dim=rope_dim, tile=tile)


@onnxscript.script(SEAHAL, default_opset=op)
def kv_cache_store_normed_unweighted(
    kv, cache, slots, positions, freqs, rope_dim: int = 64, tile: int = 64, norm_eps: float = 1e-6,
):
    """:func:`kv_cache_store_normed` without a norm weight: the vectors go through
    :func:`rms_norm_rope_unweighted`."""
    normed = rms_norm_rope_unweighted(op.Unsqueeze(kv, [2]), positions, freqs, eps=norm_eps)
    return kv_cache_store(op.Squeeze(normed, [2]), cache, slots, rope_dim=rope_dim, tile=tile)


@onnxscript.script(SEAHAL, default_opset=op)
def kv_compress_fp8(
    kv, score, ape, norm_weight, rope_freqs, kv_state, score_state, start_pos: INT64,
    ratio: int, overlap: int, norm_eps: float = 1e-6, rope_dim: int = 64, tile: int = 64,
):
    """kv_compress with the new entries as packed FP8 records -> (records [B, ceil(S/m), record]
    uint8, kv_state', score_state'): ``kv_cache_pack(kv_compress(..., out_dtype=bf16), rope_dim,
    tile)``, zero bytes in the rows past each sequence's new entries."""
    entries, new_kv_state, new_score_state = kv_compress(
        kv, score, ape, norm_weight, rope_freqs, kv_state, score_state, start_pos,
        ratio=ratio, overlap=overlap, norm_eps=norm_eps, out_dtype=BFLOAT16,
    )
    completed = completed_rows(sequence_positions(start_pos, kv), kv, ratio=ratio)
    records = op.Where(completed, kv_cache_pack(entries, rope_dim=rope_dim, tile=tile), op.Cast(0, to=TensorProto.UINT8))
    return records, new_kv_state, new_score_state


@onnxscript.script(SEAHAL, default_opset=op)
def kv_compress_store(
    kv, score, ape, norm_weight, rope_freqs, kv_state, score_state, start_pos: INT64, store, slots,
    ratio: int, overlap: int, norm_eps: float = 1e-6, rope_dim: int = 64, tile: int = 64,
):
    """kv_compress_fp8's records stored in their cache rows -> (kv_state', score_state', the new
    store): store [B, N, record] uint8, slots [B, n] int (or [1, n]: one row of slots the batch
    shares) with n <= ceil(S/m) the rows the HAL contract gives (new_entries(start_pos, S, m) at an
    int position, ceil(S/m) at a tensor one) -> ``store[b, slots[b, i]] = kv_compress_fp8(...)[b, i]``
    for i < n (:func:`store_rows`; rows past a sequence's new entries are zero bytes, stored too),
    the other rows unchanged."""
    records, new_kv_state, new_score_state = kv_compress_fp8(
        kv, score, ape, norm_weight, rope_freqs, kv_state, score_state, start_pos,
        ratio=ratio, overlap=overlap, norm_eps=norm_eps, rope_dim=rope_dim, tile=tile,
    )
    rows = op.Slice(records, [0], op.Shape(slots, start=1, end=2), [1])  # at an int position: its new entries
    return new_kv_state, new_score_state, store_rows(store, slots, rows)


@onnxscript.script(SEAHAL, default_opset=op)
def kv_cache_unpack(packed, dim: int, rope_dim: int = 64, tile: int = 64):
    """Decode kv_cache_pack records: packed [..., record] uint8 -> [..., dim] bf16;
    nope = e4m3 * 2^(e-127) (e = 255: NaN), rope = the stored bf16."""
    nope = op.Reshape(op.Constant(value_int=dim), [1]) - op.Reshape(op.Constant(value_int=rope_dim), [1])
    return unpack_records(packed, nope, rope_dim=rope_dim, tile=tile)


@onnxscript.script(SEAHAL, default_opset=op)
def grouped_linear(x, weight):
    """Block-diagonal linear layer, dense weight: x [..., G, I], weight [G*R, I] -> [..., G, R]
    in x's dtype. ``W' = x.dtype(W)``; ``out[..., g, r] = sum_i x[..., g, i] W'[g*R + r, i]`` in fp32."""
    return grouped_matmul(x, op.CastLike(weight, x))


@onnxscript.script(SEAHAL, default_opset=op)
def grouped_linear_fp8(x, weight, scale):
    """grouped_linear with an FP8 e4m3 weight [G*R, I] and 128x128 block scales
    [ceil(G*R/128), I/128] fp32: ``W' = x.dtype(e4m3(W) s)``, the product in fp32, then
    :func:`grouped_linear`'s sums."""
    codes = op.Cast(weight, to=FLOAT)
    dequantised = scale_tiles(codes, block_row_scales(scale, codes), tile=128)
    return grouped_matmul(x, op.CastLike(dequantised, x))


# --------------------------------------------------------------------------------------------
# Registry: the functions of each HAL op, and how a call's arguments become a node
# --------------------------------------------------------------------------------------------

OPS: dict[str, tuple[str, ...]] = {
    "fp8_act_quant": ("fp8_act_quant",),
    "fp4_quant": ("fp4_quant",),
    "hadamard_rotate": (
        "hadamard_rotate", "hadamard_rotate_fp4", "hadamard_rotate_roped", "hadamard_rotate_fp4_roped",
    ),
    "index_key_pack": ("index_key_pack_fp4", "index_key_pack_fp8"),
    "index_key_store": ("index_key_store_fp4", "index_key_store_fp8"),
    "kv_cache_pack": ("kv_cache_pack",),
    "kv_cache_store": ("kv_cache_store", "kv_cache_store_normed", "kv_cache_store_normed_unweighted"),
    "kv_cache_unpack": ("kv_cache_unpack",),
    "fp8_gemm": ("fp8_gemm",),
    "fp4_gemm": ("fp4_gemm",),
    "act_quant_gemm": ("act_quant_gemm_fp8", "act_quant_gemm_fp4"),
    "moe_gate": ("moe_gate", "moe_gate_unbiased", "moe_gate_hash"),
    "moe_experts": ("moe_experts", "moe_experts_fp8", "moe_experts_fp4"),
    "kv_compress": ("kv_compress",),
    "kv_compress_fp8": ("kv_compress_fp8",),
    "kv_compress_store": ("kv_compress_store",),
    "indexer_topk": ("indexer_topk",),
    "indexer_topk_packed": ("indexer_topk_packed_fp4", "indexer_topk_packed_fp8"),
    "sparse_attention": ("sparse_attention", "sparse_attention_rotated"),
    "sparse_attention_fp8": ("sparse_attention_fp8", "sparse_attention_fp8_rotated"),
    "hc_pre": ("hc_pre", "hc_pre_normed"),
    "hc_post": ("hc_post", "hc_post_summed"),
    "hc_post_pre": ("hc_post_pre", "hc_post_pre_normed", "hc_post_summed_pre", "hc_post_summed_pre_normed"),
    "hc_head": ("hc_head", "hc_head_normed"),
    "rope": ("rope",),
    "rms_norm_rope": ("rms_norm_rope", "rms_norm_rope_unweighted"),
    "rms_norm": ("rms_norm", "rms_norm_unweighted"),
    "fp32_linear": ("fp32_linear",),
    "grouped_linear": ("grouped_linear", "grouped_linear_fp8"),
}
"""HAL op -> the names of the functions that compute it (the first is the common case)."""

SHARED_BATCH: dict[str, tuple[str, ...]] = {
    "sparse_attention": ("kv",), "sparse_attention_fp8": ("records",), "kv_cache_store": ("slots",),
    "index_key_store": ("slots",), "kv_compress_store": ("slots",),
}
"""HAL op -> its inputs whose functions also take batch 1 for a tensor the whole batch shares (a
pool of cache rows, expanded over the batch by the caller: a paged cache; the slots every
sequence writes)."""

_ONNX_DTYPES = {
    torch.bfloat16: TensorProto.BFLOAT16,
    torch.float16: TensorProto.FLOAT16,
    torch.float32: TensorProto.FLOAT,
    torch.float64: TensorProto.DOUBLE,
}
_ATTRIBUTE_TYPES = ("int", "float", "str")


def onnx_dtype(dtype: torch.dtype | None) -> int:
    """The ONNX ``TensorProto`` code of a ``ScalarType`` argument (None: the contracts' bf16)."""
    if dtype is None:
        return BFLOAT16
    if dtype not in _ONNX_DTYPES:
        raise ValueError(f"out_dtype must be one of {[str(d) for d in _ONNX_DTYPES]}, got {dtype}")
    return _ONNX_DTYPES[dtype]


def _attribute_value(value: Any) -> Any:
    if isinstance(value, bool):
        return int(value)
    if value is None or isinstance(value, torch.dtype):
        return onnx_dtype(value)
    return value


@dataclass(frozen=True)
class OpFunction:
    """One ONNX function of a HAL op and its calling convention (see the module docstring).

    ``inputs`` / ``attributes``: the HAL argument names the node takes as inputs / attributes, in
    order; ``n_outputs``: node outputs, the op's outputs then the new values of ``mutates``;
    ``shared_batch``: inputs that may be given with batch 1 when the batch shares them;
    ``float_attributes``: the attributes the function types float.
    """

    op: str
    function: onnxscript.OnnxFunction
    inputs: tuple[str, ...]
    attributes: tuple[str, ...]
    n_outputs: int
    mutates: tuple[str, ...]
    shared_batch: tuple[str, ...] = ()
    float_attributes: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.function.name

    def attribute_values(self, args: Mapping[str, Any]) -> dict[str, Any]:
        """The node attributes of a call whose arguments are ``args`` (by HAL name; arguments left
        out take the function's defaults): bool -> int, ScalarType / None -> ONNX dtype code, an int
        for a float attribute -> float (the contracts take ``1`` for ``1.0``; ONNX does not)."""
        return {
            name: float(args[name]) if name in self.float_attributes else _attribute_value(args[name])
            for name in self.attributes if name in args
        }


def _op_function(op: str, function: onnxscript.OnnxFunction) -> OpFunction:
    from seahal.hal.spec import get_spec

    spec = get_spec(op)
    hal_names = list(inspect.signature(spec.contract).parameters)
    params = inspect.signature(function.function).parameters
    unknown = [name for name in params if name not in hal_names]
    if unknown:
        raise TypeError(f"ONNX function {function.name} takes {unknown}, not arguments of the HAL op {op}: {hal_names}")
    attributes = tuple(name for name, p in params.items() if p.annotation in _ATTRIBUTE_TYPES)
    inputs = tuple(name for name in params if name not in attributes)
    n_outputs = len(function.to_function_proto().output)
    floats = tuple(name for name in attributes if params[name].annotation == "float")
    return OpFunction(op, function, inputs, attributes, n_outputs, spec.mutates, SHARED_BATCH.get(op, ()), floats)


def _functions() -> dict[str, OpFunction]:
    table = {}
    for op_name, names in OPS.items():
        for name in names:
            table[name] = _op_function(op_name, globals()[name])
    return table


FUNCTIONS: dict[str, OpFunction] = _functions()
"""Function name -> :class:`OpFunction`, for every function of every HAL op."""


def weight_format(weight: Any) -> str:
    """``"fp8"``, ``"fp4"`` (packed uint8) or ``"dense"`` from a weight's element type; ``weight``
    may be a torch tensor or any value with a ``dtype`` (onnx_ir values, numpy arrays)."""
    dtype = weight.dtype if isinstance(weight, torch.Tensor) else getattr(weight, "dtype", None)
    name = str(getattr(dtype, "name", dtype)).lower().removeprefix("torch.").replace("_", "")
    if name == "uint8":
        return "fp4"
    return "fp8" if name.startswith("float8") else "dense"


def select(op: str, args: Mapping[str, Any]) -> OpFunction:
    """The function that computes ``op`` for a call with these arguments (by HAL name): which
    optional tensors are given (moe_gate, rms_norm, rms_norm_rope, hc_pre, hc_post, hc_post_pre, hc_head,
    sparse_attention, sparse_attention_fp8, kv_cache_store), the weights' format (moe_experts, grouped_linear,
    act_quant_gemm), the key format (indexer_topk_packed, index_key_pack, index_key_store) or whether an FP4
    rounding follows and whether positions are given (hadamard_rotate) pick it."""
    if op == "moe_gate":
        name = "moe_gate_hash" if args.get("tid2eid") is not None else (
            "moe_gate" if args.get("bias") is not None else "moe_gate_unbiased"
        )
    elif op in ("moe_experts", "grouped_linear"):
        fmt = weight_format(args["w1" if op == "moe_experts" else "weight"])
        name = op if fmt == "dense" else f"{op}_{fmt}"
    elif op == "act_quant_gemm":
        fmt = weight_format(args["b"])
        if fmt == "dense":
            raise KeyError("no ONNX function for 'act_quant_gemm' with a dense b: b is e4m3 or packed e2m1 (uint8)")
        name = f"{op}_{fmt}"
    elif op in ("indexer_topk_packed", "index_key_pack", "index_key_store"):
        name = f"{op}_{args['key_format']}"
    elif op in ("rms_norm", "rms_norm_rope"):
        name = op if args.get("weight") is not None else f"{op}_unweighted"
    elif op in ("hc_pre", "hc_head"):
        name = op if args.get("norm_weight") is None else f"{op}_normed"
    elif op in ("sparse_attention", "sparse_attention_fp8"):
        name = op if args.get("positions") is None else f"{op}_rotated"
    elif op == "kv_cache_store":
        name = op if args.get("positions") is None else (
            f"{op}_normed" if args.get("norm_weight") is not None else f"{op}_normed_unweighted"
        )
    elif op == "hc_post":
        name = op if args.get("addend") is None else f"{op}_summed"
    elif op == "hc_post_pre":  # each optional tensor picks its part's variant
        post_part = "hc_post" if args.get("addend") is None else "hc_post_summed"
        name = f"{post_part}_pre" if args.get("norm_weight") is None else f"{post_part}_pre_normed"
    elif op == "hadamard_rotate":
        name = "hadamard_rotate_fp4" if args.get("fp4_block") else "hadamard_rotate"
        name += "" if args.get("positions") is None else "_roped"
    elif op in OPS:
        name = op
    else:
        raise KeyError(f"no ONNX function for {op!r}; functions exist for {', '.join(OPS)}")
    return FUNCTIONS[name]


@functools.cache
def function_protos() -> tuple[onnx.FunctionProto, ...]:
    """Every function of domains ``seahal`` and ``seahal.lib``: what a model calling any of them must carry."""
    found = [
        value for value in globals().values()
        if isinstance(value, onnxscript.OnnxFunction) and value.opset.domain in (DOMAIN, LIB_DOMAIN)
    ]
    return tuple(f.to_function_proto() for f in found)


def complete_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """Add to ``model`` (in place) the seahal functions and opset imports it lacks; returns it.

    Raises ValueError when the model imports the default domain at another version than
    :data:`OPSET` (ONNX requires functions and model to agree).
    """
    imports = {o.domain: o.version for o in model.opset_import}
    if imports.get("", OPSET) != OPSET:
        raise ValueError(f"the model imports the default ONNX domain at {imports['']}; seahal functions need {OPSET}")
    for domain, version in (("", OPSET), (DOMAIN, 1), (LIB_DOMAIN, 1)):
        if domain not in imports:
            model.opset_import.append(onnx.helper.make_opsetid(domain, version))
    present = {(f.domain, f.name) for f in model.functions}
    model.functions.extend(f for f in function_protos() if (f.domain, f.name) not in present)
    return model


def node_model(
    function: OpFunction,
    input_types: Sequence[tuple[int, int]],
    output_types: Sequence[tuple[int, int]],
    attributes: Mapping[str, Any],
) -> onnx.ModelProto:
    """A model of one node calling ``function``: graph inputs ``function.inputs`` and outputs
    ``out0, out1, ...`` of the given (ONNX element type, rank), dims symbolic; checked by
    ``onnx.checker``."""
    helper = onnx.helper

    def values(names: Sequence[str], types: Sequence[tuple[int, int]]) -> list[onnx.ValueInfoProto]:
        return [
            helper.make_tensor_value_info(name, elem_type, [f"{name}_{i}" for i in range(rank)])
            for name, (elem_type, rank) in zip(names, types, strict=True)
        ]

    inputs = values(function.inputs, input_types)
    outputs = values([f"out{i}" for i in range(function.n_outputs)], output_types)
    node = helper.make_node(function.name, list(function.inputs), [v.name for v in outputs], domain=DOMAIN, **attributes)
    graph = helper.make_graph([node], function.name, inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=10)
    complete_model(model)
    onnx.checker.check_model(model)
    return model
