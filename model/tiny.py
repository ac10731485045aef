"""The built-in tiny DeepSeek-V4 checkpoint (v4_ops.md §14): random weights, official layout.

Same structure as the release (SWA, CSA, HCA and CSA layers, one hash-routed MoE layer, mHC,
FP8 linears with 128x128 ue8m0 scales, FP4 routed experts) at a size a laptop runs in seconds.
It is generated deterministically from a seed, quantised by :mod:`.convert`, and cached.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from .config import ModelConfig
from .convert import convert_tensors, official_shapes, quantised_config, write_checkpoint

TINY_CONFIG = {
    "vocab_size": 512,
    "dim": 256,
    "n_layers": 4,
    "compress_ratios": [0, 4, 16, 4],
    "n_hash_layers": 1,
    "n_heads": 4,
    "head_dim": 128,
    "rope_head_dim": 64,
    "q_lora_rank": 128,
    "o_groups": 2,
    "o_lora_rank": 128,
    "window_size": 16,
    "index_n_heads": 4,
    "index_head_dim": 128,
    "index_topk": 8,
    "n_routed_experts": 8,
    "n_activated_experts": 2,
    "n_shared_experts": 1,
    "moe_inter_dim": 128,
    "score_func": "sqrtsoftplus",
    "route_scale": 1.5,
    "swiglu_limit": 10.0,
    "hc_mult": 4,
    "hc_sinkhorn_iters": 20,
    "hc_eps": 1e-6,
    "norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "compress_rope_theta": 160000.0,
    "rope_factor": 4.0,
    "original_seq_len": 64,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "max_seq_len": 256,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "dtype": "fp8",
    "scale_fmt": "ue8m0",
}
"""Official inference ``config.json`` keys; the MTP block is left out (generation does not use it)."""

RESIDUAL_OUTPUT = re.compile(r"\.attn\.wo_b\.weight$|\.w2\.weight$")
DEFAULT_SEED = 0
CACHE_NAME = "default-v4-tiny"
STAMP = "seahal-tiny.json"
"""Marks a complete cached checkpoint and records how it was made (rebuilt when this changes)."""
STAMP_VERSION = 2


def _random_tensor(name: str, shape: tuple[int, ...], config: ModelConfig, g: torch.Generator) -> torch.Tensor:
    """One tensor with the release's dtype and a scale that keeps activations O(1).

    Matrices ~ N(0, 1/fan_in); the sublayers' output projections (wo_b, expert w2) a further
    1/sqrt(2 n_layers) so the residual streams dominate as in a trained model; the embedding
    N(0, 1); the head x2 so the next-token distribution is peaked; norm weights ~ 1; mHC mixing
    weights small so the streams start close to an even mix; hash routing picks distinct experts.
    """

    def normal(std: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (torch.randn(shape, generator=g, device=g.device) * std).to(dtype)

    leaf = name.rpartition(".")[2]
    if leaf == "tid2eid":
        order = torch.rand(config.vocab_size, config.n_routed_experts, generator=g, device=g.device).argsort(dim=-1)
        return order[:, : shape[1]].to(torch.int32)
    if name.endswith("norm.weight"):
        return (1 + normal(0.1)).to(torch.bfloat16)
    if leaf.endswith("_fn"):
        return normal(0.5 / math.sqrt(shape[1]))
    if leaf.endswith("_base") or leaf in ("ape", "bias"):
        return normal(0.1)
    if leaf.endswith("_scale"):
        return torch.ones(shape, device=g.device)
    if leaf == "attn_sink":
        return normal(0.5)
    if name == "embed.weight":
        return normal(1.0, torch.bfloat16)
    scale = 2.0 if name == "head.weight" else 1.0
    if RESIDUAL_OUTPUT.search(name):
        scale = (2 * config.n_layers) ** -0.5
    return normal(scale / math.sqrt(shape[-1]), torch.bfloat16)


def random_tensors(
    config: ModelConfig, seed: int = DEFAULT_SEED, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """Every tensor of ``config``'s checkpoint, by official name, dense (bf16 / fp32 / int32),
    drawn on ``device`` (a GPU draws a V4-Flash-sized model in seconds; each device type has its
    own random stream, so the values depend on it)."""
    g = torch.Generator(device=device).manual_seed(seed)
    return {name: _random_tensor(name, shape, config, g) for name, shape in sorted(official_shapes(config).items())}


def write_tiny_checkpoint(
    path: str | Path, seed: int = DEFAULT_SEED, quantise: bool = True, device: str | torch.device = "cpu", **config
) -> Path:
    """Write the tiny checkpoint to ``path``: quantised like the release (FP8 linears, FP4
    experts), or dense (bf16 matrices, fp32 mHC/ape/sinks/bias) when ``quantise`` is False.

    ``config`` keys replace the tiny config's (any V4 size: test splits, or V4-Flash's dimensions
    for ``seahal bench --ops model``); ``device`` is where the weights are drawn and quantised.
    """
    path = Path(path)
    raw = {**TINY_CONFIG, **config}
    tensors = random_tensors(ModelConfig.from_dict(raw), seed, device).items()
    if quantise:
        tensors = convert_tensors(tensors)
        raw = quantised_config(raw, "fp4", "fp8")
    write_checkpoint(tensors, path)
    (path / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    return path


def cache_root() -> Path:
    """``$SEAHAL_CACHE``, else ``$XDG_CACHE_HOME/seahal``, else ``~/.cache/seahal``."""
    if os.environ.get("SEAHAL_CACHE"):
        return Path(os.environ["SEAHAL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "seahal"


def default_checkpoint(seed: int = DEFAULT_SEED) -> tuple[Path, bool]:
    """The cached tiny checkpoint, built on first use -> (folder, whether it was built now).

    Built in a temporary sibling folder and renamed into place, so an interrupted build never
    leaves a half-written checkpoint behind.
    """
    folder = cache_root() / CACHE_NAME
    stamp = {"version": STAMP_VERSION, "seed": seed, "config": TINY_CONFIG}
    if (folder / STAMP).exists() and json.loads((folder / STAMP).read_text()) == stamp:
        return folder, False
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{CACHE_NAME}-", dir=folder.parent))
    try:
        write_tiny_checkpoint(staging, seed)
        (staging / STAMP).write_text(json.dumps(stamp, indent=2) + "\n")
        shutil.rmtree(folder, ignore_errors=True)
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder, True
