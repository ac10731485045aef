"""The decode cache: per layer one KV buffer (the window ring of raw KV, then the compressed
entries), indexer keys and the compressors' streaming states; one position counter for the batch
(a position-generic step, :class:`TracedLayerCache`, also takes one per sequence).

KV vectors are stored in one of two formats (``ModelConfig.cache_format``): ``"dense"`` keeps
them in the model dtype; ``"fp8"`` is the production layout of v4_ops.md §12: 584-byte records
(448 e4m3 + 64 bf16 RoPE dims + 7 ue8m0 scales + pad). Indexer keys have their own format
(``ModelConfig.index_key_format``): dense, or packed records that ``indexer_topk_packed`` scores
as they are, 68-byte FP4 (64 bytes of e2m1 codes + 4 ue8m0 scales) or 132-byte FP8 (128 e4m3 +
an fp32 scale) at d = 128.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch

from seahal.hal.formats import index_key_bytes, scatter_rows
from seahal.hal.ops.compressor import compressor_state
from seahal.hal.ops.quant import kv_record_bytes

from .config import CSA_RATIO, ModelConfig

KV_TILE = 64

KVRotation = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, float]
"""What makes the attention's stored KV from its projection, ``rms_norm_rope``'s arguments after x:
(positions [B, S], freqs [r/2], the kv norm's weight [D] or None, its eps)."""


class RowStore:
    """``rows`` stored rows per sequence, ``data`` [B, rows, width] (vectors in the model dtype,
    or packed uint8 records); subclasses say how vectors become rows (:meth:`encode`)."""

    def __init__(self, batch: int, rows: int, width: int, stored: torch.dtype, device):
        self.data = torch.zeros(batch, rows, width, dtype=stored, device=device)

    @property
    def rows(self) -> int:
        return self.data.shape[1]

    @property
    def bytes_per_row(self) -> int:
        """Stored bytes of one vector."""
        return self.data.shape[2] * self.data.element_size()

    def encode(self, vectors: torch.Tensor) -> torch.Tensor:
        """Vectors [B, n, dim] as stored rows [B, n, width]."""
        raise NotImplementedError

    def write(self, slots: torch.Tensor | slice, vectors: torch.Tensor, encoded: bool = False) -> None:
        """Store vectors [B, n, dim] at row ``slots`` (``encoded``: already stored rows [B, n, width])."""
        self.data[:, slots] = vectors if encoded else self.encode(vectors)

    def write_rows(self, target: torch.Tensor, vectors: torch.Tensor, encoded: bool = False, first: int = 0) -> None:
        """Store ``vectors[:, i]`` [B, n, dim] in row ``first + target[:, i]`` of each sequence (target:
        [1 or B, n] int64, distinct rows in ``[0, rows - first)``; ``encoded``: already stored rows
        [B, n, width]): one scatter into the rows from ``first`` on, whatever the row numbers' values."""
        scatter_rows(self.data[:, first:], target, vectors if encoded else self.encode(vectors))

    def read(self, rows: int | None = None) -> torch.Tensor:
        """The first ``rows`` (default all) stored rows as they are."""
        return self.data[:, :rows]


def _packable(vectors: torch.Tensor) -> torch.Tensor:
    """KV vectors as the FP8 record ops take them: a float64 model's rounded to fp32 (the records
    hold e4m3 codes and bf16 RoPE dims, far coarser than either), others as they are."""
    return vectors.float() if vectors.dtype == torch.float64 else vectors


class VectorStore(RowStore):
    """KV vectors of size ``dim``: ``"dense"``: [B, rows, dim] in dtype; ``"fp8"``: [B, rows, 584]
    packed KV records. Attention reads the stored rows as they are (``sparse_attention`` /
    ``sparse_attention_fp8``); nothing decodes them.
    """

    def __init__(
        self, batch: int, rows: int, dim: int, fmt: str, dtype: torch.dtype, device, ops: SimpleNamespace,
        rope_dim: int,
    ):
        if fmt not in ("dense", "fp8"):
            raise ValueError(f"unknown cache storage format {fmt!r}")
        self.dim, self.fmt, self.dtype, self.ops, self.rope_dim = dim, fmt, dtype, ops, rope_dim
        width, stored = (dim, dtype) if fmt == "dense" else (kv_record_bytes(dim, rope_dim, KV_TILE), torch.uint8)
        super().__init__(batch, rows, width, stored, device)

    def encode(self, vectors: torch.Tensor) -> torch.Tensor:
        """Vectors [B, n, dim] in the storage format: cast to dtype, or packed by the plan's
        ``kv_cache_pack``."""
        if self.fmt == "dense":
            return vectors.to(self.dtype)
        return self.ops.kv_cache_pack(_packable(vectors), self.rope_dim, KV_TILE)

    def write_rows(
        self, target: torch.Tensor, vectors: torch.Tensor, encoded: bool = False, first: int = 0,
        rotation: KVRotation | None = None,
    ) -> None:
        """:meth:`RowStore.write_rows`; FP8 vectors are packed and stored by one ``kv_cache_store``
        (the records never leave the op), where packing and then scattering takes two kernels.
        ``rotation`` (FP8 stores): the vectors are the attention's KV projection, which that op
        normalises and rotates first (``rms_norm_rope``'s arguments after x)."""
        if self.fmt == "fp8" and not encoded:
            self.ops.kv_cache_store(_packable(vectors), self.data[:, first:], target, self.rope_dim, KV_TILE,
                                    *(rotation or ()))
            return
        if rotation is not None:
            raise ValueError(f"a {self.fmt} store takes its KV normalised and rotated, not the projection")
        super().write_rows(target, vectors, encoded, first)


class IndexKeyStore(RowStore):
    """Indexer keys of size ``dim``: [B, rows, dim] in dtype (``"dense"``), or packed records
    [B, rows, index_key_bytes(dim, fmt)] uint8 (``"fp4"``, ``"fp8"``), which the indexer scores as
    they are (``indexer_topk_packed``)."""

    def __init__(self, batch: int, rows: int, dim: int, fmt: str, dtype: torch.dtype, device, ops: SimpleNamespace):
        self.fmt, self.dtype, self.ops = fmt, dtype, ops
        width, stored = (dim, dtype) if fmt == "dense" else (index_key_bytes(dim, fmt), torch.uint8)
        super().__init__(batch, rows, width, stored, device)

    def encode(self, keys: torch.Tensor) -> torch.Tensor:
        """Keys [B, n, dim] as stored rows: cast to dtype, or packed by the plan's ``index_key_pack``
        (FP4 with 1x32 ue8m0 scales, or FP8 with one ue8m0 scale per key)."""
        if self.fmt == "dense":
            return keys.to(self.dtype)
        return self.ops.index_key_pack(keys, self.fmt)

    def write_rows(self, target: torch.Tensor, keys: torch.Tensor, encoded: bool = False, first: int = 0) -> None:
        """:meth:`RowStore.write_rows`; packed records are made and stored by one ``index_key_store``."""
        if self.fmt != "dense" and not encoded:
            self.ops.index_key_store(keys, self.data[:, first:], target, self.fmt)
            return
        super().write_rows(target, keys, encoded, first)


class StepMemo(dict):
    """Values made once a forward step and shared by its layers, keyed by what they depend on
    besides the step's positions (a compression ratio, a store's geometry): the position
    arithmetic of a position-generic step -- ring slots, entry counts, the rows a write lands
    in -- which would otherwise be a few small kernels in every layer. Layers of one ratio hold
    the same number of entries at every step, so what derives from that count is shared too."""

    def once(self, key: tuple, make: Callable[[], Any]) -> Any:
        """The value under ``key``, made by ``make()`` the first time it is asked for."""
        if key not in self:
            self[key] = make()
        return self[key]


def _once(memo: StepMemo | None, key: tuple, make: Callable[[], Any]) -> Any:
    return make() if memo is None else memo.once(key, make)


@dataclass(frozen=True, eq=False)
class PositionTables:
    """Device constants a position-generic step derives its position arithmetic from, made with
    the cache (never inside a captured step, which could not make them from host values): the
    model's compression ratios as divisors, so that every ratio's entry count ``p // m`` is one
    kernel rather than one a ratio, and, for each ratio whose queries see every compressed entry
    (HCA), the entries' numbers ``j`` and their rows ``W + j`` in a layer's KV store at decode."""

    ratios: tuple[int, ...]
    """The distinct non-zero compression ratios, in the order of :attr:`divisors`."""
    divisors: torch.Tensor
    """[R] int64: :attr:`ratios` on the cache's device."""
    window: int
    """W, the window ring's rows: compressed entry j's row in a layer's KV store is W + j."""
    entries: dict[int, tuple[torch.Tensor, torch.Tensor]]
    """{m: (j, W + j)}, each [capacity entries] int32, for the ratios whose queries see all entries."""

    @classmethod
    def of(cls, config: ModelConfig, capacity: int, device) -> PositionTables:
        ratios = tuple(sorted({m for m in config.compress_ratios if m}))
        entries = {}
        for m in ratios:
            if m != CSA_RATIO:
                j = torch.arange(-(-capacity // m), dtype=torch.int32, device=device)
                entries[m] = (j, j + config.window_size)
        divisors = torch.tensor(ratios, dtype=torch.int64, device=device)
        return cls(ratios, divisors, config.window_size, entries)

    def tensors(self) -> list[torch.Tensor]:
        """The tables' tensors (the divisors, each ratio's entry numbers and rows)."""
        return [self.divisors, *(t for pair in self.entries.values() for t in pair)]

    def entry_rows(self, ratio: int, n: int, base: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Views of entries ``j < n`` of ratio m and their rows ``base + j`` ([n] int32 each) where
        the tables hold them (an HCA ratio, ``base`` = W: a decode step's keys), else None."""
        held = self.entries.get(ratio) if base == self.window else None
        if held is None or n > held[0].shape[0]:
            return None
        return held[0][:n], held[1][:n]

    def entry_counts(self, pos: int | torch.Tensor) -> dict[int, int | torch.Tensor]:
        """{m: pos // m} for every ratio; at a tensor position (on the tables' device) one kernel for
        all of them, each count shaped as ``pos``: a view of one [R, *pos.shape] result."""
        if not isinstance(pos, torch.Tensor):
            return {m: pos // m for m in self.ratios}
        every = torch.floor_divide(pos.unsqueeze(0), self.divisors.view(-1, *[1] * pos.dim()))
        return {m: every[i] for i, m in enumerate(self.ratios)}


@dataclass
class LayerCache:
    """One attention layer's cache for a batch: ``kv`` rows ``[window ring | compressed entries]``
    (token p in row p mod ``window``, compressed entry j in row ``window + j``, the first
    ``n_compressed`` valid), CSA ``index_keys``, compressor states.

    One buffer, so that attention at decode reads the selected rows of the stored buffer itself
    (``sparse_attention`` / ``sparse_attention_fp8`` over ``kv.data``), never a copy of the store.
    """

    kv: VectorStore
    window: int
    compress_state: tuple[torch.Tensor, torch.Tensor] | None = None
    index_keys: IndexKeyStore | None = None
    index_state: tuple[torch.Tensor, torch.Tensor] | None = None
    n_compressed: int | torch.Tensor = 0
    ratio: int = 0
    """The compression ratio m of the layer's entries (0: a window-only layer)."""

    @property
    def capacity(self) -> int:
        """Compressed entries the buffer holds: ceil(C/m) in a cache of C tokens, the floor(C/m)
        those tokens complete and, when m does not divide C, one more row, where a position-generic
        step stores its padding (see :class:`TracedLayerCache`)."""
        return self.kv.rows - self.window

    def ring(self) -> torch.Tensor:
        """The window ring's stored rows [B, W, row] (a view)."""
        return self.kv.data[:, : self.window]

    def compressed_rows(self) -> torch.Tensor:
        """The compressed entries' stored rows [B, N, row] (a view): entry j in row j, N >= the
        valid ones (a query masks what it cannot see)."""
        return self.kv.data[:, self.window : self.window + self.n_compressed]

    def write_window(
        self, start_pos: int | torch.Tensor, rows: torch.Tensor, slots: torch.Tensor | None = None, encoded: bool = True,
        rotation: KVRotation | None = None,
    ) -> None:
        """Store the stored-format rows [B, n, row] of tokens ``start_pos, ...`` (an int, or a 0-d
        or [B] tensor) in their ring slots (token p in slot p mod W; of more than W tokens, the last
        W); ``encoded`` False: KV vectors [B, n, dim], which the store encodes. An int start_pos's
        slots are at most two runs of the ring: slice copies. At a tensor start_pos, ``slots`` (the
        tokens' ring slots p mod W [1 or B, n] int32 or int64, when the caller made them: once a step for
        every layer) lets n <= W rows be written by one scatter (:meth:`RowStore.write_rows`:
        vectors of an FP8 store packed in the same kernel, and with ``rotation`` normalised and
        rotated there too: only that path takes it)."""
        b, n = rows.shape[:2]
        w = self.window
        if isinstance(start_pos, torch.Tensor) and slots is not None and n <= w:
            if rotation is None:
                self.kv.write_rows(slots, rows, encoded)
            else:
                self.kv.write_rows(slots, rows, encoded, rotation=rotation)
            return
        if rotation is not None:
            raise ValueError("the KV projection is normalised and rotated only where a scatter stores it")
        rows = rows if encoded else self.kv.encode(rows)
        if not isinstance(start_pos, torch.Tensor):
            kept = min(n, w)
            first = (start_pos + n - kept) % w  # the first kept token's slot; the rest follow, wrapping once
            head = min(kept, w - first)
            self.kv.data[:, first : first + head] = rows[:, n - kept : n - kept + head]
            if head < kept:
                self.kv.data[:, : kept - head] = rows[:, n - kept + head :]
            return
        keep = torch.arange(max(n - w, 0), n, device=rows.device)
        slots = (start_pos.reshape(-1, 1) + keep) % w  # [1 or B, kept]
        sequences = torch.arange(b, device=rows.device)[:, None]
        self.kv.data[sequences, slots] = rows[:, keep]

    def store_index_keys(
        self, new_keys: torch.Tensor, entries_after: int, memo: StepMemo | None = None
    ) -> torch.Tensor:
        """Store this step's indexer keys [B, count, d_i] as entries ``n_compressed, ...``, the step
        ending with ``entries_after`` entries (``count = entries_after - n_compressed``), and return
        the keys as the indexer scores them, stored ones and new ones alike in the stored format
        (so a key scores the same whichever step completed it): [B, N, d_i] dense or packed
        records [B, N, bytes], N >= the entries a query may see (it masks the others). ``memo``:
        the step's (:class:`TracedLayerCache` shares its write rows; an int position needs none)."""
        self._check_new(new_keys, entries_after)
        self.index_keys.write(slice(self.n_compressed, entries_after), new_keys)
        return self.index_keys.read(entries_after)

    def compressed_destination(self, n: int, memo: StepMemo | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Where a compressor may store a step's ``n`` FP8 records itself (``kv_compress_store``:
        the store and each sequence's rows in it), instead of handing them to
        :meth:`append_compressed`; None: the records come back to be stored here (an int position
        writes its entries by a slice copy, a dense store casts them)."""
        return None

    def append_compressed(
        self, entries: torch.Tensor, entries_after: int, encoded: bool = False, memo: StepMemo | None = None
    ) -> None:
        """Store the entries [B, count, d] a step completed (after its indexer keys, see
        :meth:`store_index_keys`), which leave the layer ``entries_after`` entries; ``encoded``: the
        entries are already stored rows [B, count, row] (FP8 records from ``kv_compress_fp8``), kept
        as they come; ``memo`` as for :meth:`store_index_keys`."""
        self._check_new(entries, entries_after)
        self.kv.write(slice(self.window + self.n_compressed, self.window + entries_after), entries, encoded)
        self.n_compressed = entries_after

    def _check_new(self, rows: torch.Tensor, entries_after: int) -> None:
        """A step's new entries ``rows`` [B, count, ...] must take this layer from ``n_compressed``
        entries to ``entries_after``, within its capacity."""
        count = entries_after - self.n_compressed
        if rows.shape[1] != count:
            raise ValueError(
                f"a step to {entries_after} entries from {self.n_compressed} adds {count}, got {rows.shape[1]} rows"
            )
        if entries_after > self.capacity:
            raise RuntimeError(
                f"cache capacity exceeded: {entries_after} compressed entries > {self.capacity}; "
                "create the cache with a larger max_seq_len"
            )

    def tensors(self) -> list[torch.Tensor]:
        return list(self.named_tensors().values())

    def named_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the layer by name, in a fixed order: ``kv`` (window ring, then compressed
        entries), ``index_keys`` (dense keys or packed records), ``compress_kv_state``,
        ``compress_score_state``, ``index_kv_state``, ``index_score_state`` (those the layer has)."""
        named = {}
        for name in ("kv", "index_keys"):
            store = getattr(self, name)
            if store is not None:
                named[name] = store.data
        for name in ("compress", "index"):
            state = getattr(self, f"{name}_state")
            if state is not None:
                named[f"{name}_kv_state"], named[f"{name}_score_state"] = state
        return named

    def with_tensors(self, tensors: Mapping[str, torch.Tensor], n_compressed: int) -> LayerCache:
        """A cache of this layout holding ``tensors`` (keyed as :meth:`named_tensors`), with the
        first ``n_compressed`` compressed entries valid. The tensors are used, not copied."""
        stores = {}
        for name in ("kv", "index_keys"):
            store = getattr(self, name)
            if store is not None:
                store = stores[name] = copy.copy(store)
                store.data = tensors[name]
        states = {
            f"{name}_state": (tensors[f"{name}_kv_state"], tensors[f"{name}_score_state"])
            for name in ("compress", "index")
            if getattr(self, f"{name}_state") is not None
        }
        kind = TracedLayerCache if isinstance(n_compressed, torch.Tensor) else LayerCache
        return kind(**{**vars(self), **stores, **states, "n_compressed": n_compressed})


class TracedLayerCache(LayerCache):
    """A layer cache whose position is an int64 tensor, 0-d or [B] per sequence (``n_compressed``
    too), for one graph that serves every position (a captured decode step, the ONNX export).
    Nothing depends on the position's value: every compressed row is offered (queries mask the
    entries they cannot see), where :class:`LayerCache` slices to ``n_compressed``.

    A step of S tokens from position p, holding c = floor(p/m) entries, gets n = ceil(S/m) rows
    from its compressor: the ``count`` = floor((p+S)/m) - c entries it completes, then padding.
    All n are stored, row i as entry c + i, by one scatter and no mask. That is safe because

    - they fit: a store serving positions below T (:meth:`Cache.new`'s capacity,
      :meth:`Cache.truncated`'s tokens) holds ceil(T/m) entries, and for p + S <= T,
      c + n = floor(p/m) + ceil(S/m) <= ceil((p+S)/m) <= ceil(T/m);
    - the padding overwrites no valid entry: it lands at entries >= c + count, which no query of
      the step sees (query t sees entries j < floor((t+1)/m) <= c + count; the indexer and
      attention kernels drop the others by selection, so a padded row's values, NaN included,
      never reach a score), and the step that completes such an entry stores it before its
      queries read the store.

    So the rows past the valid entries hold whatever a step's padding left, not necessarily zeros."""

    def compressed_rows(self) -> torch.Tensor:
        return self.kv.data[:, self.window :]

    def store_index_keys(
        self, new_keys: torch.Tensor, entries_after: torch.Tensor, memo: StepMemo | None = None
    ) -> torch.Tensor:
        """Store this step's keys [B, n, d_i] (per sequence the ones it completes, then padding)
        as entries ``n_compressed, ...``; return the whole store (queries mask the rows they do not
        see). With the step's ``memo`` the rows written are made once for the layers of this ratio."""
        self.index_keys.write_rows(self._new_rows(new_keys.shape[1], memo), new_keys)
        return self.index_keys.read()

    def compressed_destination(self, n: int, memo: StepMemo | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """An FP8 store's compressed rows (past the ring) and the step's ``n`` rows in them, entries
        ``n_compressed + i`` (:meth:`_new_rows`): a compressor's records go there in its own launch."""
        if self.kv.fmt != "fp8":
            return None
        return self.compressed_rows(), self._new_rows(n, memo)

    def append_compressed(
        self, entries: torch.Tensor | None, entries_after: torch.Tensor, encoded: bool = False,
        memo: StepMemo | None = None,
    ) -> None:
        """Store ``entries`` [B, n, d] (per sequence the ones the step completes, then padding;
        ``encoded``: stored rows, as :meth:`LayerCache.append_compressed`) as entries
        ``n_compressed, ...``; the layer then holds ``entries_after`` (a tensor shaped as
        ``n_compressed``). With ``memo``, the rows written are made once for the layers of this
        ratio. ``entries`` None: the compressor stored them at :meth:`compressed_destination`."""
        if entries is not None:
            self.kv.write_rows(self._new_rows(entries.shape[1], memo), entries, encoded, first=self.window)
        self.n_compressed = entries_after

    def _new_rows(self, n: int, memo: StepMemo | None) -> torch.Tensor:
        """[1 or B, n] int64: the entries ``n_compressed + i`` (i < n) a step writes, in every store
        of the layer (its KV entries from the ring's end on); a decode step's one entry is a view
        of ``n_compressed``, no kernel."""
        def rows() -> torch.Tensor:
            start = self.n_compressed.reshape(-1, 1)
            return start + torch.arange(n, device=start.device) if n > 1 else start

        return _once(memo, ("new rows", self.ratio, n), rows)


@dataclass
class Cache:
    """All layers' caches and the number of tokens consumed so far (``pos``: an int, or in a
    position-generic step a 0-d or [B] per-sequence tensor, see :meth:`with_tensors`)."""

    config: ModelConfig
    layers: list[LayerCache]
    capacity: int
    pos: int | torch.Tensor = 0
    tables: PositionTables | None = None
    """Made by :meth:`new` and shared by the caches made from it (:meth:`with_tensors`, ...)."""

    @classmethod
    def new(
        cls, config: ModelConfig, batch: int, capacity: int, dtype: torch.dtype, device, ops: SimpleNamespace
    ) -> Cache:
        c = config
        kv_format = "fp8" if c.cache_format == "fp8" else "dense"
        layers = []
        for layer in range(c.n_layers):
            ratio = c.compress_ratios[layer]
            entries = -(-capacity // ratio) if ratio else 0  # see TracedLayerCache: room for a padded row
            kv = VectorStore(batch, c.window_size + entries, c.head_dim, kv_format, dtype, device, ops, c.rope_head_dim)
            lc = LayerCache(kv=kv, window=c.window_size, ratio=ratio)
            if ratio:
                lc.compress_state = compressor_state(batch, ratio, c.head_dim, ratio == CSA_RATIO, device)
            if ratio == CSA_RATIO:
                lc.index_keys = IndexKeyStore(batch, entries, c.index_head_dim, c.index_key_format, dtype, device, ops)
                lc.index_state = compressor_state(batch, ratio, c.index_head_dim, True, device)
            layers.append(lc)
        return cls(config, layers, capacity, tables=PositionTables.of(config, capacity, device))

    def named_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the cache as ``layers.<i>.<name>`` (see :meth:`LayerCache.named_tensors`)."""
        return {f"layers.{i}.{name}": t for i, lc in enumerate(self.layers) for name, t in lc.named_tensors().items()}

    def with_tensors(self, tensors: Mapping[str, torch.Tensor], pos: int | torch.Tensor) -> Cache:
        """A cache of this layout (same names, shapes and dtypes) holding ``tensors`` after ``pos``
        tokens. The tensors are used, not copied: the new cache's writes go to them.

        ``pos`` an int64 tensor, 0-d or [B] (one position per sequence), gives a cache for a
        position-generic step (its layers are :class:`TracedLayerCache`); its range is then the
        caller's to check."""
        expected = self.named_tensors()
        if set(tensors) != set(expected):
            missing, unknown = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
            raise ValueError(f"cache tensors do not match the layout: missing {missing}, unknown {unknown}")
        for name, like in expected.items():
            t = tensors[name]
            if t.shape != like.shape or t.dtype != like.dtype:
                raise ValueError(
                    f"cache tensor {name} must be {list(like.shape)} {like.dtype}, got {list(t.shape)} {t.dtype}"
                )
        if not isinstance(pos, torch.Tensor) and not 0 <= pos <= self.capacity:
            raise ValueError(f"pos must be in [0, {self.capacity}], got {pos}")
        # the tables serve a cache on their device (a layout built on meta tensors makes its own)
        device = next(iter(tensors.values())).device if tensors else None
        tables = self.tables if self.tables is not None and self.tables.divisors.device == device else None
        if tables is not None:
            held = tables.entry_counts(pos)  # entries held: one count per ratio
        else:
            held = {m: pos // m for m in set(self.config.compress_ratios) if m}
        layers = []
        for i, lc in enumerate(self.layers):
            own = {name: tensors[f"layers.{i}.{name}"] for name in lc.named_tensors()}
            layers.append(lc.with_tensors(own, held.get(lc.ratio, 0)))
        return Cache(self.config, layers, self.capacity, pos, tables)

    def rows(self, first: int, stop: int) -> Cache:
        """Sequences ``[first, stop)`` as a cache of their own at position 0 whose tensors are views
        of this one's: what it stores lands in those rows here (a batch of prompts of different
        lengths is prefilled group by group into one cache, then decoded together)."""
        layers = [
            lc.with_tensors({name: t[first:stop] for name, t in lc.named_tensors().items()}, 0)
            for lc in self.layers
        ]
        return Cache(self.config, layers, self.capacity, tables=self.tables)

    def truncated(self, tokens: int) -> Cache:
        """This cache as far as positions below ``tokens`` reach: per layer the window ring, the
        first ceil(tokens / m) compressed entries and indexer keys (as :attr:`LayerCache.capacity`
        of a ``tokens`` cache; never more than this cache holds), and the states, all views (what
        is written lands here). A position-generic step over it offers its queries ``tokens``
        positions' rows instead of the capacity's."""
        if not 0 < tokens <= self.capacity:
            raise ValueError(f"tokens must be in [1, {self.capacity}], got {tokens}")
        layers = []
        for lc, ratio in zip(self.layers, self.config.compress_ratios):
            entries = -(-tokens // ratio) if ratio else 0
            named = lc.named_tensors()
            named["kv"] = named["kv"][:, : lc.window + entries]
            if "index_keys" in named:
                named["index_keys"] = named["index_keys"][:, :entries]
            layers.append(lc.with_tensors(named, lc.n_compressed))
        return Cache(self.config, layers, tokens, self.pos, self.tables)

    def check_room(self, n_tokens: int) -> None:
        if isinstance(self.pos, torch.Tensor):  # tracing: the position is a run-time value
            return
        if self.pos + n_tokens > self.capacity:
            raise RuntimeError(f"cache holds {self.capacity} tokens; {self.pos} used, {n_tokens} more requested")

    def nbytes(self) -> int:
        """Bytes the cache holds now (all layers, all sequences, and its position tables)."""
        held = [t for lc in self.layers for t in lc.tensors()] + (self.tables.tensors() if self.tables else [])
        return sum(t.numel() * t.element_size() for t in held)

    def bytes_per_token(self) -> float:
        """Amortised bytes one sequence adds per token: compressed entries and indexer keys
        (``bytes_per_row / ratio`` each). The window ring and compressor states are a constant per
        sequence, not per token."""
        total = 0.0
        for layer, lc in enumerate(self.layers):
            ratio = self.config.compress_ratios[layer]
            for store in (lc.kv if ratio else None, lc.index_keys):
                if store is not None:
                    total += store.bytes_per_row / ratio
        return total
