"""transformers' DeepSeek-V4 modules as test oracles: a tiny config and random fp64 weights.

Only full-sequence module forwards are used (HF's incremental CSA decode is known not to reproduce
its full forward).
"""

from __future__ import annotations

import math
from types import ModuleType

import pytest
import torch


def transformers_v4() -> ModuleType:
    """transformers' DeepSeek-V4 modeling module, or a skip of the calling test where it cannot run:
    transformers missing, or a torch older than it takes (transformers 5 runs its models on torch
    >= 2.6 only; on torch 2.5 it imports, with every model a placeholder that raises)."""
    transformers = pytest.importorskip("transformers", minversion="5.23")
    if not transformers.utils.is_torch_available():
        pytest.skip(
            f"transformers {transformers.__version__} runs no model on torch {torch.__version__}",
            allow_module_level=True,
        )
    from transformers.models.deepseek_v4 import modeling_deepseek_v4

    return modeling_deepseek_v4


def tiny_config():
    """A tiny DeepseekV4Config: head_dim 32 (16 rope dims), CSA m=4, HCA m=16, indexer 4 x 32, YaRN 4 over 64."""
    transformers_v4()
    from transformers.models.deepseek_v4.configuration_deepseek_v4 import DeepseekV4Config

    return DeepseekV4Config(
        hidden_size=64,
        head_dim=32,
        qk_rope_head_dim=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        q_lora_rank=32,
        index_n_heads=4,
        index_head_dim=32,
        index_topk=4,
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 16},
        max_position_embeddings=256,
        compress_rope_theta=160000.0,
        rope_parameters={
            "rope_type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 64,
            "beta_fast": 32,
            "beta_slow": 1,
        },
    )


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random fp64 weights: projections std 1/sqrt(fan_in), biases N(0, 1), norm weights 1 + N(0, 0.1)."""
    g = torch.Generator().manual_seed(seed)
    module.double()
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * noise)
            elif name.endswith("position_bias"):
                p.copy_(noise)
            else:
                p.copy_(noise / math.sqrt(p.shape[-1]))
    return module
