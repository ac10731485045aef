"""The onnxruntime backend: every HAL op run by onnxruntime as its ``seahal`` ONNX function.

This is the path for vendors that ship an onnxruntime execution provider: each op is a one-node
model whose node ``seahal::<op>`` carries its ONNX function (:mod:`seahal.onnx.functions`); an
execution provider that implements the node runs it, otherwise ORT inlines the body of standard
ops. The provider follows the tensors' device (CPU here; CUDA, CANN when present) or
``$SEAHAL_ORT_PROVIDERS``.

The backend serves ``cpu`` tensors like the cpu backend but never replaces it: it is *opt-in*
(its kernels enter only plans made for it) and ranks below cpu for ``device="auto"``, so
``device="cpu"`` and ``"auto"`` keep the cpu backend, while ``device="onnxruntime"`` (or
``"ort"``) binds every op to onnxruntime. ``SEAHAL_OPS="sparse_attention=onnxruntime"`` runs a
single op through onnxruntime inside a cpu plan.
"""

from __future__ import annotations

import importlib.util

from seahal.hal import Availability, register_backend, register_kernel
from seahal.hal.spec import specs

BACKEND = "onnxruntime"
KERNEL_PRIORITY = 20
"""Above every cpu kernel (reference 0, native 10): in plans for this backend onnxruntime runs
every op. Plans for other backends never see these kernels (the backend is opt-in)."""

_FLOATS = ("bfloat16", "float32", "float64")
_SCALES = ("float32", "float8_e8m0fnu")
CAPABILITIES = {
    "fp8_act_quant": {"dtype": _FLOATS, "scale_fmt": ("ue8m0", "fp32")},
    "fp4_quant": {"dtype": _FLOATS},
    "hadamard_rotate": {"dtype": _FLOATS},
    "index_key_pack": {"dtype": _FLOATS, "key_format": ("fp4", "fp8")},
    "index_key_store": {"dtype": _FLOATS, "key_format": ("fp4", "fp8")},
    "kv_cache_pack": {"dtype": ("bfloat16", "float32")},
    "kv_cache_store": {"dtype": ("bfloat16", "float32")},
    "fp8_gemm": {"out_dtype": ("bfloat16", "float32"), "scale_dtype": _SCALES},
    "fp4_gemm": {"out_dtype": ("bfloat16", "float32"), "scale_dtype": _SCALES},
    "act_quant_gemm": {
        "dtype": _FLOATS, "weight_format": ("fp8", "fp4"), "out_dtype": ("bfloat16", "float32"), "scale_dtype": _SCALES,
    },
    "moe_gate": {"score_func": ("sqrtsoftplus", "sigmoid", "softmax"), "routing": ("score", "hash", "group-limited")},
    "moe_experts": {"dtype": _FLOATS, "weight_format": ("dense", "fp8", "fp4")},
    "kv_compress": {"overlap": (True, False), "out_dtype": _FLOATS},
    "kv_compress_fp8": {"overlap": (True, False), "format": ("e4m3+bf16 rope",)},
    "kv_compress_store": {"overlap": (True, False), "format": ("e4m3+bf16 rope",)},
    "indexer_topk": {"dtype": _FLOATS},
    "indexer_topk_packed": {"dtype": _FLOATS, "key_format": ("fp4", "fp8")},
    "sparse_attention": {"dtype": _FLOATS, "kv_format": ("dense",)},
    "sparse_attention_fp8": {"dtype": _FLOATS, "kv_format": ("fp8",)},
    "hc_pre": {"dtype": _FLOATS},
    "hc_post": {"dtype": _FLOATS},
    "hc_post_pre": {"dtype": _FLOATS},
    "hc_head": {"dtype": _FLOATS},
    "rope": {"dtype": _FLOATS},
    "rms_norm_rope": {"dtype": _FLOATS},
    "rms_norm": {"dtype": _FLOATS},
    "fp32_linear": {"dtype": _FLOATS, "weight_dtype": _FLOATS},
    "grouped_linear": {"dtype": _FLOATS, "weight_format": ("dense", "fp8"), "scale_dtype": _SCALES},
}
"""Declared capabilities per op (math is fp32 throughout; fp64 inputs are accepted and computed in fp32)."""


def probe() -> Availability:
    """Available when onnxruntime, onnx and onnxscript import; says which providers ORT has."""
    missing = [name for name in ("onnxruntime", "onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:
        return Availability(False, f"{', '.join(missing)} not installed (pip install onnxruntime onnx onnxscript)")
    import onnxruntime

    found = ", ".join(onnxruntime.get_available_providers())
    return Availability(True, f"onnxruntime {onnxruntime.__version__}, providers: {found}")


DEVICE_POSITION = {"kv_compress", "kv_compress_fp8", "kv_compress_store", "indexer_topk", "indexer_topk_packed"}
"""Ops whose ONNX function takes start_pos as a graph input, scalar or per sequence ([B]): the
session reads a tensor position itself, seahal never does."""


def register() -> None:
    """Entry point ``seahal.backends: onnxruntime``."""
    register_backend(
        BACKEND,
        device_type="cpu",
        probe=probe,
        aliases=("ort",),
        description="every op as an ONNX function run by onnxruntime (execution provider by device)",
        verified_with={"onnxruntime": "1.32.0", "onnxscript": "0.7.2", "onnx": "1.23.2"},
        priority=-10,  # device="auto" never prefers it to the cpu backend (0)
        opt_in=True,  # its kernels serve only plans for this backend: cpu plans stay cpu's
    )
    for op in specs():
        register_kernel(
            op,
            BACKEND,
            "function",
            f"seahal.backends.onnxruntime.kernels:{op}",
            priority=KERNEL_PRIORITY,
            capabilities=CAPABILITIES.get(op, {}),
            device_position=op in DEVICE_POSITION,
        )
