"""Model configuration: one dataclass, built from an official or a transformers ``config.json``.

Both spellings are accepted: the official inference keys (``dim``, ``n_layers``, ``compress_ratios``,
``n_hash_layers``...) and transformers' (``hidden_size``, ``num_hidden_layers``, ``layer_types``,
``mlp_layer_types``, ``rope_parameters``...). The result is validated once.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from seahal.hal.ops.rope import Yarn

LAYER_TYPE_RATIO = {"sliding_attention": 0, "compressed_sparse_attention": 4, "heavily_compressed_attention": 128}
CSA_RATIO = 4
"""The only overlapped, indexed compression ratio; any other non-zero ratio is HCA."""


@dataclass
class ModelConfig:
    """DeepSeek-V4 architecture numbers (v4_ops.md §1), official names."""

    vocab_size: int = 129280
    dim: int = 4096
    n_layers: int = 43
    n_heads: int = 64
    head_dim: int = 512
    rope_head_dim: int = 64
    q_lora_rank: int = 1024
    o_groups: int = 8
    o_lora_rank: int = 1024
    window_size: int = 128
    compress_ratios: list[int] = field(default_factory=list)
    """One ratio per main layer: 0 = sliding window only, 4 = CSA, other = HCA."""
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 512
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    n_activated_experts: int = 6
    n_hash_layers: int = 3
    moe_inter_dim: int = 2048
    score_func: str = "sqrtsoftplus"
    route_scale: float = 1.5
    swiglu_limit: float = 10.0
    n_groups: int = 1
    topk_groups: int = 1
    hc_mult: int = 4
    hc_sinkhorn_iters: int = 20
    hc_eps: float = 1e-6
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    compress_rope_theta: float = 160000.0
    rope_factor: float = 16.0
    original_seq_len: int = 65536
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    max_seq_len: int = 4096
    simulate_fp8_kv: bool = True
    """Round the cached KV's no-RoPE dims through FP8 (the official precision of the cache)."""
    simulate_fp4_indexer: bool = True
    """Hadamard-rotate and FP4-round the indexer's q and keys as the official code does."""
    cache_format: str = "dense"
    """``"dense"``: cached vectors in the model dtype; ``"fp8"``: the production layout (584-byte
    FP8 KV records, 68-byte FP4 indexer keys), see model/cache.py."""
    index_cache_format: str | None = None
    """How the cache stores indexer keys: ``"dense"`` (model dtype), ``"fp4"`` (68-byte MXFP4
    records at d = 128, DeepGEMM's / vLLM's FP4 indexer cache) or ``"fp8"`` (132-byte e4m3 + fp32
    scale records, V3.2's layout and vLLM's default); packed keys are scored by
    ``indexer_topk_packed``. None: ``"fp4"`` when ``cache_format == "fp8"`` and the indexer
    simulates FP4, else ``"dense"`` (see :attr:`index_key_format`)."""
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1

    def __post_init__(self) -> None:
        if not self.compress_ratios:
            self.compress_ratios = [0] * self.n_layers
        self.compress_ratios = [int(r) for r in self.compress_ratios[: self.n_layers]]
        problems = []
        if len(self.compress_ratios) != self.n_layers:
            problems.append(f"compress_ratios has {len(self.compress_ratios)} entries for n_layers={self.n_layers}")
        if self.n_heads % self.o_groups:
            problems.append(f"n_heads={self.n_heads} must be a multiple of o_groups={self.o_groups}")
        if self.rope_head_dim > self.head_dim or self.rope_head_dim % 2:
            problems.append(f"rope_head_dim={self.rope_head_dim} must be even and <= head_dim={self.head_dim}")
        if self.n_activated_experts > self.n_routed_experts:
            problems.append("n_activated_experts must be <= n_routed_experts")
        if self.cache_format not in ("dense", "fp8"):
            problems.append(f"cache_format must be 'dense' or 'fp8', got {self.cache_format!r}")
        if self.index_cache_format not in (None, "dense", "fp4", "fp8"):
            problems.append(
                f"index_cache_format must be None, 'dense', 'fp4' or 'fp8', got {self.index_cache_format!r}"
            )
        elif self.index_key_format == "fp4" and self.index_head_dim % 32:
            problems.append(f"fp4 indexer keys need index_head_dim to be a multiple of 32, got {self.index_head_dim}")
        if problems:
            raise ValueError("invalid DeepSeek-V4 config: " + "; ".join(problems))

    @property
    def yarn(self) -> Yarn | None:
        """YaRN of the compressed layers (v4_ops.md §4); None when original_seq_len is 0."""
        if self.original_seq_len <= 0:
            return None
        return Yarn(self.rope_factor, self.original_seq_len, self.beta_fast, self.beta_slow)

    @property
    def index_key_format(self) -> str:
        """The storage format of the cached indexer keys: :attr:`index_cache_format`, resolved."""
        if self.index_cache_format is not None:
            return self.index_cache_format
        return "fp4" if self.cache_format == "fp8" and self.simulate_fp4_indexer else "dense"

    def layer_kind(self, layer: int) -> str:
        ratio = self.compress_ratios[layer]
        return "swa" if ratio == 0 else "csa" if ratio == CSA_RATIO else "hca"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_hf_dict(self) -> dict[str, Any]:
        """This architecture as a transformers ``config.json`` (``model_type`` deepseek_v4), so a
        checkpoint folder loads in transformers as is; :meth:`from_dict` reads it back to the same
        config (``max_seq_len`` capped at 4096 as for any transformers config). Run-time options
        (``simulate_*``, ``cache_format``) are not architecture and are left out. ValueError for
        what transformers' V4 cannot express: two different HCA ratios, or grouped routing."""
        hca = sorted({r for r in self.compress_ratios if r and r != CSA_RATIO})
        if len(hca) > 1 or self.n_groups != 1 or self.topk_groups != 1:
            raise ValueError(f"transformers' DeepSeek-V4 has one HCA ratio and no routing groups; got HCA ratios "
                             f"{hca}, n_groups={self.n_groups}, topk_groups={self.topk_groups}")
        ours = self.to_dict()
        renamed = {hf: ours[name] for hf, name in _HF_TO_OFFICIAL.items() if name not in _HF_DERIVED}
        layer_type = {0: "sliding_attention", CSA_RATIO: "compressed_sparse_attention"}
        yarn = {} if self.yarn is None else {
            "rope_type": "yarn", "factor": self.rope_factor, "original_max_position_embeddings": self.original_seq_len,
            "beta_fast": self.beta_fast, "beta_slow": self.beta_slow, "attention_factor": 1.0,
        }
        rotary = self.rope_head_dim / self.head_dim
        return {
            "model_type": "deepseek_v4",
            **renamed,
            **{name: ours[name] for name in _SAME_NAME},
            "layer_types": [layer_type.get(r, "heavily_compressed_attention") for r in self.compress_ratios],
            "compress_rates": {"compressed_sparse_attention": CSA_RATIO,
                               "heavily_compressed_attention": hca[0] if hca else 128},
            "mlp_layer_types": ["hash_moe" if i < self.n_hash_layers else "moe" for i in range(self.n_layers)],
            "partial_rotary_factor": rotary,
            "rope_parameters": {
                "main": {"rope_type": "default", "rope_theta": self.rope_theta, "partial_rotary_factor": rotary},
                "compress": {"rope_type": "default", **yarn, "rope_theta": self.compress_rope_theta,
                             "partial_rotary_factor": rotary},
            },
            "num_nextn_predict_layers": 0,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        """Build from either key spelling; unknown keys are ignored."""
        return cls(**_normalise(raw))

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        return cls.from_dict(json.loads(path.read_text()))


_HF_TO_OFFICIAL = {
    "hidden_size": "dim",
    "num_hidden_layers": "n_layers",
    "num_attention_heads": "n_heads",
    "moe_intermediate_size": "moe_inter_dim",
    "num_experts_per_tok": "n_activated_experts",
    "routed_scaling_factor": "route_scale",
    "scoring_func": "score_func",
    "sliding_window": "window_size",
    "rms_norm_eps": "norm_eps",
    "qk_rope_head_dim": "rope_head_dim",
    "num_hash_layers": "n_hash_layers",
    "n_group": "n_groups",
    "topk_group": "topk_groups",
    "max_position_embeddings": "max_seq_len",
}

_HF_DERIVED = {"rope_head_dim", "n_hash_layers", "n_groups", "topk_groups"}
"""Official fields transformers' V4 config spells another way (partial_rotary_factor,
mlp_layer_types) or lacks (routing groups): :meth:`ModelConfig.to_hf_dict` writes them itself."""
_SAME_NAME = ("vocab_size", "head_dim", "q_lora_rank", "o_groups", "o_lora_rank", "index_n_heads", "index_head_dim",
              "index_topk", "n_routed_experts", "n_shared_experts", "swiglu_limit", "hc_mult", "hc_sinkhorn_iters",
              "hc_eps", "rope_theta", "compress_rope_theta", "bos_token_id", "eos_token_id")
"""Official fields transformers' V4 config names alike."""


def _normalise(raw: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in raw.items():
        out[_HF_TO_OFFICIAL.get(key, key)] = value
    if "max_position_embeddings" in raw and "max_seq_len" not in raw:
        out["max_seq_len"] = min(int(raw["max_position_embeddings"]), 4096)
    if "layer_types" in raw and "compress_ratios" not in raw:
        rates = {**LAYER_TYPE_RATIO, **(raw.get("compress_rates") or {})}
        out["compress_ratios"] = [rates[t] for t in raw["layer_types"]]
    if "mlp_layer_types" in raw and "n_hash_layers" not in raw:
        out["n_hash_layers"] = sum(1 for t in raw["mlp_layer_types"] if t == "hash_moe")
    if "partial_rotary_factor" in raw and raw["partial_rotary_factor"] and "rope_head_dim" not in out:
        out["rope_head_dim"] = int(out.get("head_dim", 512) * raw["partial_rotary_factor"])
    compress = (raw.get("rope_parameters") or {}).get("compress") or raw.get("rope_scaling") or {}
    if compress.get("rope_type", compress.get("type")) == "yarn":
        out.setdefault("rope_factor", compress.get("factor", 16.0))
        out.setdefault("original_seq_len", compress.get("original_max_position_embeddings", 65536))
        out.setdefault("beta_fast", compress.get("beta_fast", 32.0))
        out.setdefault("beta_slow", compress.get("beta_slow", 1.0))
    elif "rope_parameters" in raw or "rope_scaling" in raw:
        out.setdefault("original_seq_len", 0)
    main = (raw.get("rope_parameters") or {}).get("main") or {}
    if "rope_theta" in main:
        out["rope_theta"] = main["rope_theta"]
    if "rope_theta" in compress:
        out["compress_rope_theta"] = compress["rope_theta"]
    if isinstance(out.get("eos_token_id"), list):
        out["eos_token_id"] = out["eos_token_id"][0]
    known = {f.name for f in fields(ModelConfig)}
    return {k: v for k, v in out.items() if k in known}
