"""``scaled_matmul``: quantised GEMM ``out = (a * a_scale) @ (b * b_scale)^T``.

a [M, K] and b [N, K] int8 or float8_e4m3fn (FP8 only where the chip has it, see
``_emulation.settings["fp8"]``), 8-bit only (``quant_bit_size == a_quant_bit_size == 8``, the
check xLLM's wrapper makes). Scale layouts follow from the shapes, as xLLM's
``scaled_matmul.cpp`` selects them: ``a_scale`` [M] per token or [M, G] group-wise along K;
``b_scale`` [N] per channel, [N, G] group-wise, or [ceil(N/128), K/128] per 128x128 block (fewer
rows than b). All scales float32; fp32 accumulation per K group; output half or bfloat16.
"""

from __future__ import annotations

import math

import torch

from ._emulation import check, check_dtype, recorded, settings, unsupported

BLOCK = 128


def _expand_a(a_scale: torch.Tensor, m: int, k: int) -> torch.Tensor:
    check(a_scale.shape[0] == m, f"a_scale must have {m} rows, but got {list(a_scale.shape)}")
    if a_scale.dim() == 1:
        return a_scale[:, None].expand(m, k)
    groups = a_scale.shape[1]
    check(k % groups == 0, f"K={k} must be a multiple of a_scale's {groups} groups")
    return a_scale.repeat_interleave(k // groups, dim=1)


def _expand_b(b_scale: torch.Tensor, n: int, k: int) -> torch.Tensor:
    if b_scale.dim() == 1:
        check(b_scale.shape[0] == n, f"b_scale must be [{n}], but got {list(b_scale.shape)}")
        return b_scale[:, None].expand(n, k)
    rows, groups = b_scale.shape
    if rows < n:  # per block
        check(rows == -(-n // BLOCK) and groups * BLOCK == k,
              f"per-block b_scale must be [{-(-n // BLOCK)}, {k // BLOCK}], but got {list(b_scale.shape)}")
        return b_scale.repeat_interleave(BLOCK, dim=0)[:n].repeat_interleave(BLOCK, dim=1)
    check(rows == n and k % groups == 0, f"group-wise b_scale must be [{n}, G] with K % G == 0, got {list(b_scale.shape)}")
    return b_scale.repeat_interleave(k // groups, dim=1)


def _group(scale: torch.Tensor, k: int) -> int:
    """K elements sharing one scale."""
    return k if scale.dim() == 1 else k // scale.shape[1]


@recorded
def scaled_matmul(a, b, a_scale, b_scale, output_dtype, bias=None, c=None, act_mode="none", quant_bit_size=8,
                  alpha=1.0, beta=1.0, use_hp_active=False, a_quant_bit_size=-1, a_calib=None, b_calib=None):
    check(quant_bit_size == 8 and a_quant_bit_size == 8,
          "scaled_matmul only supports w8a8 quantization (quant_bit_size == 8, a_quant_bit_size == 8), "
          f"got quant_bit_size = {quant_bit_size}, a_quant_bit_size = {a_quant_bit_size}")
    check(output_dtype in (torch.float16, torch.bfloat16), f"output dtype must be half or bfloat16, but got {output_dtype}")
    check_dtype("a", a, (torch.int8, torch.float8_e4m3fn))
    check(b.dtype == a.dtype, f"b dtype must equal a dtype {a.dtype}, but got {b.dtype}")
    if a.dtype == torch.float8_e4m3fn:
        check(settings["fp8"], "float8_e4m3fn scaled_matmul is not supported on this MLU")
    check(a.dim() == 2 and b.dim() == 2 and a.shape[1] == b.shape[1],
          f"a must be [M, K] and b [N, K], but got {list(a.shape)} and {list(b.shape)}")
    check(a_scale is not None, "a_scale is required for w8a8")
    check_dtype("a_scale", a_scale, (torch.float32,))
    check_dtype("b_scale", b_scale, (torch.float32,))
    if bias is not None or c is not None or act_mode != "none" or a_calib is not None or b_calib is not None:
        raise unsupported("scaled_matmul with bias, c, an activation or calibration")
    (m, k), n = a.shape, b.shape[0]
    out = torch.zeros(m, n, dtype=torch.float32)
    sa, sb = _expand_a(a_scale, m, k), _expand_b(b_scale, n, k)
    group = math.gcd(_group(a_scale, k), _group(b_scale, k))
    for start in range(0, k, group):
        cols = slice(start, start + group)
        partial = a[:, cols].float() @ b[:, cols].float().T
        out += partial * sa[:, start, None] * sb[None, :, start]
    return (alpha * out).to(output_dtype)
