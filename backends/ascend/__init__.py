"""The Ascend backend: Huawei NPUs through ``torch_npu`` (``pip install seahal[ascend]``).

Vendor operators of ``torch_npu`` itself (no vllm-ascend build) serve the ops they match; every
other op runs on the portable CPU reference kernels, which are device-resident torch and run on
``npu`` tensors as they are. The chip family comes from ``torch_npu.npu.get_soc_version()``
(``chips.py``). Not verified on hardware: no Ascend chip is reachable where seahal is developed;
the tests run these kernels on a test emulation of torch_npu and check every vendor call against
the torch-npu 2.14 wheel's schemas and meta rules (docs/backends/ascend.md).
"""

from __future__ import annotations

import importlib.util
import re

from seahal.hal import Availability, emulated_placement, register_backend, register_kernel

from .chips import FAMILIES, FP8_GEMM_CHIPS, chips_with, family, weight_conversions

MIN_TORCH_NPU = (2, 13)
"""Hash routing in ``npu_moe_gating_top_k`` and ``sinks`` in ``npu_sparse_flash_attention``."""

_SCORE_GATING = ("sigmoid", "softmax")


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:2])


def _probe() -> Availability:
    if importlib.util.find_spec("torch_npu") is None:
        return Availability(False, "torch_npu is not installed: pip install seahal[ascend] (needs the CANN toolkit)")
    try:
        import torch_npu  # registers torch.npu
    except Exception as exc:  # torch_npu without CANN fails at import (libhccl.so not found)
        return Availability(False, f"torch_npu failed to import: {exc} (is the CANN toolkit installed and sourced?)")
    version = str(getattr(torch_npu, "__version__", "unknown"))
    if _version(version) < MIN_TORCH_NPU:
        need = ".".join(map(str, MIN_TORCH_NPU))
        return Availability(
            False,
            f"torch_npu {version} is older than {need}, which the Ascend kernels need (hash routing in "
            "npu_moe_gating_top_k, sinks in npu_sparse_flash_attention)",
        )
    if not torch_npu.npu.is_available() or torch_npu.npu.device_count() == 0:
        return Availability(False, "torch_npu is installed but no NPU is visible (driver, ASCEND_RT_VISIBLE_DEVICES?)")
    soc = torch_npu.npu.get_soc_version()
    found = family(soc)
    if found is None:
        names = ", ".join(f"{f.name} {f.soc_versions.start}-{f.soc_versions.stop - 1}" for f in FAMILIES)
        return Availability(False, f"SoC version {soc} is not a chip the Ascend backend knows ({names})")
    placement = emulated_placement(torch_npu)
    reason = f"torch_npu {version}, {torch_npu.npu.device_count()} NPU(s), {found.name} (SoC {soc})"
    if placement:
        reason = f"TEST EMULATION of torch_npu on {placement} tensors, not an NPU: {reason}"
    return Availability(True, reason, chip=found.chip, emulated_on=placement)


def _explicit(key: str, allowed: tuple[str, ...], why: str):
    """A ``supports`` predicate for a kernel that serves part of its op's contract: the plan must
    ask for it with ``requirements={key: one of allowed}`` (a model plan that says nothing gets the
    portable kernel, which serves the whole contract)."""

    def supports(ctx) -> str | None:
        value = ctx.requirements.get(key)
        if value in allowed:
            return None
        asked = f"{key}={value!r}" if value is not None else f"no {key} requirement"
        return f"{why}; serves {key} in {list(allowed)} when asked for explicitly ({asked})"

    return supports


def register() -> None:
    """Entry point ``seahal.backends: ascend``."""
    register_backend(
        "ascend",
        device_type="npu",
        probe=_probe,
        aliases=("npu",),
        description="Huawei Ascend through torch_npu",
        collective_backend="hccl",
        verified_with={"torch-npu": "2.14.0 (schemas and meta rules of the wheel; no hardware)"},
        verified_on_hardware=False,
        priority=20,
        weight_conversions=weight_conversions,
    )
    # "module:qualname" strings: registering imports neither torch_npu nor the kernel modules.
    register_kernel(
        "moe_gate", "ascend", "torch_npu", "seahal.backends.ascend.moe:moe_gate", priority=10,
        capabilities={"dtype": ("bfloat16", "float32"), "score_func": _SCORE_GATING,
                      "routing": ("score", "group-limited", "hash")},
        supports=_explicit(
            "score_func", _SCORE_GATING, "npu_moe_gating_top_k documents only norm_type 0 (softmax) and 1 (sigmoid)"
        ),
    )
    register_kernel(
        "moe_experts", "ascend", "torch_npu", "seahal.backends.ascend.moe:moe_experts", priority=10,
        capabilities={"dtype": ("bfloat16",), "weight_format": ("dense",)},
    )
    register_kernel(
        "sparse_attention", "ascend", "torch_npu", "seahal.backends.ascend.attention:sparse_attention", priority=10,
        capabilities={"dtype": ("bfloat16",), "kv_format": ("dense",)},
    )
    register_kernel(
        "indexer_topk", "ascend", "torch_npu", "seahal.backends.ascend.attention:indexer_topk", priority=10,
        capabilities={"dtype": ("bfloat16",), "head_dim": (128,)},
    )
    register_kernel(
        "fp8_gemm", "ascend", "torch_npu", "seahal.backends.ascend.gemm:fp8_gemm", priority=10,
        capabilities={"chip": FP8_GEMM_CHIPS, "out_dtype": ("bfloat16", "float32"),
                      "scale_dtype": ("float32", "float8_e8m0fnu")},
    )
    register_kernel(
        "act_quant_gemm", "ascend", "torch_npu", "seahal.backends.ascend.gemm:act_quant_gemm", priority=10,
        capabilities={"chip": FP8_GEMM_CHIPS, "dtype": ("bfloat16", "float32"), "weight_format": ("fp8",),
                      "out_dtype": ("bfloat16", "float32"), "scale_dtype": ("float32", "float8_e8m0fnu")},
    )
    register_kernel(
        "fp8_act_quant", "ascend", "torch_npu", "seahal.backends.ascend.quant:fp8_act_quant", priority=10,
        capabilities={"chip": chips_with("fp8_block_quant"), "dtype": ("bfloat16",), "scale_fmt": ("fp32",)},
        supports=_explicit(
            "scale_fmt", ("fp32",), "npu_dynamic_block_quant returns amax/448 scales, not V4's power-of-two (ue8m0) ones"
        ),
    )
    mhc = {"chip": chips_with("mhc"), "dtype": ("bfloat16",)}
    for op in ("hc_pre", "hc_post", "hc_post_pre", "hc_head"):
        register_kernel(op, "ascend", "torch_npu", f"seahal.backends.ascend.mhc:{op}", priority=10, capabilities=mhc)
    rotary = {"chip": chips_with("rotary_mul_interleave"), "dtype": ("bfloat16", "float32")}
    for op in ("rope", "rms_norm_rope"):
        register_kernel(op, "ascend", "torch_npu", f"seahal.backends.ascend.rope:{op}", priority=10, capabilities=rotary)
