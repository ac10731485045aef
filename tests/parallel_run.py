"""One rank of a spawned ``torch.distributed`` run for tests/test_parallel.py (gloo on CPU).

The rank joins the process group the way ``torchrun`` would have it (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``/``MASTER_PORT`` in the environment), loads each configuration's checkpoint
, and saves what :func:`logits` returns for each to ``out/rank<r>.pt``.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

PREFIX = 17
"""Tokens of the cached prefill; the rest of the sequence is decoded one token at a time."""


def logits(model, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """``prefill``: a stateless forward over ids [B, S]; ``decode``: the same positions through
    the cache, a PREFIX-token prefill then one token per step (crossing compression boundaries)."""
    cache = model.new_cache(ids.shape[0], 32)
    steps = [model(ids[:, :PREFIX], cache=cache)]
    steps += [model(ids[:, t : t + 1], cache=cache) for t in range(PREFIX, ids.shape[1])]
    return {"prefill": model(ids), "decode": torch.cat(steps, dim=1)}


def _rank(rank: int, world: int, port: int, configs: dict, ids: torch.Tensor, out: Path) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)  # world size processes share the CI machine's cores
    from seahal.model import load

    results = {}
    for name, (path, parallel, overrides) in configs.items():
        model = load(path, device="cpu", announce=False, parallel=parallel, **overrides)
        results[name] = logits(model, ids)
    torch.save(results, out / f"rank{rank}.pt")
    dist.destroy_process_group()


def spawn(world: int, configs: dict, ids: torch.Tensor, out: Path) -> list[dict]:
    """Run ``configs`` ({name: (checkpoint, ParallelConfig, load overrides)}) on ``world`` spawned
    ranks -> each rank's {name: logits(...)}."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(world, port, configs, ids, out), nprocs=world)
    return [torch.load(out / f"rank{r}.pt") for r in range(world)]
