"""mHC, manifold-constrained hyper-connections: pre (with Sinkhorn), post and head."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..checks import Contract
from ..spec import Out, define_op

STREAM_DTYPES = (torch.bfloat16, torch.float32, torch.float64)
PARAM_DTYPES = (torch.float32, torch.float64)


def _streams(c: Contract, x) -> None:
    c.tensor("x", x, ["B", "S", "n", "D"], STREAM_DTYPES)


@define_op(
    "hc_pre",
    family="mhc",
    schema=(
        "(Tensor x, Tensor fn, Tensor base, Tensor scale, int sinkhorn_iters=20, float eps=1e-6, "
        "float norm_eps=1e-6, Tensor? norm_weight=None) -> (Tensor, Tensor, Tensor)"
    ),
)
def hc_pre(x, fn, base, scale, sinkhorn_iters=20, eps=1e-6, norm_eps=1e-6, norm_weight=None):
    """Collapse n residual streams into one sub-layer input; emit the post and mixing weights.

    x: [B, S, n, D], fn: [(2+n)*n, n*D] fp32, base: [(2+n)*n] fp32, scale: [3] fp32,
    norm_weight: [D] fp32 or None
    -> y: [B, S, D] in x's dtype, post: [B, S, n] fp32, comb: [B, S, n, n] fp32

    ``mix = (x_flat @ fn^T) * rsqrt(mean(x_flat^2) + norm_eps)``;
    ``pre_i = sigmoid(mix_i scale_0 + base_i) + eps``; ``post_i = 2 sigmoid(mix_{n+i} scale_1 + base_{n+i})``;
    ``comb = Sinkhorn(mix_{2n+i*n+j} scale_2 + base_{2n+i*n+j})``: softmax over j, +eps, divide by
    column sums (+eps), then ``iters-1`` times rows then columns; ``y = sum_i pre_i x_i``.
    With ``norm_weight`` y is the sub-layer's pre-norm of that sum:
    ``y = rms_norm(sum_i pre_i x_i, norm_weight, norm_eps)``, the sum rounded to x's dtype first.
    """
    c = Contract("hc_pre")
    _streams(c, x)
    return _check_pre(c, x, fn, base, scale, sinkhorn_iters, norm_weight)


def _check_pre(c: Contract, x, fn, base, scale, sinkhorn_iters, norm_weight) -> tuple[Out, Out, Out]:
    """hc_pre's checks past the streams -> its outputs (y, post, comb)."""
    n, d = c.dims["n"], c.dims["D"]
    c.tensor("fn", fn, [(2 + n) * n, n * d], PARAM_DTYPES)
    c.tensor("base", base, [(2 + n) * n], PARAM_DTYPES)
    c.tensor("scale", scale, [3], PARAM_DTYPES)
    c.positive("sinkhorn_iters", sinkhorn_iters)
    c.optional("norm_weight", norm_weight, ["D"], PARAM_DTYPES)
    b, s = c.dims["B"], c.dims["S"]
    return Out((b, s, d), x.dtype), Out((b, s, n), torch.float32), Out((b, s, n, n), torch.float32)


@define_op(
    "hc_post",
    family="mhc",
    schema="(Tensor f, Tensor x, Tensor post, Tensor comb, Tensor? addend=None) -> Tensor",
)
def hc_post(f, x, post, comb, addend=None):
    """Expand a sub-layer output back into n streams mixed with the old ones.

    f: [B, S, D], x: [B, S, n, D], post: [B, S, n] fp32, comb: [B, S, n, n] fp32,
    addend: [B, S, D] in f's dtype or None
    -> [B, S, n, D] in x's dtype: ``x'_j = post_j f + sum_i comb[i, j] x_i`` (fp32 math).

    With ``addend`` the sub-layer output comes in two parts (V4's MoE: the routed experts' sum and
    the shared expert's output) and f is their sum in f's dtype, ``f + addend`` as a tensor add
    rounds it, so that a kernel can add them as it reads f.
    """
    c = Contract("hc_post")
    _streams(c, x)
    _check_post(c, f, post, comb, addend)
    return Out(tuple(x.shape), x.dtype)


def _check_post(c: Contract, f, post, comb, addend) -> None:
    """hc_post's checks past the streams."""
    c.tensor("f", f, ["B", "S", "D"], STREAM_DTYPES)
    c.tensor("post", post, ["B", "S", "n"], PARAM_DTYPES)
    c.tensor("comb", comb, ["B", "S", "n", "n"], PARAM_DTYPES)
    c.optional("addend", addend, ["B", "S", "D"], (f.dtype,))


@define_op(
    "hc_post_pre",
    family="mhc",
    schema=(
        "(Tensor f, Tensor x, Tensor post, Tensor comb, Tensor fn, Tensor base, Tensor scale, "
        "int sinkhorn_iters=20, float eps=1e-6, float norm_eps=1e-6, Tensor? norm_weight=None, "
        "Tensor? addend=None) -> (Tensor, Tensor, Tensor, Tensor)"
    ),
)
def hc_post_pre(
    f, x, post, comb, fn, base, scale, sinkhorn_iters=20, eps=1e-6, norm_eps=1e-6, norm_weight=None, addend=None
):
    """One sub-layer's :func:`hc_post`, then the next sub-layer's :func:`hc_pre` of the streams it made.

    f, x, post, comb, addend: as hc_post's (the finished sub-layer's output and weights, the old
    streams); fn, base, scale, sinkhorn_iters, eps, norm_eps, norm_weight: as hc_pre's (the next
    sub-layer's parameters)
    -> (streams [B, S, n, D] in x's dtype, y [B, S, D] in x's dtype, post' [B, S, n] fp32,
    comb' [B, S, n, n] fp32) with

    ``streams = hc_post(f, x, post, comb, addend)``, ``(y, post', comb') = hc_pre(streams, fn, base,
    scale, sinkhorn_iters, eps, norm_eps, norm_weight)``: the streams rounded to x's dtype before
    hc_pre reads them, as the two ops in turn. A kernel may mix the new streams as it makes them
    (V4 runs the pair at every sub-layer boundary; the streams are read once instead of twice).
    """
    c = Contract("hc_post_pre")
    _streams(c, x)
    _check_post(c, f, post, comb, addend)
    y, post_next, comb_next = _check_pre(c, x, fn, base, scale, sinkhorn_iters, norm_weight)
    return Out(tuple(x.shape), x.dtype), y, post_next, comb_next


def post_then_pre(hc_post: Callable[..., torch.Tensor], hc_pre: Callable[..., tuple]) -> Callable[..., tuple]:
    """An :func:`hc_post_pre` kernel made of a backend's ``hc_post`` and ``hc_pre`` kernels called in
    turn, the streams the first returns handed to the second: the op's definition as code, for
    backends without a kernel that mixes the streams as it makes them."""

    def hc_post_pre(
        f, x, post, comb, fn, base, scale, sinkhorn_iters=20, eps=1e-6, norm_eps=1e-6, norm_weight=None, addend=None
    ):
        streams = hc_post(f, x, post, comb, addend)
        return (streams, *hc_pre(streams, fn, base, scale, sinkhorn_iters, eps, norm_eps, norm_weight))

    hc_post_pre.__doc__ = f"hc_post_pre as {hc_post.__module__}'s hc_post, then its hc_pre of the streams it made."
    return hc_post_pre


@define_op(
    "hc_head",
    family="mhc",
    schema=(
        "(Tensor x, Tensor fn, Tensor base, Tensor scale, float eps=1e-6, float norm_eps=1e-6, "
        "Tensor? norm_weight=None) -> Tensor"
    ),
)
def hc_head(x, fn, base, scale, eps=1e-6, norm_eps=1e-6, norm_weight=None):
    """Collapse the streams before the final norm (no Sinkhorn, no post).

    x: [B, S, n, D], fn: [n, n*D], base: [n], scale: [1], norm_weight: [D] or None
    -> [B, S, D] in x's dtype;
    ``pre_i = sigmoid(mix_i scale_0 + base_i) + eps`` with mix as in hc_pre; ``y = sum_i pre_i x_i``,
    with ``norm_weight`` the final norm of it, ``rms_norm(y, norm_weight, norm_eps)``, as in hc_pre.
    """
    c = Contract("hc_head")
    _streams(c, x)
    n, d = c.dims["n"], c.dims["D"]
    c.tensor("fn", fn, [n, n * d], PARAM_DTYPES)
    c.tensor("base", base, [n], PARAM_DTYPES)
    c.tensor("scale", scale, [1], PARAM_DTYPES)
    c.optional("norm_weight", norm_weight, ["D"], PARAM_DTYPES)
    return Out((c.dims["B"], c.dims["S"], d), x.dtype)
