"""RMSNorm: the normalisation before every sub-layer and of the low-rank q / kv (v4_ops.md §3)."""

from __future__ import annotations

from ..checks import FLOAT_HIGH, Contract, check_norm_parameters
from ..spec import Out, define_op


@define_op("rms_norm", family="norm", schema="(Tensor x, Tensor? weight, float eps=1e-6) -> Tensor")
def rms_norm(x, weight=None, eps=1e-6):
    """Normalise the last dim to unit root mean square, optionally scaled per channel.

    x: [..., D] bf16/fp32/fp64, weight: [D] fp32/fp64 or None -> [..., D] in x's dtype.

    ``y = x * rsqrt(mean(x^2) + eps) * weight`` (no weight: unweighted, as the per-head q norm),
    computed in fp32 (fp64 when x is fp64) and rounded once to x's dtype.
    """
    c = Contract("rms_norm")
    c.tensor("x", x, None, FLOAT_HIGH, min_rank=1)
    c.dims["D"] = x.shape[-1]
    check_norm_parameters(c, weight, eps)
    return Out(tuple(x.shape), x.dtype)
