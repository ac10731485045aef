"""TEST EMULATION of ``torch_npu`` 2.14 (Huawei Ascend) for seahal's tests. Not the real package.

Each operator keeps the real signature (argument names, keyword-only parameters and defaults of
the 2.14 schema file ``npu_native_functions_by_codegen.yaml``), the documented layouts and dtypes,
and the checks the vendor documents or its meta registrations make, raising ``RuntimeError`` as
the vendor's ``torch._check`` does. The math is written from the vendor documentation
(``torch_npu/_op_plugin_docs.py``) in plain fp32 torch on CPU tensors; it says nothing about the
real kernels' numerics, which only hardware can show.

``__seahal_emulated_on__`` tells seahal's probe that tensors live on the CPU. Installed on
``sys.path`` only by ``tests/vendor_emulation.py``.
"""

from . import _emulation, npu
from ._attention import npu_lightning_indexer, npu_sparse_flash_attention
from ._gemm import npu_quant_matmul
from ._mhc import npu_mhc_post, npu_mhc_pre, npu_mhc_sinkhorn
from ._moe import npu_grouped_matmul, npu_moe_gating_top_k, npu_moe_init_routing_v2, npu_moe_token_unpermute
from ._quant import npu_dynamic_block_quant
from ._rope import npu_rotary_mul

__seahal_emulated_on__ = "cpu"


def __getattr__(name: str):
    if name == "__version__":
        return _emulation.state.version
    raise AttributeError(f"module 'torch_npu' has no attribute {name!r} (not emulated)")


__all__ = [
    "npu",
    "npu_dynamic_block_quant",
    "npu_grouped_matmul",
    "npu_lightning_indexer",
    "npu_mhc_post",
    "npu_mhc_pre",
    "npu_mhc_sinkhorn",
    "npu_moe_gating_top_k",
    "npu_moe_init_routing_v2",
    "npu_moe_token_unpermute",
    "npu_quant_matmul",
    "npu_rotary_mul",
    "npu_sparse_flash_attention",
]
