"""Benchmark of the KV compressor (``kv_compress``): gated softmax pooling, RMSNorm and RoPE per entry,
and of ``kv_compress_fp8``, which also packs each entry into its 584-byte FP8 cache record.

Three compressors per model (V4-Flash and V4-Pro share them: they act on head_dim 512 and the
indexer's 128): the CSA main compressor (m = 4, overlapped), the HCA one (m = 128) and the CSA
indexer's (m = 4, overlapped, d = 128). Rows: prefill from an empty state (8k and 64k tokens,
batch 1; the goal is 70% of 3.0 TB/s over the bytes touched from 8k on) and a decode step that
completes an entry (batch 1 and 64; the goal is 5 us per layer). ``kv_compress`` entries come out
bf16; ``kv_compress_fp8`` rows (the main compressors, whose entries the FP8 cache stores) write
records, checked after decoding both sides. The peer is the CPU reference's code on the GPU tensors.

    seahal bench --backend cuda --ops kv_compress,kv_compress_fp8 [--quick] [--json out.json]
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial

import torch

from seahal.bench.common import (
    PEAK_BF16_TFLOPS,
    Case,
    Workload,
    close,
    implementation,
    measure_all,
    reference,
    workload_calls,
)
from seahal.hal.ops.compressor import compressor_state
from seahal.hal.ops.quant import kv_record_bytes

OPS = ("kv_compress", "kv_compress_fp8")
BF16_TOL = 1e-2
"""bf16 entries from fp32 pooling, norm and rotation: the output rounding (2^-9) dominates."""
RECORD_TOL = 2**-4
"""Decoded FP8 records: the same bf16 entries within BF16_TOL, where an element at an e4m3 rounding
boundary may take the neighbouring code (3 mantissa bits: one step is <= 2^-3 of the value); such
elements are rare, so the normwise error stays far below 2^-4, while a wrong tile scale or RoPE
byte order moves it by >= 0.5."""
KV_TILE = 64
"""Elements per ue8m0 scale of a V4 KV record (v4_ops.md §12)."""
DECODE_POSITION = 4095
"""start_pos of the decode rows: the token that completes a block at every ratio used (4, 128)."""


def compress_cost(batch: int, seq: int, ratio: int, overlap: bool, dim: int, rope_dim: int, start_pos: int,
                  records: bool = False) -> tuple[int, int]:
    """FLOPs and bytes of compressing tokens [start_pos, start_pos + seq) of ``batch`` sequences.

    With coff = 2 (overlapped) or 1, width w = coff * dim, n new entries and ``held`` state slots
    read (none from a reset state at start_pos 0, else ``(coff - 1) * m + start_pos mod m``):
    FLOPs ``2 * batch * n * coff * m * dim`` (each entry's softmax-weighted sum over coff*m slots);
    bytes, fp32 unless said: kv and score tokens ``2 * batch * seq * w``, held state read
    ``2 * batch * held * w``, state slots that change written ``2 * batch * changed * w``, ape
    ``m * w``, bf16 entries ``batch * n * dim * 2`` (``records``: ``batch * n *
    kv_record_bytes(dim, rope_dim, 64)``, 584 at d = 512), norm weight ``dim`` and rope frequencies
    ``rope_dim / 2``. The slots that change: all coff*m from a reset; else the seq new ones when no
    entry completes, or ``max(kept, held)`` (``kept = held + seq - n * m`` move to the front, the
    rest of the old ones are emptied); the unused slots of a carried state are empty already.
    """
    coff = 2 if overlap else 1
    width = coff * dim
    n_new = (start_pos + seq) // ratio - start_pos // ratio
    held = _held_slots(ratio, overlap, start_pos)
    if start_pos == 0:
        changed = coff * ratio
    else:
        changed = seq if n_new == 0 else max(held + seq - n_new * ratio, held)
    flops = 2 * batch * n_new * coff * ratio * dim
    fp32_values = width * (2 * batch * seq + 2 * batch * held + 2 * batch * changed + ratio) + dim + rope_dim // 2
    entry_bytes = kv_record_bytes(dim, rope_dim, KV_TILE) if records else 2 * dim
    return flops, 4 * fp32_values + batch * n_new * entry_bytes


def _held_slots(ratio: int, overlap: bool, start_pos: int) -> int:
    """State slots in use before tokens from start_pos: ``(coff - 1) * m + start_pos mod m``, none at 0."""
    return 0 if start_pos == 0 else (1 if overlap else 0) * ratio + start_pos % ratio


def _decoded_close(dim: int, rope_dim: int) -> Callable[[torch.Tensor, torch.Tensor], tuple[float, bool]]:
    """Checker of FP8 records: both sides decoded by the reference ``kv_cache_unpack``, then compared
    within :data:`RECORD_TOL`."""
    unpack, check = reference("kv_cache_unpack", "quant"), close(RECORD_TOL)
    return lambda out, ref: check(unpack(out, dim, rope_dim, KV_TILE), unpack(ref, dim, rope_dim, KV_TILE))


def _compress(ratio: int, overlap: bool, dim: int, rope_dim: int, batch: int, seq: int, start_pos: int,
              op: str, device: torch.device) -> Workload:
    torch.manual_seed(seq + batch)
    coff = 2 if overlap else 1
    kv = torch.randn(batch, seq, coff * dim, device=device)
    score = torch.randn(batch, seq, coff * dim, device=device)
    ape = torch.randn(ratio, coff * dim, device=device) * 0.1
    norm_weight = torch.rand(dim, device=device) + 0.5
    freqs = 10000.0 ** -(torch.arange(0, rope_dim, 2, device=device).float() / rope_dim)
    state = compressor_state(batch, ratio, dim, overlap, device=device)
    for values in state:  # as the op leaves it: data in the slots in use, empty after
        values[:, : _held_slots(ratio, overlap, start_pos)].normal_()

    records = (1e-6, rope_dim, KV_TILE) if op == "kv_compress_fp8" else ()

    def call(function, states):  # each side owns its state: the op updates it in place
        return function(kv, score, ape, norm_weight, freqs, *states, ratio, overlap, start_pos, *records)

    kernel = implementation(op, "compressor", "compressor", device)
    ours, theirs = tuple(s.clone() for s in state), tuple(s.clone() for s in state)
    check = _decoded_close(dim, rope_dim) if records else close(BF16_TOL)
    return Workload(partial(call, kernel, ours), {"reference": partial(call, reference(op, "compressor"), theirs)}, check)


def _layouts(device: torch.device) -> list[tuple[str, int, bool, int, int]]:
    """(name, ratio, overlapped, dim, rope_dim) of the compressors benchmarked."""
    if device.type != "cuda":
        return [("CSA tiny", 4, True, 80, 16), ("HCA tiny", 128, False, 80, 16)]  # 64 no-RoPE dims: one FP8 tile
    return [("CSA main", 4, True, 512, 64), ("HCA main", 128, False, 512, 64), ("CSA indexer", 4, True, 128, 64)]


def cases(device: torch.device, quick: bool, op: str = "kv_compress") -> list[Case]:
    """Rows of ``op``: every compressor for ``kv_compress``; the main ones (the FP8 cache's) for
    ``kv_compress_fp8``."""
    if device.type != "cuda":
        runs = [(1, 256, 0), (2, 1, DECODE_POSITION)]
    else:
        runs = [(1, 8192, 0)] + [(1, 65536, 0)] * (not quick) + [(1, 1, DECODE_POSITION), (64, 1, DECODE_POSITION)]
    out = []
    records = op == "kv_compress_fp8"
    for name, ratio, overlap, dim, rope_dim in _layouts(device):
        if records and "indexer" in name:
            continue
        for batch, seq, start_pos in runs:
            flops, nbytes = compress_cost(batch, seq, ratio, overlap, dim, rope_dim, start_pos, records)
            stage = f"prefill S={seq}" if start_pos == 0 else f"decode pos={start_pos}"
            out.append(Case(op, f"{name} (m={ratio}, d={dim}) {stage} B={batch}", flops, nbytes, PEAK_BF16_TFLOPS,
                            partial(_compress, ratio, overlap, dim, rope_dim, batch, seq, start_pos, op),
                            {"ratio": ratio, "dim": dim, "batch": batch, "tokens": seq}))
    return out


def rows(ops: list[str], device: torch.device, quick: bool) -> list[dict]:
    """Rows of ``ops`` (a subset of :data:`OPS`) in the common schema."""
    return [row for op in ops for row in measure_all(cases(device, quick, op), device, quick)]


def calls(ops: list[str], device: torch.device, quick: bool) -> Iterator[Callable[[], object]]:
    """Every kernel call of the rows of ``ops``, unchecked and untimed (:func:`.common.workload_calls`)."""
    for op in ops:
        yield from workload_calls(cases(device, quick, op), device)
