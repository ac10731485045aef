"""Benchmark of the KV compressor (``kv_compress``): gated softmax pooling, RMSNorm and RoPE per entry.

Three compressors per model (V4-Flash and V4-Pro share them: they act on head_dim 512 and the
indexer's 128): the CSA main compressor (m = 4, overlapped), the HCA one (m = 128) and the CSA
indexer's (m = 4, overlapped, d = 128). Rows: prefill from an empty state (8k and 64k tokens,
batch 1; the goal is 70% of 3.0 TB/s over the bytes touched from 8k on) and a decode step that
completes an entry (batch 1 and 64; the goal is 5 us per layer). Entries come out bf16 (the fused
FP8 cache write is not written yet). The peer is the CPU reference's code on the GPU tensors.

    seahal bench --backend cuda --ops kv_compress [--quick] [--json out.json]
"""

from __future__ import annotations

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
)
from seahal.hal.ops.compressor import compressor_state

OPS = ("kv_compress",)
BF16_TOL = 1e-2
"""bf16 entries from fp32 pooling, norm and rotation: the output rounding (2^-9) dominates."""
DECODE_POSITION = 4095
"""start_pos of the decode rows: the token that completes a block at every ratio used (4, 128)."""


def compress_cost(batch: int, seq: int, ratio: int, overlap: bool, dim: int, rope_dim: int, start_pos: int) -> tuple[int, int]:
    """FLOPs and bytes of compressing tokens [start_pos, start_pos + seq) of ``batch`` sequences.

    With coff = 2 (overlapped) or 1, width w = coff * dim, n new entries and ``held`` state slots
    read (none from a reset state at start_pos 0, else ``(coff - 1) * m + start_pos mod m``):
    FLOPs ``2 * batch * n * coff * m * dim`` (each entry's softmax-weighted sum over coff*m slots);
    bytes, fp32 unless said: kv and score tokens ``2 * batch * seq * w``, held state read
    ``2 * batch * held * w``, state slots that change written ``2 * batch * changed * w``, ape
    ``m * w``, bf16 entries ``batch * n * dim * 2``, norm weight ``dim`` and rope frequencies
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
    return flops, 4 * fp32_values + 2 * batch * n_new * dim


def _held_slots(ratio: int, overlap: bool, start_pos: int) -> int:
    """State slots in use before tokens from start_pos: ``(coff - 1) * m + start_pos mod m``, none at 0."""
    return 0 if start_pos == 0 else (1 if overlap else 0) * ratio + start_pos % ratio


def _compress(ratio: int, overlap: bool, dim: int, rope_dim: int, batch: int, seq: int, start_pos: int,
              device: torch.device) -> Workload:
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

    def call(function, states):  # each side owns its state: the op updates it in place
        return function(kv, score, ape, norm_weight, freqs, *states, ratio, overlap, start_pos)

    kernel = implementation("kv_compress", "compressor", "compressor", device)
    ours, theirs = tuple(s.clone() for s in state), tuple(s.clone() for s in state)
    return Workload(partial(call, kernel, ours), {"reference": partial(call, reference("kv_compress", "compressor"), theirs)},
                    close(BF16_TOL))


def _layouts(device: torch.device) -> list[tuple[str, int, bool, int, int]]:
    """(name, ratio, overlapped, dim, rope_dim) of the compressors benchmarked."""
    if device.type != "cuda":
        return [("CSA tiny", 4, True, 64, 16), ("HCA tiny", 128, False, 64, 16)]
    return [("CSA main", 4, True, 512, 64), ("HCA main", 128, False, 512, 64), ("CSA indexer", 4, True, 128, 64)]


def cases(device: torch.device, quick: bool) -> list[Case]:
    if device.type != "cuda":
        runs = [(1, 256, 0), (2, 1, DECODE_POSITION)]
    else:
        runs = [(1, 8192, 0)] + [(1, 65536, 0)] * (not quick) + [(1, 1, DECODE_POSITION), (64, 1, DECODE_POSITION)]
    out = []
    for name, ratio, overlap, dim, rope_dim in _layouts(device):
        for batch, seq, start_pos in runs:
            flops, nbytes = compress_cost(batch, seq, ratio, overlap, dim, rope_dim, start_pos)
            stage = f"prefill S={seq}" if start_pos == 0 else f"decode pos={start_pos}"
            out.append(Case("kv_compress", f"{name} (m={ratio}, d={dim}) {stage} B={batch}", flops, nbytes, PEAK_BF16_TFLOPS,
                            partial(_compress, ratio, overlap, dim, rope_dim, batch, seq, start_pos),
                            {"ratio": ratio, "dim": dim, "batch": batch, "tokens": seq}))
    return out


def rows(ops: list[str], device: torch.device, quick: bool) -> list[dict]:
    """Rows of ``kv_compress`` in the common schema."""
    return measure_all(cases(device, quick), device, quick)
