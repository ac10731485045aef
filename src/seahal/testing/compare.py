"""How one output of a kernel is judged against the reference: exactly, closely, or as a selection.

The numbers (which rtol, which atol, why) live in :mod:`seahal.testing.tolerances`; this module
holds the comparison mechanics and the ranking keys of the selection ops (``moe_gate``,
``indexer_topk``, ``indexer_topk_packed``), whose index outputs are judged by the scores they
select rather than as exact sets, because near-ties may legitimately resolve either way in a
different accumulation order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from seahal.hal.formats import FP4_AMAX_FLOOR, FP4_MAX, e2m1_decode, e2m1_encode, ue8m0_ceil

F64 = torch.float64


@dataclass(frozen=True)
class Verdict:
    """The outcome of one comparison. ``worst`` is the largest error / allowed error (<= 1 passes)."""

    ok: bool
    max_abs: float | None = None
    max_rel: float | None = None
    worst: float | None = None
    detail: str = ""


def bit_pattern(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns of t as integers of the same width (so NaN == NaN and -0 != +0)."""
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.contiguous().view(width)


def _where(mask: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in mask.nonzero()[0])


def _value(t: torch.Tensor, at: tuple[int, ...]) -> str:
    v = t[at]
    if v.dtype.is_floating_point or v.dtype.is_complex:
        return f"{float(v.to(F64)):.6g}"
    return str(int(v))


@dataclass(frozen=True)
class Exact:
    """Bit-for-bit equality (integer codes, quantised bytes, deterministic codecs)."""

    def describe(self) -> str:
        return "exact (bitwise)"

    def compare(self, got: torch.Tensor, want: torch.Tensor) -> Verdict:
        got, want = got.cpu(), want.cpu()
        if got.dtype != want.dtype or got.shape != want.shape:
            return Verdict(False, detail=f"got {list(got.shape)} {got.dtype}, want {list(want.shape)} {want.dtype}")
        differ = bit_pattern(got) != bit_pattern(want)
        if not differ.any():
            return Verdict(True, 0.0, 0.0, 0.0)
        at = _where(differ)
        return Verdict(
            False,
            detail=f"{int(differ.sum())} of {differ.numel()} elements differ; first at {list(at)}: "
            f"got {_value(got, at)}, want {_value(want, at)}",
        )


@dataclass(frozen=True)
class Close:
    """``|got - want| <= atol + atol_ref * max|want| + rtol * |want|`` elementwise, in float64.

    ``atol`` is absolute (rules derive it from the inputs' magnitudes), ``atol_ref`` is relative to
    the largest reference magnitude; non-finite reference values must be matched exactly.
    """

    rtol: float
    atol: float = 0.0
    atol_ref: float = 0.0

    def describe(self) -> str:
        parts = [f"rtol {self.rtol:.3g}"]
        if self.atol:
            parts.append(f"atol {self.atol:.3g}")
        if self.atol_ref:
            parts.append(f"atol {self.atol_ref:.3g}*max|ref|")
        return ", ".join(parts)

    def compare(self, got: torch.Tensor, want: torch.Tensor) -> Verdict:
        if got.shape != want.shape:
            return Verdict(False, detail=f"got shape {list(got.shape)}, want {list(want.shape)}")
        got, want = got.cpu().to(F64), want.cpu().to(F64)
        finite = torch.isfinite(want)
        same_special = (got == want) | (got.isnan() & want.isnan())
        bad_special = (~finite & ~same_special) | (finite & ~torch.isfinite(got))
        if bad_special.any():
            at = _where(bad_special)
            detail = f"non-finite mismatch at {list(at)}: got {_value(got, at)}, want {_value(want, at)}"
            return Verdict(False, detail=detail)
        err = torch.where(finite, (got - want).abs(), 0.0)
        scale = float(want[finite].abs().max()) if finite.any() else 0.0
        allowed = self.atol + self.atol_ref * scale + self.rtol * torch.where(finite, want.abs(), 0.0)
        ratio = torch.where(err == 0, 0.0, err / allowed)  # err > 0 with allowed == 0 gives inf
        nonzero = finite & (want != 0)
        max_rel = float((err[nonzero] / want[nonzero].abs()).max()) if nonzero.any() else 0.0
        worst = float(ratio.max()) if ratio.numel() else 0.0
        verdict = Verdict(worst <= 1.0, float(err.max()) if err.numel() else 0.0, max_rel, worst)
        if verdict.ok:
            return verdict
        at = tuple(int(i) for i in torch.unravel_index(ratio.argmax(), ratio.shape))
        detail = (
            f"{int((ratio > 1).sum())} of {ratio.numel()} elements out of tolerance; worst at {list(at)}: "
            f"got {_value(got, at)}, want {_value(want, at)}, "
            f"|err| {float(err[at]):.3g} > allowed {float(allowed[at]):.3g}"
        )
        return Verdict(False, verdict.max_abs, verdict.max_rel, worst, detail)


@dataclass(frozen=True)
class Decoded:
    """``check`` applied to both sides after ``decode`` (packed records compared by their values)."""

    check: Any
    decode: Callable[[torch.Tensor], torch.Tensor]

    def describe(self) -> str:
        return f"decoded: {self.check.describe()}"

    def compare(self, got: torch.Tensor, want: torch.Tensor) -> Verdict:
        if got.dtype != want.dtype or got.shape != want.shape:
            return Verdict(False, detail=f"got {list(got.shape)} {got.dtype}, want {list(want.shape)} {want.dtype}")
        return self.check.compare(self.decode(got.cpu()), self.decode(want.cpu()))


@dataclass(frozen=True)
class RoundedCodes:
    """FP8 codes with fp32 (non power-of-two) scales, judged against the input.

    ``(q, scale)``: the scale within one fp32 ulp of the reference's (``amax/448`` may be computed
    as ``amax * (1/448)``), and each e4m3 code the round-to-nearest of ``clamp(x / scale)`` under
    the kernel's *own* scale; where that quotient lies within ``slack`` (relative) of a rounding
    boundary either neighbour is accepted, since a kernel's fp32 quotient may be an ulp or two off.
    ``x: [..., K]`` is the input, ``block`` the tile width.
    """

    x: torch.Tensor
    block: int
    slack: float = 2.0**-21

    def describe(self) -> str:
        return f"scale within 1 fp32 ulp; codes = e4m3(x / scale) (either neighbour within {self.slack:.2g} of a tie)"

    def compare(self, got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor]) -> Verdict:
        (q, scale), (_, want_scale) = (tuple(t.cpu() for t in got), want)
        scale_verdict = Close(rtol=2.0**-23).compare(scale, want_scale)
        if not scale_verdict.ok:
            return Verdict(False, detail=f"scale: {scale_verdict.detail}")
        x = self.x.to(F64)
        quotient = (x.unflatten(-1, (-1, self.block)) / scale.to(F64).unsqueeze(-1)).flatten(-2)
        low, high = (
            bit_pattern((quotient * f).clamp(-448.0, 448.0).to(torch.float32).to(torch.float8_e4m3fn))
            for f in (1 - self.slack, 1 + self.slack)
        )
        codes = bit_pattern(q)
        wrong = (codes != low) & (codes != high)
        if not wrong.any():
            return Verdict(True, 0.0, 0.0, scale_verdict.worst)
        at = _where(wrong)
        return Verdict(
            False,
            detail=f"q: {int(wrong.sum())} of {wrong.numel()} codes are not e4m3(x / scale); first at {list(at)}: "
            f"got {_value(q, at)}, x / scale = {float(quotient[at]):.6g}",
        )


@dataclass(frozen=True)
class FP4Rounded:
    """Values rounded through FP4 e2m1 in 1 x ``block`` ue8m0 blocks from inputs known within a
    bound: element i was computed as some ``v_i`` in ``[exact_i - delta_i, exact_i + delta_i]``.

    A block passes if one power-of-two scale s explains all of it: s lies between the scales of the
    smallest and the largest amax the intervals allow (``2^ceil(log2(max(amax, 6 * 2^-126) / 6))``,
    monotone in amax), and each output is ``s`` times an e2m1 value between the round-to-nearest
    of ``clamp(lo / s)`` and of ``clamp(hi / s)`` (rounding is monotone too). With delta = 0 this is
    the exact FP4 rounding of ``exact``; a kernel's own rounding before the FP4 step is what delta
    allows for. ``exact``, ``delta``: [..., K] float64; outputs [..., K] in any float dtype.
    """

    exact: torch.Tensor
    delta: torch.Tensor
    block: int

    def describe(self) -> str:
        return f"FP4 e2m1 rounding (1 x {self.block} ue8m0 blocks) of a value within the bound of the exact one"

    def compare(self, got: torch.Tensor, want: torch.Tensor) -> Verdict:
        if got.shape != self.exact.shape:
            return Verdict(False, detail=f"got shape {list(got.shape)}, want {list(self.exact.shape)}")
        blocks = self.exact.shape[-1] // self.block

        def tiled(t: torch.Tensor) -> torch.Tensor:
            return t.cpu().to(F64).reshape(*t.shape[:-1], blocks, self.block)

        value, lo, hi = tiled(got), tiled(self.exact - self.delta), tiled(self.exact + self.delta)
        magnitude_lo = torch.where((lo <= 0) & (hi >= 0), 0.0, torch.minimum(lo.abs(), hi.abs()))
        magnitude_hi = torch.maximum(lo.abs(), hi.abs())
        s_lo, s_hi = (ue8m0_ceil(m.amax(-1).clamp(min=FP4_AMAX_FLOOR) / FP4_MAX) for m in (magnitude_lo, magnitude_hi))

        def nearest(v: torch.Tensor) -> torch.Tensor:
            return e2m1_decode(e2m1_encode(v.clamp(-FP4_MAX, FP4_MAX))).to(F64)

        explained = torch.zeros(s_lo.shape, dtype=torch.bool)
        for step in range(int(torch.log2(s_hi / s_lo).max()) + 1 if s_lo.numel() else 0):
            s = (s_lo * 2.0**step).unsqueeze(-1)
            q = value / s
            on_grid = nearest(q) == q
            within = (q >= nearest(lo / s)) & (q <= nearest(hi / s))
            explained |= (on_grid & within).all(-1) & (s.squeeze(-1) <= s_hi)
        if explained.all():
            return Verdict(True, 0.0, 0.0, 0.0)
        at = _where(~explained)
        return Verdict(
            False,
            detail=f"{int((~explained).sum())} of {explained.numel()} blocks are no FP4 rounding of their values; "
            f"first block {list(at)}: got {value[at].tolist()}, exact {tiled(self.exact)[at].tolist()}",
        )


@dataclass(frozen=True)
class Selection:
    """Index outputs ``[..., k]`` judged by the scores they select (``-1`` = empty slot).

    ``scores: [..., n]`` float64 ranking keys (``-inf`` = not eligible), ``tol: [...]`` the largest
    score difference that rounding can explain in that row, ``offset``: the index entry 0 is
    returned as (entry j as ``offset + j``; the ``-1``s stay). A row passes when it holds
    ``min(k, #eligible)`` distinct eligible indices followed by ``-1``s, ordered by score descending
    (within tol), with no unselected entry scoring more than tol above the worst selected one, and
    exact ties (equal float64 scores) going to the smaller index, both in order and at the cut.
    """

    scores: torch.Tensor
    tol: torch.Tensor
    offset: int = 0

    def describe(self) -> str:
        return "same selected scores within rounding, exact ties to the smaller index"

    def compare(self, got: torch.Tensor, want: torch.Tensor) -> Verdict:
        got = got.cpu().long()
        if got.shape != want.shape:
            return Verdict(False, detail=f"got shape {list(got.shape)}, want {list(want.shape)}")
        scores = self.scores.reshape(-1, self.scores.shape[-1])
        tol = self.tol.to(F64).expand(self.scores.shape[:-1]).reshape(-1)
        rows = got.reshape(-1, got.shape[-1])
        want_rows = want.cpu().long().reshape(-1, got.shape[-1])
        recalled, wanted, worst = 0, 0, 0.0
        for r in range(rows.shape[0]):
            problem, margin = _selection_problem(rows[r], scores[r], float(tol[r]), self.offset)
            if problem is not None:
                at = list(torch.unravel_index(torch.tensor(r), got.shape[:-1]))
                detail = f"row {[int(i) for i in at]}: {problem}; got {rows[r].tolist()}, want {want_rows[r].tolist()}"
                return Verdict(False, worst=margin, detail=detail)
            ref = set(want_rows[r][want_rows[r] >= 0].tolist())
            recalled += len(ref & set(rows[r].tolist()))
            wanted += len(ref)
            worst = max(worst, margin)
        recall = recalled / wanted if wanted else 1.0
        return Verdict(True, worst=worst, detail=f"recall {recall:.3f}")


def _selection_problem(
    row: torch.Tensor, scores: torch.Tensor, tol: float, offset: int = 0
) -> tuple[str | None, float]:
    """Why one row of a selection is wrong (None if it is right), and its worst score margin / tol;
    the row holds entry j (column j of ``scores``) as ``offset + j``."""
    eligible = torch.isfinite(scores)
    n_valid = min(row.numel(), int(eligible.sum()))
    valid, rest = row[:n_valid], row[n_valid:]
    if (rest != -1).any() or (valid < 0).any():
        return f"expected {n_valid} valid indices then -1s", float("inf")
    picked = valid - offset
    if (picked < 0).any() or (picked >= scores.numel()).any() or picked.unique().numel() != n_valid:
        return f"indices out of range [{offset}, {offset + scores.numel()}) or repeated", float("inf")
    if n_valid == 0:
        return None, 0.0
    if not eligible[picked].all():
        return "selected an entry that is not eligible (masked / not visible)", float("inf")
    s = scores[picked]
    margin = 0.0
    for i in range(n_valid - 1):
        rise = float(s[i + 1] - s[i])
        if rise > tol:
            return f"not ordered by score: slot {i + 1} scores {rise:.3g} above slot {i}", rise / max(tol, 1e-300)
        if rise == 0 and picked[i + 1] < picked[i]:
            tie = f"exact tie between {int(valid[i])} and {int(valid[i + 1])}"
            return f"{tie} not broken to the smaller index", float("inf")
        margin = max(margin, rise / tol if tol > 0 else 0.0)
    unpicked = eligible.clone()
    unpicked[picked] = False
    if unpicked.any():
        floor = float(s.min())
        best_left = float(scores[unpicked].max())
        if best_left - floor > tol:
            return f"an unselected entry scores {best_left - floor:.3g} above the worst selected one", float("inf")
        tied = unpicked & (scores == floor)
        if tied.any() and int(tied.nonzero()[0]) < int(picked[s == floor].max()):
            return "exact tie at the cut not broken to the smaller index", float("inf")
        margin = max(margin, (best_left - floor) / tol if tol > 0 else 0.0)
    return None, margin


@dataclass(frozen=True)
class RoutedWeights:
    """``moe_gate`` weights: where the kernel selected the reference's experts, compared with the
    reference's weights; where a near-tie let it select others, with the weights the gate formula
    gives for its own selection (``scores`` are the unbiased float64 expert scores)."""

    close: Close
    scores: torch.Tensor
    route_scale: float
    renormalise: bool

    def describe(self) -> str:
        return self.close.describe() + " (for the kernel's own selection)"

    def compare(self, got: tuple[torch.Tensor, torch.Tensor], want: tuple[torch.Tensor, torch.Tensor]) -> Verdict:
        got_w, got_idx = (t.cpu() for t in got)
        want_w, want_idx = (t.cpu() for t in want)
        if got_w.shape != want_w.shape:
            return Verdict(False, detail=f"got shape {list(got_w.shape)}, want {list(want_w.shape)}")
        same = (got_idx.long() == want_idx.long()).all(dim=-1, keepdim=True)
        own = self.scores.gather(-1, got_idx.long().clamp(0, self.scores.shape[-1] - 1))
        if self.renormalise:
            own = own / (own.sum(-1, keepdim=True) + 1e-20)
        expected = torch.where(same, want_w.to(F64), own * self.route_scale)
        return self.close.compare(got_w, expected)


# --------------------------------------------------------------------------------------------
# Ranking keys of the selection ops (float64, from the call's inputs)
# --------------------------------------------------------------------------------------------


def gate_scores(x: torch.Tensor, weight: torch.Tensor, score_func: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Unbiased expert scores ``s = f(x W^T)`` in float64 and each token's logit magnitude
    ``max_e sum_i |x_i W_ei|`` (what fp32 rounding of the logits is relative to).

    x: [T, D], weight: [E, D] -> (s: [T, E], magnitude: [T]).
    """
    logits = x.to(F64) @ weight.to(F64).T
    magnitude = (x.to(F64).abs() @ weight.to(F64).abs().T).amax(-1)
    if score_func == "softmax":
        return logits.softmax(-1), magnitude
    if score_func == "sigmoid":
        return logits.sigmoid(), magnitude
    return F.softplus(logits).sqrt(), magnitude


def gate_ranking(
    scores: torch.Tensor, bias: torch.Tensor | None, n_groups: int, topk_groups: int
) -> torch.Tensor:
    """Biased selection keys ``s + bias`` [T, E], -inf outside the ``topk_groups`` best groups
    (group score = sum of its two best biased scores; groups ranked with ties to the smaller one)."""
    biased = scores + (0.0 if bias is None else bias.to(F64))
    if n_groups == 1:
        return biased
    tokens, experts = biased.shape
    grouped = biased.reshape(tokens, n_groups, experts // n_groups)
    group_score = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
    chosen = torch.sort(group_score, dim=-1, descending=True, stable=True).indices[:, :topk_groups]
    keep = torch.zeros(tokens, n_groups, dtype=torch.bool).scatter(1, chosen, True)
    return grouped.masked_fill(~keep[..., None], float("-inf")).reshape(tokens, experts)


def indexer_scores(
    q: torch.Tensor, weights: torch.Tensor, keys: torch.Tensor, ratio: int, start_pos: int | torch.Tensor,
    weights_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indexer scores ``I(t, j) = sum_h w_h relu(q_h . K_j)``, ``w = weights * weights_scale``, in
    float64, -inf where entry j is not visible to query t (``j >= floor((t+1)/m)``), and per query
    the magnitude ``max_j sum_h |w_h| sum_c |q_hc K_jc|`` that fp32 rounding is relative to.

    q: [B, S, H, d], weights: [B, S, H], keys: [B, N, d] -> ([B, S, N], [B, S]); column j is entry
    j, whatever index the op returns it as (its ``offset``).
    """
    q64, w64, k64 = q.to(F64), weights.to(F64) * weights_scale, keys.to(F64)
    scores = torch.einsum("bsh,bshn->bsn", w64, torch.einsum("bshd,bnd->bshn", q64, k64).relu())
    magnitude = torch.einsum("bsh,bshn->bsn", w64.abs(), torch.einsum("bshd,bnd->bshn", q64.abs(), k64.abs()))
    positions = torch.as_tensor(start_pos).reshape(-1, 1) + torch.arange(q.shape[1])  # [1 or B, S]
    visible = torch.arange(keys.shape[1]) < ((positions + 1) // ratio)[..., None]
    return scores.masked_fill(~visible, float("-inf")), magnitude.amax(-1)
