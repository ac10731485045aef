"""Packed indexer keys (v4_ops.md §12): the FP4 / FP8 record codec, the ``indexer_topk_packed`` contract
and reference, and the model's indexer key cache in each format.

Judges: the spec's formulas written out here (scale rules, byte layout by hand), the FP4 values the
model's indexer simulation already rounds to, a conformance run of a kernel that reads the wrong
nibble, and the model run with the keys stored dense (the values the packed records must decode to).
"""

from __future__ import annotations

import math
import struct

import pytest
import torch

from seahal import hal
from seahal.backends.cpu.reference.indexer import indexer_topk, indexer_topk_packed
from seahal.hal.formats import (
    fp4_quant_dequant,
    index_key_bytes,
    index_key_pack,
    index_key_unpack,
)
from seahal.hal.registry import Availability, register_backend, register_kernel
from seahal.model import ModelConfig, load
from seahal.model.cache import Cache
from seahal.testing.conformance import run_conformance

from v4_checkpoints import CSA, HCA, SWA, make_hf_model, save_hf_checkpoint


def _keys(*shape: int, seed: int = 0) -> torch.Tensor:
    """Normal keys, each 32-block scaled by 2^[-10, 10]: block scales far apart within a key."""
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(*shape, generator=gen)
    blocks = keys.view(*shape[:-1], -1, 32)
    blocks *= torch.exp2(torch.randint(-10, 11, (*shape[:-1], shape[-1] // 32, 1), generator=gen).float())
    return keys


# -- codec -----------------------------------------------------------------------------------------


def test_record_bytes():
    assert index_key_bytes(128, "fp4") == 68 and index_key_bytes(128, "fp8") == 132  # V4: MXFP4 / V3.2 layout
    assert index_key_bytes(64, "fp4") == 34 and index_key_bytes(96, "fp8") == 100
    with pytest.raises(ValueError, match="multiple of 32, got 48"):
        index_key_bytes(48, "fp4")
    with pytest.raises(ValueError, match=r"must be one of \['fp4', 'fp8'\], got 'int8'"):
        index_key_bytes(128, "int8")


def test_fp4_records_hold_the_model_simulation_values():
    """fp4 decodes to exactly what the model's FP4 indexer simulation (fp4_quant then dequant)
    rounds to, and packing those values again keeps them (the cache stores simulated keys)."""
    keys = _keys(3, 7, 128)
    records = index_key_pack(keys, "fp4")
    assert records.shape == (3, 7, 68) and records.dtype == torch.uint8
    simulated = fp4_quant_dequant(keys)
    assert torch.equal(index_key_unpack(records, 128, "fp4"), simulated)
    for dtype in (torch.float32, torch.bfloat16):
        again = simulated.to(dtype)
        assert torch.equal(index_key_unpack(index_key_pack(again, "fp4"), 128, "fp4", dtype), again)


def test_fp4_layout_by_hand():
    key = torch.zeros(64)
    key[0], key[1], key[2] = 6.0, -0.5, 1.5  # block 0: amax 6 -> scale 2^0
    key[32:] = 2.0**-20 * 3  # block 1: amax 3 * 2^-20 -> scale 2^ceil(log2(2^-21)) = 2^-21, code 6.0 -> 0b0111
    record = index_key_pack(key, "fp4")
    assert record[0] == 0x7 | (0x9 << 4)  # element 0 (6.0, code 7) low nibble; element 1 (-0.5, code 8|1) high
    assert record[1] == 0x3  # element 2 (1.5, code 3), element 3 (0)
    assert record[16] == 0x77  # block 1: two 6.0 codes per byte
    assert record[32:].tolist() == [127, 127 - 21]  # e8m0 scales 2^0, 2^-21


def test_fp8_scale_rule_and_layout():
    """fp8: one scale per key, ``2^ceil(log2(max(amax, 1e-4) / 448))`` (vLLM / V3.2 ue8m0), stored
    as a little-endian fp32 after the d e4m3 codes; a zero key takes the floor."""
    keys = _keys(5, 128, seed=1)
    keys[3] = 0.0
    records = index_key_pack(keys, "fp8")
    assert records.shape == (5, 132)
    for j in range(5):
        amax = max(float(keys[j].abs().max()), 1e-4)
        scale = 2.0 ** math.ceil(math.log2(amax / 448))
        assert bytes(records[j, 128:].tolist()) == struct.pack("<f", scale)
        codes = (keys[j] / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
        assert torch.equal(records[j, :128], codes.view(torch.uint8))
    assert struct.unpack("<f", bytes(records[3, 128:].tolist()))[0] == 2.0**-22  # 1e-4/448 rounded up
    decoded = index_key_unpack(records, 128, "fp8")
    assert ((decoded - keys).abs() <= keys.abs().amax(-1, keepdim=True) * 2.0**-4).all()  # e4m3: 3 mantissa bits


def test_unpack_rounds_to_the_requested_dtype():
    """A non-power-of-two fp32 scale (vLLM's non-ue8m0 mode) decodes in fp32, then rounds once."""
    records = index_key_pack(_keys(4, 64, seed=2), "fp8")
    records[:, 64:] = (records[:, 64:].contiguous().view(torch.float32) * 1.3).view(torch.uint8)
    fp32 = index_key_unpack(records, 64, "fp8")
    assert torch.equal(index_key_unpack(records, 64, "fp8", torch.bfloat16), fp32.to(torch.bfloat16))
    assert not torch.equal(fp32.to(torch.bfloat16).float(), fp32)
    with pytest.raises(ValueError, match=r"fp8 index keys of d=64 must be \[..., 68\] uint8, got \[4, 67\]"):
        index_key_unpack(records[:, :67], 64, "fp8")


# -- the op ----------------------------------------------------------------------------------------


def _call(fmt: str = "fp4", d: int = 64, n: int = 6, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 5, 3, d, generator=gen)
    weights = torch.randn(2, 5, 3, generator=gen)
    return q, weights, index_key_pack(_keys(2, n, d, seed=seed), fmt), fmt, 4, 20, 3


@pytest.mark.parametrize("fmt", ["fp4", "fp8"])
def test_reference_is_indexer_topk_on_the_decoded_keys(fmt):
    q, weights, records, _, ratio, start_pos, topk = _call(fmt)
    got = indexer_topk_packed(q, weights, records, fmt, ratio, start_pos, topk)
    assert torch.equal(got, indexer_topk(q, weights, index_key_unpack(records, 64, fmt), ratio, start_pos, topk))
    assert got.shape == (2, 5, 3) and (got >= 0).all()
    plan = hal.plan("cpu", ops=["indexer_topk_packed"], announce=False)
    assert torch.equal(plan.ops.indexer_topk_packed(q, weights, records, fmt, ratio, start_pos, topk), got)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"key_format": "fp16"}, "key_format must be one of ['fp4', 'fp8'], got 'fp16'"),
        ({"key_format": "fp8"}, "keys's last dim must be 68 bytes for fp8 keys of d=64 (q's head dim), got 34"),
        ({"q": torch.zeros(2, 5, 3, 48)},
         "d must be a multiple of 32 (fp4 keys carry one e8m0 scale per 32 elements), got d=48"),
        ({"keys": torch.zeros(2, 6, 34)}, "keys must be [B=2, N, *] uint8, got [2, 6, 34] float32 on cpu"),
    ],
)
def test_contract_errors(change, message):
    names = ("q", "weights", "keys", "key_format", "ratio", "start_pos", "topk")
    args = dict(zip(names, _call("fp4")))
    with pytest.raises(hal.SpecError) as err:
        hal.get_spec("indexer_topk_packed").check(**{**args, **change})
    assert str(err.value) == f"indexer_topk_packed: {message}"


def _high_nibble_first(q, weights, keys, key_format, ratio, start_pos, topk, weights_scale=1.0, offset=0):
    """The reference with the two FP4 codes of each byte swapped: element 2i read from the high nibble."""
    if key_format == "fp4":
        d = q.shape[-1]
        keys = keys.clone()
        keys[..., : d // 2] = (keys[..., : d // 2] >> 4) | (keys[..., : d // 2] << 4)
    return indexer_topk_packed(q, weights, keys, key_format, ratio, start_pos, topk, weights_scale, offset)


def test_conformance_catches_a_kernel_reading_the_wrong_nibble(isolated_registry):
    register_backend("nibbleswap", device_type="cpu", probe=lambda: Availability(True, "test backend"))
    register_kernel("indexer_topk_packed", "nibbleswap", "swapped", _high_nibble_first)
    report = run_conformance("nibbleswap", ["indexer_topk_packed"], property_examples=0)
    failed = {r.case for r in report.failures}
    assert failed and all(name.startswith(("fp4:", "example")) for name in failed), report.summary()
    assert not any(name.startswith("fp8:") for name in failed)


# -- the model's indexer key cache -----------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_hf_checkpoint(make_hf_model([SWA, CSA, HCA, CSA], seed=3), tmp_path_factory.mktemp("ckpt"))


def test_index_cache_format_defaults_to_the_fp4_simulation():
    assert ModelConfig().index_key_format == "dense"
    assert ModelConfig(cache_format="fp8").index_key_format == "fp4"
    assert ModelConfig(cache_format="fp8", simulate_fp4_indexer=False).index_key_format == "dense"
    assert ModelConfig(index_cache_format="fp8").index_key_format == "fp8"  # any KV format
    with pytest.raises(ValueError, match="index_cache_format must be None, 'dense', 'fp4' or 'fp8', got 'fp16'"):
        ModelConfig(index_cache_format="fp16")
    with pytest.raises(ValueError, match="fp4 indexer keys need index_head_dim to be a multiple of 32, got 48"):
        ModelConfig(index_cache_format="fp4", index_head_dim=48)


def test_fp8_index_keys_bytes_per_token():
    """V4-Flash with vLLM's default FP8 indexer cache: 132-byte keys instead of 68."""
    flash = ModelConfig(compress_ratios=[0, 0] + [4, 128] * 20 + [4], cache_format="fp8", index_cache_format="fp8")
    cache = Cache.new(flash, 1, 1 << 20, torch.bfloat16, "meta", ops=None)
    assert cache.bytes_per_token() == pytest.approx(21 * (584 + 132) / 4 + 20 * 584 / 128)


def _run(model, ids: torch.Tensor, prefill: int):
    """Prefill then one-token steps; returns (logits, [(op, key_format, keys) per indexer call])."""
    calls = []
    for name in ("indexer_topk", "indexer_topk_packed"):
        bound = getattr(model.ops, name)

        def spy(*args, _bound=bound, _name=name):
            fmt = args[3] if _name == "indexer_topk_packed" else "dense"
            calls.append((_name, fmt, args[2].clone()))
            return _bound(*args)

        setattr(model.ops, name, spy)
    cache = model.new_cache(ids.shape[0], 32)
    logits = [model(ids[:, :prefill], cache=cache)]
    logits += [model(ids[:, t : t + 1], cache=cache) for t in range(prefill, ids.shape[1])]
    return torch.cat(logits, 1), calls, cache


def test_packed_fp4_keys_select_bitwise_as_the_dense_store(checkpoint):
    """The release layout (FP8 KV records, FP4 indexer key records scored by indexer_topk_packed)
    against the same model storing the FP4-simulated keys dense: the records decode to those
    values exactly, so every logit is bitwise equal (top-2 of up to 4 entries: the scores decide)."""
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    runs = {
        fmt: _run(load(checkpoint, device="cpu", announce=False, cache_format="fp8", index_topk=2,
                       index_cache_format=fmt), ids, prefill=9)
        for fmt in ("dense", None)
    }
    (dense_logits, dense_calls, _), (packed_logits, packed_calls, cache) = runs["dense"], runs[None]
    assert {c[:2] for c in dense_calls} == {("indexer_topk", "dense")}
    assert {c[:2] for c in packed_calls} == {("indexer_topk_packed", "fp4")}
    assert cache.named_tensors()["layers.1.index_keys"].shape == (2, 8, 68)
    for (_, _, dense), (_, _, records) in zip(dense_calls, packed_calls):
        assert torch.equal(index_key_unpack(records, 128, "fp4", dense.dtype), dense)
    assert torch.equal(packed_logits, dense_logits)


def test_fp8_index_keys_are_the_fp8_records_of_the_keys(checkpoint):
    """index_cache_format="fp8": the cache holds 132-byte records, the indexer scores them packed,
    and the records are index_key_pack's of the keys the dense store would hold (first CSA layer's
    prefill, where both runs have the same inputs)."""
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(1))
    dense = _run(load(checkpoint, device="cpu", announce=False, index_cache_format="dense"), ids, 9)
    logits, calls, cache = _run(load(checkpoint, device="cpu", announce=False, index_cache_format="fp8"), ids, 9)
    assert {c[:2] for c in calls} == {("indexer_topk_packed", "fp8")}
    assert cache.named_tensors()["layers.3.index_keys"].shape == (2, 8, 132)
    first_dense, first_packed = dense[1][0][2], calls[0][2]
    assert first_packed.shape == (2, 2, 132)  # tokens 0..8 complete entries 0 and 1
    assert torch.equal(first_packed, index_key_pack(first_dense, "fp8"))
    assert torch.isfinite(logits).all()
