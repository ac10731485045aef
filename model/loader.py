"""``load(path_or_config, device, dtype, policy)``: config -> plan -> graph -> weights."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from seahal import hal

from .checkpoint import load_weights
from .config import ModelConfig
from .attention import Attention
from .transformer import MODEL_OPS, Transformer


def load(
    path_or_config: str | Path | ModelConfig | dict,
    device: str | torch.device = "auto",
    dtype: torch.dtype | None = None,
    policy: str = "fallback",
    announce: bool = True,
    environ: Mapping[str, str] | None = None,
    **overrides,
) -> Transformer:
    """Build a DeepSeek-V4 model with every specialised op bound once through a HAL plan.

    ``path_or_config``: a checkpoint folder (config.json + safetensors shards) or a config
    (zero weights, for tests and planning). ``dtype``: the activation dtype (default bf16 on
    accelerators, fp32 on CPU). ``environ`` replaces os.environ for the plan's overrides
    (``SEAHAL_OPS``, ``SEAHAL_BACKEND``). ``overrides`` replace config fields, e.g.
    ``simulate_fp8_kv=False`` or ``max_seq_len=8192``. The plan is ``model.plan``.
    """
    path = None
    if isinstance(path_or_config, ModelConfig):
        config = path_or_config
    elif isinstance(path_or_config, dict):
        config = ModelConfig.from_dict(path_or_config)
    else:
        path = Path(path_or_config)
        config = ModelConfig.from_file(path)
    if overrides:
        config = ModelConfig.from_dict({**config.to_dict(), **overrides})
    plan = hal.plan(device, ops=MODEL_OPS, policy=policy, announce=announce, environ=environ)
    if dtype is None:
        dtype = torch.float32 if plan.device.type == "cpu" else torch.bfloat16
    if path is None:
        with torch.device(plan.device):
            return Transformer(config, plan, dtype).eval()
    # Built on the meta device: every weight is then replaced by the checkpoint's tensor in its
    # stored format, so no placeholder is ever allocated (V4-Flash would need 1 TB of fp32 zeros).
    with torch.device("meta"):
        model = Transformer(config, plan, dtype)
    load_weights(model, path, plan.device, dtype, progress=announce)
    for attention in (m for m in model.modules() if isinstance(m, Attention)):
        attention.freqs = attention.rope_frequencies().to(plan.device)
    return model.eval()
