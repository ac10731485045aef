"""The released DeepSeek-V4 models as configs, for planning without a checkpoint at hand.

Official inference ``config.json`` keys (v4_ops.md §1: REF-Flash and REF-Pro
``inference/config.json``), including the release's weight formats: FP8 e4m3 linears with
ue8m0 block scales (``dtype``, ``scale_fmt``) and FP4 routed experts (``expert_dtype``).
``compress_ratios`` has one entry per main layer plus the MTP block's (which seahal does not load).
"""

from __future__ import annotations

from typing import Any

_COMMON: dict[str, Any] = {
    "vocab_size": 129280,
    "head_dim": 512,
    "rope_head_dim": 64,
    "o_lora_rank": 1024,
    "window_size": 128,
    "index_n_heads": 64,
    "index_head_dim": 128,
    "n_shared_experts": 1,
    "n_activated_experts": 6,
    "n_hash_layers": 3,
    "score_func": "sqrtsoftplus",
    "swiglu_limit": 10.0,
    "hc_mult": 4,
    "hc_sinkhorn_iters": 20,
    "hc_eps": 1e-6,
    "norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "compress_rope_theta": 160000.0,
    "rope_factor": 16.0,
    "original_seq_len": 65536,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "max_position_embeddings": 1048576,
    "dtype": "fp8",
    "scale_fmt": "ue8m0",
    "expert_dtype": "fp4",
}

PRESETS: dict[str, dict[str, Any]] = {
    "V4-Flash": {
        **_COMMON,
        "dim": 4096,
        "n_layers": 43,
        "n_heads": 64,
        "q_lora_rank": 1024,
        "o_groups": 8,
        "n_routed_experts": 256,
        "moe_inter_dim": 2048,
        "route_scale": 1.5,
        "index_topk": 512,
        "compress_ratios": [0, 0] + [4, 128] * 20 + [4] + [0],
    },
    "V4-Pro": {
        **_COMMON,
        "dim": 7168,
        "n_layers": 61,
        "n_heads": 128,
        "q_lora_rank": 1536,
        "o_groups": 16,
        "n_routed_experts": 384,
        "moe_inter_dim": 3072,
        "route_scale": 2.5,
        "index_topk": 1024,
        "compress_ratios": [128, 128] + [4, 128] * 29 + [4] + [0],
    },
}
"""Raw configs by name; ``ModelConfig.from_dict(PRESETS[name])`` builds one."""


def preset(name: str) -> dict[str, Any]:
    """A copy of preset ``name`` (case-insensitive); ValueError listing the presets otherwise."""
    for key, raw in PRESETS.items():
        if key.lower() == name.lower():
            return {k: list(v) if isinstance(v, list) else v for k, v in raw.items()}
    raise ValueError(f"unknown model preset {name!r}; presets: {', '.join(PRESETS)}")
