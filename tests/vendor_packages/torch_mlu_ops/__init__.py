"""TEST EMULATION of ``torch_mlu_ops`` (Cambricon's fused LLM operators), for seahal's tests.

Only the functions seahal's Cambricon backend calls, written from Cambricon's documentation as
published with vllm-mlu (``vllm_mlu/_mlu_ops.py`` docstrings and call sites @b9925203) and the
Torch-MLU-Ops manual v1.3.2: the documented parameter names and order, the layouts and dtypes,
and the documented limitations, which raise ``RuntimeError`` as tmo's ``TORCH_CHECK`` does.
Behaviour the documentation leaves open raises ``NotImplementedError`` saying so, rather than
guessing. Tensors stay on the CPU (``__seahal_emulated_on__``); every call is recorded in
``_emulation.CALLS`` for the signature-table test.
"""

from __future__ import annotations

import sys

import torch_mlu  # noqa: F401  (tmo requires torch_mlu; the emulations are imported together)

from . import _emulation
from .attention import single_query_cached_kv_attn
from .compressor import fused_compress_multi_kv
from .gating import moe_sigmoid_topk, moe_softmax_topk, moe_softplus_topk
from .gemm import scaled_matmul
from .mhc import fused_mhc_post, hc_split_sinkhorn
from .moe import group_gemm, moe_combine_result, moe_expand_input, moe_gen_idx
from .rope import apply_rotary

__version__ = "1.12.1+torch2.7.1"
__seahal_emulated_on__ = "cpu"

__all__ = [
    "apply_rotary",
    "fused_compress_multi_kv",
    "fused_mhc_post",
    "group_gemm",
    "hc_split_sinkhorn",
    "moe_combine_result",
    "moe_expand_input",
    "moe_gen_idx",
    "moe_sigmoid_topk",
    "moe_softmax_topk",
    "moe_softplus_topk",
    "scaled_matmul",
    "single_query_cached_kv_attn",
]

_emulation.bind(sys.modules[__name__])
