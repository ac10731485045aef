"""``load(path_or_config, device, dtype, policy)``: config -> plan -> graph -> weights."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from seahal import hal

from .checkpoint import load_weights
from .config import ModelConfig
from .parallel import SINGLE_PROCESS, Parallel, ParallelConfig, init_parallel
from .sharding import ShardPlan, read_headers
from .transformer import MODEL_OPS, Transformer


def load(
    path_or_config: str | Path | ModelConfig | dict,
    device: str | torch.device = "auto",
    dtype: torch.dtype | None = None,
    policy: str = "fallback",
    announce: bool = True,
    environ: Mapping[str, str] | None = None,
    *,
    tp: int | None = None,
    ep: int | None = None,
    parallel: ParallelConfig | Parallel | None = None,
    **overrides,
) -> Transformer:
    """Build a DeepSeek-V4 model with every specialised op bound once through a HAL plan.

    ``path_or_config``: a checkpoint folder (config.json + safetensors shards) or a config
    (zero weights, for tests and planning). ``dtype``: the activation dtype (default bf16 on
    accelerators, fp32 on CPU). ``environ`` replaces os.environ for the plan's overrides
    (``SEAHAL_OPS``, ``SEAHAL_BACKEND``). ``overrides`` replace config fields, e.g.
    ``simulate_fp8_kv=False`` or ``max_seq_len=8192``. The plan is ``model.plan``; quantised
    weights the plan's backend cannot compute in their format on this chip are dequantised at load
    as ``model.plan.weight_conversions`` lists.

    Split over processes (launched by ``torchrun``, see docs/scale-out.md): ``tp=T, ep=E`` or
    ``parallel=ParallelConfig(T, E, dp_attention=...)`` joins the process group through the
    device backend's collective backend and loads only this rank's slices. A :class:`Parallel`
    without process groups (``Parallel(config, rank)``) places and loads one rank's weights
    without running collectives.
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
    split = _parallel(parallel, tp, ep, config, device)
    if split is not SINGLE_PROCESS:
        device = split.device or device
        announce = announce and split.rank == 0
    plan = hal.plan(device, ops=MODEL_OPS, policy=policy, announce=announce, environ=environ)
    if dtype is None:
        dtype = torch.float32 if plan.backend.device_type == "cpu" else torch.bfloat16
    if path is None:
        with torch.device(plan.device):
            return Transformer(config, plan, dtype, split).eval()
    # Built on the meta device: every weight is then replaced by the checkpoint's tensor in its
    # stored format, so no placeholder is ever allocated (V4-Flash would need 1 TB of fp32 zeros).
    with torch.device("meta"):
        model = Transformer(config, plan, dtype, split)
    shards = None
    if split is not SINGLE_PROCESS:
        shards = ShardPlan(read_headers(path), split, config.n_routed_experts)
        shards.check()
    load_weights(
        model, path, plan.device, dtype, progress=announce, conversions=plan.weight_conversions, shards=shards
    )
    for module in model.modules():  # the constants the meta build left unmade
        if hasattr(module, "make_constants"):
            module.make_constants(plan.device)
    return model.eval()


def _parallel(
    parallel: ParallelConfig | Parallel | None, tp: int | None, ep: int | None, config: ModelConfig, device
) -> Parallel:
    """The placement of this process: one process unless tp / ep / parallel ask for a split."""
    if isinstance(parallel, Parallel):
        return parallel
    if parallel is None:
        if tp is None and ep is None:
            return SINGLE_PROCESS
        parallel = ParallelConfig(tp or 1, ep or 1)
    elif tp is not None or ep is not None:
        raise ValueError("pass either tp/ep or parallel, not both")
    parallel.check(config)  # before joining a process group: a bad split fails on every rank alike
    return init_parallel(parallel, device)
