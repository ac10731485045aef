"""The CPU backend: the reference (pure PyTorch, the spec in code) plus native fast paths.

The reference kernels are *portable*: written device-resident without host synchronisation, they
run on tensors of any device and are every plan's fallback. Native kernels (``seahal._native``,
C++/OpenMP) serve the CPU above them where they exist.
"""

from __future__ import annotations

import torch

from seahal.hal import Availability, register_backend, register_kernel

_REF = "seahal.backends.cpu.reference"

_FLOATS = ("bfloat16", "float32", "float64")
_SCALES = ("float32", "float8_e8m0fnu")

# op -> (module of backends/cpu/reference holding the kernel of the same name, capabilities).
# Capabilities are data: the support matrix is generated from them and plans match requirements
# against them. The reference accepts everything its op's contract accepts.
REFERENCE_KERNELS = {
    "fp8_act_quant": ("quant", {"dtype": _FLOATS, "scale_fmt": ("ue8m0", "fp32")}),
    "fp4_quant": ("quant", {"dtype": _FLOATS, "format": ("e2m1/ue8m0",)}),
    "hadamard_rotate": ("quant", {"dtype": _FLOATS}),
    "index_key_pack": ("quant", {"dtype": _FLOATS, "key_format": ("fp4", "fp8")}),
    "index_key_store": ("quant", {"dtype": _FLOATS, "key_format": ("fp4", "fp8")}),
    "kv_cache_pack": ("quant", {"dtype": ("bfloat16", "float32"), "format": ("e4m3+bf16 rope",)}),
    "kv_cache_store": ("quant", {"dtype": ("bfloat16", "float32"), "format": ("e4m3+bf16 rope",)}),
    "kv_cache_unpack": ("quant", {"format": ("e4m3+bf16 rope",)}),
    "fp8_gemm": ("gemm", {"out_dtype": ("bfloat16", "float32"), "scale_dtype": _SCALES}),
    "fp4_gemm": ("gemm", {"out_dtype": ("bfloat16", "float32"), "scale_dtype": _SCALES}),
    "act_quant_gemm": ("gemm", {
        "dtype": _FLOATS, "weight_format": ("fp8", "fp4"), "out_dtype": ("bfloat16", "float32"), "scale_dtype": _SCALES,
    }),
    "moe_gate": ("moe", {"score_func": ("sqrtsoftplus", "sigmoid", "softmax"), "routing": ("score", "hash", "group-limited")}),
    "moe_experts": ("moe", {"dtype": _FLOATS, "weight_format": ("dense", "fp8", "fp4")}),
    "kv_compress": ("compressor", {"overlap": (True, False), "out_dtype": _FLOATS}),
    "kv_compress_fp8": ("compressor", {"overlap": (True, False), "format": ("e4m3+bf16 rope",)}),
    "kv_compress_store": ("compressor", {"overlap": (True, False), "format": ("e4m3+bf16 rope",)}),
    "indexer_topk": ("indexer", {"dtype": _FLOATS}),
    "indexer_topk_packed": ("indexer", {"dtype": _FLOATS, "key_format": ("fp4", "fp8")}),
    "sparse_attention": ("attention", {"dtype": _FLOATS, "kv_format": ("dense",)}),
    "sparse_attention_fp8": ("attention", {"dtype": _FLOATS, "kv_format": ("fp8",)}),
    "hc_pre": ("mhc", {"dtype": _FLOATS}),
    "hc_post": ("mhc", {"dtype": _FLOATS}),
    "hc_post_pre": ("mhc", {"dtype": _FLOATS}),
    "hc_head": ("mhc", {"dtype": _FLOATS}),
    "rope": ("rope", {"dtype": _FLOATS}),
    "rms_norm_rope": ("rope", {"dtype": _FLOATS}),
    "rms_norm": ("norm", {"dtype": _FLOATS}),
    "fp32_linear": ("linear", {"dtype": _FLOATS, "weight_dtype": _FLOATS}),
    "grouped_linear": ("linear", {"dtype": _FLOATS, "weight_format": ("dense", "fp8"), "scale_dtype": _SCALES}),
}

DEVICE_POSITION = {"kv_compress", "kv_compress_fp8", "kv_compress_store", "indexer_topk", "indexer_topk_packed"}
"""Reference kernels that take ``start_pos`` as a device tensor (0-d or per sequence) and only
compute with it, never reading it on the host: the portable fallback keeps decode capturable."""


def _probe() -> Availability:
    from .native import native_module

    module = native_module()
    kernels = f"native kernels: {module.simd_variant()}" if module is not None else "native kernels not built"
    return Availability(True, f"{torch.get_num_threads()} threads, {kernels}")


def _weight_conversions(chip: str | None) -> dict[str, str]:
    """Without ``seahal._native`` wo_a is dequantised to bf16 at load (the official code's form):
    the reference reads an FP8 weight by dequantising it on every call (208 ms a call for
    V4-Flash's 8192 x 4096 wo_a on 2 cores, against 4.8 ms for the einsum over the bf16 weight).
    The native ``grouped_linear`` reads the FP8 bytes as stored."""
    from .native import native_module

    return {} if native_module() is not None else {"grouped_linear": "bfloat16"}


def register() -> None:
    """Entry point ``seahal.backends: cpu``."""
    register_backend(
        "cpu",
        device_type="cpu",
        probe=_probe,
        description="reference (pure PyTorch) + native C++ fast paths",
        collective_backend="gloo",
        verified_with={"torch": "2.13.0"},
        weight_conversions=_weight_conversions,
    )
    for op, (module, capabilities) in REFERENCE_KERNELS.items():
        register_kernel(
            op, "cpu", "reference", f"{_REF}.{module}:{op}", priority=0, capabilities=capabilities, portable=True,
            device_position=op in DEVICE_POSITION,
        )
    from .native import register_native_kernels

    register_native_kernels()
