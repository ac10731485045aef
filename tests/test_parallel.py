"""Tensor and expert parallelism on CPU (gloo): 2 and 4 spawned ranks against one process, sharded
loading, the collective-backend capability, and ``torchrun -m seahal run --ep 2``.

Tolerance. The model runs in fp32 and a split only changes the order of sums: ``wo_b``'s and the
experts' down projections are summed over TP ranks, the routed experts' outputs over EP ranks in
another order. Each reordering moves a result by a few fp32 ulps (2^-24 relative); through four
layers, mHC and the head that measures <= 5e-7 of the largest logit here, so the bound is 1e-5.
With FP8 in the loop (the FP8 cache, or FP8-quantised linear inputs of a quantised checkpoint)
an ulp of difference can flip an e4m3 rounding (one 2^-4 step of that element): measured 3e-5,
bound 1e-3. Both stay far below what a misplacement does on this
model: swapping two heads' sinks moves the logits by 1.3e-2, swapping two experts by 0.28.
Every rank must return the same logits bit for bit (each rank samples from its own copy).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from seahal import hal
from seahal.hal.formats import dequantize_weight
from seahal.model import load
from seahal.model import checkpoint as checkpoint_module
from seahal.model.parallel import Parallel, ParallelConfig, init_parallel
from seahal.model.sharding import EP, TP, ShardingError, read_headers, shard_rules
from seahal.model.tiny import write_tiny_checkpoint

from parallel_run import logits, spawn
from v4_checkpoints import SPLIT_2_WAYS_QUANTISED, SPLIT_4_WAYS

RELATIVE = 1e-5
FP8_RELATIVE = 1e-3
P = ParallelConfig
FP8_CACHE = {"cache_format": "fp8"}

# name -> (world size, checkpoint, ParallelConfig, load overrides); one spawn per world size.
# a2a_min_tokens=16: the 4 x 21-token prefill dispatches by all-to-all, the 4-token decode steps gather.
CASES = {
    "tp2": (2, "dense", P(tp=2), {}),
    "tp2 quantised": (2, "quantised", P(tp=2), {}),
    "ep2 all_to_all": (2, "dense", P(ep=2, moe_comm="all_to_all"), {}),
    "ep2 gather": (2, "dense", P(ep=2, moe_comm="gather"), {}),
    "tp4": (4, "dense", P(tp=4), {}),
    "ep4 all_to_all": (4, "dense", P(ep=4, moe_comm="all_to_all"), {}),
    "tp2 x ep2": (4, "dense", P(2, 2, a2a_min_tokens=16), {}),
    "tp2 x ep2 fp8 cache": (4, "dense", P(2, 2, a2a_min_tokens=16), FP8_CACHE),
    "tp2 x ep2 dp_attention": (4, "dense", P(2, 2, dp_attention=True, a2a_min_tokens=16), {}),
    "ep4 dp_attention gather": (4, "dense", P(ep=4, dp_attention=True, moe_comm="gather"), {}),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("parallel")
    return {
        "dense": write_tiny_checkpoint(root / "dense", quantise=False, **SPLIT_4_WAYS),
        "quantised": write_tiny_checkpoint(root / "quantised", **SPLIT_2_WAYS_QUANTISED),
    }


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 256, (4, 21), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def single_process(checkpoints, ids):
    """The one-process logits per (checkpoint, load overrides), computed once each."""
    done: dict[tuple, dict] = {}

    def get(ckpt: str, overrides: dict) -> dict:
        key = (ckpt, tuple(sorted(overrides.items())))
        if key not in done:
            done[key] = logits(load(checkpoints[ckpt], device="cpu", announce=False, **overrides), ids)
        return done[key]

    return get


@pytest.fixture(scope="module")
def runs(checkpoints, ids, tmp_path_factory):
    """world size -> each rank's {case: logits}, spawned once per world size on first use."""
    done: dict[int, list[dict]] = {}

    def get(world: int) -> list[dict]:
        if world not in done:
            configs = {
                name: (checkpoints[ckpt], parallel, overrides)
                for name, (w, ckpt, parallel, overrides) in CASES.items()
                if w == world
            }
            done[world] = spawn(world, configs, ids, tmp_path_factory.mktemp(f"world{world}"))
        return done[world]

    return get


@pytest.mark.parametrize("case", list(CASES))
def test_parallel_logits_equal_single_process(case, runs, single_process):
    world, ckpt, _, overrides = CASES[case]
    expected = single_process(ckpt, overrides)
    fp8_in_the_loop = ckpt == "quantised" or overrides.get("cache_format") == "fp8"
    bound = FP8_RELATIVE if fp8_in_the_loop else RELATIVE
    ranks = runs(world)
    for kind in ("prefill", "decode"):
        got = ranks[0][case][kind]
        for rank in range(1, world):
            assert torch.equal(ranks[rank][case][kind], got), f"rank {rank} {kind} differs from rank 0"
        err = (got - expected[kind]).abs().max() / expected[kind].abs().max()
        assert err <= bound, f"{case} {kind}: max |diff| / max |logit| = {err:.2e}"


def _spy_reads(monkeypatch) -> dict[str, list[tuple[str, int]]]:
    """Record every tensor read through safe_open: canonical name -> [(how, bytes)]."""
    reads: dict[str, list[tuple[str, int]]] = {}
    real = checkpoint_module.safe_open

    class Handle:
        def __init__(self, *args, **kwargs):
            self.inner = real(*args, **kwargs)

        def __enter__(self):
            self.f = self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def keys(self):
            return self.f.keys()

        def _record(self, name, how, t):
            reads.setdefault(checkpoint_module.canonical_name(name), []).append((how, t.numel() * t.element_size()))
            return t

        def get_tensor(self, name):
            return self._record(name, "whole", self.f.get_tensor(name))

        def get_slice(self, name):
            inner, record = self.f.get_slice(name), self._record

            class Slice:
                def __getitem__(self, index):
                    return record(name, "slice", inner[index])

                def get_dtype(self):  # read, not recorded: the header's dtype, no tensor bytes
                    return inner.get_dtype()

            return Slice()

    monkeypatch.setattr(checkpoint_module, "safe_open", Handle)
    return reads


def test_sharded_loading_reads_only_each_ranks_slice(checkpoints, monkeypatch):
    path = checkpoints["quantised"]
    reads = _spy_reads(monkeypatch)
    full = load(path, device="cpu", announce=False)
    full_bytes = {name: got for name, [(_, got)] in reads.items()}
    assert set(full_bytes) == set(read_headers(path))
    config = ParallelConfig(tp=2, ep=2)
    models = []
    for rank in range(config.world):
        reads.clear()
        model = load(path, device="cpu", announce=False, parallel=Parallel(config, rank))
        models.append(model)
        first, end = model.parallel.ep_range(model.config.n_routed_experts)
        for name, nbytes in full_bytes.items():
            key = checkpoint_module.expert_key(name)
            if key is not None and key[0].endswith(".experts") and not first <= key[1] < end:
                assert name not in reads, f"rank {rank} read {name}, held by another EP rank"
                continue
            model_name = name if key is None else f"{key[0]}.{key[2]}" + ("_scale" if key[3] == "scale" else "")
            split = any(rule.axis == TP for rule in shard_rules(model_name))
            (how, got), = reads[name]
            assert got == (nbytes // 2 if split else nbytes), f"rank {rank} read {got} of {nbytes} bytes of {name}"
            assert how == ("slice" if split else "whole"), name  # never the whole of a split tensor

    # The TP ranks' slices put back together are the full model, scales included.
    wq_b = [m.layers[1].attn.wq_b for m in models[:2]]
    dequantised = torch.cat([dequantize_weight(q.weight, q.scale, torch.float32) for q in wq_b])
    assert torch.equal(dequantised, dequantize_weight(full.layers[1].attn.wq_b.weight, full.layers[1].attn.wq_b.scale, torch.float32))
    wo_b = [m.layers[2].attn.wo_b for m in models[:2]]
    dequantised = torch.cat([dequantize_weight(w.weight, w.scale, torch.float32) for w in wo_b], dim=1)
    assert torch.equal(dequantised, dequantize_weight(full.layers[2].attn.wo_b.weight, full.layers[2].attn.wo_b.scale, torch.float32))
    # routed expert 5 lives on EP rank 1 (ranks 2, 3) as local expert 1, its w2 columns split over TP
    experts = [m.layers[3].ffn.experts for m in models[2:]]
    w2 = torch.cat([dequantize_weight(e.w2[1], e.w2_scale[1], torch.float32) for e in experts], dim=1)
    reference = full.layers[3].ffn.experts
    assert torch.equal(w2, dequantize_weight(reference.w2[5], reference.w2_scale[5], torch.float32))
    assert torch.equal(torch.cat([m.head.weight for m in models[:2]]), full.head.weight)


def test_shard_rules_and_splits_that_would_cut_a_block(tmp_path):
    assert [(r.axis, r.dim) for r in shard_rules("layers.3.ffn.experts.w2")] == [(EP, 0), (TP, 2)]
    assert [(r.axis, r.dim) for r in shard_rules("layers.3.ffn.experts.w2_scale")] == [(EP, 0), (TP, 2)]
    assert [(r.axis, r.dim) for r in shard_rules("layers.0.attn.wq_b.scale")] == [(TP, 0)]
    assert shard_rules("layers.1.attn.indexer.wq_b.weight") == ()  # the indexer is replicated
    assert shard_rules("layers.1.attn.wkv.weight") == ()
    # The tiny default: 128-wide FP4 expert inputs cannot be cut in two 1x128 activation tiles.
    path = write_tiny_checkpoint(tmp_path / "tiny")
    with pytest.raises(ShardingError, match=r"experts\.0\.w2\.weight' \(fp4, dim 1 of 128\) cannot be split over tp=2"):
        load(path, device="cpu", announce=False, parallel=Parallel(ParallelConfig(tp=2), 0))
    with pytest.raises(ValueError, match="n_heads=4 is not a multiple of tp=3"):
        load(path, device="cpu", announce=False, tp=3)


def test_backends_name_their_collective_backend_and_one_process_takes_the_parallel_path(checkpoints, ids):
    declared = {name: b.collective_backend for name, b in hal.backends().items()}
    assert {k: declared[k] for k in ("cpu", "cuda", "ascend", "cambricon")} == {
        "cpu": "gloo", "cuda": "nccl", "ascend": "hccl", "cambricon": "cncl"
    }
    single = logits(load(checkpoints["dense"], device="cpu", announce=False), ids)
    assert not dist.is_initialized()
    try:
        model = load(checkpoints["dense"], device="cpu", announce=False, tp=1, ep=1)
        assert dist.get_backend() == "gloo" and model.parallel.distributed
        parallel = logits(model, ids)
    finally:
        dist.destroy_process_group()
    for kind in ("prefill", "decode"):
        assert torch.equal(parallel[kind], single[kind])  # world size 1: no collective, same math


def test_torchrun_seahal_run_with_expert_parallelism(tmp_path):
    env = {**os.environ, "SEAHAL_CACHE": str(tmp_path), "OMP_NUM_THREADS": "1"}
    argv = ["run", "--device", "cpu", "--max-new-tokens", "3", "--warmup", "0"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "seahal"]
    out = subprocess.run(torchrun + argv + ["--ep", "2"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    single = subprocess.run([sys.executable, "-m", "seahal", *argv], env=env, capture_output=True, text=True)
    assert single.returncode == 0, single.stderr[-3000:]
    text = out.stdout
    assert "placement: tp=1 x ep=2, moe_comm=auto" in text
    assert re.search(r"^0 +0 +0 +cpu +0-3 of 4 +0-1 of 2 +0-3 of 8 ", text, re.M)
    assert re.search(r"^1 +0 +1 +cpu +0-3 of 4 +0-1 of 2 +4-7 of 8 ", text, re.M)
    assert text.count("generated:") == 1  # rank 0 reports
    generated = re.search(r"generated: .*", text)[0]
    assert generated == re.search(r"generated: .*", single.stdout)[0]
