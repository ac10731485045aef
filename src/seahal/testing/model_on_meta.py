"""The benchmarked model on the cuda plan, built and run on meta tensors posing as an H100.

Inside :func:`seahal.testing.triton_compile.capture_launches` no kernel runs and no memory is
allocated: each Triton launch is recorded. ``tests/test_decode_census.py`` counts a decode step's
kernels this way, ``tests/test_cuda_compile.py`` compiles every launch the model makes. Both run
this in a child process: the plan must see the posing CUDA device from its first probe.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from unittest import mock

import torch

LAYOUTS = ("release", "bf16")
"""``release``: FP8 linears and shared experts (e8m0 128x128 scales), FP4 routed experts (e8m0
1x32), FP8 KV cache, the other linears in bf16, as a release checkpoint loads (``seahal
convert``'s formats). ``bf16``: every weight and the cache in bf16."""


def release_layout(model: torch.nn.Module) -> None:
    """Replace ``model``'s weights by the release checkpoint's formats (see :data:`LAYOUTS`)."""
    from seahal.model.convert import FP8_LINEAR
    from seahal.model.layers import Linear
    from seahal.model.moe import Experts

    for name, module in model.named_modules():
        if isinstance(module, Linear):
            rows, cols = module.weight.shape
            if FP8_LINEAR.search(name + ".weight"):
                module.set_weight(torch.empty(rows, cols, dtype=torch.float8_e4m3fn, device="cuda"),
                                  torch.empty(-(-rows // 128), cols // 128, dtype=torch.float8_e8m0fnu,
                                              device="cuda"), torch.bfloat16)
            else:
                module.set_weight(torch.empty(rows, cols, dtype=torch.bfloat16, device="cuda"), None, torch.bfloat16)
        elif isinstance(module, Experts):
            for w in ("w1", "w3", "w2"):
                experts, rows, cols = getattr(module, w).shape
                if FP8_LINEAR.search(f"{name}.{w}.weight"):  # the shared expert, as its official name says
                    module.set_weights(w, torch.empty(experts, rows, cols, dtype=torch.float8_e4m3fn, device="cuda"),
                                       torch.empty(experts, -(-rows // 128), cols // 128, dtype=torch.float8_e8m0fnu,
                                                   device="cuda"))
                else:  # routed experts
                    module.set_weights(w, torch.empty(experts, rows, cols // 2, dtype=torch.uint8, device="cuda"),
                                       torch.empty(experts, rows, cols // 32, dtype=torch.float8_e8m0fnu, device="cuda"))


def model_steps(
    layout: str = "release", context: int = 1024, layers: int = 4, capacity: int | None = None
) -> Iterator[tuple[str, callable]]:
    """Yield ("prefill", run), ("decode", run), ("graph decode", run) and ("graph prefill", run):
    ``run()`` is one forward of the 4-layer V4-Flash model of ``seahal bench --ops model`` (64
    experts) over ``context`` prompt tokens, then over one more token, then the step a
    :class:`DecodeGraph` captures (the position a device tensor: what the end-to-end bench
    replays), then the prompt as one such step from position 0 (the bench's captured prefill).
    ``layers``: V4-Flash's first that many layers (4: the benchmarked model); ``capacity``: the
    cache's rows (default ``2 * context``). Call inside ``capture_launches()``."""
    from seahal.bench.model_e2e import FLASH, V4_FLASH_4_LAYERS
    from seahal.model import load
    from seahal.model.config import ModelConfig

    os.environ["SEAHAL_CUDA_UNVERIFIED"] = "1"
    with mock.patch("torch.cuda.is_available", lambda: True):
        cache_format = "fp8" if layout == "release" else "dense"
        depth = {"n_layers": layers, "compress_ratios": FLASH["compress_ratios"][:layers]}
        config = ModelConfig.from_dict({**V4_FLASH_4_LAYERS, **depth, "cache_format": cache_format})
        capacity = capacity or 2 * context
        model = load(config, device="cuda", dtype=torch.bfloat16, announce=False, max_seq_len=capacity)
        if layout == "release":
            release_layout(model)
        cache = model.new_cache(1, capacity)
        ids = torch.zeros(1, context, dtype=torch.int64, device="cuda")
        # The forward's own inference_mode hides dtype conversions from dispatch modes (torch
        # 2.13: an inference tensor's .to() never reaches them); no_grad shows every kernel.
        forward = type(model).forward.__wrapped__
        positions = {"graph decode": torch.full((1,), context + 1, dtype=torch.int64, device="cuda"),
                     "graph prefill": torch.zeros(1, dtype=torch.int64, device="cuda")}
        phases = (("prefill", ids), ("decode", ids[:, :1]), ("graph decode", ids[:, :1]), ("graph prefill", ids))
        for phase, tokens in phases:
            position = positions.get(phase)

            def run(tokens=tokens, position=position):
                step_cache = cache if position is None else cache.with_tensors(cache.named_tensors(), position)
                with torch.no_grad():
                    forward(model, tokens, cache=step_cache, last_only=True)
            yield phase, run
