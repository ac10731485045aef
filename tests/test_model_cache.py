"""The decode cache: storage formats, bytes per token, capacity, and checkpoint errors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from seahal.backends.cpu.reference.quant import kv_cache_pack, kv_cache_unpack
from seahal.model import ModelConfig, load
from seahal.model.cache import Cache
from seahal.model.checkpoint import CheckpointError

from v4_checkpoints import CSA, HCA, SWA, make_hf_model, save_hf_checkpoint

V32_BYTES_PER_TOKEN = 61 * (656 + 132)
"""DeepSeek-V3.2: a 656-byte FP8 MLA entry and a 132-byte FP8 indexer key per token, 61 layers."""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_hf_checkpoint(make_hf_model([SWA, CSA, HCA, CSA], seed=3), tmp_path_factory.mktemp("ckpt"))


def test_v4_flash_fp8_cache_is_7_percent_of_v32():
    flash = ModelConfig(compress_ratios=[0, 0] + [4, 128] * 20 + [4], cache_format="fp8")
    cache = Cache.new(flash, 1, 1 << 20, torch.bfloat16, "meta", ops=None)
    # 21 CSA layers: (584 B KV record + 68 B FP4 indexer key) / 4; 20 HCA layers: 584 B / 128.
    assert cache.bytes_per_token() == pytest.approx(21 * (584 + 68) / 4 + 20 * 584 / 128)
    assert 0.070 < cache.bytes_per_token() / V32_BYTES_PER_TOKEN < 0.075


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packing_an_fp8_rounded_kv_stores_the_same_values(dtype):
    """Why an FP8 cache skips ``fp8_kv_precision`` before packing the window's KV: packing rounds
    the nope dims through e4m3 in the same 1x64 ue8m0 tiles, and rounding twice decodes to the same
    values as once. Where the first rounding lowers a tile's amax below a power of two (amax / s in
    (224, 232) rounds to 224) the second takes half the scale and twice the codes: other bytes,
    equal values. Tiles here: random, near that boundary, tiny (the 1e-4 amax floor), and zero."""
    from types import SimpleNamespace

    from seahal.backends.cpu.reference.quant import fp8_act_quant
    from seahal.model.quant_sim import fp8_kv_precision

    gen = torch.Generator().manual_seed(0)
    kv = torch.randn(4, 64, 576, generator=gen) * torch.exp2(torch.randint(-20, 20, (4, 64, 1), generator=gen).float())
    tiles = kv[..., :512].unflatten(-1, (8, 64))
    tiles[:, :, 1] *= 228 / tiles[:, :, 1].abs().amax(-1, keepdim=True)  # amax / s = 228: rounds to 224
    tiles[:, :, 2] *= 1e-7
    tiles[:, :, 3] = 0.0
    kv = kv.to(dtype)
    rounded = fp8_kv_precision(kv, SimpleNamespace(fp8_act_quant=fp8_act_quant), rope_dim=64)
    once, twice = kv_cache_pack(kv), kv_cache_pack(rounded)
    assert not torch.equal(once, twice)  # the boundary tiles store other bytes ...
    decoded = kv_cache_unpack(once, 576)
    assert torch.equal(decoded.view(torch.int16), kv_cache_unpack(twice, 576).view(torch.int16))  # ... the same values
    assert torch.equal(decoded.view(torch.int16), rounded.to(torch.bfloat16).view(torch.int16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packing_fp4_rounded_index_keys_stores_the_same_values(dtype):
    """Why FP4 index-key records skip the keys' simulated FP4 rounding (the rotation stays): the
    records round the rotated keys through e2m1 in the same 1x32 ue8m0 blocks, and twice decodes
    as once. A block whose amax / s in (3, 3.5) rounds to 3 is stored with half the scale and
    twice the codes (e2m1 values up to 3, doubled, stay e2m1 values)."""
    from seahal.backends.cpu.reference.quant import fp4_quant, hadamard_rotate
    from seahal.hal.formats import fp4_dequantize, hadamard, index_key_pack, index_key_unpack

    gen = torch.Generator().manual_seed(1)
    keys = torch.randn(4, 64, 128, generator=gen) * torch.exp2(torch.randint(-20, 20, (4, 64, 1), generator=gen).float())
    keys = keys.to(dtype)
    rotated = hadamard(keys)
    blocks = rotated.unflatten(-1, (4, 32))
    blocks[:, :, 1] *= 3.2 / blocks[:, :, 1].abs().amax(-1, keepdim=True)  # amax / s = 3.2: rounds to 3
    blocks[:, :, 2] = 0.0
    untouched = hadamard_rotate(keys, 32)
    simulated = fp4_dequantize(*fp4_quant(rotated, 32), 32, dtype)  # its rounding, on the edited blocks
    assert torch.equal(untouched[:, :, :32], simulated[:, :, :32])  # the simulation: rotate, then this
    once, twice = index_key_pack(rotated, "fp4"), index_key_pack(simulated, "fp4")
    assert not torch.equal(once, twice)
    decoded = index_key_unpack(once, 128, "fp4", torch.float32)
    assert torch.equal(decoded, index_key_unpack(twice, 128, "fp4", torch.float32))
    assert torch.equal(decoded, simulated.float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fp8_cache_decode_tracks_the_full_forward(checkpoint, dtype):
    """Also for a float64 model, whose KV vectors the FP8 record ops take rounded to fp32."""
    dense = load(checkpoint, device="cpu", announce=False, dtype=dtype)
    fp8 = load(checkpoint, device="cpu", announce=False, cache_format="fp8", dtype=dtype)
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    for model, bound in ((dense, 1e-5), (fp8, 1e-4)):
        full = model(ids)
        cache = model.new_cache(2, 64)
        outs = [model(ids[:, :9], cache=cache)] + [model(ids[:, t : t + 1], cache=cache) for t in range(9, 40)]
        error = (torch.cat(outs, 1) - full).abs().max() / full.abs().max()
        # Prefill and decode attend the same keys (fp8: every key is its stored record, the query's
        # own token included), so only the fp32 order differs: ~4e-7 of the logit scale dense. fp8
        # adds e4m3 rounding of activations and KV: an fp32 input a last bit apart at a rounding
        # boundary moves one element by a code step (2^-3 of it); observed 2.3e-5.
        assert error <= bound, (model.config.cache_format, error)
    # head_dim 128 (64 RoPE), index_head_dim 128, ratios [0, 4, 16, 4]. dense: KV and indexer key
    # 128 elements each per entry; fp8: a 64 + 128 + 1 (+7 pad) = 200 B record and a 64 + 4 = 68 B key.
    row = 128 * dtype.itemsize
    assert dense.new_cache(1, 64).bytes_per_token() == 2 * (row + row) / 4 + row / 16
    assert fp8.new_cache(1, 64).bytes_per_token() == 2 * (200 + 68) / 4 + 200 / 16


def test_bf16_compressor_writes_fp8_records_as_packing_its_entries_did(checkpoint):
    """A bf16 model with the FP8 cache takes its compressed entries as records from kv_compress_fp8;
    before, kv_compress's bf16 entries went through fp8_kv_precision and the cache's kv_cache_pack.
    Re-quantising fp8_kv_precision's output reproduces its codes up to a tile scale halving with
    doubled codes (same values), so the stored entries decode identically and the logits are
    bitwise the same, over a prefill and decode steps completing CSA (m=4) and HCA (m=16) entries."""
    from seahal.model.attention import Compressor

    fused = load(checkpoint, device="cpu", dtype=torch.bfloat16, announce=False, cache_format="fp8")
    before = load(checkpoint, device="cpu", dtype=torch.bfloat16, announce=False, cache_format="fp8")
    main = [m for m in before.modules() if isinstance(m, Compressor) and m.records is not None]
    assert len(main) == 3  # CSA, HCA, CSA: the indexers' compressors keep dense keys
    for module in main:
        module.records = None  # the path before kv_compress_fp8
    ids = torch.randint(0, 512, (2, 37), generator=torch.Generator().manual_seed(2))
    caches = [fused.new_cache(2, 48), before.new_cache(2, 48)]
    for chunk in [slice(0, 9)] + [slice(t, t + 1) for t in range(9, 37)]:
        logits = [model(ids[:, chunk], cache=cache) for model, cache in zip((fused, before), caches)]
        assert torch.equal(logits[0], logits[1]), chunk
    for mine, theirs in zip(caches[0].layers, caches[1].layers):
        assert mine.n_compressed == theirs.n_compressed
        stored = [layer.compressed_rows() for layer in (mine, theirs)]
        decoded = [kv_cache_unpack(rows, 128, 64, 64) for rows in stored]
        assert torch.equal(decoded[0], decoded[1])
    assert [layer.n_compressed for layer in caches[0].layers] == [0, 9, 2, 9]


def test_compressor_projects_through_one_stacked_weight(checkpoint):
    """Each compressor's wkv and wgate run as one fp32_linear over [wkv; wgate]: the two column views
    of its output are the two projections bit for bit (each column its own weight row's sum), the
    Linears' weights become views of the stacked matrix (no second copy), and a weight replaced
    afterwards is stacked again rather than served stale."""
    from seahal.backends.cpu.reference.linear import fp32_linear
    from seahal.model.attention import Compressor

    model = load(checkpoint, device="cpu", dtype=torch.bfloat16, announce=False)
    compressors = [m for m in model.modules() if isinstance(m, Compressor)]
    assert len(compressors) == 5  # CSA, HCA, CSA, and the two CSA layers' indexers
    gen = torch.Generator().manual_seed(7)
    for module in compressors:
        x = torch.randn(2, 5, module.wkv.in_features, generator=gen).to(torch.bfloat16)
        kv, score = module._projections(x)
        assert torch.equal(kv, fp32_linear(x, module.wkv.weight))
        assert torch.equal(score, fp32_linear(x, module.wgate.weight))
        storage = module._stacked.weights()[0].untyped_storage().data_ptr()
        assert {w.untyped_storage().data_ptr() for w in (module.wkv.weight, module.wgate.weight)} == {storage}
        replaced = torch.randn(module.wgate.weight.shape, generator=gen).to(torch.bfloat16)
        module.wgate.set_weight(replaced, None, torch.bfloat16)
        kv, score = module._projections(x)
        assert torch.equal(score, fp32_linear(x, replaced)) and torch.equal(kv, fp32_linear(x, module.wkv.weight))
        assert module._stacked.weights()[0].untyped_storage().data_ptr() != storage


def test_csa_layer_projects_both_compressors_through_one_stacked_weight(checkpoint):
    """A CSA layer's two compressors (its own and its indexer's) project x by one fp32_linear over
    [wkv; wgate; indexer wkv; indexer wgate]: each column view is its Linear's product bit for bit,
    and the four weights become views of one storage; an HCA layer's compressor makes its own."""
    from seahal.backends.cpu.reference.linear import fp32_linear
    from seahal.model.attention import Attention

    model = load(checkpoint, device="cpu", dtype=torch.bfloat16, announce=False)
    attentions = [m for m in model.modules() if isinstance(m, Attention) and m.compressor is not None]
    gen = torch.Generator().manual_seed(9)
    for module in attentions:
        x = torch.randn(2, 5, module.wkv.in_features, generator=gen).to(torch.bfloat16)
        own, index = module._compressor_projections_of(x)
        if module.indexer is None:
            assert (own, index) == (None, None)
            continue
        linears = (module.compressor.wkv, module.compressor.wgate, module.indexer.compressor.wkv,
                   module.indexer.compressor.wgate)
        for got, linear in zip((*own, *index), linears, strict=True):
            assert torch.equal(got, fp32_linear(x, linear.weight))
        assert len({linear.weight.untyped_storage().data_ptr() for linear in linears}) == 1
    assert sum(m.indexer is not None for m in attentions) == 2


def test_attention_projects_x_through_one_stacked_weight(tmp_path):
    """Each attention's wq_a and wkv (FP8, 128 + 128 rows in the tiny release checkpoint) run as
    one fp8_gemm over the stacked weights and block scales: its column views are the two Linears'
    products bit for bit, both Linears' weights and scales become views of one storage, and a
    replaced weight is stacked again."""
    from seahal.model.attention import Attention
    from seahal.model.layers import quantize_shared_input
    from seahal.model.tiny import write_tiny_checkpoint

    model = load(write_tiny_checkpoint(tmp_path), device="cpu", dtype=torch.bfloat16, announce=False)
    gen = torch.Generator().manual_seed(8)
    for module in (m for m in model.modules() if isinstance(m, Attention)):
        x = torch.randn(2, 5, module.wq_a.in_features, generator=gen).to(torch.bfloat16)
        xq = quantize_shared_input(x, module.wq_a, module.wkv)
        qa, kv = module._input_projections(x)
        assert module.wq_a.format == "fp8" and torch.equal(qa, module.wq_a(x, xq)) and torch.equal(kv, module.wkv(x, xq))
        weight, scale = module._input_projections.weights()
        for t, whole in ((module.wq_a.weight, weight), (module.wkv.weight, weight), (module.wq_a.scale, scale),
                         (module.wkv.scale, scale)):
            assert t.untyped_storage().data_ptr() == whole.untyped_storage().data_ptr()
        before = kv
        negated = (-module.wkv.weight.float()).to(torch.float8_e4m3fn)  # exact
        module.wkv.set_weight(negated, module.wkv.scale.clone(), torch.bfloat16)
        qa, kv = module._input_projections(x)
        assert torch.equal(kv, -before) and module._input_projections.weights()[0].data_ptr() != weight.data_ptr()


def test_stacked_linears_run_one_by_one_where_they_cannot_share_a_matrix():
    """FP8 Linears whose 128-row scale blocks would straddle two of them, or of two formats, are
    not stacked: the products are the Linears' own."""
    from types import SimpleNamespace

    from seahal.backends.cpu.reference.gemm import act_quant_gemm, fp8_gemm
    from seahal.backends.cpu.reference.quant import fp8_act_quant
    from seahal.model.convert import quantize_fp8_blocks
    from seahal.model.layers import Linear, StackedLinears

    ops = SimpleNamespace(act_quant_gemm=act_quant_gemm, fp8_gemm=fp8_gemm, fp8_act_quant=fp8_act_quant)
    gen = torch.Generator().manual_seed(9)
    linears = [Linear(256, rows, ops) for rows in (96, 128)]
    for lin in linears:
        lin.set_weight(*quantize_fp8_blocks(torch.randn(lin.out_features, 256, generator=gen)), torch.bfloat16)
    stack = StackedLinears(*linears)
    assert stack.weights() is None  # 96 rows: the first block of scales would hold rows of both
    x = torch.randn(3, 256, generator=gen).to(torch.bfloat16)
    assert all(torch.equal(y, lin(x)) for y, lin in zip(stack(x), linears))
    dense = Linear(256, 128, ops, dtype=torch.bfloat16)
    assert StackedLinears(linears[1], dense).weights() is None


def test_traced_cache_stores_encoded_records_as_the_eager_one(checkpoint):
    """The export's traced cache (tensor position) keeps kv_compress_fp8's records as they come, at
    the same rows as the eager cache: the first ``count`` of a padded batch, the padding after them."""
    model = load(checkpoint, device="cpu", dtype=torch.bfloat16, announce=False, cache_format="fp8")
    cache = model.new_cache(2, 48)
    model(torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(4)), cache=cache)
    eager = cache.layers[1]  # CSA: 2 entries so far
    named = eager.named_tensors()
    traced = eager.with_tensors({n: t.clone() for n, t in named.items()}, torch.tensor(eager.n_compressed))
    eager = eager.with_tensors({n: t.clone() for n, t in named.items()}, eager.n_compressed)
    records = torch.randint(0, 256, (2, 3, 200), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    eager.append_compressed(records[:, :2], eager.n_compressed + 2, encoded=True)
    traced.append_compressed(records, traced.n_compressed + 2, encoded=True)  # padded to 3 rows
    valid = eager.window + 4  # ring and entries 0-3
    assert torch.equal(traced.kv.data[:, :valid], eager.kv.data[:, :valid])
    assert torch.equal(eager.compressed_rows()[:, -2:], records[:, :2]) and int(traced.n_compressed) == 4
    assert torch.equal(traced.kv.data[:, valid], records[:, 2])  # the padding: entry 4, not yet valid
    assert torch.equal(traced.kv.data[:, valid + 1 :], eager.kv.data[:, valid + 1 :])


STORES = ModelConfig(
    n_layers=3, compress_ratios=[4, 16, 128], window_size=8, head_dim=16, rope_head_dim=8, index_head_dim=8
)
"""A CSA layer (m=4: KV entries and indexer keys) and HCA layers of m=16 and m=128, small dense stores."""


@pytest.mark.parametrize(
    "extent, starts, n_tokens",
    [
        # the whole cache of 62 positions (16, 4 and 1 entries: 62 is no multiple of 4 or 16):
        # m=4 entries complete at 3 and 7, none at 0, 16 or 61, whose padding takes the 16th row
        (None, [0, 3, 7, 16, 61], 1),
        (10, [9, 7, 4], 1),  # truncated(10): 3 CSA rows; 9, its last token, pads entry 2
        (32, [31, 0, 15], 1),  # truncated(32): the m=128 layer's one row, entry 0, completed by none
        (10, [5, 0, 2], 5),  # a chunk of 5 tokens: two rows for m=4, entries complete or pad
        (None, [3, 54], 8),  # m=16 at 54: the chunk completes nothing, its padding takes the 4th row
    ],
)
def test_traced_step_stores_the_entries_of_the_int_position_step(extent, starts, n_tokens):
    """A position-generic step (positions per sequence, over the cache or a truncated view) stores
    every entry it completes, and its indexer key, where the int-position step does, bitwise; the
    compressor's padding rows go to the entries right after (not yet valid; NaN here, which must
    reach no valid row) and nothing else of the cache changes, in the view or past it."""
    from seahal.hal.ops.compressor import new_entries
    from seahal.model.cache import StepMemo

    gen = torch.Generator().manual_seed(0)
    full = Cache.new(STORES, len(starts), 62, torch.float32, "cpu", ops=None)
    for t in full.named_tensors().values():
        t.copy_(torch.randn(t.shape, generator=gen))  # stale rows: a row written differs from its old value
    ints = full.with_tensors({n: t.clone() for n, t in full.named_tensors().items()}, 0)
    traced = full.with_tensors({n: t.clone() for n, t in full.named_tensors().items()}, 0)
    expected = ints.named_tensors()  # the int step's result, then the traced step's padding

    position = torch.tensor(starts)
    view = traced.truncated(extent) if extent else traced
    step, memo = view.with_tensors(view.named_tensors(), position), StepMemo()
    for layer, m in enumerate(STORES.compress_ratios):
        n = -(-n_tokens // m)  # the compressor's rows: ceil(S/m)
        vectors = {name: torch.randn(len(starts), n, d, generator=gen) for name, d in (("kv", 16), ("index_keys", 8))}
        for b, p in enumerate(starts):
            count, first = new_entries(p, n_tokens, m), p // m
            for vector in vectors.values():
                vector[b, count:] = float("nan")  # padding
            own = (ints.truncated(extent) if extent else ints).rows(b, b + 1)
            lc = own.with_tensors(own.named_tensors(), p).layers[layer]
            if m == 4:
                lc.store_index_keys(vectors["index_keys"][b : b + 1, :count], first + count)
            lc.append_compressed(vectors["kv"][b : b + 1, :count], first + count)
            for name, offset in (("kv", STORES.window_size), ("index_keys", 0)):
                if m == 4 or name == "kv":
                    expected[f"layers.{layer}.{name}"][b, offset + first + count : offset + first + n] = float("nan")
        lc, after = step.layers[layer], (position + n_tokens) // m
        if m == 4:
            lc.store_index_keys(vectors["index_keys"], after, memo)
        lc.append_compressed(vectors["kv"], after, memo=memo)
        assert lc.n_compressed.tolist() == [(p + n_tokens) // m for p in starts]
    for name, tensor in traced.named_tensors().items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0, equal_nan=True, msg=name)


@pytest.mark.parametrize("start, n", [(0, 5), (13, 5), (14, 16), (3, 40), (16, 16), (7, 1)])
def test_window_ring_writes_agree_at_int_and_tensor_positions(start, n):
    """Token p lands in ring slot p mod W, the last W of a longer chunk only: an int position
    writes at most two slice runs, a tensor one scatters or indexes; both equal the definition
    (W = 16; the cases wrap the ring, fill it exactly, overflow it, and write one token)."""
    from seahal.model.cache import LayerCache, RowStore

    w = 16
    rows = torch.arange(2 * n * 3, dtype=torch.float32).view(2, n, 3) + 1
    want = torch.zeros(2, w, 3)
    for i in range(max(n - w, 0), n):
        want[:, (start + i) % w] = rows[:, i]
    positions = torch.arange(start, start + n)
    slots = positions % w
    for start_pos, given in ((start, None), (torch.tensor(start), slots[None]), (torch.tensor([start] * 2), None)):
        store = RowStore(2, w + 4, 3, torch.float32, "cpu")
        LayerCache(kv=store, window=w).write_window(start_pos, rows, given)
        assert torch.equal(store.data[:, :w], want), start_pos
        assert not store.data[:, w:].any()  # nothing past the ring


@pytest.mark.parametrize("start", [torch.tensor([0, 3, 7, 8, 21]), torch.tensor(5), 2])
def test_step_positions_give_the_ring_rows_slots_and_entry_counts_of_their_definitions(start):
    """A one-token step's window ring rows (key position p = t - i in row p mod W, -1 before the
    sequence), its ring slot (t mod W) and each ratio's entries after the step (floor((t+1)/m)),
    against the definitions, for one position per sequence, one for the batch and an int (W = 8:
    positions before, at and past a full ring)."""
    from seahal.model.attention import StepPositions

    w = 8
    step = StepPositions.of(start, 1, torch.device("cpu"), torch.arange(w))
    starts = torch.as_tensor(start).reshape(-1).tolist()
    want = torch.tensor([[[(t - i) % w if t >= i else -1 for i in range(w)]] for t in starts], dtype=torch.int32)
    assert step.decode_window.dtype == torch.int32 and torch.equal(step.decode_window.reshape(want.shape), want)
    if isinstance(start, int):  # an int position's window writes are slice copies: no slots made
        assert step.ring_slots(w) is None
    else:
        slots = step.ring_slots(w)
        assert slots.dtype == torch.int32 and slots.reshape(-1).tolist() == [t % w for t in starts]
        assert step.ring_slots(5).reshape(-1).tolist() == [t % 5 for t in starts]  # another ring: its own slots
    for m in (4, 128):
        after = step.entries_after(m)
        assert torch.as_tensor(after).reshape(-1).tolist() == [(t + 1) // m for t in starts]
        assert step.entries_after(m) is after  # made once a step
    assert torch.as_tensor(step.end).reshape(-1).tolist() == [t + 1 for t in starts]


@pytest.mark.parametrize("start", [torch.tensor([0, 3, 127, 128, 300]), torch.tensor(255), 2])
def test_position_tables_count_every_ratio_in_one_kernel(start):
    """A cache's position tables: each ratio's entry count floor(p/m), before a one-token step and
    after it (p + 1), against the definition; at a tensor position one kernel for every ratio (a
    floor division by the ratios' tensor; views of it per ratio), at an int no kernel. A decode
    step's HCA rows (entry j at row W + j) are views of the tables' (no kernel), and made where the
    rows start elsewhere (a chunk's keys put its tokens before the entries)."""
    from seahal.model.attention import StepPositions, entry_rows
    from seahal.model.cache import PositionTables

    from seahal.testing.triton_compile import AtenKernels

    w, capacity = 8, 1000
    config = ModelConfig(n_layers=4, compress_ratios=[0, 4, 128, 4], window_size=w)
    tables = PositionTables.of(config, capacity, "cpu")
    assert tables.ratios == (4, 128) and set(tables.entries) == {128}  # CSA layers' rows come from the indexer
    starts = torch.as_tensor(start).reshape(-1).tolist()
    one_kernel = ["aten.floor_divide.default"] if isinstance(start, torch.Tensor) else []
    with AtenKernels() as kernels:
        held = tables.entry_counts(start)
    assert kernels.ops == one_kernel
    step = StepPositions.of(start, 1, torch.device("cpu"), torch.arange(w), tables)
    step.end  # noqa: B018  (made first: the counts after the step are timed alone)
    with AtenKernels() as kernels:
        after = {m: step.entries_after(m) for m in (4, 128)}
    assert kernels.ops == one_kernel
    for m in (4, 128):
        assert torch.as_tensor(held[m]).reshape(-1).tolist() == [t // m for t in starts]
        assert torch.as_tensor(after[m]).reshape(-1).tolist() == [(t + 1) // m for t in starts]
        assert step.entries_after(m) is after[m]  # made once a step
    with AtenKernels() as kernels:
        j, rows = entry_rows(5, w, tables, 128, torch.device("cpu"))
    assert kernels.ops == [] and j.tolist() == list(range(5)) and rows.tolist() == [w + i for i in range(5)]
    assert j.untyped_storage().data_ptr() == tables.entries[128][0].untyped_storage().data_ptr()
    j, rows = entry_rows(5, w + 3, tables, 128, torch.device("cpu"))  # a 3-token chunk before the entries
    assert rows.tolist() == [w + 3 + i for i in range(5)] and rows.dtype == torch.int32


def test_a_step_must_bring_the_entries_it_completes():
    """An int-position layer cache takes exactly the entries that bring it to the step's count,
    and no more than its capacity: a mismatch names both counts and the rows given."""
    from seahal.model.cache import LayerCache, RowStore

    lc = LayerCache(kv=RowStore(1, 4 + 3, 2, torch.float32, "cpu"), window=4, ratio=4, n_compressed=1)
    with pytest.raises(ValueError, match="a step to 3 entries from 1 adds 2, got 1 rows"):
        lc.append_compressed(torch.ones(1, 1, 2), 3, encoded=True)
    with pytest.raises(RuntimeError, match="4 compressed entries > 3"):
        lc.append_compressed(torch.ones(1, 3, 2), 4, encoded=True)
    lc.append_compressed(torch.ones(1, 2, 2), 3, encoded=True)  # stored rows as they are
    assert lc.n_compressed == 3 and lc.kv.data[0, 5:7].eq(1).all() and not lc.kv.data[0, 4].any()


def test_cache_capacity_is_enforced(checkpoint):
    model = load(checkpoint, device="cpu", announce=False)
    cache = model.new_cache(1, 16)
    model(torch.zeros(1, 16, dtype=torch.long), cache=cache)
    with pytest.raises(RuntimeError, match="cache holds 16 tokens"):
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache)


def test_cache_rebuilt_from_its_tensors_continues_the_same(checkpoint):
    """named_tensors / with_tensors (the ONNX export's explicit cache state) lose nothing."""
    model = load(checkpoint, device="cpu", announce=False, cache_format="fp8")
    ids = torch.randint(0, 512, (2, 10), generator=torch.Generator().manual_seed(1))
    cache = model.new_cache(2, 32)
    model(ids[:, :9], cache=cache)
    named = cache.named_tensors()
    assert named["layers.1.index_keys"].shape[-1] == 68  # packed FP4 records: 64 code bytes + 4 e8m0 scales
    assert named["layers.1.compress_score_state"].dtype == torch.float32
    rebuilt = cache.with_tensors({name: t.clone() for name, t in named.items()}, cache.pos)
    assert torch.equal(model(ids[:, 9:], cache=rebuilt), model(ids[:, 9:], cache=cache))
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.named_tensors().values(), cache.named_tensors().values()))
    with pytest.raises(ValueError, match=r"cache tensor layers.0.kv must be \[2, 16, 200\] torch.uint8"):
        cache.with_tensors({**named, "layers.0.kv": named["layers.0.kv"][:, :1]}, 9)
    with pytest.raises(ValueError, match=r"missing \['layers.0.kv'\]"):
        cache.with_tensors({n: t for n, t in named.items() if n != "layers.0.kv"}, 9)


def test_missing_and_misshaped_tensors_are_named(checkpoint, tmp_path):
    tensors = load_file(checkpoint / "model.safetensors")
    (tmp_path / "config.json").write_text((checkpoint / "config.json").read_text())
    name = "model.layers.1.attn.wq_b.weight"
    save_file({k: v for k, v in tensors.items() if k != name}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"layers\.1\.attn\.wq_b\.weight"):
        load(tmp_path, device="cpu", announce=False)
    save_file({**tensors, name: tensors[name][:, :64].contiguous()}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"wq_b\.weight.*expected shape \[512, 128\]"):
        load(tmp_path, device="cpu", announce=False)


def test_rows_and_truncated_views_write_into_the_cache(checkpoint):
    """Cache.rows (a group's sequences) and Cache.truncated (a context bucket) are views: what a
    forward stores through them lands in the cache's own tensors, in the right rows."""
    model = load(checkpoint, device="cpu", announce=False)
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(1))
    cache = model.new_cache(3, 64)
    model(ids, cache=cache.rows(1, 2))
    alone = model.new_cache(1, 64)
    model(ids, cache=alone)
    fresh = model.new_cache(3, 64).named_tensors()
    for name, tensor in cache.named_tensors().items():
        assert torch.equal(tensor[1:2], alone.named_tensors()[name]), name
        assert torch.equal(tensor[0::2], fresh[name][0::2]), name  # the other sequences untouched
    view = cache.truncated(32)
    assert view.capacity == 32 and view.layers[2].kv.data.shape[1] == 16 + 32 // 16  # ring + HCA entries (m=16)
    assert cache.truncated(33).layers[2].kv.data.shape[1] == 16 + 3  # ceil(33/16): room for a step's padding
    assert view.layers[2].kv.data.data_ptr() == cache.layers[2].kv.data.data_ptr()
    with pytest.raises(ValueError, match=r"tokens must be in \[1, 64\], got 65"):
        cache.truncated(65)


def test_indexer_takes_the_projection_its_scale_and_the_picks_offset(checkpoint):
    """The model hands the indexer op ``weights_proj(x)`` as the projection made it (bf16) with the
    official factor ``head_dim^-0.5 * n_heads^-0.5``, which the op applies as the official
    ``weights_proj(x).float() * scale`` (one fp32 product; the conformance cases check the ops),
    and the row of entry 0 among the keys it attends (a 9-token chunk: ``[ring | chunk |
    entries]``, W + 9), so that its picks are the attention's rows as they come: against the
    op without the offset, each pick shifted and each gap kept."""
    from types import SimpleNamespace

    from seahal.model.attention import Indexer

    model = load(checkpoint, device="cpu", dtype=torch.bfloat16, announce=False, cache_format="fp8")
    indexer = next(m for m in model.modules() if isinstance(m, Indexer))
    seen = {}

    def keep_input(module, args, out) -> None:  # (a hook's non-None result would replace the output)
        seen["x"] = args[0]

    indexer.weights_proj.register_forward_hook(keep_input)
    ops = indexer.ops

    def indexer_topk_packed(q, weights, keys, fmt, ratio, start_pos, topk, scale, offset):
        seen.update(weights=weights, scale=scale, offset=offset)
        picks = ops.indexer_topk_packed(q, weights, keys, fmt, ratio, start_pos, topk, scale, offset)
        plain = ops.indexer_topk_packed(q, weights, keys, fmt, ratio, start_pos, topk, scale)
        seen["shifted"] = torch.equal(picks, torch.where(plain >= 0, plain + offset, -1)) and bool(plain.ge(0).any())
        return picks

    indexer.ops = SimpleNamespace(**{**vars(ops), "indexer_topk_packed": indexer_topk_packed})
    model(torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(7)), cache=model.new_cache(2, 48))
    assert seen["weights"].dtype == torch.bfloat16 and torch.equal(seen["weights"], indexer.weights_proj(seen["x"]))
    assert seen["scale"] == indexer.head_dim**-0.5 * indexer.n_heads**-0.5
    assert seen["offset"] == model.config.window_size + 9 and seen["shifted"]
