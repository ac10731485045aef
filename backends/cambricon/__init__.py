"""The Cambricon backend: MLUs through ``torch_mlu``, vendor ops from ``torch_mlu_ops`` (tmo).

Eight ops have a tmo kernel (``cambricon.tmo``): moe_gate (``moe_softplus_topk`` and friends),
moe_experts (``moe_gen_idx`` -> ``group_gemm`` x2 -> ``moe_combine_result``), fp8_gemm
(``scaled_matmul``), kv_compress (``fused_compress_multi_kv``), sparse_attention
(``single_query_cached_kv_attn`` with ``learnable_sink``; its output's inverse RoPE on
``apply_rotary``), hc_pre (``hc_split_sinkhorn``),
hc_post (``fused_mhc_post``) and rope (``apply_rotary``, forward and inverse; rms_norm_rope too, after
the portable norm), act_quant_gemm as the portable quantisation then fp8_gemm, and hc_post_pre as
hc_post then hc_pre. Every other op,
and every call a tmo function cannot take, runs on the portable reference (pure torch,
device-resident, no host sync). tmo is called with keywords only, checked against the
version-pinned table in :mod:`.signatures`; a tmo release the table does not pin is refused
(portable path), with the reason in the plan and ``seahal info``.

Not verified on hardware: no Cambricon chip is reachable where seahal is developed. The tests run
these kernels against an emulation of torch_mlu/torch_mlu_ops written from Cambricon's docs.
"""

from __future__ import annotations

from seahal.hal import PlanContext, register_backend, register_kernel

_FLOATS = ("bfloat16", "float32")

# op -> (tmo functions the kernel calls, declared capabilities). The kernel of op ``x`` is the
# function ``x`` of the module named in _MODULES. Shapes or dtypes a tmo function cannot take are
# sent to the portable kernel per call (see route.py); capabilities state what reaches tmo.
KERNELS = {
    "moe_gate": (
        ("moe_softplus_topk", "moe_sigmoid_topk", "moe_softmax_topk"),
        {"dtype": _FLOATS, "score_func": ("sqrtsoftplus", "sigmoid", "softmax"), "routing": ("score", "hash")},
    ),
    "moe_experts": (
        ("moe_gen_idx", "moe_expand_input", "group_gemm", "moe_combine_result"),
        {"dtype": _FLOATS, "weight_format": ("dense",)},
    ),
    "fp8_gemm": (("scaled_matmul",), {"out_dtype": ("bfloat16",), "scale_dtype": ("float32", "float8_e8m0fnu")}),
    "act_quant_gemm": (
        ("scaled_matmul",),
        {"dtype": _FLOATS, "weight_format": ("fp8",), "out_dtype": ("bfloat16",), "scale_dtype": ("float32", "float8_e8m0fnu")},
    ),
    "kv_compress": (("fused_compress_multi_kv",), {"out_dtype": _FLOATS}),
    "sparse_attention": (("single_query_cached_kv_attn",), {"dtype": _FLOATS, "kv_format": ("dense",)}),
    "hc_pre": (("hc_split_sinkhorn",), {"dtype": _FLOATS}),
    "hc_post": (("fused_mhc_post",), {"dtype": _FLOATS}),
    "hc_post_pre": (("fused_mhc_post", "hc_split_sinkhorn"), {"dtype": _FLOATS}),
    "rope": (("apply_rotary",), {"dtype": _FLOATS}),
    "rms_norm_rope": (("apply_rotary",), {"dtype": _FLOATS}),
}
_MODULES = {
    "moe_gate": "gating",
    "moe_experts": "experts",
    "fp8_gemm": "gemm",
    "act_quant_gemm": "gemm",
    "kv_compress": "compressor",
    "sparse_attention": "attention",
    "hc_pre": "mhc",
    "hc_post": "mhc",
    "hc_post_pre": "mhc",
    "rope": "rope",
    "rms_norm_rope": "rope",
}


def _needs_tmo(op: str, functions: tuple[str, ...]):
    """A ``supports`` predicate: tmo usable, pinned, and the op's device check passing (FP8 for
    fp8_gemm and act_quant_gemm, fp32 rotary for rope and rms_norm_rope: :data:`.probe.DEVICE_CHECKS`)."""

    def supports(ctx: PlanContext) -> str | None:
        from . import probe, tmo

        usable, why = probe.tmo_status()
        if not usable:
            return why
        if op in probe.DEVICE_CHECKS:
            return probe.DEVICE_CHECKS[op]()
        lacking = [f for f in functions if tmo.lacks(f)]
        if len(lacking) == len(functions):
            return f"torch_mlu_ops {tmo.version()} has none of {list(functions)}"
        return None

    return supports


def _weight_conversions(chip: str | None) -> dict[str, str]:
    """FP8 linears are dequantised to bf16 at load when tmo's FP8 ``scaled_matmul`` is not usable
    here (probe failed, tmo absent or unpinned): plain bf16 matmuls beat the portable FP8 GEMM.
    wo_a always is (no FP8-weight grouped linear on the MLU): the portable ``grouped_linear``'s
    batched bf16 matmul reads it, as the model's own einsum did before the op existed."""
    from . import probe

    conversions = {"grouped_linear": "bfloat16"}
    if probe.fp8_gemm_works() is not None:
        conversions["fp8_gemm"] = "bfloat16"
    return conversions


def _probe():
    from .probe import probe

    return probe()


def register() -> None:
    """Entry point ``seahal.backends: cambricon``."""
    from .probe import CHIPS

    register_backend(
        "cambricon",
        device_type="mlu",
        probe=_probe,
        aliases=("mlu",),
        description="Cambricon MLU through torch_mlu + torch_mlu_ops",
        collective_backend="cncl",
        verified_with={"torch-mlu": "API only, no hardware", "torch-mlu-ops": "signature table 1.6, 1.12 (no hardware)"},
        verified_on_hardware=False,
        priority=20,
        weight_conversions=_weight_conversions,
    )
    for op, (functions, capabilities) in KERNELS.items():
        register_kernel(
            op, "cambricon", "tmo", f"seahal.backends.cambricon.{_MODULES[op]}:{op}", priority=10,
            capabilities={"chip": CHIPS, **capabilities}, supports=_needs_tmo(op, functions),
        )
