"""seahal plan-memory: its byte counts equal what seahal allocates, and its published figures."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from seahal.cli import main as cli_main
from seahal.device_memory import DEVICES, device_memory, parse_devices
from seahal.hal.formats import E8M0_DTYPE
from seahal.model import ModelConfig, load
from seahal.model.convert import convert
from seahal.model.parallel import Parallel, ParallelConfig
from seahal.model.tiny import write_tiny_checkpoint
from seahal.plan_memory import (
    WeightFormats,
    kv_cache_bytes,
    load_config,
    memory_doc,
    plan_memory,
    stored_tensors,
    workspace_bytes,
)

DOC = Path(__file__).resolve().parents[1] / "docs" / "scale-out-memory.md"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """The tiny V4 in three layouts: the release's (FP8 linears, FP4 experts), FP8 experts, dense bf16."""
    root = tmp_path_factory.mktemp("tiny")
    dense = write_tiny_checkpoint(root / "dense", quantise=False)
    return {
        "release": write_tiny_checkpoint(root / "release"),
        "fp8-experts": convert(dense, root / "fp8-experts", experts="fp8"),
        "dense": dense,
    }


def held_tensors(obj, prefix: str = "", seen: set[int] | None = None) -> dict[str, torch.Tensor]:
    """Every tensor reachable from ``obj`` through attributes, lists, tuples and dicts, by path
    (a module's parameters, buffers and plain tensor attributes such as expert scales alike)."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        return {} if id(obj) in seen or seen.add(id(obj)) else {prefix: obj}
    if isinstance(obj, torch.nn.Module):
        items = {**obj._parameters, **obj._buffers, **obj._modules,
                 **{k: v for k, v in vars(obj).items() if not k.startswith("_")}}.items()
    elif isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = enumerate(obj)
    elif hasattr(obj, "__dict__") and type(obj).__module__.startswith("seahal.model"):
        items = vars(obj).items()
    else:
        return {}
    found = {}
    for key, value in items:
        found.update(held_tensors(value, f"{prefix}.{key}" if prefix else str(key), seen))
    return found


def nbytes(tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    return {name: t.numel() * t.element_size() for name, t in tensors.items()}


@pytest.mark.parametrize("layout", ["release", "fp8-experts", "dense"])
def test_weight_bytes_equal_what_load_allocates(checkpoints, layout):
    path = checkpoints[layout]
    model = load(path, device="cpu", dtype=torch.bfloat16, announce=False)
    held = nbytes(held_tensors(model))
    _, raw, formats = load_config(path)
    config = ModelConfig.from_dict(raw)
    # a plan's weight conversions (the CPU's without seahal._native: wo_a to bf16) count as loaded;
    # the device rows keep the FP8 bytes a GPU holds
    conversions = model.plan.weight_conversions
    on_cpu = stored_tensors(config, formats, torch.bfloat16, conversions=conversions)
    assert {t.name: t.nbytes for t in on_cpu} == held  # tensor by tensor, to the byte
    on_gpu = sum(t.nbytes for t in stored_tensors(config, formats, torch.bfloat16))
    assert plan_memory(path, "1xH100", context=64, dtype=torch.bfloat16).weights.total == on_gpu
    assert (on_gpu == sum(held.values())) == (layout == "dense" or not conversions)


@pytest.mark.parametrize("tp, ep", [(2, 1), (1, 2), (2, 2)])
def test_weight_bytes_per_rank_equal_what_sharded_load_allocates(checkpoints, tp, ep):
    path = checkpoints["dense"]
    plan = plan_memory(path, f"{tp * ep}xH100", tp, ep, context=64, dtype=torch.bfloat16)
    for rank in range(tp * ep):
        parallel = Parallel(ParallelConfig(tp, ep), rank)
        model = load(path, device="cpu", dtype=torch.bfloat16, announce=False, parallel=parallel)
        assert sum(nbytes(held_tensors(model)).values()) == plan.weights.total, rank


def test_a_split_that_would_cut_a_quantisation_block_is_refused(checkpoints):
    # The tiny experts' intermediate dim is 128: tp=2 would leave each rank half a 128-wide block.
    with pytest.raises(ValueError, match=r"'layers\.0\.ffn\.experts\.0\.w2\.weight'.* tp=2"):
        plan_memory(checkpoints["release"], "2xH100", tp=2, ep=1, context=64)


def _tiny_cache_bytes(vector: int, index_key: int) -> int:
    """The tiny V4's cache (layers SWA, CSA, HCA m=16, CSA; window 16) for 2 sequences of 70
    tokens, by hand: ``vector`` / ``index_key`` bytes per stored KV vector / indexer key. A layer
    of ratio m stores ceil(70/m) entries: the 70 // m complete ones and a row for the incomplete
    block (where a position-generic step stores its compressor's padding)."""
    window = 2 * 16 * vector
    csa = window + 2 * 18 * (vector + index_key) + 4 * (2 * 8 * 256 * 4)  # 4 states [2, 2m, 2d] fp32
    hca = window + 2 * 5 * vector + 2 * (2 * 16 * 128 * 4)  # 2 states [2, m, d] fp32
    tables = 2 * 8 + 2 * 5 * 4  # the ratios 4 and 16 as int64; HCA entries 0..4 and their rows, int32
    return window + 2 * csa + hca + tables


@pytest.mark.parametrize(
    "cache_format, expected",
    [
        ("dense", _tiny_cache_bytes(128 * 4, 128 * 4)),  # fp32 vectors of 128
        ("fp8", _tiny_cache_bytes(64 + 2 * 64 + 8, 64 + 4)),  # 64 e4m3 + 64 bf16 + scale padded to 8; FP4 key
    ],
)
def test_cache_bytes_equal_an_allocated_filled_cache(checkpoints, cache_format, expected):
    model = load(checkpoints["release"], device="cpu", announce=False, cache_format=cache_format)
    cache = model.new_cache(2, 70)  # 70: not a multiple of the CSA (4) or HCA (16) ratio
    model(torch.randint(0, 512, (2, 17)), cache=cache)  # fills the ring, 4 CSA entries and 1 HCA entry
    held = sum(nbytes(held_tensors(cache)).values())
    assert held == expected
    assert kv_cache_bytes(model.config, 2, 70, torch.float32) == held
    plan = plan_memory(checkpoints["release"], "1xH100", context=70, batch=2, cache_format=cache_format,
                       dtype=torch.float32)
    assert plan.kv_cache_bytes == held


def test_largest_context_is_the_last_that_fits(checkpoints):
    plan = plan_memory(checkpoints["release"], "1xH100", context=64, usable_fraction=1e-3, dtype=torch.bfloat16)
    config = ModelConfig.from_dict({**load_config(checkpoints["release"])[1], "cache_format": "fp8"})

    def total(context: int) -> int:
        return (plan.weights.total + kv_cache_bytes(config, 1, context, torch.bfloat16)
                + workspace_bytes(config, 1, context, 1, 1, torch.bfloat16))

    assert 64 < plan.max_context
    assert total(plan.max_context) <= plan.usable_bytes < total(plan.max_context + 1)


def test_presets_have_the_published_sizes():
    # DeepSeek's model cards: V4-Flash 284B parameters, V4-Pro 1.6T (FP4 codes count two a byte).
    for name, published, tolerance in (("V4-Flash", 284e9, 0.005), ("V4-Pro", 1.6e12, 0.03)):
        _, raw, formats = load_config(name)
        tensors = stored_tensors(ModelConfig.from_dict(raw), formats, torch.bfloat16)
        params = sum(math.prod(t.shape) * (2 if t.fmt == "fp4" else 1) for t in tensors if "scale" not in t.fmt)
        assert abs(params / published - 1) < tolerance, (name, params)
    flash = ModelConfig.from_dict(load_config("v4-flash")[1])
    assert [flash.layer_kind(i) for i in range(flash.n_layers)].count("csa") == 21


def test_release_formats_are_read_from_config_and_checkpoint(checkpoints):
    assert load_config("V4-Pro")[2] == WeightFormats("fp8", "fp4", "ue8m0")
    written = "ue8m0" if E8M0_DTYPE is not None else "fp32"  # torch < 2.7 writes e8m0 scales' fp32 values
    assert load_config(checkpoints["release"])[2] == WeightFormats("fp8", "fp4", written)
    assert load_config(checkpoints["fp8-experts"])[2] == WeightFormats("fp8", "fp8", written)
    # the dense tiny checkpoint's config.json still says dtype fp8: the headers win
    assert load_config(checkpoints["dense"])[2].linears == "dense"


def test_device_table():
    assert parse_devices("8xH100") == (8, device_memory("h100"))
    assert parse_devices("16 x Ascend910B")[1].total_bytes == 64 << 30
    assert all(d.source for d in DEVICES)
    with pytest.raises(ValueError, match="unknown device 'X9'"):
        parse_devices("8xX9")


def test_cli_prints_and_writes_json(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert cli_main(["plan-memory", "--config", "V4-Flash", "--devices", "8x910B", "--json", str(out)]) == 0
    assert "largest context at batch 1" in capsys.readouterr().out
    plan = json.loads(out.read_text())
    assert (plan["device"], plan["devices"], plan["fits"]) == ("910B", 8, True)
    with pytest.raises(SystemExit, match="--tp x --ep must equal the 8 devices"):
        cli_main(["plan-memory", "--config", "V4-Flash", "--tp", "4", "--ep", "4"])


@pytest.mark.skipif(E8M0_DTYPE is None, reason="the doc counts e8m0 scales as bytes: torch >= 2.7 holds them so")
def test_doc_is_generated():
    assert DOC.read_text() == memory_doc(), "run `seahal plan-memory --write-doc docs/scale-out-memory.md`"
