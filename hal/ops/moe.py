"""MoE routing (score-routed and hash-routed gate) and grouped experts with clamped SwiGLU."""

from __future__ import annotations

import torch

from ..checks import FLOAT_HIGH, FP8, INDEX, SCALES, Contract
from ..spec import Out, define_op

SCORE_FUNCS = ("sqrtsoftplus", "sigmoid", "softmax")


@define_op(
    "moe_gate",
    family="moe",
    schema=(
        "(Tensor x, Tensor weight, Tensor? bias, int top_k, str score_func='sqrtsoftplus', "
        "float route_scale=1.0, int n_groups=1, int topk_groups=1, Tensor? input_ids=None, "
        "Tensor? tid2eid=None) -> (Tensor, Tensor)"
    ),
)
def moe_gate(
    x, weight, bias, top_k, score_func="sqrtsoftplus", route_scale=1.0, n_groups=1, topk_groups=1,
    input_ids=None, tid2eid=None,
):
    """Route tokens to experts: scores, biased top-k selection, renormalised weights.

    x: [T, D] float, weight: [E, D] float, bias: [E] fp32 or None,
    hash routing: input_ids: [T] int, tid2eid: [vocab, top_k] int (then bias is ignored)
    -> weights: [T, top_k] fp32, indices: [T, top_k] int32

    ``logits = x W^T`` (fp32); ``s = sqrt(softplus(logits))`` | ``sigmoid`` | ``softmax``;
    selection ``idx = topk(s + bias)`` (ties to the smaller expert index), optionally limited to the
    ``topk_groups`` best of ``n_groups`` groups (group score = sum of its top-2 biased scores);
    hash layers take ``idx = tid2eid[input_ids]``. Weights ``w = s[idx]``, divided by their sum
    (+1e-20) unless score_func is softmax, then times ``route_scale``.
    """
    c = Contract("moe_gate")
    c.tensor("x", x, ["T", "D"], FLOAT_HIGH)
    c.tensor("weight", weight, ["E", "D"], FLOAT_HIGH)
    c.optional("bias", bias, ["E"], (torch.float32, torch.float64))
    c.choice("score_func", score_func, SCORE_FUNCS)
    c.positive("top_k", top_k)
    c.require(top_k <= c.dims["E"], f"top_k must be <= E={c.dims['E']}, got {top_k}")
    c.positive("n_groups", n_groups)
    c.require(c.dims["E"] % n_groups == 0, f"E={c.dims['E']} must be a multiple of n_groups={n_groups}")
    c.require(1 <= topk_groups <= n_groups, f"topk_groups must be in [1, n_groups={n_groups}], got {topk_groups}")
    kept = topk_groups * (c.dims["E"] // n_groups)
    c.require(top_k <= kept, f"top_k={top_k} must be <= the {kept} experts of the topk_groups={topk_groups} kept groups")
    c.require((input_ids is None) == (tid2eid is None), "input_ids and tid2eid must be given together (hash routing)")
    if tid2eid is not None:
        c.tensor("input_ids", input_ids, ["T"], INDEX)
        c.tensor("tid2eid", tid2eid, [None, top_k], INDEX)
    return Out((c.dims["T"], top_k), torch.float32), Out((c.dims["T"], top_k), torch.int32)


def expert_weight_format(w: torch.Tensor) -> str:
    """``"fp8"``, ``"fp4"`` or ``"dense"``, from the weight's dtype."""
    if w.dtype in FP8:
        return "fp8"
    if w.dtype == torch.uint8:
        return "fp4"
    return "dense"


def _expert_weight(c: Contract, name: str, w, scale, rows: str, cols: str) -> str:
    """Check one stacked expert weight [E, rows, cols] in its format; returns the format."""
    fmt = expert_weight_format(w) if isinstance(w, torch.Tensor) else "dense"
    if fmt == "fp8":
        c.tensor(name, w, ["E", rows, cols], FP8)
        c.divisible(cols, 128, f"{name} uses 128x128 blocks")
        c.tensor(f"{name}_scale", scale, ["E", -(-c.dims[rows] // 128), c.dims[cols] // 128], SCALES)
    elif fmt == "fp4":
        c.tensor(name, w, ["E", rows, None], (torch.uint8,))
        c.require(
            w.shape[2] * 2 == c.dims[cols],
            f"{name} must be [E, {rows}={c.dims[rows]}, {cols}/2={c.dims[cols] // 2}] uint8 (packed e2m1), "
            f"got {list(w.shape)}",
        )
        c.divisible(cols, 128, f"{name}'s activations use 1x128 FP8 tiles")
        c.tensor(f"{name}_scale", scale, ["E", c.dims[rows], c.dims[cols] // 32], SCALES)
    else:
        c.tensor(name, w, ["E", rows, cols], FLOAT_HIGH)
        c.require(scale is None, f"{name}_scale must be None for {str(w.dtype).removeprefix('torch.')} weights")
    return fmt


@define_op(
    "moe_experts",
    family="moe",
    schema=(
        "(Tensor x, Tensor topk_weights, Tensor topk_ids, Tensor w1, Tensor? w1_scale, Tensor w3, "
        "Tensor? w3_scale, Tensor w2, Tensor? w2_scale, float swiglu_limit=10.0) -> Tensor"
    ),
)
def moe_experts(x, topk_weights, topk_ids, w1, w1_scale, w3, w3_scale, w2, w2_scale, swiglu_limit=10.0):
    """Weighted sum of clamped-SwiGLU experts over each token's routed experts.

    x: [T, D] bf16/fp32, topk_weights: [T, k] fp32, topk_ids: [T, k] int (-1 = no expert),
    w1, w3: [E, I, D], w2: [E, D, I] in one of three formats, picked by dtype:
      dense: bf16/fp32, scales None;
      fp8:   e4m3, scales [E, ceil(rows/128), cols/128] (128x128 blocks);
      fp4:   uint8 [E, rows, cols/2] packed e2m1, scales [E, rows, cols/32] (1x32, powers of two)
    -> [T, D] in x's dtype.

    ``y_t = sum_k E_{id_k}(x_t; w_k)`` accumulated in fp32, with
    ``E(x; w) = x.dtype(W2 x.dtype(w * h))`` and ``h = silu(min(x W1^T, L)) * clamp(x W3^T, -L, L)``
    in fp32: the routing weight multiplies *before* the down projection (official inference
    code), and each expert's output is rounded to x's dtype (bf16 in the model) before the sum;
    for quantised weights each GEMM input is first FP8-quantised in 1x128 ue8m0 tiles.
    L = swiglu_limit (<= 0 disables the clamp).
    """
    c = Contract("moe_experts")
    c.tensor("x", x, ["T", "D"], (torch.bfloat16, torch.float32, torch.float64))
    c.tensor("topk_weights", topk_weights, ["T", "k"], (torch.float32, torch.float64))
    c.tensor("topk_ids", topk_ids, ["T", "k"], INDEX)
    fmt1 = _expert_weight(c, "w1", w1, w1_scale, "I", "D")
    fmt3 = _expert_weight(c, "w3", w3, w3_scale, "I", "D")
    fmt2 = _expert_weight(c, "w2", w2, w2_scale, "D", "I")
    c.require(fmt1 == fmt3, f"w1 and w3 must share a format, got {fmt1} and {fmt3}")
    if fmt2 != "dense":
        c.divisible("I", 128, "the down projection's activations use 1x128 FP8 tiles")
    return Out((c.dims["T"], c.dims["D"]), x.dtype)
