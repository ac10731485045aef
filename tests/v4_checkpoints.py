"""Random DeepSeek-V4 checkpoints made with transformers (the parity oracle) for model tests.

``DeepseekV4ForCausalLM.save_pretrained`` writes the official layout, so a random transformers
model is also a valid seahal checkpoint. Parameters get seeded normal noise (transformers' own
init leaves some at zero or one, which would hide wiring mistakes).
Checkpoints made without transformers (any size, dense or quantised):
``seahal.model.tiny.write_tiny_checkpoint``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from hf_v4 import transformers_v4

CSA, HCA, SWA = "compressed_sparse_attention", "heavily_compressed_attention", "sliding_attention"


def make_hf_model(
    layer_types: list[str],
    n_hash_layers: int = 1,
    *,
    window: int = 16,
    index_topk: int = 8,
    hca_ratio: int = 16,
    seed: int = 0,
):
    """A tiny V4 (dim 256, 4 heads of 128 with 64 RoPE dims, 8 experts top-2, hc_mult 4) in fp32."""
    transformers_v4()
    from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

    config = DeepseekV4Config(
        vocab_size=512, hidden_size=256, moe_intermediate_size=128, num_hidden_layers=len(layer_types),
        num_attention_heads=4, head_dim=128, q_lora_rank=128, n_routed_experts=8, num_experts_per_tok=2,
        o_groups=2, o_lora_rank=128, index_n_heads=4, index_head_dim=128, index_topk=index_topk,
        sliding_window=window, layer_types=layer_types,
        compress_rates={CSA: 4, HCA: hca_ratio},
        mlp_layer_types=["hash_moe"] * n_hash_layers + ["moe"] * (len(layer_types) - n_hash_layers),
        partial_rotary_factor=0.5, max_position_embeddings=4096,
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                         "beta_fast": 32, "beta_slow": 1, "rope_theta": 10000},
    )
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = DeepseekV4ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.01 if "hc_" in name or name.endswith("fn") else 0.05)
        for name, b in model.named_buffers():
            if name.endswith("tid2eid"):
                b.copy_(torch.randint(0, config.n_routed_experts, b.shape))
            elif name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.1)
    return model


def save_hf_checkpoint(model, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(path)
    return path


SPLIT_4_WAYS = dict(
    vocab_size=256, dim=128, n_heads=4, o_groups=4, o_lora_rank=32, q_lora_rank=64, window_size=8,
    index_n_heads=4, index_head_dim=64, index_topk=4, n_routed_experts=8, moe_inter_dim=64, max_seq_len=64,
)
"""A tiny V4 (SWA, CSA, HCA, CSA layers) whose heads, output groups, experts, expert dims and
vocabulary split 2 or 4 ways (dense weights: no block constraints)."""

SPLIT_2_WAYS_QUANTISED = dict(
    vocab_size=256, dim=128, n_heads=4, o_groups=4, o_lora_rank=64, q_lora_rank=128, window_size=8,
    index_n_heads=4, index_head_dim=64, index_topk=4, n_routed_experts=8, moe_inter_dim=256, max_seq_len=64,
)
"""Like SPLIT_4_WAYS, sized so that tp=2 cuts FP8 weights on 128x128 block boundaries and FP4
expert columns on whole 128-element activation tiles."""
