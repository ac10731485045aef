"""The onnxruntime backend's kernels: every HAL op, run as its ``seahal`` ONNX function.

Each kernel takes the op's arguments as its contract names them and hands them, by name, to
:func:`seahal.backends.onnxruntime.session.run`. An op with no outputs of its own that only
mutates arguments (kv_cache_store, index_key_store: its function returns the new cache or store,
which ``run`` copies into that argument; kv_compress_store: the new kv_state, score_state and
store) returns None, as its schema's ``-> ()`` says.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from seahal.hal.spec import get_spec

from .session import run


def _kernel(op: str) -> Callable[..., Any]:
    signature = inspect.signature(get_spec(op).contract)

    def kernel(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        result = run(op, bound.arguments)
        return None if isinstance(result, tuple) and not result else result

    kernel.__name__ = kernel.__qualname__ = op
    kernel.__signature__ = signature
    kernel.__doc__ = f"{op} through onnxruntime (ONNX function seahal::{op}; see seahal.onnx.functions)."
    return kernel


fp8_act_quant = _kernel("fp8_act_quant")
fp4_quant = _kernel("fp4_quant")
hadamard_rotate = _kernel("hadamard_rotate")
index_key_pack = _kernel("index_key_pack")
index_key_store = _kernel("index_key_store")
kv_cache_pack = _kernel("kv_cache_pack")
kv_cache_store = _kernel("kv_cache_store")
kv_cache_unpack = _kernel("kv_cache_unpack")
fp8_gemm = _kernel("fp8_gemm")
fp4_gemm = _kernel("fp4_gemm")
act_quant_gemm = _kernel("act_quant_gemm")
moe_gate = _kernel("moe_gate")
moe_experts = _kernel("moe_experts")
kv_compress = _kernel("kv_compress")
kv_compress_fp8 = _kernel("kv_compress_fp8")
kv_compress_store = _kernel("kv_compress_store")
indexer_topk = _kernel("indexer_topk")
indexer_topk_packed = _kernel("indexer_topk_packed")
sparse_attention = _kernel("sparse_attention")
sparse_attention_fp8 = _kernel("sparse_attention_fp8")
hc_pre = _kernel("hc_pre")
hc_post = _kernel("hc_post")
hc_post_pre = _kernel("hc_post_pre")
hc_head = _kernel("hc_head")
rope = _kernel("rope")
rms_norm_rope = _kernel("rms_norm_rope")
rms_norm = _kernel("rms_norm")
fp32_linear = _kernel("fp32_linear")
grouped_linear = _kernel("grouped_linear")
