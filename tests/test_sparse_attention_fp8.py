"""sparse_attention_fp8: sparse attention over the packed FP8 KV records (v4_ops.md §9, §12).

The reference kernel against its definition, ``sparse_attention(q, kv_cache_unpack(records)
.to(q.dtype), ...)``, bit for bit, reading only the records the indices select; the contract's
errors; and the model, whose attention reads the layer's stored ``[window ring | compressed
entries]`` buffer in place at decode: a bf16 model with the FP8 cache gives the dense cache's
logits bit for bit (the FP8-simulated KV is exactly what the records decode to), and every
attention call equals the decode-everything composition.
"""

from __future__ import annotations

import pytest
import torch

from seahal import hal
from seahal.backends.cpu.reference.attention import sparse_attention, sparse_attention_fp8
from seahal.backends.cpu.reference.quant import kv_cache_pack, kv_cache_unpack
from seahal.model import load
from seahal.model.tiny import write_tiny_checkpoint

E4M3_NAN_AND_E8M0_NAN = 0xFF
"""A byte that decodes to NaN as an e4m3 code and as an e8m0 exponent: poison for unread records."""


def _records(b: int, n: int, d: int, rope_dim: int, tile: int, gen: torch.Generator) -> torch.Tensor:
    """[B, N, record] uint8 of normal vectors whose nope tiles are scaled by 2^-12..2^12 (e8m0
    exponents ~108..132, subnormal e4m3 codes where an element is far below its tile's max)."""
    kv = torch.randn(b, n, d, generator=gen)
    scale = torch.exp2(torch.randint(-12, 13, (b, n, (d - rope_dim) // tile), generator=gen).float())
    kv[..., : d - rope_dim] *= scale.repeat_interleave(tile, dim=-1)
    return kv_cache_pack(kv, rope_dim, tile)


def _query(b: int, s: int, h: int, d: int, k: int, n: int, dtype: torch.dtype, gen: torch.Generator):
    q = (torch.randn(b, s, h, d, generator=gen) * 2.0**-6).to(dtype)
    indices = torch.randint(0, n, (b, s, k), generator=gen)
    indices = torch.where(torch.rand(b, s, k, generator=gen) < 0.25, -1, indices)
    indices[..., 1] = indices[..., 0]  # a repeated key counts twice
    return q, indices, torch.randn(h, generator=gen)


@pytest.mark.parametrize(
    "dtype, d, rope_dim, tile",
    [(torch.bfloat16, 512, 64, 64), (torch.float32, 80, 24, 8), (torch.float64, 128, 64, 64)],
)
def test_reference_is_unpack_then_sparse_attention_bit_for_bit(dtype, d, rope_dim, tile):
    # V4's 584-byte records; 7 tiles of 8 with the nope/rope boundary at 56; fp64 q. The records
    # are every other row of a longer buffer, the indices int64 with -1 gaps and repeats.
    gen = torch.Generator().manual_seed(d)
    records = _records(2, 2 * 11, d, rope_dim, tile, gen)[:, ::2]
    q, indices, sink = _query(2, 3, 5, d, 7, 11, dtype, gen)
    out = sparse_attention_fp8(q, records, indices, sink, d**-0.5, rope_dim, tile)
    kv = kv_cache_unpack(records, d, rope_dim, tile).to(dtype)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert torch.equal(out, sparse_attention(q, kv, indices.int(), sink, d**-0.5))


def test_reference_reads_only_the_selected_records():
    gen = torch.Generator().manual_seed(1)
    records = _records(1, 6, 512, 64, 64, gen)
    q, indices, sink = _query(1, 2, 4, 512, 5, 6, torch.bfloat16, gen)
    indices[..., -1] = 0  # empty slots read row 0 (weight 0): keep it among the selected ones
    want = sparse_attention_fp8(q, records, indices, sink, 0.04)
    unread = torch.ones(6, dtype=torch.bool)
    unread[indices.clamp(min=0).flatten()] = False
    assert unread.any()
    poisoned = records.clone()
    poisoned[:, unread] = E4M3_NAN_AND_E8M0_NAN  # NaN keys wherever nothing points
    assert torch.equal(sparse_attention_fp8(q, poisoned, indices, sink, 0.04), want)
    # 2^24 rows (a stride-0 view of one record: 9.8 GB were it materialised, 16 GiB decoded) cost
    # only the selected ones: the same output as the one-row store with every index at row 0.
    huge = records[:, :1].expand(1, 1 << 24, 584)
    far = torch.where(indices >= 0, torch.randint(0, 1 << 24, indices.shape, generator=gen), -1)
    assert torch.equal(
        sparse_attention_fp8(q, huge, far, sink, 0.04),
        sparse_attention_fp8(q, records[:, :1], torch.where(far >= 0, 0, -1), sink, 0.04),
    )


def test_reference_needs_no_host_sync():
    """Runs on meta tensors, where a host synchronisation (.item(), nonzero) raises."""
    q = torch.empty(2, 3, 4, 512, device="meta", dtype=torch.bfloat16)
    records = torch.empty(2, 9, 584, device="meta", dtype=torch.uint8)
    indices = torch.empty(2, 3, 6, device="meta", dtype=torch.int32)
    out = sparse_attention_fp8(q, records, indices, torch.empty(4, device="meta"), 0.1)
    assert out.shape == q.shape and out.dtype == torch.bfloat16


def test_contract_names_the_argument_and_the_record_geometry():
    plan = hal.plan("cpu", ops=["sparse_attention_fp8"], announce=False, environ={})
    assert plan.entries["sparse_attention_fp8"].label == "cpu.reference"
    gen = torch.Generator().manual_seed(2)
    records = _records(2, 9, 512, 64, 64, gen)
    q, indices, sink = _query(2, 1, 3, 512, 6, 9, torch.bfloat16, gen)
    bad_calls = {
        "sparse_attention_fp8: records must be [B=2, N, 584] uint8, got [2, 9, 583] uint8 on cpu":
            (q, records[..., :583], indices, sink, 0.1),
        "sparse_attention_fp8: records must be [B=2, N, 584] uint8, got [2, 9, 584] float32 on cpu":
            (q, records.float(), indices, sink, 0.1),
        "sparse_attention_fp8: records must be [B=2, N, 200] uint8, got [2, 9, 584] uint8 on cpu":
            (q[..., :128], records, indices, sink, 0.1),  # q's head dim sets the record size
        "sparse_attention_fp8: q's head dim D - rope_dim must be a multiple of tile=48, got 512 - 64 = 448":
            (q, records, indices, sink, 0.1, 64, 48),
        "sparse_attention_fp8: indices must be [B=2, S=1, K] int32 or int64, got [2, 6] int32 on cpu":
            (q, records, indices[:, 0].int(), sink, 0.1),
        "sparse_attention_fp8: softmax_scale must be > 0, got 0.0": (q, records, indices, sink, 0.0),
    }
    for message, args in bad_calls.items():
        with pytest.raises(hal.SpecError) as err:
            plan.ops.sparse_attention_fp8(*args)
        assert str(err.value) == message


# -- the model's FP8 cache ----------------------------------------------------------------------

PROMPT, CHUNK, TOKENS, CAPACITY = 9, 7, 48, 64
"""A prefill, a 7-token chunk at position 9 (the concatenated path over a ring that already holds
tokens), then decode to 48: the tiny config's 16-slot window wraps twice, CSA entries (m = 4)
complete every 4 tokens and HCA entries (m = 16) at 16, 32 and 48."""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=5, quantise=False)


def _run(model, ids: torch.Tensor):
    """Logits [B, TOKENS, vocab] of prefill, chunk, then one token at a time; and the cache."""
    cache = model.new_cache(ids.shape[0], CAPACITY)
    outs = [model(ids[:, :PROMPT], cache=cache), model(ids[:, PROMPT : PROMPT + CHUNK], cache=cache)]
    outs += [model(ids[:, t : t + 1], cache=cache) for t in range(PROMPT + CHUNK, TOKENS)]
    return torch.cat(outs, dim=1), cache


def test_bf16_model_fp8_cache_gives_the_dense_cache_logits_bit_for_bit(checkpoint):
    """The KV is FP8-simulated (e4m3 x 2^k nope dims) and bf16, so a record decodes to exactly the
    vector the dense cache stores: the two formats must attend identical keys everywhere."""
    ids = torch.randint(0, 512, (2, TOKENS), generator=torch.Generator().manual_seed(0))
    runs = {
        fmt: _run(load(checkpoint, device="cpu", dtype=torch.bfloat16, announce=False, cache_format=fmt), ids)
        for fmt in ("dense", "fp8")
    }
    (dense, dense_cache), (fp8, fp8_cache) = runs["dense"], runs["fp8"]
    assert torch.equal(fp8, dense)
    config = dense_cache.config
    for dense_layer, fp8_layer in zip(dense_cache.layers, fp8_cache.layers):
        assert fp8_layer.kv.data.dtype == torch.uint8 and fp8_layer.kv.data.shape[-1] == 200
        decoded = kv_cache_unpack(fp8_layer.kv.data, config.head_dim, config.rope_head_dim, 64)
        assert torch.equal(decoded, dense_layer.kv.data)  # ring and entries in the same rows
    assert [lc.n_compressed for lc in fp8_cache.layers] == [0, TOKENS // 4, TOKENS // 16, TOKENS // 4]


@pytest.mark.parametrize("cache_format", ["dense", "fp8"])
def test_decode_attends_the_stored_buffer_in_place(checkpoint, cache_format):
    """Every attention call equals the composition that decodes every row first (bit for bit);
    a one-token step passes the layer's own buffer (no copy), and nothing else decodes the cache."""
    model = load(checkpoint, device="cpu", dtype=torch.bfloat16, announce=False, cache_format=cache_format)
    ops, calls = model.ops, []
    op = "sparse_attention_fp8" if cache_format == "fp8" else "sparse_attention"
    bound, unpack = getattr(ops, op), ops.kv_cache_unpack

    def spy(q, keys, indices, sink, scale, *rest):  # rest: (rope_dim, tile) for records, then positions, freqs
        out = bound(q, keys, indices, sink, scale, *rest)
        geometry, rotation = rest[:-2], rest[-2:]
        rows = kv_cache_unpack(keys, q.shape[-1], *geometry).to(q.dtype) if geometry else keys
        assert torch.equal(out, sparse_attention(q, rows, indices, sink, scale, *rotation))
        calls.append((q.shape[1], keys.data_ptr()))
        return out

    def no_unpack(*args):
        raise AssertionError("the model decoded cached records with kv_cache_unpack")

    ops.kv_cache_unpack = no_unpack
    setattr(ops, op, spy)
    try:
        ids = torch.randint(0, 512, (1, TOKENS), generator=torch.Generator().manual_seed(1))
        _, cache = _run(model, ids)
    finally:
        setattr(ops, op, bound)
        ops.kv_cache_unpack = unpack
    layers = len(cache.layers)
    buffers = [lc.kv.data.data_ptr() for lc in cache.layers]
    steps = [calls[i : i + layers] for i in range(0, len(calls), layers)]
    assert len(steps) == 2 + TOKENS - PROMPT - CHUNK
    for chunk in steps[:2]:  # prefill and chunk: a concatenation, not the buffer
        assert all(s > 1 and ptr not in buffers for s, ptr in chunk)
    for step in steps[2:]:
        assert [ptr for _, ptr in step] == buffers
