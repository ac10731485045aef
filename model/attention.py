"""Attention of one layer: sliding window, plus compressed entries (HCA) or indexer-selected
compressed entries (CSA), in one softmax with per-head sinks (v4_ops.md §6-§9)."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
from torch import nn

from seahal.hal.formats import FP4_TILE
from seahal.hal.ops.compressor import most_new_entries
from seahal.hal.ops.rope import rope_frequencies

from .cache import KV_TILE, LayerCache, PositionTables, StepMemo
from .config import CSA_RATIO, ModelConfig
from .layers import Linear, RMSNorm, StackedLinears
from .parallel import SINGLE_PROCESS, Parallel
from .quant_sim import fp8_kv_precision


class Compressor(nn.Module):
    """Gated pooling of ``ratio`` tokens per entry: projections here, pooling in ``kv_compress``.

    ``wkv, wgate: [coff*d, D]``, ``ape: [m, coff*d]``, ``norm: [d]``; coff = 2 when overlapped (CSA).
    ``records = (rope_dim, tile)``: a bf16 model's entries come packed as FP8 KV cache records
    (``kv_compress_fp8``: the bf16 entries, then ``kv_cache_pack``, in one op).
    """

    def __init__(
        self, dim: int, head_dim: int, ratio: int, overlap: bool, ops: SimpleNamespace, eps: float,
        records: tuple[int, int] | None = None,
    ):
        super().__init__()
        coff = 2 if overlap else 1
        self.ratio, self.overlap, self.ops, self.eps, self.records = ratio, overlap, ops, eps, records
        self.wkv = Linear(dim, coff * head_dim, ops)
        self.wgate = Linear(dim, coff * head_dim, ops)
        self.ape = nn.Parameter(torch.zeros(ratio, coff * head_dim), requires_grad=False)
        self.norm = RMSNorm(head_dim, eps, ops)
        self._stacked = StackedLinears(self.wkv, self.wgate)  # [wkv; wgate] (_projections)

    def forward(
        self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor], start_pos: int | torch.Tensor,
        freqs: torch.Tensor, projections: tuple[torch.Tensor, torch.Tensor] | None = None,
        destination: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor | None:
        """x: [B, S, D] -> the entries tokens [start_pos, start_pos+S) complete: [B, n, d] in x's dtype,
        or, when :meth:`packs` x, as FP8 records [B, n, record] uint8. ``projections``: x's fp32
        ``(x wkv^T, x wgate^T)`` when the caller made them (a CSA layer, with its indexer's), else
        made here (:meth:`_projections`). ``destination`` (a store and its rows, see
        ``LayerCache.compressed_destination``): FP8 records are stored there by the op that makes
        them (``kv_compress_store``) and None returned."""
        kv, score = self._projections(x) if projections is None else projections
        args = (kv, score, self.ape, self.norm.weight, freqs, state[0], state[1], self.ratio, self.overlap, start_pos)
        if not self.packs(x):
            return self.ops.kv_compress(*args, self.eps, x.dtype)
        if destination is not None:
            self.ops.kv_compress_store(*args, *destination, self.eps, *self.records)
            return None
        return self.ops.kv_compress_fp8(*args, self.eps, *self.records)

    def _projections(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 ``(x wkv^T, x wgate^T)`` of the checkpoint's bf16 weights (the official code's fp32
        compressor), one ``fp32_linear`` over the stacked [wkv; wgate] (:func:`fp32_projections`)."""
        return fp32_projections(x, self._stacked, self.ops)

    def packs(self, x: torch.Tensor) -> bool:
        """Whether entries come as FP8 records: with ``records`` set, for a bf16 model (the op packs
        bf16 entries; an fp32 model keeps its fp32 entries, packed by the cache)."""
        return self.records is not None and x.dtype == torch.bfloat16


def fp32_projections(x: torch.Tensor, stack: StackedLinears, ops: SimpleNamespace) -> tuple[torch.Tensor, ...]:
    """fp32 ``x W^T`` of each of ``stack``'s Linears (the compressors' projections), as one
    ``fp32_linear`` over their stacked weights and column views of its output: one launch instead
    of one a Linear, with all their weight rows to spread over the GPU (a decode step's six
    compressor GEMVs took 93 us on the H100 at 567d97d, latency-bound at 16-64 programs each).
    Every output column is its own weight row's sum, so the values are those of separate calls.
    Quantised weights, or dtypes that differ, take a call each."""
    dense = all(linear.format == "dense" for linear in stack.linears)
    stacked = stack.weights() if dense else None
    if stacked is None:
        return tuple(ops.fp32_linear(x, linear.weight) for linear in stack.linears)
    return ops.fp32_linear(x, stacked[0]).split(stack.sizes, dim=-1)


class Indexer(nn.Module):
    """Lightning indexer: scores compressed keys per query, keeps the top-k (CSA layers)."""

    def __init__(self, config: ModelConfig, ops: SimpleNamespace):
        super().__init__()
        self.config, self.ops = config, ops
        self.n_heads, self.head_dim = config.index_n_heads, config.index_head_dim
        self.wq_b = Linear(config.q_lora_rank, self.n_heads * self.head_dim, ops)
        self.weights_proj = Linear(config.dim, self.n_heads, ops)
        self.compressor = Compressor(config.dim, self.head_dim, CSA_RATIO, True, ops, config.norm_eps)
        self.weights_scale = self.head_dim**-0.5 * self.n_heads**-0.5
        """The head weights' factor: the op forms ``weights_proj(x).float() * scale`` as it loads them."""

    def forward(
        self, x: torch.Tensor, q: torch.Tensor, cache: LayerCache, step: StepPositions, freqs: torch.Tensor,
        projections: tuple[torch.Tensor, torch.Tensor] | None = None, offset: int = 0,
    ) -> torch.Tensor:
        """-> top-k compressed entries [B, S, index_topk] int32, entry j as ``offset + j`` (its row
        among the keys the attention reads), -1 gaps; this chunk's new keys are stored in the cache
        as entries ``n_compressed, ...``. q: [B, S, H * d], this indexer's ``wq_b`` product of the
        attention's qr, which the attention makes in one GEMM with its own query projection
        (:class:`StackedLinears`); ``projections``: its compressor's, when the attention made them
        with its own compressor's (see :meth:`Compressor.forward`)."""
        b, s, _ = x.shape
        q = q.view(b, s, self.n_heads, self.head_dim)
        positions = step.positions.expand(b, s)
        keys = self.compressor(x, cache.index_state, step.start_pos, freqs, projections)
        if self.config.simulate_fp4_indexer:  # RoPE, the rotation and its FP4 rounding in one op
            q = self.ops.hadamard_rotate(q, FP4_TILE, positions, freqs)
            # FP4 key records round the rotated keys as the simulation would: rotating suffices
            fp4_records = self.config.index_key_format == "fp4"
            keys = self.ops.hadamard_rotate(keys, 0 if fp4_records else FP4_TILE)
        else:
            q = self.ops.rope(q, positions, freqs)
        weights = self.weights_proj(x)  # the official weights_proj(x).float() * scale: the op scales them
        weights = weights.float() if weights.dtype == torch.float64 else weights
        stored = cache.store_index_keys(keys, step.entries_after(CSA_RATIO), step.memo)  # dense keys or packed records
        fmt, topk, scale = self.config.index_key_format, self.config.index_topk, self.weights_scale
        if fmt == "dense":
            return self.ops.indexer_topk(q, weights, stored, CSA_RATIO, step.start_pos, topk, scale, offset)
        return self.ops.indexer_topk_packed(q, weights, stored, fmt, CSA_RATIO, step.start_pos, topk, scale, offset)


class Attention(nn.Module):
    """Shared-KV MQA over ``window ∪ compressed`` with sinks, inverse RoPE, grouped output.

    Tensor parallel: this rank holds ``n_heads / tp`` query heads and ``o_groups / tp`` output
    groups (the heads of a group stay together); ``wo_b``'s partial sums are all-reduced over the
    TP group. ``wq_a``, the KV projection, the compressor and the indexer are replicated.
    """

    def __init__(self, config: ModelConfig, layer: int, ops: SimpleNamespace, parallel: Parallel = SINGLE_PROCESS):
        super().__init__()
        self.config, self.ops, self.parallel = config, ops, parallel
        self.ratio = config.compress_ratios[layer]
        c = config
        self.n_heads, self.head_dim, self.rope_dim = c.n_heads // parallel.tp, c.head_dim, c.rope_head_dim
        self.o_groups = c.o_groups // parallel.tp
        self.wq_a = Linear(c.dim, c.q_lora_rank, ops)
        self.q_norm = RMSNorm(c.q_lora_rank, c.norm_eps, ops)
        self.wq_b = Linear(c.q_lora_rank, self.n_heads * c.head_dim, ops)
        self.wkv = Linear(c.dim, c.head_dim, ops)
        self._input_projections = StackedLinears(self.wq_a, self.wkv)  # x's two products in one GEMM
        self.kv_norm = RMSNorm(c.head_dim, c.norm_eps, ops)
        self.wo_a = Linear(c.n_heads * c.head_dim // c.o_groups, self.o_groups * c.o_lora_rank, ops,
                           reader="grouped_linear")
        self.wo_b = Linear(self.o_groups * c.o_lora_rank, c.dim, ops)
        self.attn_sink = nn.Parameter(torch.zeros(self.n_heads), requires_grad=False)
        self.compressor = None
        self.indexer = None
        if self.ratio:
            records = (self.rope_dim, KV_TILE) if c.cache_format == "fp8" else None
            self.compressor = Compressor(
                c.dim, c.head_dim, self.ratio, self.ratio == CSA_RATIO, ops, c.norm_eps, records
            )
        if self.ratio == CSA_RATIO:
            self.indexer = Indexer(c, ops)
            self._query_projections = StackedLinears(self.wq_b, self.indexer.wq_b)  # qr's two products
            # x's four fp32 compressor products, the attention's compressor's and its indexer's
            self._compressor_projections = StackedLinears(
                self.compressor.wkv, self.compressor.wgate, self.indexer.compressor.wkv, self.indexer.compressor.wgate
            )
        self.register_buffer("freqs", None, persistent=False)
        self.register_buffer("window_offsets", None, persistent=False)
        self.make_constants()

    def make_constants(self, device: torch.device | None = None) -> None:
        """The layer's RoPE frequency table and its window's key offsets 0..W-1 (on ``device``, else
        the ambient one; a meta-built model's loader remakes them on the model's device)."""
        device = device or torch.get_default_device()
        # a meta build's table is made on the host and only its shape kept: the table's math on meta
        # tensors goes through torch's Python decompositions, whose import (torch._dynamo) takes 2 s
        with torch.device("cpu" if device.type == "meta" else device):
            self.freqs = self.rope_frequencies().to(device=device)
        self.window_offsets = torch.arange(self.config.window_size, device=device)

    def rope_frequencies(self) -> torch.Tensor:
        """SWA-only layers: plain RoPE at rope_theta; compressed layers: compress_rope_theta + YaRN."""
        c = self.config
        if not self.ratio:
            return rope_frequencies(c.rope_head_dim, c.rope_theta)
        return rope_frequencies(c.rope_head_dim, c.compress_rope_theta, c.yarn)

    def forward(
        self, x: torch.Tensor, cache: LayerCache, start_pos: int | torch.Tensor, step: StepPositions | None = None,
    ) -> torch.Tensor:
        """x: [B, S, D] (attn-normed), tokens at positions [start_pos, start_pos+S) -> [B, S, D];
        ``step``: the positions and what derives from them, when the caller made them once for
        every layer (:meth:`StepPositions.of`)."""
        b, s, _ = x.shape
        step = step or StepPositions.of(start_pos, s, x.device)
        positions = step.positions.expand(b, s)
        qa, kv = self._input_projections(x)
        qr = self.q_norm(qa)
        if self.indexer is None:
            q = self.wq_b(qr)
        else:  # the indexer's queries come from qr too; the norm reads the heads of the column view in place
            q, q_index = self._query_projections(qr)
        # each query head, then the KV vector (one head, the kv norm's weight): RMSNorm, then RoPE
        q = self.ops.rms_norm_rope(q.view(b, s, self.n_heads, self.head_dim), None, self.config.norm_eps, positions,
                                   self.freqs)
        decode = s == 1
        ring_slots = step.ring_slots(cache.window)
        # a decode step's KV into an FP8 ring at a tensor position: normalised, rotated, packed and
        # stored at its slot by one op (kv_cache_store), the projection handed over as it is
        rotation = None
        if decode and ring_slots is not None and cache.kv.fmt == "fp8":
            rotation = (positions, self.freqs, self.kv_norm.weight, self.kv_norm.eps)
        else:
            kv = self.ops.rms_norm_rope(kv.unsqueeze(2), self.kv_norm.weight, self.kv_norm.eps, positions, self.freqs)
            kv = kv.squeeze(2)
            if self.config.simulate_fp8_kv and cache.kv.fmt != "fp8":  # an FP8 cache stores kv through that rounding
                kv = fp8_kv_precision(kv, self.ops, self.rope_dim)

        compressed_idx = None
        if self.compressor is not None:
            own, index = self._compressor_projections_of(x)
            packed = self.compressor.packs(x)  # FP8 records as the cache stores them
            # at a tensor position the records go straight to their cache rows (kv_compress_store)
            destination = cache.compressed_destination(most_new_entries(s, self.ratio), step.memo) if packed else None
            entries = self.compressor(x, cache.compress_state, start_pos, self.freqs, own, destination)
            if self.config.simulate_fp8_kv and not packed:
                entries = fp8_kv_precision(entries, self.ops, self.rope_dim)
            if self.indexer is not None:  # a CSA layer: its indexer keys complete with the entries
                offset = entry_row_base(cache.window, s)  # the picks as rows of the keys attended
                compressed_idx = self.indexer(x, q_index, cache, step, self.freqs, index, offset)
            cache.append_compressed(entries, step.entries_after(self.ratio), packed, step.memo)

        if decode:  # stored first (encoded on the way): its ring slot held token p - W, which query p no longer sees
            cache.write_window(start_pos, kv, ring_slots, encoded=False, rotation=rotation)
            chunk = kv
        else:
            chunk = cache.kv.encode(kv)  # this chunk's KV as the cache stores it
        keys, indices = self._gather_keys(chunk, cache, start_pos, step, compressed_idx, decode)
        o = self._attend(q, keys, indices, cache, positions)  # rotated back by each query's position
        if not decode:
            cache.write_window(start_pos, chunk, ring_slots)
        return self._project_out(o)

    def _compressor_projections_of(self, x: torch.Tensor) -> tuple[tuple | None, tuple | None]:
        """The compressors' fp32 projections of x, ((kv, score), (its indexer's kv, score)): a CSA
        layer's two compressors in one ``fp32_linear`` (:func:`fp32_projections`); (None, None) for
        an HCA layer, whose compressor makes its own."""
        if self.indexer is None:
            return None, None
        kv, score, index_kv, index_score = fp32_projections(x, self._compressor_projections, self.ops)
        return (kv, score), (index_kv, index_score)

    def _gather_keys(
        self, chunk: torch.Tensor, cache: LayerCache, start_pos: int | torch.Tensor, step: StepPositions,
        compressed_idx: torch.Tensor | None, decode: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored-format key rows the queries attend and each query's indices into them;
        ``chunk``: this chunk's KV rows as stored [B, S, row], or at decode its vectors [B, 1, dim]
        (already in their ring slot: only the shape is read).

        Query t sees raw tokens t-W+1..t and compressed entry j when j < floor((t+1)/m): all of
        them (HCA) or the indexer's pick (CSA). Decode (one token, already in its ring slot): the
        layer's buffer ``[ring | compressed entries]`` itself, token p in row p mod W, entry j in
        row W + j; nothing is copied. A chunk of S > 1 tokens: ``[ring | chunk | compressed
        entries]`` concatenated (its later tokens would overwrite ring slots its earlier queries
        see), token p in ring slot p mod W before the chunk and in row W + p - start_pos within it.
        Indices are int32; at decode every part is made in int32, a chunk's window rows are
        converted once a step; a CSA layer's row is its window and the indexer's picks, which come
        as rows of these keys (``offset``)."""
        b, s, _ = chunk.shape
        w = cache.window
        t = step.positions
        entries = cache.compressed_rows()
        keys = cache.kv.data if decode else torch.cat((cache.ring(), chunk, entries), dim=1)

        def window_rows() -> torch.Tensor:  # [B, S, W] int32: each query's window in keys, -1 before the sequence
            if decode:
                ring = step.decode_ring(w)
                ring = ring if ring is not None else ring_rows(t, self.window_offsets[:w])
                return ring.expand(b, s, w)
            p = t[..., None] - self.window_offsets[:w]  # [(B,) S, W] key positions
            first = start_pos.reshape(-1, 1, 1) if isinstance(start_pos, torch.Tensor) else start_pos
            rows = torch.where(p < first, p % w, w + p - first).masked_fill(p < 0, -1)
            return rows.to(torch.int32).expand(b, s, w)

        base = entry_row_base(w, s)

        def window() -> torch.Tensor:  # the same for every layer
            return step.memo.once(("window rows", w, b), window_rows)

        def indices() -> torch.Tensor:  # SWA: the window; HCA: and every entry the query sees
            if not self.ratio:
                return window()
            j, rows = entry_rows(entries.shape[1], base, step.tables, self.ratio, chunk.device)
            if decode:  # query t sees entry j < floor((t+1)/m): one token, the entries the step leaves
                seen = step.entries_after(self.ratio)
                seen = seen.reshape(-1, 1, 1) if isinstance(seen, torch.Tensor) else seen
            else:
                seen = ((t + 1) // self.ratio)[..., None]
            hidden = j >= seen
            return torch.cat((window(), rows.masked_fill(hidden, -1).expand(b, s, -1)), dim=2)

        if compressed_idx is None:  # the same rows for every layer of this ratio: made once a step
            return keys, step.memo.once(("indices", self.ratio, w, entries.shape[1], b), indices)
        # CSA: [window | the indexer's picks], which it gave as rows already (entry j as base + j)
        return keys, torch.cat((window(), compressed_idx), dim=2)

    def _attend(
        self, q: torch.Tensor, keys: torch.Tensor, indices: torch.Tensor, cache: LayerCache, positions: torch.Tensor
    ) -> torch.Tensor:
        """Sparse attention over key rows in the cache's format: dense rows, or FP8 records read
        by ``sparse_attention_fp8`` (only the records the indices select are decoded); the output
        then takes the inverse RoPE of its query's position, in the same op."""
        scale = self.head_dim**-0.5
        if cache.kv.fmt == "fp8":
            return self.ops.sparse_attention_fp8(q, keys, indices, self.attn_sink, scale, self.rope_dim, KV_TILE,
                                                 positions, self.freqs)
        return self.ops.sparse_attention(q, keys, indices, self.attn_sink, scale, positions, self.freqs)

    def _project_out(self, o: torch.Tensor) -> torch.Tensor:
        """Grouped output projection: per group g, ``z_g = Wo_a[g] o_g`` over Wo_a dequantised to
        o's dtype (``grouped_linear``: the official code's products, from the FP8 bytes); then
        ``Wo_b z`` (summed over the TP group, each rank holding some of the groups)."""
        b, s = o.shape[:2]
        z = self.ops.grouped_linear(o.reshape(b, s, self.o_groups, -1), self.wo_a.weight, self.wo_a.scale)
        return self.parallel.tp_all_reduce(self.wo_b(z.reshape(b, s, -1)))


@dataclass
class StepPositions:
    """A forward step's token positions and what every attention layer derives from them alone:
    made once a step (:meth:`of`) rather than once a layer."""

    positions: torch.Tensor
    """[S] int64 for an int start_pos, [1 or B, S] for a tensor one (:func:`token_positions`)."""
    start_pos: int | torch.Tensor
    """The step's first position: an int, or a 0-d or [B] int64 tensor (a position-generic step)."""
    decode_window: torch.Tensor | None = None
    """One token a sequence: :func:`ring_rows` of its window, [(1 or B,) 1, W] int32."""
    decode_slots: torch.Tensor | None = None
    """With ``decode_window``: the token's own ring slot (p mod W, the window's offset 0), [(1 or B,) 1]
    int32, a view of the same arithmetic."""
    memo: StepMemo = field(default_factory=StepMemo)
    """What the layers derive from the positions and their ratio or window (:meth:`entries_after`,
    :meth:`ring_slots`, the cache's write rows, a decode step's index rows), made by the first layer
    that asks: at a tensor position each is a few small kernels, in every layer otherwise."""
    tables: PositionTables | None = None
    """The cache's device constants (:class:`seahal.model.cache.PositionTables`), when it has them."""

    @classmethod
    def of(cls, start_pos: int | torch.Tensor, n: int, device: torch.device,
           window_offsets: torch.Tensor | None = None, tables: PositionTables | None = None) -> StepPositions:
        """The step of ``n`` tokens from ``start_pos``; with ``window_offsets`` (0..W-1) and one
        token, its window's ring rows and the token's ring slot too; ``tables``: the cache's."""
        positions = token_positions(start_pos, n, device)
        if n == 1 and window_offsets is not None:
            rows = ring_rows(positions, window_offsets)
            return cls(positions, start_pos, rows, rows[..., 0], tables=tables)
        return cls(positions, start_pos, tables=tables)

    @property
    def end(self) -> int | torch.Tensor:
        """The position after the step, ``start_pos + S``: the cache's next position."""
        return self.memo.once(("end",), lambda: self.start_pos + self.positions.shape[-1])

    def entries_after(self, ratio: int) -> int | torch.Tensor:
        """The compressed entries of ratio m a layer holds after the step, ``floor((start_pos + S) / m)``
        (an int, or a tensor shaped as ``start_pos``; with :attr:`tables`, every ratio's in one kernel)."""
        if self.tables is not None and ratio in self.tables.ratios:
            return self.memo.once(("entries after",), lambda: self.tables.entry_counts(self.end))[ratio]
        return self.memo.once(("entries after", ratio), lambda: self.end // ratio)

    def decode_ring(self, window: int) -> torch.Tensor | None:
        """:attr:`decode_window` when it was made for a ring of ``window`` rows, else None."""
        made = self.decode_window is not None and self.decode_window.shape[-1] == window
        return self.decode_window if made else None

    def ring_slots(self, window: int) -> torch.Tensor | None:
        """At a tensor position, the step's tokens' slots in a ring of ``window`` rows, p mod W:
        [1 or B, S], int32 at decode (:attr:`decode_slots`), else int64; None at an int position
        (its window writes are slice copies)."""
        if not isinstance(self.start_pos, torch.Tensor):
            return None
        if self.decode_ring(window) is not None:
            return self.decode_slots
        return self.memo.once(("ring slots", window), lambda: self.positions % window)


def entry_row_base(window: int, s: int) -> int:
    """The row of compressed entry 0 among the keys a step of ``s`` tokens a sequence attends: W at
    decode (the layer's store ``[ring | entries]`` itself), W + S for a chunk (``[ring | chunk |
    entries]``; see :meth:`Attention._gather_keys`)."""
    return window if s == 1 else window + s


def entry_rows(
    n: int, base: int, tables: PositionTables | None, ratio: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compressed entries ``j < n`` of ratio m and their rows ``base + j`` among the keys, [n] int32
    each: views of the cache's tables where they hold them (:meth:`PositionTables.entry_rows`: a
    decode step's rows), made otherwise (two kernels)."""
    held = tables.entry_rows(ratio, n, base) if tables is not None else None
    if held is not None:
        return held
    j = torch.arange(n, dtype=torch.int32, device=device)
    return j, j + base


def ring_rows(positions: torch.Tensor, window_offsets: torch.Tensor) -> torch.Tensor:
    """[..., S, W] int32: the ring row (p mod W) of key position p = t - i for query position t and
    offset i in ``window_offsets`` (0..W-1), -1 where p < 0 (before the sequence). Three kernels:
    the subtraction writes int32 (the index dtype attention takes: no conversion after), and as
    p > -W, ``fmod`` keeps a negative p negative and the clamp makes it -1."""
    p = torch.empty((*positions.shape, window_offsets.shape[0]), dtype=torch.int32, device=positions.device)
    torch.sub(positions[..., None], window_offsets, out=p)
    return p.fmod_(window_offsets.shape[0]).clamp_(min=-1)


def token_positions(start_pos: int | torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
    """Positions ``[start_pos, start_pos + n)`` as int64: [n] for an int start_pos; [1, n] for a 0-d
    tensor, [B, n] for one position per sequence, as a position-generic step has them (see
    :class:`seahal.model.cache.TracedLayerCache`). One token at an int64 tensor position: a view
    of it (no kernel in a decode step's graph), read before the step advances it."""
    if isinstance(start_pos, torch.Tensor):
        column = start_pos.reshape(-1, 1).to(torch.int64)
        return column if n == 1 else column + torch.arange(n, device=device)
    return torch.arange(start_pos, start_pos + n, device=device)
