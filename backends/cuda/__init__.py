"""The CUDA backend: Triton kernels for NVIDIA GPUs (``pip install seahal[cuda]``)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re

import torch

from seahal.hal import Availability, PlanContext, register_backend, register_kernel

_SM90 = ("sm90",)
_FLOAT = ("bfloat16", "float32")
_SCALES = ("float32", "float8_e8m0fnu")
_QUANT = {"chip": _SM90, "dtype": ("bfloat16", "float16", "float32", "float64"), "scale_fmt": ("ue8m0", "fp32")}

# op -> (module:function, capabilities, verified on a GPU). Capabilities are data: plans match a
# model's requirements against them and docs/support-matrix.md is generated from them. Every kernel
# marked True was verified on an H100 at 14a3a20 (2026-11-27, docs/measurements/2026-11-27-h100:
# full-shape conformance 280 passed, 0 failed; the GPU tests 221 passed, 0 failed; every bench row
# checked against the reference). A kernel changed since goes back to False until a GPU run passes
# it again. Since that run, without a GPU: moe_experts' FP4 default launch from two tokens takes
# the 64-column tiles that run measured fastest (its bench variants "16x64 tiles, 4 warps" and
# "64x64 tiles, 4 warps", which ran there, checked against the reference; the kernel code is
# unchanged). New since that run: grouped_linear (the FP8 wo_a GEMV), interpreter-verified only.
# Changed since: the weights-first FP4 decode of moe_experts and fp4_gemm, and the FP4 index keys
# of indexer_topk_packed, read 4-byte-aligned codes as words (_e2m1.e2m1_bf16_words; compiled for
# sm_90 and interpreter-verified, not yet run on a GPU). fp8_act_quant's kernel gained a ROUND_TRIP
# constexpr for moe_experts' round-trip variant; its own launches compile to the same sm_90 SASS as
# before (compared instruction by instruction), so it stays verified. Changed since: every kernel
# that counts arrivals (the split-K tail of fp8_gemm's Triton kernel, the compressor's channel
# blocks, the mHC mix) resets its counter with a relaxed exchange (_gemm.reset_arrival_counter),
# and hc_pre / hc_head's last program loads all its partial sums and parameters at once: the same
# arithmetic, a different memory ordering, which only a GPU can check. New since: rms_norm_rope's
# one pass (rope's kernel with its NORM constexpr; rope's own launches compile to the same sm_90
# PTX as before, compared instruction by instruction, so rope stays verified). New since:
# act_quant_gemm, fp8_gemm's kernel quantising x's blocks as it loads them (QUANT_A). Changed since:
# hc_pre / hc_head normalise their collapse with norm_weight (the mix kernel's NORM constexpr).
# Changed since: moe_gate's logits over an fp32 W (the model's gate) above 4 tokens take W's three
# exact bf16 parts on the tensor cores (SPLIT_W) instead of an IEEE fp32 dot on the CUDA cores.
# Changed since: sparse_attention and sparse_attention_fp8 rotate their output back when given
# positions (OUT_ROPE); their unrotated launches compile to the same sm_90 SASS as before (compared
# instruction by instruction, constant-bank offsets aside), and serve as cuda.triton_unfused with
# rope's kernel after them. Changed since: hc_post adds the sub-layer output's two parts as it reads
# f (ADDEND); its plain launches compile to the same SASS as before and serve as cuda.triton_unfused
# after torch's add.
# New since: kv_cache_store, kv_cache_pack's kernel storing each record at its cache row (a slot
# pointer); kv_cache_pack's own launches compile to the same sm_90 SASS as before (compared
# instruction by instruction), so it stays verified, and serves as cuda.triton_unfused before torch's
# scatter; kv_cache_store's kernel also normalises and rotates the vectors when given positions
# (NORM_ROPE). New since: index_key_store, index_key_pack's kernel storing likewise (its plain
# launches the same sm_90 SASS as before, so index_key_pack stays verified). Changed since:
# hadamard_rotate rotates the RoPE columns of each K step first when given positions; its plain
# launches compile to the same sm_90 SASS as before and serve, after rope's kernel, as
# cuda.triton_unfused. New since: hc_post_pre, hc_pre's mix kernel making the streams it mixes
# (POST); hc_pre being unverified too, it has no unfused form: GPU plans run the reference until
# a GPU run passes both. New since: kv_compress_store, kv_compress_fp8's launch storing each record at
# its slot's row (STORE); kv_compress_fp8 being unverified too, it has no unfused form either.
# Changed since: indexer_topk and indexer_topk_packed's kernels scale the head weights as they load
# them (weights_scale) and offset the picks as they store them (offset); no unfused form.
KERNELS: dict[str, tuple[str, dict[str, tuple], bool]] = {
    "fp8_act_quant": ("quant:fp8_act_quant", _QUANT, True),
    "fp4_quant": ("quant:fp4_quant", _QUANT, True),
    "kv_cache_pack": ("quant:kv_cache_pack", {"chip": _SM90, "dtype": ("bfloat16", "float16", "float32")}, True),
    "kv_cache_store": (  # kv_cache_pack's kernel storing each record at its slot's row (not yet run on a GPU)
        "quant:kv_cache_store", {"chip": _SM90, "dtype": ("bfloat16", "float16", "float32")}, False
    ),
    "kv_cache_unpack": ("kv_unpack:kv_cache_unpack", {"chip": _SM90}, True),
    "hadamard_rotate": ("quant:hadamard_rotate", {"chip": _SM90, "dtype": _FLOAT}, False),  # RoPE first: not yet run
    "index_key_pack": (
        "quant:index_key_pack", {"chip": _SM90, "dtype": ("bfloat16", "float32"), "key_format": ("fp4", "fp8")}, True
    ),
    "index_key_store": (  # index_key_pack's kernel storing each record at its slot's row (not yet run on a GPU)
        "quant:index_key_store", {"chip": _SM90, "dtype": ("bfloat16", "float32"), "key_format": ("fp4", "fp8")}, False
    ),
    "hc_post": ("mhc:hc_post", {"chip": _SM90, "dtype": _FLOAT}, False),
    "hc_post_pre": ("mhc:hc_post_pre", {"chip": _SM90, "dtype": _FLOAT}, False),  # hc_pre's launches: not yet run
    "rope": ("rope:rope", {"chip": _SM90, "dtype": _FLOAT}, True),
    "rms_norm": ("norm:rms_norm", {"chip": _SM90, "dtype": _FLOAT}, True),
    "rms_norm_rope": ("rope:rms_norm_rope", {"chip": _SM90, "dtype": _FLOAT}, False),  # rope's kernel, NORM
    "kv_compress": ("compressor:kv_compress", {"chip": _SM90, "out_dtype": _FLOAT}, False),
    "kv_compress_fp8": (  # the same launch, the bf16 entry packed into the FP8 record in registers
        "compressor:kv_compress_fp8", {"chip": _SM90, "format": ("e4m3+bf16 rope",)}, False
    ),
    "kv_compress_store": (  # the same launch, each record stored at its slot's row (not yet run on a GPU)
        "compressor:kv_compress_store", {"chip": _SM90, "format": ("e4m3+bf16 rope",)}, False
    ),
    "hc_pre": ("mhc:hc_pre", {"chip": _SM90, "dtype": _FLOAT}, False),
    "hc_head": ("mhc:hc_head", {"chip": _SM90, "dtype": _FLOAT}, False),
    "fp8_gemm": ("fp8_gemm:fp8_gemm", {"chip": _SM90, "out_dtype": _FLOAT, "scale_dtype": _SCALES}, False),
    "fp4_gemm": ("fp4_gemm:fp4_gemm", {"chip": _SM90, "out_dtype": _FLOAT, "scale_dtype": _SCALES}, False),
    "act_quant_gemm": (  # FP8 weights at <= 16 rows: fp8_gemm's kernel quantising x (QUANT_A); else two launches
        "fp8_gemm:act_quant_gemm",
        {
            "chip": _SM90, "dtype": ("bfloat16", "float16", "float32", "float64"), "weight_format": ("fp8", "fp4"),
            "out_dtype": _FLOAT, "scale_dtype": _SCALES,
        },
        False,
    ),
    "moe_gate": (  # fp32 math, top_k <= 8; group-limited routing stays on the reference
        "moe_gate:moe_gate",
        {
            "chip": _SM90,
            "dtype": _FLOAT,
            "score_func": ("sqrtsoftplus", "sigmoid", "softmax"),
            "routing": ("score", "hash"),
        },
        False,
    ),
    "fp32_linear": ("linear:fp32_linear", {"chip": _SM90, "dtype": _FLOAT, "weight_dtype": _FLOAT}, True),
    "grouped_linear": (  # the FP8 GEMV at decode (new since 14a3a20: not yet run on a GPU)
        "linear:grouped_linear",
        {"chip": _SM90, "dtype": _FLOAT, "weight_format": ("dense", "fp8"), "scale_dtype": _SCALES},
        False,
    ),
    # One Triton kernel serves both: dense kv rows, or the 584-byte FP8 records decoded in registers.
    "sparse_attention": (
        "sparse_attention:sparse_attention", {"chip": _SM90, "dtype": _FLOAT, "kv_format": ("dense",)}, False
    ),
    "sparse_attention_fp8": (
        "sparse_attention:sparse_attention_fp8", {"chip": _SM90, "dtype": _FLOAT, "kv_format": ("fp8",)}, False
    ),
    "moe_experts": (
        "moe_experts:moe_experts",
        {"chip": _SM90, "dtype": _FLOAT, "weight_format": ("dense", "fp8", "fp4"), "scale_dtype": _SCALES},
        False,
    ),
    "indexer_topk": ("indexer:indexer_topk", {"chip": _SM90, "dtype": _FLOAT}, False),
    "indexer_topk_packed": (  # the same scores kernel, FP4 / FP8 key records decoded in registers
        "indexer:indexer_topk_packed", {"chip": _SM90, "dtype": _FLOAT, "key_format": ("fp4", "fp8")}, False
    ),
}

UNFUSED_KERNELS: dict[str, str] = {
    "rms_norm_rope": "rope:rms_norm_then_rope",
    "sparse_attention": "sparse_attention:sparse_attention_then_rope",
    "sparse_attention_fp8": "sparse_attention:sparse_attention_fp8_then_rope",
    "hc_post": "mhc:hc_post_after_the_add",
    "kv_cache_store": "quant:kv_cache_pack_then_scatter",
    "index_key_store": "quant:index_key_pack_then_scatter",
    "hadamard_rotate": "quant:rope_then_hadamard_rotate",
}
"""Fused ops as the verified kernels of their parts in turn (kernel ``triton_unfused``, below the
one-pass kernel, with its capabilities): what a GPU plan runs while the one-pass kernel awaits its
GPU run, one launch more, instead of the portable reference."""

DEVICE_POSITION = {"kv_compress", "kv_compress_fp8", "kv_compress_store", "indexer_topk", "indexer_topk_packed"}
"""Kernels that load a tensor ``start_pos`` in the kernel (never on the host): decode steps through
them can be captured in a CUDA graph (``seahal.model.decode_graph``)."""

UNVERIFIED_VARIABLE = "SEAHAL_CUDA_UNVERIFIED"
"""Set to 1 to let plans on a GPU use kernels not yet run on one (see :func:`_verified_or_opted_in`)."""


def _verified_or_opted_in(ctx: PlanContext) -> str | None:
    """Kernels verified only under the Triton interpreter serve GPU plans only on request: they
    have passed the conformance suite on CPU tensors and compile for sm_90, but have not run on a
    GPU in their present form. Under the interpreter (``chip`` None) they always serve."""
    if ctx.chip is None or os.environ.get(UNVERIFIED_VARIABLE) == "1":
        return None
    return f"not yet run on a GPU (interpreter-verified); {UNVERIFIED_VARIABLE}=1 enables it"


WEIGHT_READERS = {"grouped_linear": "bfloat16"}
"""Ops whose quantised weights would otherwise be dequantised at load, and to what: wo_a's
``grouped_linear``, whose FP8 kernel is new. Until it serves the plan (verified on a GPU, or
:data:`UNVERIFIED_VARIABLE` set) the plan converts wo_a at load as before the op existed, so that
its portable fallback runs the einsum over a bf16 wo_a instead of dequantising on every call."""


def _weight_conversions(chip: str | None) -> dict[str, str]:
    """The :data:`WEIGHT_READERS` conversions of the ops whose kernel does not serve ``chip``."""
    unserved = _verified_or_opted_in(PlanContext("cuda", chip, {})) is not None
    return {op: dtype for op, dtype in WEIGHT_READERS.items() if unserved and not KERNELS[op][2]}


MIN_TRITON = "3.4"
"""The oldest Triton the kernels run on (``triton.knobs``, Gluon); torch 2.8 is the first whose
pinned Triton it is: an older torch installs an older Triton, and the backend says so."""


def triton_too_old() -> str | None:
    """Why the installed Triton cannot run the kernels (older than :data:`MIN_TRITON`), else None.
    Reads the installed version without importing triton."""
    version = importlib.metadata.version("triton")
    release = tuple(int(part) for part in re.findall(r"\d+", version)[:2])
    if release >= tuple(int(part) for part in MIN_TRITON.split(".")):
        return None
    return (f"triton {version} is older than the kernels need (>= {MIN_TRITON}, the Triton of torch >= 2.8): "
            f"pip install 'triton>={MIN_TRITON}'")


def _probe() -> Availability:
    if importlib.util.find_spec("triton") is None:
        return Availability(False, "triton is not installed: pip install seahal[cuda]")
    if too_old := triton_too_old():
        return Availability(False, too_old)
    if not torch.cuda.is_available():
        why = "torch was built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        return Availability(False, f"{why} (torch {torch.__version__})")
    major, minor = torch.cuda.get_device_capability()
    return Availability(True, torch.cuda.get_device_name(), chip=f"sm{major}{minor}")


def register() -> None:
    """Entry point ``seahal.backends: cuda``."""
    register_backend(
        "cuda",
        device_type="cuda",
        probe=_probe,
        description="Triton kernels for NVIDIA GPUs",
        collective_backend="nccl",
        verified_with={"torch": "2.11.0+cu130", "triton": "3.6.0"},
        priority=30,
        weight_conversions=_weight_conversions,
    )
    # "module:qualname" strings: importing the backend never imports triton.
    for op, (function, capabilities, gpu_verified) in KERNELS.items():
        register_kernel(
            op, "cuda", "triton", f"seahal.backends.cuda.{function}", priority=10, capabilities=capabilities,
            supports=None if gpu_verified else _verified_or_opted_in, device_position=op in DEVICE_POSITION,
        )
    for op, function in UNFUSED_KERNELS.items():
        register_kernel(
            op, "cuda", "triton_unfused", f"seahal.backends.cuda.{function}", priority=5, capabilities=KERNELS[op][1]
        )
