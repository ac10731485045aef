"""Ascend chip families and what each can do: data, not code paths.

``torch_npu.npu.get_soc_version()`` returns an int; its ranges name the family (vllm-ascend
``vllm_ascend/device/hardware.py``; shared/spec/vendor_apis.md §2.1). FP8 inputs and block-scaled
(G-B) quantised matmul exist only on the Ascend 950 (CANN aclnnQuantMatmulV5, 9.2.0beta1); Atlas A2
(910B) and A3 (910C) compute int8/int4 and floats. The other per-family flags cite the vendor's
"supported products" list of each operator. Where a family has no kernel for a quantised
weight format, the weights are dequantised at load (:func:`weight_conversions`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ChipFamily:
    """One Ascend family: the chip name kernels declare in ``capabilities["chip"]``."""

    chip: str
    name: str
    soc_versions: range
    fp8_block_gemm: bool
    """``npu_quant_matmul(group_sizes=[1, 128, 128])`` with FLOAT8 inputs."""
    fp8_block_quant: bool
    """``npu_dynamic_block_quant`` with FLOAT8 outputs (CANN ops-nn ``quant/dynamic_block_quant``:
    A2/A3 quantise to INT8 only)."""
    mhc: bool
    """``npu_mhc_pre`` / ``npu_mhc_sinkhorn`` / ``npu_mhc_post`` (torch-npu >= 2.10.0.post4, below the
    backend's minimum 2.13; supported products: Ascend 950 only, op-plugin and CANN docs)."""
    rotary_mul_interleave: bool
    """``npu_rotary_mul(rotary_mode="interleave")`` (the 2.14 docstring lists Atlas A2 and A3 only)."""


FAMILIES = (
    ChipFamily("ascend910b", "Atlas A2 (910B)", range(220, 226), fp8_block_gemm=False, fp8_block_quant=False,
               mhc=False, rotary_mul_interleave=True),
    ChipFamily("ascend910c", "Atlas A3 (910C)", range(250, 256), fp8_block_gemm=False, fp8_block_quant=False,
               mhc=False, rotary_mul_interleave=True),
    ChipFamily("ascend950", "Ascend 950 (A5)", range(260, 261), fp8_block_gemm=True, fp8_block_quant=True,
               mhc=True, rotary_mul_interleave=False),
)


def chips_with(feature: str) -> tuple[str, ...]:
    """The ``capabilities["chip"]`` of the families that have ``feature`` (a :class:`ChipFamily` flag)."""
    return tuple(f.chip for f in FAMILIES if getattr(f, feature))


FP8_GEMM_CHIPS = chips_with("fp8_block_gemm")


def family(soc_version: int) -> ChipFamily | None:
    """The family of a ``get_soc_version()`` number, or None (310P and unknown SoCs)."""
    return next((f for f in FAMILIES if soc_version in f.soc_versions), None)


def weight_conversions(chip: str | None) -> dict[str, str]:
    """``{op: dtype}``: quantised weights dequantised at load on ``chip``.

    No family has a grouped FP8/FP4 expert GEMM wired here (MX/G-B ``npu_grouped_matmul`` on 950
    is future work), nor an FP4 GEMM or an FP8-weight grouped linear (wo_a), so those weights
    become bf16 everywhere; FP8 linears stay FP8 where ``npu_quant_matmul`` has the G-B mode (950)
    and become bf16 elsewhere. An int8 W8A8 requantisation would halve the memory of the bf16
    route but needs an int8 GEMM op in the HAL.
    """
    known = next((f for f in FAMILIES if f.chip == chip), None)
    conversions = {"fp4_gemm": "bfloat16", "moe_experts": "bfloat16", "grouped_linear": "bfloat16"}
    if known is None or not known.fp8_block_gemm:
        conversions["fp8_gemm"] = "bfloat16"
    return conversions
