"""The attention path's Triton kernels at V4-Flash's full prefill shapes (64k tokens) on a GPU.

What only full shapes exercise: offsets past 2^31 bytes (q and o are 4 GiB at 64k x 64 x 512 bf16),
grids of millions of programs, the indexer's workspace passes, 16k compressed entries. Each test
runs twice: at V4-Flash scale on a CUDA device (skipped without one, e.g. in CI), and at a small
scale under the Triton interpreter on CPU tensors (test_under_interpreter's subprocess, in CI) —
the same function, so the checking logic itself is exercised everywhere.

Judged by the conformance rules (:func:`seahal.testing.tolerances.checks_for`) against the CPU
reference run on the same device, in float64 where the contract allows (as ``seahal conformance``).
Sparse attention and the indexer are checked on sampled queries: the reference for all 64k queries
would need 4 GiB of gathered rows (attention) or 275 GB of logits (indexer), and each query's
result depends only on its own q row, indices and position, so the reference of the sampled rows
alone is the reference of the whole call restricted to them. The samples take the first queries
(nothing or little visible), the window and block boundaries, the last query and random ones.
The compressor is compared whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from seahal.backends.cpu.reference import attention as ref_attention
from seahal.backends.cpu.reference import compressor as ref_compressor
from seahal.backends.cpu.reference import indexer as ref_indexer
from seahal.backends.cpu.reference import quant as ref_quant
from seahal.hal.ops.compressor import compressor_state
from seahal.testing import triton_interpreter
from seahal.testing.conformance import float64_positions
from seahal.testing.tolerances import checks_for
from seahal.testing.triton_interpreter import require_triton

require_triton()

from cuda_marks import IN_INTERPRETER  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cpu" if IN_INTERPRETER else "cuda")
CSA, HCA = 4, 128


@dataclass(frozen=True)
class Scale:
    """One prefill of ``seq`` tokens from position 0: attention heads x head_dim (rope_dim, FP8
    tile), the window, the indexer's heads x dim and top-k, how many queries are checked, and the
    compressor's token count (small scale: enough for two HCA entries)."""

    seq: int
    heads: int
    head_dim: int
    rope_dim: int
    tile: int
    window: int
    index_heads: int
    index_dim: int
    topk: int
    sampled: int
    compress_seq: int


V4_FLASH = Scale(seq=65536, heads=64, head_dim=512, rope_dim=64, tile=64, window=128, index_heads=64, index_dim=128,
                 topk=512, sampled=64, compress_seq=65536)
SMALL = Scale(seq=64, heads=4, head_dim=128, rope_dim=32, tile=32, window=8, index_heads=4, index_dim=32, topk=8,
              sampled=16, compress_seq=300)
SCALES = [
    pytest.param(SMALL, id="small", marks=pytest.mark.skipif(
        not IN_INTERPRETER and not HAS_CUDA, reason="no CUDA device: runs in test_under_interpreter's subprocess")),
    pytest.param(V4_FLASH, id="V4-Flash-64k", marks=pytest.mark.skipif(
        IN_INTERPRETER or not HAS_CUDA, reason="V4-Flash shapes need a CUDA device")),
]


def test_under_interpreter():
    run = triton_interpreter.rerun_test_file(__file__)
    assert run.passed(), run.report


@pytest.fixture(scope="module")
def cuda():
    """The kernel modules (imported under the interpreter in its subprocess, bf16 dot corrected)."""
    from seahal.backends.cuda import compressor, indexer, sparse_attention

    with triton_interpreter.bf16_dot_fix():
        yield SimpleNamespace(attention=sparse_attention, indexer=indexer, compressor=compressor)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator(device=DEVICE).manual_seed(seed)


def sampled_queries(scale: Scale, ratio: int, seed: int) -> list[int]:
    """Query positions to check: the first ones and each side of the block and window boundaries,
    the last, and random others, ``scale.sampled`` or a few fewer (sorted, distinct)."""
    edges = {0, 1, ratio - 1, ratio, scale.window - 1, scale.window, scale.window + 1, scale.seq - 1}
    others = torch.randperm(scale.seq, generator=torch.Generator().manual_seed(seed))[: scale.sampled - len(edges)]
    return sorted(edges | set(others.tolist()))


def model_prefill_indices(scale: Scale, ratio: int, gen: torch.Generator) -> torch.Tensor:
    """int32 [1, S, W + topk] as ``Attention._gather_keys`` builds them at start_pos 0 over keys
    ``[window ring (W rows) | the S new rows | S / m compressed entries]``: query t sees rows W + p
    for p in (t - W, t] (-1 before the start), then entries W + S + j for the indexer's pick of j
    among the floor((t + 1) / m) visible entries (here a random pick, in score order as the
    indexer returns it; -1 beyond the visible count)."""
    s, w, entries = scale.seq, scale.window, scale.seq // ratio
    t = torch.arange(s, device=DEVICE)
    p = t[:, None] - torch.arange(w, device=DEVICE)
    picks = []
    step = max(1, (1 << 24) // entries)
    for start in range(0, s, step):
        rows = t[start : start + step]
        visible = torch.arange(entries, device=DEVICE) < ((rows + 1) // ratio)[:, None]
        scores = torch.rand(rows.shape[0], entries, device=DEVICE, generator=gen).masked_fill(~visible, -1.0)
        top = scores.topk(scale.topk, dim=-1)
        picks.append(torch.where(top.values >= 0, top.indices + w + s, -1))
    return torch.cat((torch.where(p < 0, -1, w + p), torch.cat(picks)), dim=1).int()[None]


def _reference(op: str, function, args: tuple):
    """The reference on the args as ``seahal conformance`` runs it: float64 where the contract
    allows, every tensor copied (states are updated in place), on the args' device."""
    upcast = float64_positions(op, args)
    copies = tuple(
        (a.double() if i in upcast else a.clone()) if isinstance(a, torch.Tensor) else a for i, a in enumerate(args)
    )
    return function(*copies), copies


def _assert_conforms(op: str, args: tuple, got: tuple, want: tuple, where: str = "") -> None:
    """Every comparison the conformance rules make for this call (outputs, then states)."""
    for item in checks_for(op, args):
        at = item.outputs if isinstance(item.outputs, tuple) else (item.outputs,)
        pick = (lambda values: values[at[0]]) if len(at) == 1 else (lambda values: tuple(values[i] for i in at))
        verdict = item.check.compare(pick(got), pick(want))
        assert verdict.ok, f"{op} {item.label}{where}: {verdict.detail}"


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("kv_format", ["bf16", "fp8"])
def test_sparse_attention_prefill(cuda, scale, kv_format):
    gen = _generator(1)
    s, d = scale.seq, scale.head_dim
    q = torch.randn(1, s, scale.heads, d, device=DEVICE, dtype=torch.bfloat16, generator=gen)
    kv = torch.randn(1, scale.window + s + s // CSA, d, device=DEVICE, dtype=torch.bfloat16, generator=gen)
    sink = torch.randn(scale.heads, device=DEVICE, generator=gen)
    indices = model_prefill_indices(scale, CSA, gen)
    softmax_scale = d**-0.5
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=DEVICE)
    if kv_format == "fp8":  # the cache as the model stores it; its exact decode is what attention sees
        records = ref_quant.kv_cache_pack(kv, scale.rope_dim, scale.tile)
        kv = ref_quant.kv_cache_unpack(records, d, scale.rope_dim, scale.tile)
        cuda.attention.launch_sparse_attention(q, records, indices, sink, softmax_scale, out,
                                               rope_dim=scale.rope_dim, tile=scale.tile)
    else:
        cuda.attention.launch_sparse_attention(q, kv, indices, sink, softmax_scale, out)
    assert not out.isnan().any(), "some output elements were not written"

    rows = torch.tensor(sampled_queries(scale, CSA, seed=2), device=DEVICE)
    args = (q[:, rows], kv, indices[:, rows], sink, softmax_scale)
    want, _ = _reference("sparse_attention", ref_attention.sparse_attention, args)
    _assert_conforms("sparse_attention", args, (out[:, rows],), (want,), f" at queries {rows.tolist()}")


@pytest.mark.parametrize("scale", SCALES)
def test_indexer_prefill(cuda, scale):
    gen = _generator(3)
    s, h, d = scale.seq, scale.index_heads, scale.index_dim
    q = torch.randn(1, s, h, d, device=DEVICE, dtype=torch.bfloat16, generator=gen)
    weights = torch.randn(1, s, h, device=DEVICE, generator=gen) * (h * d) ** -0.5
    keys = torch.randn(1, s // CSA, d, device=DEVICE, dtype=torch.bfloat16, generator=gen)
    got = cuda.indexer.indexer_topk(q, weights, keys, CSA, 0, scale.topk)
    assert got.dtype == torch.int32 and got.shape == (1, s, scale.topk)

    keys, got = keys.cpu(), got.cpu()
    for t in sampled_queries(scale, CSA, seed=4):
        # query t of the prefill is the one-query call at start_pos t over the same keys
        args = (q[:, t : t + 1].cpu(), weights[:, t : t + 1].cpu(), keys, CSA, t, scale.topk)
        want, _ = _reference("indexer_topk", ref_indexer.indexer_topk, args)
        _assert_conforms("indexer_topk", args, (got[:, t : t + 1],), (want,), f" at query {t}")
    assert (got[0, : CSA - 1] == -1).all() and (got[0, -1] >= 0).all()  # nothing visible yet / all slots used


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("layer", ["CSA", "HCA"])
def test_kv_compress_prefill(cuda, scale, layer):
    ratio, overlap = (CSA, True) if layer == "CSA" else (HCA, False)
    coff, d, r = 1 + overlap, scale.head_dim, scale.rope_dim
    gen = _generator(5)
    kv, score = (torch.randn(1, scale.compress_seq, coff * d, device=DEVICE, generator=gen) for _ in range(2))
    ape = torch.randn(ratio, coff * d, device=DEVICE, generator=gen) * 0.5
    norm_weight = 1 + torch.randn(d, device=DEVICE, generator=gen) * 0.1
    freqs = 160000.0 ** (-torch.arange(r // 2, dtype=torch.float32, device=DEVICE) * 2 / r)  # compress_rope_theta
    args = (kv, score, ape, norm_weight, freqs, *compressor_state(1, ratio, d, overlap, DEVICE), ratio, overlap, 0)
    mine = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
    got = cuda.compressor.kv_compress(*mine)
    assert got.shape == (1, scale.compress_seq // ratio, d)
    want, theirs = _reference("kv_compress", ref_compressor.kv_compress, args)
    _assert_conforms("kv_compress", args, (got, mine[5], mine[6]), (want, theirs[5], theirs[6]))
