"""The version-pinned signature table of the torch_mlu_ops (tmo) functions this backend calls.

tmo's Python functions have changed their parameter order between releases (the v1.3.2 manual
orders ``moe_softmax_topk(input, topk, num_expert_group, topk_group, normalize, ...)``, later call
sites pass ``(input, topk, normalize, num_expert_group, topk_group, ...)``), and Cambricon
publishes no machine-readable schema (no PyPI wheel, no schema file). So the backend calls tmo with
keyword arguments only, and every call is checked against this table, kept by hand: per tmo
version, per function, the parameter names in order with their defaults, and where they were
read. The installed version selects its entry; an unknown version is refused with the list of
pinned ones (:func:`entry_for`).

Each signature is written as the Python parameter list it documents (``"a, b, c=None"``) and
parsed once. Sources (see ``docs/backends/cambricon.md``):

- ``TMO-1.3.2``: Torch-MLU-Ops user manual v1.3.2 (2025-01-06): the gating chapter and
  section 5.1.2, ``apply_rotary``.
- ``VM@8fa99fd9``: ``Cambricon/vllm-mlu: vllm_mlu/_mlu_ops.py`` at 8fa99fd9, whose
  ``requirements.txt`` asks for ``torch_mlu_ops >= 1.6.0``: the positional call sites there give
  the order, the wrappers' docstrings the names (``rotary_embedding`` passes ``apply_rotary``
  the manual's nine parameters in the manual's order).
- ``VM@b9925203``: the same file at b9925203, the first vllm-mlu with DeepSeek-V4 (it adds
  ``moe_softplus_topk``, ``fused_compress_multi_kv``, ``hc_split_sinkhorn``, ``fused_mhc_post``,
  ``learnable_sink``), and ``jd-opensource/xllm: xllm/core/kernels/mlu/scaled_matmul.cpp`` at
  81676c99 for the scale layouts ``scaled_matmul`` infers. Which tmo release introduced these is
  not published; FlagGems' ``backends.yaml`` lists torch-mlu-ops 1.12.1 as the newest release, so
  the entry is pinned as 1.12 and marked ``inferred``: confirm it on the first real MLU.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from dataclasses import dataclass

REQUIRED = object()
"""Default of a parameter the caller must pass."""


@dataclass(frozen=True)
class Param:
    name: str
    default: object = REQUIRED

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


@dataclass(frozen=True)
class Signature:
    """One tmo function in one release: its parameters in order, and where that was read."""

    function: str
    params: tuple[Param, ...]
    source: str

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    def problems(self, kwargs: Mapping[str, object]) -> list[str]:
        """Why a keyword call does not match: unknown keywords, missing required parameters."""
        unknown = [k for k in kwargs if k not in self.names]
        missing = [p.name for p in self.params if p.required and p.name not in kwargs]
        found = []
        if unknown:
            found.append(f"unknown keyword(s) {unknown}")
        if missing:
            found.append(f"missing required parameter(s) {missing}")
        return found


@dataclass(frozen=True)
class Release:
    """The table entry of one tmo release (``major.minor``)."""

    version: str
    functions: Mapping[str, Signature]
    inferred: bool = False
    """True when the version number was inferred rather than read next to the signatures."""


def _parse(function: str, params: str, source: str) -> Signature:
    """``"input, topk, normalize=False"`` -> Signature (defaults are Python literals)."""
    parsed = []
    for item in filter(None, (p.strip() for p in params.split(","))):
        name, eq, default = (s.strip() for s in item.partition("="))
        parsed.append(Param(name, ast.literal_eval(default) if eq else REQUIRED))
    return Signature(function, tuple(parsed), source)


def _release(version: str, source: str, functions: Mapping[str, str], inferred: bool = False) -> Release:
    return Release(version, {f: _parse(f, p, source) for f, p in functions.items()}, inferred)


_APPLY_ROTARY = (
    "input, sin_cache, cos_cache, position_ids, cu_seqlens, interleaved, discrete, dynamic_ntk, max_seqlen"
)

_V1_6 = {
    "apply_rotary": _APPLY_ROTARY,
    "moe_softmax_topk": (
        "input, topk, normalize=False, num_expert_group=-1, topk_group=0, mask=None, "
        "normed_by='topk_logit', route_scale=1.0, reduce_weight=None, expert_id=None"
    ),
    "moe_sigmoid_topk": (
        "input, topk, normalize=False, num_expert_group=-1, topk_group=0, route_scale=1.0, "
        "score_bias=None, reduce_weight=None, expert_id=None"
    ),
    "moe_gen_idx": "expert_id, expert_num",
    "moe_expand_input": "input, gather_idx, cusum_token_count=None, start_expert_id=0, expert_size=0",
    "group_gemm": "a, b, m_list, expand_idx, c, alpha, beta, max_m=0",
    "moe_combine_result": (
        "input, reduce_weight, gather_ids, residual, cusum_token_count, start_expert_id, expert_size, "
        "bias=None, output=None"
    ),
    "scaled_matmul": (
        "a, b, a_scale, b_scale, output_dtype, bias=None, c=None, act_mode='none', quant_bit_size=8, "
        "alpha=1.0, beta=1.0, use_hp_active=False"
    ),
    "single_query_cached_kv_attn": (
        "q, k_cache, v_cache, out, block_tables, context_lens, k_cache_quant_scale, v_cache_quant_scale, "
        "alibi_slopes, max_context_len, window_size_left, window_size_right, softmax_scale, "
        "return_lse=False, q_quant_scale=None, head_size_v=-1, compute_dtype=None, mask=None"
    ),
}

_V1_12 = {
    **_V1_6,
    "moe_softmax_topk": _V1_6["moe_softmax_topk"] + ", score_bias=None",
    "moe_softplus_topk": (
        "input, topk, input_ids=None, tid2eid=None, bias=None, route_scale=1.0, reduce_weight=None, "
        "expert_id=None"
    ),
    "group_gemm": _V1_6["group_gemm"] + ", d=None",
    "scaled_matmul": _V1_6["scaled_matmul"] + ", a_quant_bit_size=-1, a_calib=None, b_calib=None",
    "single_query_cached_kv_attn": _V1_6["single_query_cached_kv_attn"] + ", learnable_sink=None",
    "fused_compress_multi_kv": (
        "kv, score, kv_state, score_state, cu_seqlens, batch_ids, ape, max_seqlen, overlap, compressed_kv"
    ),
    "hc_split_sinkhorn": "mixes, hc_scale, hc_base, pre_scale=None, hc_mult=4, sinkhorn_iter=20, eps=1e-06",
    "fused_mhc_post": "x, residual, post, comb, compute_rms, eps, output=None, output_rms=None",
}

RELEASES: dict[str, Release] = {
    r.version: r
    for r in (
        _release(
            "1.3",
            "TMO-1.3.2 (user manual v1.3.2, gating chapter, section 5.1.2)",
            {
                "moe_softmax_topk": "input, topk, num_expert_group, topk_group, normalize, mask, normed_by",
                "apply_rotary": _APPLY_ROTARY,
            },
        ),
        _release("1.6", "VM@8fa99fd9 vllm_mlu/_mlu_ops.py (requires torch_mlu_ops >= 1.6.0)", _V1_6),
        _release(
            "1.12", "VM@b9925203 vllm_mlu/_mlu_ops.py; XL@81676c99 scaled_matmul.cpp", _V1_12, inferred=True
        ),
    )
}
"""tmo ``major.minor`` -> its pinned signatures. Versions in between are unknown, not assumed."""


def release_key(version: str) -> str:
    """``"1.12.1+torch2.11.0"`` -> ``"1.12"``."""
    parts = version.split("+", 1)[0].split(".")
    return ".".join(parts[:2])


class UnpinnedVersionError(RuntimeError):
    """The installed tmo release has no entry in the signature table."""


def entry_for(version: str) -> Release:
    """The table entry of an installed tmo version, or :class:`UnpinnedVersionError` naming the
    pinned ones (seahal does not guess the signatures of a release nobody checked)."""
    key = release_key(version)
    if key not in RELEASES:
        raise UnpinnedVersionError(
            f"torch_mlu_ops {version} has no entry in seahal's signature table "
            f"(pinned: {', '.join(RELEASES)}); its vendor ops are not used, every op runs on the "
            "portable path. Add the release's signatures to backends/cambricon/signatures.py "
            "with their source to enable them."
        )
    return RELEASES[key]
