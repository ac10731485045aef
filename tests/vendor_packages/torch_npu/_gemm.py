"""Block-scaled quantised GEMM: npu_quant_matmul (emulated: DeepSeek G-B mode, Ascend 950 only)."""

from __future__ import annotations

import torch

from ._emulation import check, on_device, soc_family

_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
_OUTPUT = (torch.bfloat16, torch.float16, torch.float32)


def npu_quant_matmul(
    x1, x2, scale, *, offset=None, pertoken_scale=None, bias=None, output_dtype=None, x1_dtype=None, x2_dtype=None,
    pertoken_scale_dtype=None, scale_dtype=None, group_sizes=None, y_scale=None,
):
    """``y = (x1 * pertoken_scale) @ (x2 * scale)`` with group_sizes [1, 128, 128]: x1 [M, K] FP8,
    pertoken_scale [M, ceil(K/128)] fp32 (1x128 groups), x2 [K, N] FP8, scale
    [ceil(K/128), ceil(N/128)] fp32 (128x128 blocks) -> [M, N] output_dtype, fp32 accumulation.

    FP8 inputs and the G-B mode are Ascend 950 additions (CANN aclnnQuantMatmulV5); other chips
    reject them. Only this mode is emulated.
    """
    for name, t in (("x1", x1), ("x2", x2), ("scale", scale), ("pertoken_scale", pertoken_scale)):
        on_device(name, t)
    check(x1.dtype in _FP8 and x2.dtype in _FP8, f"x1/x2 must be float8 in this mode, got {x1.dtype}/{x2.dtype}")
    check(soc_family() == "A5", f"FLOAT8 inputs are only supported on Ascend 950, this is {soc_family()}")
    check(group_sizes is not None and list(group_sizes) == [1, 128, 128], f"only group_sizes=[1, 128, 128] is emulated, got {group_sizes}")
    check(x1.dim() == 2 and x2.dim() == 2 and x1.shape[1] == x2.shape[0], f"x1 must be [M, K], x2 [K, N], got {list(x1.shape)} and {list(x2.shape)}")
    check(offset is None and bias is None and y_scale is None, "offset, bias and y_scale are not supported with group_sizes")
    m, k = x1.shape
    n = x2.shape[1]
    kb, nb = -(-k // 128), -(-n // 128)
    check(pertoken_scale is not None and tuple(pertoken_scale.shape) == (m, kb) and pertoken_scale.dtype == torch.float32,
          f"pertoken_scale must be [M={m}, ceil(K/128)={kb}] float32")
    check(tuple(scale.shape) == (kb, nb) and scale.dtype == torch.float32, f"scale must be [ceil(K/128)={kb}, ceil(N/128)={nb}] float32")
    dtype = output_dtype if output_dtype is not None else torch.bfloat16
    check(dtype in _OUTPUT, f"output_dtype must be bfloat16, float16 or float32, got {dtype}")
    a = x1.float() * pertoken_scale.repeat_interleave(128, 1)[:, :k]
    b = x2.float() * scale.repeat_interleave(128, 0)[:k].repeat_interleave(128, 1)[:, :n]
    out = torch.zeros(m, n)
    for k0 in range(0, k, 128):  # fp32 partial sums per K group, as the HAL contract accumulates
        out += a[:, k0 : k0 + 128] @ b[k0 : k0 + 128]
    return out.to(dtype)
