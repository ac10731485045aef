"""Conformance tolerances: for every op and output, how a kernel is compared with the reference.

This is the one place tolerances are defined; ``docs/conformance.md`` carries the table that
:func:`markdown_table` generates from it (a test keeps the two in sync).

The reference is the CPU reference kernel evaluated in float64 where the op's contract accepts
float64 inputs (so its result is the exact math up to ~2^-50); elsewhere (quantised inputs, fp32
states) it runs on the same inputs as the kernel, so only the kernel's accumulation order can
differ. Where a fused op's second part reads its first part's rounded output (``hc_post_pre``'s
hc_pre reads the streams), that part's reference runs on the output the kernel returned
(:class:`OnOwnStreams`). Every tolerance is derived from a number format with p significant bits:

* unit roundoff ``u = 2^-p``: one rounding to nearest moves a value by at most ``u`` relative
  (bf16: p = 8, u = 2^-8; fp16: p = 11; fp32: p = 24, u = 2^-24; e4m3: p = 4);
* one ulp ``= 2u``: two roundings of nearly equal values to the same format (the kernel's and the
  reference's) may land on neighbours, so an output in format X is allowed one ulp of X;
* a sum of n terms in fp32 is off by at most ``gamma_n = n u`` relative to the sum of the terms'
  magnitudes (Higham, first order). Rules use that bound against magnitudes measured on the inputs
  where it is cheap, else against max|reference| — random-order rounding errors grow like sqrt(n),
  which leaves the same factor of room as the ratio sum|terms| / |sum| of zero-mean data.

Index outputs of the selection ops (router, indexer) are compared by the scores they select (see
:class:`seahal.testing.compare.Selection`), with the score rounding bound as tolerance.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from seahal.hal.formats import dequantize_weight, fp8_dequantize, hadamard, index_key_unpack
from seahal.hal.spec import get_spec

from seahal.backends.cpu.reference.mhc import hc_head as reference_hc_head
from seahal.backends.cpu.reference.mhc import hc_pre as reference_hc_pre
from seahal.backends.cpu.reference.quant import fp8_act_quant, kv_cache_unpack
from seahal.backends.cpu.reference.rope import rope as reference_rope

from .cases import named_args
from .compare import (
    Close,
    Decoded,
    Exact,
    FP4Rounded,
    RoundedCodes,
    RoutedWeights,
    Selection,
    Verdict,
    gate_ranking,
    gate_scores,
    indexer_scores,
)

SIGNIFICANT_BITS = {
    torch.bfloat16: 8,
    torch.float16: 11,
    torch.float32: 24,
    torch.float64: 53,
    torch.float8_e4m3fn: 4,
}


def unit_roundoff(dtype: torch.dtype) -> float:
    """``u = 2^-p``: the relative error of one rounding to nearest in a format of p significant bits."""
    return 2.0 ** -SIGNIFICANT_BITS[dtype]


def ulp(dtype: torch.dtype) -> float:
    """``2^(1-p)``: the relative spacing of neighbours, the most two correct roundings can differ."""
    return 2 * unit_roundoff(dtype)


def gamma(n: int) -> float:
    """``n * 2^-24``: worst-case relative error of an fp32 sum of n terms (vs the sum of |terms|)."""
    return n * unit_roundoff(torch.float32)


U32 = unit_roundoff(torch.float32)


@dataclass(frozen=True)
class Compared:
    """One comparison of a call: a label, which outputs it reads, and the check."""

    label: str
    outputs: int | tuple[int, ...]
    check: Any


@dataclass(frozen=True)
class Rule:
    """How one op is compared: the docs table rows and the function building the checks.

    ``rows``: (output, tolerance, derivation) for the docs; ``build(args)`` gets the call's
    arguments by name (defaults filled in) and returns one :class:`Compared` per output, then one
    per mutated state (compared after the last call).
    """

    rows: tuple[tuple[str, str, str], ...]
    build: Callable[[Mapping[str, Any]], tuple[Compared, ...]]


def _max_abs(t: torch.Tensor) -> float:
    return float(t.to(torch.float64).abs().max()) if t.numel() else 0.0


def _out_dtype(a: Mapping[str, Any]) -> torch.dtype:
    return torch.bfloat16 if a["out_dtype"] is None else a["out_dtype"]


def _low_precision(t: torch.Tensor) -> bool:
    return t.dtype in (torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------------------------
# Per-op rules
# --------------------------------------------------------------------------------------------

_EXACT_CODEC = (
    "the spec fixes every rounding (fp32 scale arithmetic, power-of-two ue8m0 scales, RNE with "
    "saturation), so the codec is a deterministic function of its input"
)


def _fp8_act_quant(a: Mapping[str, Any]) -> tuple[Compared, ...]:
    if a["scale_fmt"] == "ue8m0":  # power-of-two scales: x / s is exact in any arithmetic
        return _exact("q", "scale")(a)
    return (Compared("q, scale", (0, 1), RoundedCodes(a["x"], a["block_size"])),)


def _exact(*labels: str) -> Callable[[Mapping[str, Any]], tuple[Compared, ...]]:
    return lambda a: tuple(Compared(label, i, Exact()) for i, label in enumerate(labels))


def _hadamard_rotate(a: Mapping[str, Any]) -> tuple[Compared, ...]:
    # H_n / sqrt(n) has entries +-n^-0.5, so an error e_j of the kernel's input v' moves output i by
    # at most n^-0.5 sum_j |e_j|: v' is x itself, or with positions its rope r', within rope's rule
    # of the reference's r (:func:`_roped_input`: E = sum_j |r'_j - r_j| per row). Then n exact
    # products (v' times +-1) summed in fp32 and the multiply by fp32(n^-0.5): gamma(n + 2) relative
    # to sum|v'| / sqrt(n) <= (sum|v| + E) / sqrt(n); then one rounding to x's dtype (u relative).
    # With fp4_block the FP4 rounding of that value follows, judged as a rounding of some value
    # within the bound.
    x = a["x"]
    u = unit_roundoff(x.dtype)
    v, input_err = x.to(torch.float64), 0.0
    if a["positions"] is not None:
        v, input_err = _roped_input(x, a["positions"], a["freqs"])
    n = v.shape[-1]
    sum_err = (gamma(n + 2) * (v.abs().sum(-1, keepdim=True) + input_err) * (1 + u) + input_err) * n**-0.5
    if not a["fp4_block"]:
        return (Compared("out", 0, Close(rtol=u, atol=_max_abs(sum_err))),)
    exact = hadamard(v)
    return (Compared("out", 0, FP4Rounded(exact, sum_err + u * exact.abs(), a["fp4_block"])),)


def _roped_input(
    x: torch.Tensor, positions: torch.Tensor, freqs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """hadamard_rotate's rotated input with positions: the reference's ``r = rope(x)`` in float64,
    and per row (one head's n values) a bound ``E >= sum_j |r'_j - r_j|`` for a kernel's r' (rounded
    to x's dtype) within rope's rule (:func:`_rope_close`).

    The first n - 2R dims pass x through exactly (0 error); each of the 2R rotated ones is within
    ``rtol |r_j| + atol``, rope's rule for the row's own max|x| (the angle error moves a pair by
    ``|dtheta| (|a| + |b|)``, its own magnitude), so ``E = rtol sum_rot |r_j| + 2R atol``.
    """
    xf = x.to(torch.float64)
    r = reference_rope(xf, positions, freqs.to(torch.float64))
    rotated = r[..., r.shape[-1] - 2 * freqs.shape[-1]:]
    rule = _rope_close(x.dtype, 1.0, positions, freqs)  # |x| <= 1: atol scales with the row's max|x|
    row_max = xf.abs().amax(-1, keepdim=True)
    return r, rule.rtol * rotated.abs().sum(-1, keepdim=True) + rotated.shape[-1] * rule.atol * row_max


def _gemm(k_step: int) -> Callable[[Mapping[str, Any]], tuple[Compared, ...]]:
    """C over K: K exact products of codes (e4m3 x e4m3 and e4m3 x e2m1 fit fp32), summed in fp32,
    plus per K step one multiply by each scale and one add into the accumulator: gamma(n) relative
    to the sum of the scaled products' magnitudes ``|A| @ |B|^T`` (not to |C|, which cancellation
    may make far smaller), then one rounding to the output dtype."""

    def build(a: Mapping[str, Any]) -> tuple[Compared, ...]:
        k = a["a"].shape[1]
        n = k + 3 * (k // k_step)
        a_values = fp8_dequantize(a["a"], a["a_scale"], 128, torch.float64).abs()
        magnitude = _max_abs(a_values @ dequantize_weight(a["b"], a["b_scale"], torch.float64).abs().T)
        return (Compared("out", 0, Close(rtol=ulp(_out_dtype(a)), atol=gamma(n) * magnitude)),)

    return build


def _act_quant_gemm(a: Mapping[str, Any]) -> tuple[Compared, ...]:
    # The spec fixes the activations' codes and scales: fp8_act_quant(x)'s exactly, a deterministic
    # function of x (ue8m0 scales, so x / s is exact; see its rule). Kernel and reference therefore
    # multiply identical codes, and the output is judged by the rule of b's GEMM on those codes:
    # fp8_gemm's for e4m3 b (128-wide K steps), fp4_gemm's for packed e2m1 b (32-wide steps).
    a_codes, a_scale = fp8_act_quant(a["x"])
    gemm = "fp4_gemm" if a["b"].dtype == torch.uint8 else "fp8_gemm"
    args = {"a": a_codes, "a_scale": a_scale, "b": a["b"], "b_scale": a["b_scale"], "out_dtype": a["out_dtype"]}
    return RULES[gemm].build(args)


def _moe_gate(a: Mapping[str, Any]) -> tuple[Compared, ...]:
    scores, magnitude = gate_scores(a["x"], a["weight"], a["score_func"])
    # logits carry gamma_3D * sum|x w| (D exact products summed in fp32, 3D where a kernel
    # splits an fp32 W into three exact bf16 parts for the tensor cores); every score function
    # moves by at most 2x its logit's error (sqrt(softplus)' <= 1/2, sigmoid' <= 1/4, softmax <=
    # 2 max|dlogit|); both sides of a comparison err, hence 4x, plus a few fp32 roundings of the
    # score itself.
    score_err = gamma(3 * a["x"].shape[1] + 8) * magnitude
    top_k = a["top_k"]
    weights = Close(rtol=4 * float(score_err.max()) + gamma(2 * top_k + 8))
    renormalise = a["score_func"] != "softmax"
    routed = RoutedWeights(weights, scores, a["route_scale"], renormalise)
    if a["tid2eid"] is not None:
        return Compared("weights", (0, 1), routed), Compared("indices", 1, Exact())
    ranking = gate_ranking(scores, a["bias"], a["n_groups"], a["topk_groups"])
    tol = 4 * score_err + 8 * U32 * ranking.abs().masked_fill(ranking.isinf(), 0).amax(-1)
    return Compared("weights", (0, 1), routed), Compared("indices", 1, Selection(ranking, tol))


def _moe_experts(a: Mapping[str, Any]) -> tuple[Compared, ...]:
    x, w1 = a["x"], a["w1"]
    n = x.shape[1] + w1.shape[1] + a["topk_ids"].shape[1] + 8
    # the routed SwiGLU output and each expert's output are rounded to x's dtype before the down
    # projection and the k-expert sum (reference semantics), so one ulp of x's dtype may flip per
    # hidden value; through the down projection that is one ulp of the output's scale. Not a
    # worst-case bound, and deliberately so: the first GEMM's worst case, gamma_D sum|x W| (~2%
    # of |x W| at D = 4096, sum|x W| / |x W| ~ sqrt(D)), spans several ulps of h (an e4m3 step of
    # the FP8-quantised h for ~1 in 6 values), and carried through the down GEMM it allows more
    # than |y| itself, which no longer tells a correct kernel from a wrong one. Flips are rare
    # (the two sides' fp32 values straddle a rounding boundary only within a few fp32 ulps of it).
    tol = ulp(x.dtype) + gamma(n)
    return (Compared("out", 0, Close(rtol=tol, atol_ref=tol)),)


def _kv_compress(a: Mapping[str, Any]) -> tuple[Compared, ...]:
    out = a["out_dtype"] or torch.bfloat16
    ratio, d = a["ratio"], a["norm_weight"].shape[0]
    # entries: the pooled vector and the normed vector are rounded to the output format by
    # contract and the rotation mixes each rope pair, so an element may move by one output ulp of
    # its pair's scale; in fp32 add the softmax pooling over <= 2m slots, the RMS over d and the
    # rotation angle j*m*f rounded to fp32 (as in rope).
    theta = (int(torch.as_tensor(a["start_pos"]).max()) + a["kv"].shape[1]) * _max_abs(a["rope_freqs"])
    tol = ulp(out) + gamma(2 * ratio + d + 8) + 2 * (theta + 4) * U32
    entries = Close(rtol=tol, atol_ref=tol)
    # states hold copies of kv and one fp32 rounding of score + ape: one fp32 ulp.
    state = Close(rtol=ulp(torch.float32))
    return Compared("entries", 0, entries), Compared("kv_state", 1, state), Compared("score_state", 2, state)


def _fp8_records(values: Close, d: int, rope_dim: int, tile: int) -> Decoded:
    """Packed FP8 KV records (kv_cache_pack's) of vectors that ``values`` bounds, compared decoded.

    Where the kernel's vector element is off the reference's (by up to ``values``), its e4m3 code
    may be one e4m3 step off (2^-3 relative; a tile scale doubling or halving requantises the tile,
    each side still within half a step, 2^-4, of its own value); subnormal codes add at most half a
    subnormal step, s·2^-10 <= 2^-17·max|value|, on each side. The rope dims are the values rounded
    to bf16 (exactly the value for bf16 vectors): neighbours at most, 2^-7 relative, inside the step.
    """
    close = Close(rtol=values.rtol + ulp(torch.float8_e4m3fn), atol=values.atol, atol_ref=values.atol_ref + 2.0**-16)
    return Decoded(close, lambda r: kv_cache_unpack(r, d, rope_dim, tile))


def _kv_compress_fp8(a: Mapping[str, Any]) -> tuple[Compared, ...]:
    entries, *states = _kv_compress({**a, "out_dtype": torch.bfloat16})
    # records are kv_compress's bf16 entries packed: entries' rule plus one e4m3 step, decoded.
    records = _fp8_records(entries.check, a["norm_weight"].shape[0], a["rope_dim"], a["tile"])
    return (Compared("records", 0, records), *states)


@dataclass(frozen=True)
class StoredRows:
    """A cache [B, N, record] whose rows ``slots`` [B or 1, S] were stored into: those rows, gathered
    in slot order ([B, S, record], so index [b, i] is sequence b's vector i), judged by ``check``;
    every row no slot names exactly (bitwise: it must keep its bytes).

    ``before``: the cache as it was before a sequence of calls whose last stored into ``slots``
    (the case's own tensor: the runner calls kernels on copies; a caller that stores into its own
    tensor passes a copy taken before the first call). The rows the reference changed from it (the
    earlier calls' slots) count as stored too: every stored row, gathered in row order ([R,
    record]), is judged by ``check``, every other row exactly."""

    check: Any
    slots: torch.Tensor
    before: torch.Tensor | None = None

    def describe(self) -> str:
        stored = "stored rows" if self.before is None else "rows any call stored into"
        return f"{stored} {self.check.describe()}; every other row exact (bitwise)"

    def compare(self, got: torch.Tensor, want: torch.Tensor) -> Verdict:
        if got.dtype != want.dtype or got.shape != want.shape:
            return Verdict(False, detail=f"got {list(got.shape)} {got.dtype}, want {list(want.shape)} {want.dtype}")
        got, want = got.cpu(), want.cpu()
        batch, n_rows, width = want.shape
        slots = self.slots.cpu().long().expand(batch, -1)
        stored = torch.zeros(batch, n_rows, dtype=torch.bool).scatter_(1, slots, True)
        if self.before is not None:
            stored |= (want != self.before.cpu()).any(-1)
        kept = Exact().compare(got[~stored], want[~stored])
        if not kept.ok:
            rows = "rows no slot names" if self.before is None else "rows no call stored into"
            return Verdict(False, detail=f"{rows} must keep their bytes: {kept.detail}")
        if self.before is not None:
            return self.check.compare(got[stored], want[stored])
        rows = slots[..., None].expand(-1, -1, width)
        return self.check.compare(got.gather(1, rows), want.gather(1, rows))


def _kv_cache_store(a: Mapping[str, Any]) -> tuple[Compared, ...]:
    if a["positions"] is None:  # no outputs: the mutated cache is index 0
        return _exact("cache")(a)
    # the stored vectors are rms_norm_rope's of kv (one head), within its rule; packed, they are
    # compared decoded as FP8 records of such vectors (one e4m3 step more), the other rows exactly.
    kv = a["kv"]
    normed = {"x": kv.unsqueeze(2), "weight": a["norm_weight"], "eps": a["norm_eps"]}
    (vectors,) = _rms_norm_rope({**normed, "positions": a["positions"], "freqs": a["freqs"]})
    records = _fp8_records(vectors.check, kv.shape[-1], a["rope_dim"], a["tile"])
    return (Compared("cache", 0, StoredRows(records, a["slots"])),)


def _kv_compress_store(a: Mapping[str, Any]) -> tuple[Compared, ...]:
    # kv_compress_fp8's rule on the same arguments: its states as they are, its records' rule for
    # every row a call stored into (zero rows past the new entries included), read back from the
    # store after the last call; every other row exact. Built for the last call, whose start_pos + S
    # is the stream's furthest position, so its angle bound covers every earlier call's records.
    records, kv_state, score_state = _kv_compress_fp8(a)
    # no outputs: the mutated kv_state, score_state and store are indices 0, 1, 2 (schema order)
    return (
        Compared(kv_state.label, 0, kv_state.check),
        Compared(score_state.label, 1, score_state.check),
        Compared("store", 2, StoredRows(records.check, a["slots"], before=a["store"])),
    )


def _indexer_topk(a: Mapping[str, Any]) -> tuple[Compared, ...]:
    q = a["q"]
    scores, magnitude = indexer_scores(q, a["weights"], a["keys"], a["ratio"], a["start_pos"], a["weights_scale"])
    # fp32 scores: d products per head and H weighted heads, each side within gamma * magnitude; the
    # head weights fp32(weights) * fp32(weights_scale) add two roundings, within the 8 spare.
    tol = 2 * gamma(q.shape[-1] + q.shape[-2] + 8) * magnitude
    return (Compared("indices", 0, Selection(scores, tol, a["offset"])),)


def _indexer_topk_packed(a: Mapping[str, Any]) -> tuple[Compared, ...]:
    # the op is indexer_topk on the keys decoded to q's dtype: judge the selection on those keys.
    keys = index_key_unpack(a["keys"], a["q"].shape[-1], a["key_format"], a["q"].dtype)
    return _indexer_topk({**a, "keys": keys})


def _sparse_attention(a: Mapping[str, Any]) -> tuple[Compared, ...]:
    return _attention(a, a["kv"])


def _sparse_attention_fp8(a: Mapping[str, Any]) -> tuple[Compared, ...]:
    # the keys are the records decoded (exactly, so both sides attend identical rows): the dense rule on them.
    return _attention(a, kv_cache_unpack(a["records"], a["q"].shape[-1], a["rope_dim"], a["tile"]))


def _attention(a: Mapping[str, Any], kv: torch.Tensor) -> tuple[Compared, ...]:
    """The attention output over keys ``kv``, rotated back where positions are given."""
    q, softmax_scale = a["q"], a["softmax_scale"]
    q_norm = float(q.to(torch.float64).norm(dim=-1).max()) if q.numel() else 0.0
    kv_norm = float(kv.to(torch.float64).norm(dim=-1).max()) if kv.numel() else 0.0
    # a logit is off by gamma_D * |q| |k| * scale (Cauchy-Schwarz); exp turns that into a relative
    # error of each probability, twice (numerator and denominator); the PV sum adds gamma_K; the
    # output is a sub-convex combination of kv rows, so errors scale with max|kv|. Low-precision
    # inputs may round the probabilities to bf16 before PV (REF, FlashMLA): u_bf16 each.
    logit_err = gamma(q.shape[-1] + 8) * softmax_scale * q_norm * kv_norm
    prob_err = unit_roundoff(torch.bfloat16) if _low_precision(q) else 0.0
    atol = (2 * logit_err + gamma(a["indices"].shape[-1] + 8) + prob_err) * _max_abs(kv)
    out = Close(rtol=ulp(q.dtype), atol=atol)
    if a["positions"] is not None:
        out = _rotated_back(out, _max_abs(kv), q.dtype, a["positions"], a["freqs"])
    return (Compared("out", 0, out),)


def _rotated_back(
    o_rule: Close, o_max: float, dtype: torch.dtype, positions: torch.Tensor, freqs: torch.Tensor
) -> Close:
    """The rule of ``rope(o, positions, freqs, inverse=True)`` for an o in ``dtype`` with |o| <= o_max
    that ``o_rule`` bounds: ``|o'_j - o_j| <= E_j = atol + rtol |o_j|`` (o' the kernel's o rounded to
    dtype; its rtol is that rounding).

    A rotation moves a pair (a, b) to (a c - b s, a s + b c), so element j of the rotated error
    ``Delta = o' - o`` is at most ``|(Delta_a, Delta_b)|_2`` of its pair (Cauchy-Schwarz,
    c^2 + s^2 = 1; reached at c = s = 1/sqrt2),
    and ``|(E_a, E_b)|_2 <= sqrt2 atol + rtol |(a, b)|_2 <= sqrt2 (atol + rtol o_max)``: the relative
    part becomes absolute, since a rotated element may be near 0 while its pair is not. Then rope's
    own rule on o' (:func:`_rope_close`: the fp32 angle, cos/sin and products, rtol for the output's
    rounding), to first order. The first D - 2R dims keep ``o_rule``, which this covers (rtol and
    atol only grow).
    """
    rope = _rope_close(dtype, o_max, positions, freqs)
    return Close(rtol=rope.rtol, atol=math.sqrt(2) * (o_rule.atol + o_rule.rtol * o_max) + rope.atol)


def _mix_error(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, norm_eps: float) -> float:
    """Bound on the fp32 error of the mHC logits ``mix * scale``: gamma_{nD} times the magnitude
    ``max_t (|x_t| @ |fn|^T) * rsqrt(mean(x_t^2) + eps)`` times max|scale|."""
    flat = x.to(torch.float64).flatten(2)
    inv_rms = torch.rsqrt(flat.square().mean(-1, keepdim=True) + norm_eps)
    magnitude = float((flat.abs() @ fn.to(torch.float64).abs().T * inv_rms).max()) if flat.numel() else 0.0
    return gamma(flat.shape[-1] + 8) * magnitude * _max_abs(scale)


def _collapse_atol(n: int, x_max: float | torch.Tensor, logit_err: float) -> float | torch.Tensor:
    """The absolute part of y's bound: each of n pre weights off by logit_err / 4 (sigmoid' <= 1/4)
    plus a few roundings, times |x_i| <= x_max."""
    return n * x_max * (logit_err / 4 + gamma(4))


def _collapse_rtol(x: torch.Tensor) -> float:
    """The relative part of y's bound: n + 2 fp32 roundings of the sum, then one rounding to x's dtype."""
    return ulp(x.dtype) + gamma(x.shape[2] + 2)


def _collapsed(x: torch.Tensor, logit_err: float) -> Close:
    """``y = sum_i pre_i x_i`` with ``pre = sigmoid(..) + eps``: sigmoid' <= 1/4, n streams."""
    return Close(rtol=_collapse_rtol(x), atol=_collapse_atol(x.shape[2], _max_abs(x), logit_err))


def _normed(a: Mapping[str, Any], logit_err: float) -> Close:
    """``N(y) = rms_norm(y, w, norm_eps)`` of the collapse y (hc_pre's and hc_head's ``norm_weight``).

    On token t the collapse y' is off by ``|Delta_j| <= A_t + R |y_j|`` (:func:`_collapsed`'s bound,
    with A_t from token t's own streams; the rounding to x's dtype is in R). With
    ``rho(y) = sqrt(mean(y^2) + eps)`` and ``r_t = rho(y_t)`` (y in float64):
    ``N(y')_j - N(y)_j = w_j Delta_j / rho(y') + N(y)_j (rho(y) - rho(y')) / rho(y')``, where
    ``|w_j Delta_j| <= |w_j| A_t + R |N(y)_j| r_t`` and ``|rho(y) - rho(y')| <= rms(Delta) <= A_t + R r_t``,
    so with ``a_t = A_t / r_t`` and ``rho(y') >= r_t (1 - R - a_t)`` it moves by at most
    ``(|w_j| a_t + |N(y)_j| (2R + a_t)) / (1 - R - a_t)``. Where ``R + a_t >= 1`` the error could
    cancel y's rms and only ``|N(.)| <= max|w| sqrt(D)`` on both sides bounds it (atol 2 max|w| sqrt(D));
    a zero token has A_t = 0. Then rms_norm's own relative error (:func:`_rms_norm`, the output's
    rounding included), to first order.
    """
    x, norm_eps = a["x"], a["norm_eps"]
    n, d = x.shape[2], x.shape[-1]
    # hc_pre's pre rows (fn[:n], base[:n], scale[0]) are hc_head's whole mix: y in float64
    y = reference_hc_head(*(t.to(torch.float64) for t in (x, a["fn"][:n], a["base"][:n], a["scale"][:1])),
                          a["eps"], norm_eps)
    atol = _collapse_atol(n, x.to(torch.float64).abs().amax(dim=(2, 3)), logit_err)
    rtol = _collapse_rtol(x)
    rel_atol = torch.where(atol == 0, 0.0, atol / torch.sqrt(y.square().mean(-1) + norm_eps))
    room = 1 - rtol - rel_atol
    bounded = room > 0
    k_abs = torch.where(bounded, rel_atol / room, 2 * d**0.5)
    k_rel = torch.where(bounded, (2 * rtol + rel_atol) / room, 0.0)
    return Close(rtol=_rms_norm_rtol(x.dtype, d) + _max_abs(k_rel), atol=_max_abs(a["norm_weight"]) * _max_abs(k_abs))


def _hc_y(a: Mapping[str, Any], logit_err: float) -> Compared:
    """hc_pre's / hc_head's y: the collapse, or its RMSNorm when ``norm_weight`` is given."""
    return Compared("y", 0, _collapsed(a["x"], logit_err) if a["norm_weight"] is None else _normed(a, logit_err))


def _hc_pre(a: Mapping[str, Any]) -> tuple[Compared, ...]:
    x = a["x"]
    logit_err = _mix_error(x, a["fn"], a["scale"], a["norm_eps"])
    # post = 2 sigmoid: slope <= 1/2. comb: softmax moves by <= 2x the logit error; each of the
    # 2*iters Sinkhorn normalisations adds n+1 fp32 roundings to values in [0, 1].
    post = Close(rtol=0.0, atol=logit_err / 2 + gamma(4))
    comb = Close(rtol=0.0, atol=4 * logit_err + gamma(4 * a["sinkhorn_iters"] * (x.shape[2] + 1)))
    return _hc_y(a, logit_err), Compared("post", 1, post), Compared("comb", 2, comb)


def _hc_head(a: Mapping[str, Any]) -> tuple[Compared, ...]:
    return (_hc_y(a, _mix_error(a["x"], a["fn"], a["scale"], a["norm_eps"])),)


def _hc_post(a: Mapping[str, Any]) -> tuple[Compared, ...]:
    """``x'_j = post_j f + sum_i comb[i, j] x_i``: n + 1 products summed in fp32, off by
    ``gamma_{n+2}`` relative to their magnitudes ``|post_j| |f| + sum_i |comb[i, j]| |x_i|``; the
    output's rounding is the rtol's ulp.

    With ``addend`` f is ``s = f + addend`` rounded to f's dtype by contract, and the float64
    reference adds exactly: the kernel's s' is one fp32 add (u) then, for bf16 f, one rounding to
    bf16 (u_f) away, ``|s' - s| <= (u + u_f) |s|`` (for fp32 f the two are the same rounding), which
    post_j carries into the output as ``(u + u_f) |post_j| |s|``. The products are then the rule
    above with f = s', of magnitude ``|post_j| |s|`` to first order: ``|f + addend|``, not
    ``|f| + |addend|``, since the kernel multiplies the one rounded sum, and where the addend cancels
    f that sum is 0 or a few ulps of f exactly (Sterbenz) and none of |f| reaches the output.
    """
    f, x, post, comb = (a[k].to(torch.float64) for k in ("f", "x", "post", "comb"))
    n = x.shape[2]
    sum_err = 0.0
    if a["addend"] is not None:
        f = f + a["addend"].to(torch.float64)
        sum_err = U32 + unit_roundoff(a["f"].dtype)
    expanded = post.abs()[..., None] * f.abs()[..., None, :]
    magnitude = (gamma(n + 2) + sum_err) * expanded + gamma(n + 2) * (comb.abs().transpose(-1, -2) @ x.abs())
    return (Compared("out", 0, Close(rtol=ulp(a["x"].dtype) + gamma(n + 2), atol=float(magnitude.max()))),)


@dataclass(eq=False)
class OnOwnStreams:
    """One of hc_post_pre's hc_pre outputs (``index``: 0 y, 1 post, 2 comb), judged as hc_pre's rule
    judges it for ``x`` = the streams the kernel returned, against the reference hc_pre in float64 of
    those streams (a bf16 / fp32 value widens exactly). Compared as ``(streams, output)``; ``pre`` holds
    the call's arguments by name (hc_pre's besides x). ``built`` keeps the last check for describe()."""

    pre: Mapping[str, Any]
    index: int
    built: Any = None

    def describe(self) -> str:
        own = "hc_pre's rule on the kernel's own streams"
        return own if self.built is None else f"{own}: {self.built.describe()}"

    def compare(self, got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor]) -> Verdict:
        streams, out = (t.cpu() for t in got)
        a = {**self.pre, "x": streams}
        self.built = _hc_pre(a)[self.index].check
        params = (a[k].to(torch.float64) for k in ("fn", "base", "scale"))
        norm_weight = None if a["norm_weight"] is None else a["norm_weight"].to(torch.float64)
        reference = reference_hc_pre(streams.to(torch.float64), *params, a["sinkhorn_iters"], a["eps"],
                                     a["norm_eps"], norm_weight)
        return self.built.compare(out, reference[self.index])


def _hc_post_pre(a: Mapping[str, Any]) -> tuple[Compared, ...]:
    # streams: hc_post's rule on the same inputs (against the float64 reference's streams). y, post,
    # comb: hc_pre's rule with x = the kernel's own streams, against hc_pre in float64 of those (the
    # float64 reference's streams are never rounded to x's dtype, which the contract does first).
    (streams,) = _hc_post(a)
    pre = tuple(Compared(label, (0, 1 + i), OnOwnStreams(a, i)) for i, label in enumerate(("y", "post", "comb")))
    return (Compared("streams", 0, streams.check), *pre)


def _rope_close(dtype: torch.dtype, x_max: float, positions: torch.Tensor, freqs: torch.Tensor) -> Close:
    """rope's rule on x in ``dtype`` with |x| <= x_max: theta = pos * f rounded to fp32 is off by
    |theta| u; cos/sin add u each; a rotated pair moves by |dtheta| (|a| + |b|) <= 2 |dtheta| x_max;
    the products and the sum a few u, the output's rounding one ulp."""
    theta = _max_abs(positions) * _max_abs(freqs)
    return Close(rtol=ulp(dtype) + gamma(4), atol=2 * (theta + 4) * U32 * x_max)


def _rope(a: Mapping[str, Any]) -> tuple[Compared, ...]:
    x = a["x"]
    return (Compared("out", 0, _rope_close(x.dtype, _max_abs(x), a["positions"], a["freqs"])),)


def _rms_norm_rtol(dtype: torch.dtype, d: int) -> float:
    """RMSNorm's relative error over rows of D in ``dtype``. Every step is multiplicative: sum(x^2)
    of D positive terms errs by gamma(D) relative in any order, the mean, + eps and the product add
    an ulp each, rsqrt two (the GPU's approximation); the inverse root halves the sum's error. Then
    one rounding to ``dtype``."""
    return ulp(dtype) + gamma(d) / 2 + 8 * U32


def _rms_norm(a: Mapping[str, Any]) -> tuple[Compared, ...]:
    return (Compared("out", 0, Close(rtol=_rms_norm_rtol(a["x"].dtype, a["x"].shape[-1]))),)


def _rms_norm_rope(a: Mapping[str, Any]) -> tuple[Compared, ...]:
    # The norm's relative error (as rms_norm) and the rounding of its output to x's dtype, then
    # rope's angle error, all absolute against the largest normalised value |y| (a rotated element
    # near zero has no relative bound); the output rounds once more (one ulp relative).
    x, weight = a["x"], a["weight"]
    xf = x.to(torch.float64)
    y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + a["eps"])
    y_max = _max_abs(y if weight is None else y * weight.to(torch.float64))
    norm = 2 * _rms_norm_rtol(x.dtype, x.shape[-1]) * y_max
    rope = _rope_close(x.dtype, y_max, a["positions"], a["freqs"])
    return (Compared("out", 0, Close(rtol=ulp(x.dtype), atol=norm + rope.atol)),)


def _grouped_linear(a: Mapping[str, Any]) -> tuple[Compared, ...]:
    # I products of x and W' (W' rounded to x's dtype: exact for e8m0 scales and for dense weights
    # no wider than x, else one rounding of u(x) relative that the float64 reference does not make),
    # summed in fp32 in any order (gamma(I + 1)), the output rounded once to x's dtype (one ulp).
    x, weight, scale = a["x"], a["weight"], a["scale"]
    rounds_weight = (scale is not None and scale.dtype == torch.float32) or (
        scale is None and SIGNIFICANT_BITS[weight.dtype] > SIGNIFICANT_BITS[x.dtype])
    w = dequantize_weight(weight, scale, torch.float64).abs()
    g, i = x.shape[-2:]
    magnitude = _max_abs(torch.einsum("...gi,gri->...gr", x.to(torch.float64).abs(), w.view(g, -1, i)))
    weight_error = unit_roundoff(x.dtype) if rounds_weight else 0.0
    return (Compared("out", 0, Close(rtol=ulp(x.dtype), atol=(gamma(i + 1) + weight_error) * magnitude)),)


def _fp32_linear(a: Mapping[str, Any]) -> tuple[Compared, ...]:
    # D exact products (bf16 and fp32 operands widen exactly; fp32 x fp32 products round once),
    # summed in fp32 in any order: gamma(D + 1) relative to sum |x| |w| per output. A kernel may
    # split each fp32 x into three exact bf16 parts for the tensor cores: 3D exact products.
    x, w = a["x"].to(torch.float64), a["weight"].to(torch.float64)
    n = 3 * x.shape[-1] + 1
    return (Compared("out", 0, Close(rtol=gamma(n), atol=gamma(n) * _max_abs(x.abs() @ w.abs().T))),)


RULES: dict[str, Rule] = {
    "fp8_act_quant": Rule(
        (
            ("q, scale (ue8m0)", "exact", _EXACT_CODEC),
            ("q, scale (fp32 scales)", "scale: rtol 2^-23; q = e4m3(clamp(x / scale)), either neighbour within 2^-21 of a tie",
             "amax/448 may be computed as amax·(1/448) (one fp32 ulp), and the quotient x/s in fp32 may then sit an "
             "ulp or two off, so codes are checked against the kernel's own scale"),
        ),
        _fp8_act_quant,
    ),
    "fp4_quant": Rule(
        (("codes, scale", "exact", _EXACT_CODEC + " (ties to the even e2m1 code)"),),
        _exact("codes", "scale"),
    ),
    "hadamard_rotate": Rule(
        (
            ("out (fp4_block = 0)", "rtol u(x), atol γ(n+2)·max Σ\\|x\\|/√n",
             "n exact products (x times ±1) summed in fp32 and one multiply by fp32(n^-1/2), then one "
             "rounding to x's dtype"),
            ("out (fp4_block > 0)", "an FP4 rounding of a value within that bound of the exact rotation",
             "the kernel's rotated value may differ from the reference's within the bound above, and a value "
             "near an e2m1 midpoint (or an amax near 6·2^k) may then round either way: each block must be "
             "the e2m1 rounding, under one ue8m0 scale, of values within the bound"),
            ("out (positions, freqs)",
             "as the rows above for r = rope(x): Σ\\|x\\| becomes Σ\\|r\\| + E and atol (or the bound) grows by E/√n; "
             "per row E = (ulp(x) + γ(4))·Σ_rot \\|r\\| + 2R·2·(max\\|pos·f\\| + 4)·2^-24·max\\|x\\|",
             "the kernel rotates its rope r' of x (rounded to x's dtype), within rope's rule of the reference's r: "
             "on the 2R rotated dims (ulp(x) + γ(4))·\\|r_j\\| + 2·(max\\|pos·f\\| + 4)·2^-24·max\\|x\\| of the row "
             "(the angle error moves a pair by \\|Δθ\\|·(\\|a\\| + \\|b\\|), its own magnitude), 0 on the others "
             "(passed through); their sum E bounds Σ_j \\|r'_j − r_j\\|. H/√n has entries ±1/√n, so output i moves by "
             "at most Σ_j \\|r'_j − r_j\\|/√n <= E/√n (itself <= \\|r' − r\\|_2 by Cauchy-Schwarz); the fp32 sums are "
             "over \\|r'\\| <= \\|r\\| + E; with fp4_block the FP4 rounding of a value within that widened bound"),
        ),
        _hadamard_rotate,
    ),
    "index_key_pack": Rule(
        (("record bytes", "exact", _EXACT_CODEC + "; an fp8 key's scale bytes are its fp32 power of two"),),
        _exact("records"),
    ),
    "index_key_store": Rule(
        (("store (final, every byte)", "exact",
          _EXACT_CODEC + "; the stored rows are index_key_pack's records and every other row keeps its bytes"),),
        _exact("store"),  # no outputs: the mutated store is index 0
    ),
    "kv_cache_pack": Rule(
        (("record bytes", "exact", _EXACT_CODEC + "; rope bytes are an RNE bf16 cast"),),
        _exact("record"),
    ),
    "kv_cache_store": Rule(
        (
            ("cache (positions None; final, every byte)", "exact",
             _EXACT_CODEC + "; the stored rows are kv_cache_pack's records and every other row keeps its bytes"),
            ("cache (positions, freqs; final)",
             "stored rows decoded: rms_norm_rope's out tolerance + one e4m3 step: rtol += 2^-3, "
             "atol/max\\|ref\\| += 2^-16; every other row exact",
             "the stored vectors are rms_norm_rope(kv)'s, within its rule of the reference's (the sum of x² in "
             "another order, cos/sin); where one is an ulp off, its e4m3 code may be one step off (a tile's ue8m0 "
             "scale change requantises the tile, each side within half a step) and a bf16 rope value a bf16 ulp "
             "(2^-7, inside the step); subnormal codes: half a subnormal step, <= 2^-17·max\\|value\\|, as "
             "kv_compress_fp8's records. The contract takes no float64 kv: the reference computes in fp32 with the same "
             "two roundings, its own fp32 error far inside the e4m3 step"),
        ),
        _kv_cache_store,
    ),
    "kv_cache_unpack": Rule(
        (("kv bf16", "exact", "decoding is exact: e4m3 x 2^k and the stored bf16 rope fit bf16"),),
        _exact("kv"),
    ),
    "fp8_gemm": Rule(
        (("out", "rtol ulp(out), atol γ(n)·max Σ_k\\|A\\|\\|B\\|, n = K + 3K/128",
          "inputs are identical codes; e4m3 products are exact in fp32, so only the fp32 accumulation "
          "order (K adds + 3 per 128-block for the scales) and the output rounding differ. The sum's error is "
          "relative to the products' magnitudes Σ\\|A\\|\\|B\\|, not to \\|C\\|: where they cancel, C is far smaller"),),
        _gemm(128),
    ),
    "fp4_gemm": Rule(
        (("out", "rtol ulp(out), atol γ(n)·max Σ_k\\|A\\|\\|B\\|, n = K + 3K/32",
          "as fp8_gemm with 32-wide steps (e2m1 x e4m3 products are exact in fp32)"),),
        _gemm(32),
    ),
    "act_quant_gemm": Rule(
        (("out", "fp8_gemm's (e4m3 b, n = K + 3K/128) or fp4_gemm's (e2m1 b, n = K + 3K/32) on fp8_act_quant(x): "
          "rtol ulp(out), atol γ(n)·max Σ_k\\|A\\|\\|B\\|",
          "the activations' codes and ue8m0 scales must be fp8_act_quant(x)'s exactly (the spec; with power-of-two "
          "scales that quant is exact, see its row), so both sides multiply identical codes and only the GEMM's fp32 "
          "accumulation order and the output rounding differ, as in the GEMM of b's format"),),
        _act_quant_gemm,
    ),
    "moe_gate": Rule(
        (
            ("indices", "selection, tol 4·γ(3D+8)·max_e Σ\\|x W_e\\| + 8u·\\|score\\|",
             "fp32 logits err by γ_D relative to Σ\\|x w\\| (γ_3D where a kernel splits an fp32 W into three "
             "exact bf16 parts for the tensor cores); score functions have slope <= 2; near-ties may "
             "resolve either way, exact ties must go to the smaller expert; hash routing: exact"),
            ("weights", "rtol 4·γ(3D+8)·max Σ\\|x W\\| + γ(2k+8)",
             "scores' relative error <= their logit error (sqrt∘softplus, sigmoid, softmax); renormalising "
             "adds k+1 roundings; compared for the kernel's own selection"),
        ),
        _moe_gate,
    ),
    "moe_experts": Rule(
        (("out", "rtol and atol/max\\|ref\\| ulp(x) + γ(D+I+k+8)",
          "fp32 GEMMs over D and I and the k-expert sum; the routed SwiGLU output and each expert's output "
          "are rounded to x's dtype, so one ulp of a hidden value may flip; with fp8/fp4 weights the reference "
          "runs at the case's precision so both sides quantise identical values to e4m3"),),
        _moe_experts,
    ),
    "kv_compress": Rule(
        (
            ("entries (every call)", "rtol and atol/max\\|ref\\| ulp(out) + γ(2m+d+8) + 2(θ+4)u, θ = max j·m·f",
             "the pooled and normed vectors are rounded to out_dtype (bf16) by contract and the rotation mixes "
             "pairs, so one output ulp of the pair's scale; fp32 adds pooling, RMS and angle rounding"),
            ("kv_state, score_state (final)", "rtol 2^-23",
             "copies of fp32 inputs and one fp32 rounding of score + ape: one fp32 ulp"),
        ),
        _kv_compress,
    ),
    "kv_compress_fp8": Rule(
        (
            ("records (every call, decoded)", "kv_compress's entries tolerance + one e4m3 step: rtol += 2^-3, "
             "atol/max\\|ref\\| += 2^-16",
             "entries are kv_compress's in bf16; where an entry is an ulp off, its e4m3 code may be one step off "
             "(a tile scale change requantises the tile, each side within half a step); subnormal codes: half a "
             "subnormal step, <= 2^-17·max\\|entry\\|"),
            ("kv_state, score_state (final)", "rtol 2^-23", "as kv_compress"),
        ),
        _kv_compress_fp8,
    ),
    "kv_compress_store": Rule(
        (
            ("kv_state, score_state (final)", "rtol 2^-23", "as kv_compress"),
            ("store (final): rows any call stored into, decoded", "kv_compress_fp8's records tolerance: rtol and "
             "atol/max\\|ref\\| as kv_compress's entries, rtol += 2^-3, atol/max\\|ref\\| += 2^-16",
             "each stored row is a kv_compress_fp8 record (zero bytes past a sequence's new entries at a tensor "
             "start_pos), so it may differ from the reference's as a record may; judged after the last call, by "
             "that call's bound (its start_pos + S is the stream's furthest position: the largest angle), the rows "
             "of every call together (the last call's slots and every row the reference changed from the store "
             "before the first call; max\\|ref\\| over them all)"),
            ("store (final): every other row", "exact",
             "rows no call stores into keep their bytes (the cases' stores hold random bytes: a stray write fails)"),
        ),
        _kv_compress_store,
    ),
    "indexer_topk": Rule(
        (("indices", "selection, tol 2·γ(d+H+8)·max_j Σ_h \\|w_h\\| Σ_c \\|q_hc K_jc\\|, w = weights·weights_scale",
          "fp32 scores (d products per head, H heads) on both sides; the head weights "
          "w = fp32(weights)·weights_scale (the scale rounded to fp32 too) add two roundings, within the 8; "
          "compared by selected scores (recall), exact ties to the smaller entry, entry j returned as "
          "offset + j, -1 beyond the visible entries"),),
        _indexer_topk,
    ),
    "indexer_topk_packed": Rule(
        (("indices", "as indexer_topk, on the keys decoded to q's dtype",
          "decoding is exact for ue8m0 scales and one rounding to q's dtype otherwise, fixed by the "
          "contract; the scores are then indexer_topk's"),),
        _indexer_topk_packed,
    ),
    "sparse_attention": Rule(
        (
            ("out (positions None)",
             "rtol ulp(q), atol A = (2·γ(D+8)·scale·\\|q\\|\\|k\\| + γ(K+8) + u_bf16 if bf16)·max\\|kv\\|",
             "logit error (Cauchy-Schwarz) becomes a relative probability error twice; PV sum over K keys; "
             "bf16 kernels may round probabilities to bf16; output is a sub-convex mix of kv rows"),
            ("out (positions, freqs)",
             "rtol ulp(q) + γ(4), atol √2·(A + ulp(q)·max\\|kv\\|) + 2·(max\\|pos·f\\| + 4)·2^-24·max\\|kv\\|",
             "rope(o, inverse) of o rounded to q's dtype, each element within A + ulp(q)·\\|o\\| by the row above "
             "(its rtol is that rounding); a rotation moves an element by at most the length of its pair's error, "
             "<= √2·(A + ulp(q)·max\\|kv\\|) (Cauchy-Schwarz; absolute, as a rotated element may be near 0 while "
             "its pair is not; \\|o\\| <= max\\|kv\\|); then rope's rule on o. Covers the unrotated dims too"),
        ),
        _sparse_attention,
    ),
    "sparse_attention_fp8": Rule(
        (("out", "as sparse_attention (either form), on the decoded records",
          "key j is record j decoded exactly (e4m3·2^k and the stored bf16 RoPE dims fit bf16), so the "
          "kernel and the reference attend identical rows and only the attention's own rounding differs"),),
        _sparse_attention_fp8,
    ),
    "hc_pre": Rule(
        (
            ("y (norm_weight None)", "rtol ulp(x) + γ(n+2), atol n·max\\|x\\|·(δ/4 + γ(4))",
             "δ = γ(nD+8)·max(\\|x\\|@\\|fn\\|ᵀ·rsqrt(mean x²))·max\\|scale\\| bounds the fp32 mix logits; "
             "sigmoid' <= 1/4"),
            ("y (norm_weight w)", "rtol ulp(x) + γ(D)/2 + 8u + max_t (2R + a_t)/(1 − R − a_t), "
             "atol max\\|w\\|·max_t a_t/(1 − R − a_t)",
             "y' = y + Δ with \\|Δ\\| <= A_t + R·\\|y\\| on token t (the row above: R = ulp(x) + γ(n+2), "
             "A_t = n·max\\|x_t\\|·(δ/4 + γ(4))); r_t = sqrt(mean y_t² + eps) from y in float64, a_t = A_t/r_t: "
             "the numerator moves by \\|w\\|·A_t + R·\\|ref\\|·r_t, the rms by <= rms(Δ) <= A_t + R·r_t, and "
             "rms(y') >= r_t·(1 − R − a_t); then rms_norm's relative error. Where R + a_t >= 1, atol 2·max\\|w\\|·√D "
             "(\\|rms_norm\\| <= max\\|w\\|·√D on both sides)"),
            ("post", "atol δ/2 + γ(4)", "2·sigmoid has slope <= 1/2"),
            ("comb", "atol 4δ + γ(4·iters·(n+1))",
             "softmax moves <= 2δ; 2·iters Sinkhorn normalisations, n+1 fp32 roundings each"),
        ),
        _hc_pre,
    ),
    "hc_post": Rule(
        (
            ("out (addend None)", "rtol ulp(x) + γ(n+2), atol γ(n+2)·max(\\|post\\|\\|f\\| + \\|comb\\|ᵀ\\|x\\|)",
             "n + 1 products summed in fp32, relative to their magnitudes"),
            ("out (addend a)",
             "rtol ulp(x) + γ(n+2), atol max((γ(n+3) + u_f)·\\|post\\|\\|s\\| + γ(n+2)·\\|comb\\|ᵀ\\|x\\|), "
             "s = f + a exact",
             "the contract rounds s to f's dtype (an fp32 add, u, then u_f for bf16 f), so the kernel's s' is within "
             "(u + u_f)·\\|s\\| of the float64 reference's s, which post carries; then the row above with f = s'. "
             "The magnitude is \\|f + a\\|, not \\|f\\| + \\|a\\|: the kernel multiplies the one rounded sum, "
             "which is 0 or a few ulps of f, exactly (Sterbenz), where a cancels f"),
        ),
        _hc_post,
    ),
    "hc_post_pre": Rule(
        (
            ("streams", "as hc_post's out (either form)", "the same products and fp32 sum, against the float64 "
             "reference's streams"),
            ("y, post, comb", "as hc_pre's (either form), with x = the kernel's own streams",
             "the reference is hc_pre in float64 of the streams the kernel returned (bf16 and fp32 widen exactly), "
             "so this part is judged on the kernel's own input exactly as hc_pre is on a case's x, and a streams "
             "value an ulp off (the row above) is not counted again; the float64 reference's own streams are not "
             "rounded to x's dtype, which the contract does before hc_pre reads them"),
        ),
        _hc_post_pre,
    ),
    "hc_head": Rule(
        (("y", "as hc_pre's y (either form)", "same mix, collapse and norm, no Sinkhorn"),),
        _hc_head,
    ),
    "rope": Rule(
        (("out", "rtol ulp(x) + γ(4), atol 2·(max\\|pos·f\\| + 4)·2^-24·max\\|x\\|",
          "the angle pos·f rounded to fp32 errs by \\|θ\\|·u (cases keep \\|θ\\| < 2^10); cos/sin add u each; "
          "a rotated pair moves by \\|Δθ\\|·(\\|a\\| + \\|b\\|)"),),
        _rope,
    ),
    "rms_norm": Rule(
        (("out", "rtol ulp(x) + γ(D)/2 + 8u",
          "sum(x²) of positive terms errs by γ(D) relative in any order and rsqrt halves it; the mean, eps, "
          "rsqrt (2 ulp on a GPU) and the products add a few u; all errors are relative"),),
        _rms_norm,
    ),
    "rms_norm_rope": Rule(
        (("out", "rtol ulp(x), atol (2·(ulp(x) + γ(D)/2 + 8u) + 2·(max\\|pos·f\\| + 4)·2^-24)·max\\|y\\|",
          "rms_norm's relative error and the rounding of y = rms_norm(x) to x's dtype, moved by a rotation by at "
          "most \\|a\\| + \\|b\\| <= 2 max\\|y\\|; then rope's angle error on y; the output rounds once"),),
        _rms_norm_rope,
    ),
    "fp32_linear": Rule(
        (("out", "rtol γ(3D+1), atol γ(3D+1)·max(\\|x\\|·\\|W\\|ᵀ)",
          "D products, exact for bf16 operands and rounded once for fp32 ones, summed in fp32 in any order; "
          "3D when a kernel splits fp32 x into three exact bf16 parts for the tensor cores"),),
        _fp32_linear,
    ),
    "grouped_linear": Rule(
        (("out", "rtol ulp(x), atol (γ(I+1) + u(x) if W' rounds)·max(\\|x_g\\|·\\|W'_g\\|ᵀ)",
          "I products of x and the weight dequantised to x's dtype (a rounding the float64 reference does "
          "not make, except for e8m0 scales and dense weights no wider than x), summed in fp32, rounded once"),),
        _grouped_linear,
    ),
}


def reference_in_float64(op: str, args: tuple) -> bool:
    """Whether the reference runs with float64 data for this call (where the contract allows).

    Not for ``moe_experts`` with fp8/fp4 weights: it re-quantises the routed SwiGLU output to e4m3,
    and a float64 intermediate lands on a different e4m3 code than the bf16 one whenever it is
    within half a bf16 ulp of an e4m3 midpoint (about 2^-5 of elements, each off by an e4m3 step,
    2^-3). There the reference runs in the case's own precision, so the kernel and the reference
    quantise identical values and only the accumulation order differs.
    """
    if op == "moe_experts":
        return named_args(op, args)["w1_scale"] is None
    return True


def checks_for(op: str, args: tuple) -> tuple[Compared, ...]:
    """The comparisons of one call of ``op`` with these arguments (outputs, then mutated states);
    a 0-d position tensor (the case's CPU copy) counts as its value, a [B] one stays per sequence."""
    named = named_args(op, args)
    position = get_spec(op).position
    if position is not None and isinstance(named[position], torch.Tensor) and named[position].dim() == 0:
        named[position] = int(named[position])
    return RULES[op].build(named)


def markdown_table() -> str:
    """The tolerance table of ``docs/conformance.md``, generated from :data:`RULES`."""
    lines = ["| op | output | tolerance | why |", "|---|---|---|---|"]
    for op, rule in RULES.items():
        for output, tolerance, why in rule.rows:
            lines.append(f"| {op} | {output} | {tolerance} | {why} |")
    return "\n".join(lines) + "\n"


TABLE_START = "<!-- tolerance table: generated by seahal.testing.tolerances.markdown_table() -->\n"
TABLE_END = "<!-- end of tolerance table -->"


def write_table(doc: str) -> None:
    """Replace the table between the markers of ``doc`` (``docs/conformance.md``) with a fresh one."""
    with open(doc) as f:
        text = f.read()
    head, _, rest = text.partition(TABLE_START)
    _, _, tail = rest.partition(TABLE_END)
    with open(doc, "w") as f:
        f.write(head + TABLE_START + markdown_table() + TABLE_END + tail)


if __name__ == "__main__":  # python -m seahal.testing.tolerances docs/conformance.md
    import sys

    write_table(sys.argv[1])
