"""The decode cache: per layer a window ring of raw KV, compressed entries, indexer keys and the
compressors' streaming states; one position counter for the batch.

Vectors are stored in one of two formats (``ModelConfig.cache_format``):
``"dense"`` keeps them in the model dtype; ``"fp8"`` is the production layout of v4_ops.md §12:
584-byte records (448 e4m3 + 64 bf16 RoPE dims + 7 ue8m0 scales + pad) for KV and, when the
indexer simulates FP4, 68-byte indexer keys (64 bytes of e2m1 codes + 4 ue8m0 scales).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from seahal.hal.formats import decode_scale, fp4_dequantize, ue8m0_encode
from seahal.hal.ops.compressor import compressor_state
from seahal.hal.ops.quant import kv_record_bytes

from .config import CSA_RATIO, ModelConfig

FP4_BLOCK = 32
KV_TILE = 64


class VectorStore:
    """``rows`` vectors of size ``dim`` per sequence, in a storage format.

    ``"dense"``: [B, rows, dim] in dtype; ``"fp8"``: [B, rows, 584] packed KV records;
    ``"fp4"``: [B, rows, dim/2] e2m1 codes + [B, rows, dim/32] e8m0 scales.
    """

    def __init__(
        self, batch: int, rows: int, dim: int, fmt: str, dtype: torch.dtype, device, ops: SimpleNamespace,
        rope_dim: int,
    ):
        self.dim, self.fmt, self.dtype, self.ops, self.rope_dim = dim, fmt, dtype, ops, rope_dim
        self.scales = None
        if fmt == "dense":
            self.data = torch.zeros(batch, rows, dim, dtype=dtype, device=device)
        elif fmt == "fp8":
            width = kv_record_bytes(dim, rope_dim, KV_TILE)
            self.data = torch.zeros(batch, rows, width, dtype=torch.uint8, device=device)
        elif fmt == "fp4":
            self.data = torch.zeros(batch, rows, dim // 2, dtype=torch.uint8, device=device)
            self.scales = torch.zeros(batch, rows, dim // FP4_BLOCK, dtype=torch.uint8, device=device)
        else:
            raise ValueError(f"unknown cache storage format {fmt!r}")

    @property
    def rows(self) -> int:
        return self.data.shape[1]

    @property
    def bytes_per_row(self) -> int:
        """Stored bytes of one vector."""
        width = self.data.shape[2] * self.data.element_size()
        return width + (self.scales.shape[2] if self.scales is not None else 0)

    def encode(self, vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Vectors [B, n, dim] in the storage format: (rows like ``data``, rows like ``scales`` or None)."""
        if self.fmt == "dense":
            return vectors.to(self.dtype), None
        if self.fmt == "fp8":
            return self.ops.kv_cache_pack(vectors, self.rope_dim, KV_TILE), None
        codes, scale = self.ops.fp4_quant(vectors, FP4_BLOCK)
        return codes, ue8m0_encode(scale)

    def write(self, slots: torch.Tensor | slice, vectors: torch.Tensor) -> None:
        """Store vectors [B, n, dim] at row ``slots``."""
        data, scales = self.encode(vectors)
        self.data[:, slots] = data
        if scales is not None:
            self.scales[:, slots] = scales

    def write_span(self, first: torch.Tensor, count: torch.Tensor, vectors: torch.Tensor) -> None:
        """Store ``vectors[:, i]`` at row ``first + i`` for ``i < count`` (0-d int64 tensors; the
        rows of vectors [B, n, dim] past ``count`` are ignored). Shapes do not depend on the
        values: every row is rewritten, with its old value outside the span."""
        take, source = span(first, count, self.rows, vectors.shape[1], vectors.device)
        for stored, new in zip((self.data, self.scales), self.encode(vectors)):
            if stored is not None:
                stored.copy_(torch.where(take[:, None], new[:, source], stored))

    def read(self, rows: int | None = None) -> torch.Tensor:
        """The first ``rows`` (default all) vectors as [B, rows, dim] in the model dtype."""
        data = self.data[:, :rows]
        if self.fmt == "dense":
            return data
        if self.fmt == "fp8":
            return self.ops.kv_cache_unpack(data, self.dim, self.rope_dim, KV_TILE).to(self.dtype)
        scale = decode_scale(self.scales[:, :rows])
        return fp4_dequantize(data, scale, FP4_BLOCK, self.dtype)


@dataclass
class LayerCache:
    """One attention layer's cache for a batch: ``window`` ring (token p in slot p mod W),
    ``compressed`` entries (first ``n_compressed`` valid), CSA ``index_keys``, compressor states."""

    window: VectorStore
    compressed: VectorStore | None = None
    compress_state: tuple[torch.Tensor, torch.Tensor] | None = None
    index_keys: VectorStore | None = None
    index_state: tuple[torch.Tensor, torch.Tensor] | None = None
    n_compressed: int | torch.Tensor = 0

    def compressed_entries(self) -> torch.Tensor:
        """The compressed entries [B, N, d] in the model dtype: entry j in row j, N >= the valid
        ones (a query masks what it cannot see)."""
        return self.compressed.read(self.n_compressed)

    def index_keys_with(self, new_keys: torch.Tensor) -> torch.Tensor:
        """The indexer keys [B, N, d_i] with this step's keys [B, n, d_i] as entries
        ``n_compressed, ...``: the stored ones, then the new ones."""
        return torch.cat((self.index_keys.read(self.n_compressed), new_keys), dim=1)

    def append_compressed(self, entries: torch.Tensor, index_entries: torch.Tensor | None, count: int) -> None:
        """Store the ``count`` entries [B, count, d] (and indexer keys [B, count, d_i]) a step completed."""
        if self.n_compressed + count > self.compressed.rows:
            raise RuntimeError(
                f"cache capacity exceeded: {self.n_compressed + count} compressed entries > {self.compressed.rows}; "
                "create the cache with a larger max_seq_len"
            )
        rows = slice(self.n_compressed, self.n_compressed + count)
        self.compressed.write(rows, entries)
        if index_entries is not None:
            self.index_keys.write(rows, index_entries)
        self.n_compressed += count

    def tensors(self) -> list[torch.Tensor]:
        return list(self.named_tensors().values())

    def named_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the layer by name, in a fixed order: ``window``, ``compressed``,
        ``index_keys`` (then ``index_keys_scales`` for FP4 keys), ``compress_kv_state``,
        ``compress_score_state``, ``index_kv_state``, ``index_score_state`` (those the layer has)."""
        named = {}
        for name in ("window", "compressed", "index_keys"):
            store = getattr(self, name)
            if store is not None:
                named[name] = store.data
                if store.scales is not None:
                    named[f"{name}_scales"] = store.scales
        for name in ("compress", "index"):
            state = getattr(self, f"{name}_state")
            if state is not None:
                named[f"{name}_kv_state"], named[f"{name}_score_state"] = state
        return named

    def with_tensors(self, tensors: Mapping[str, torch.Tensor], n_compressed: int) -> LayerCache:
        """A cache of this layout holding ``tensors`` (keyed as :meth:`named_tensors`), with the
        first ``n_compressed`` compressed entries valid. The tensors are used, not copied."""
        stores = {}
        for name in ("window", "compressed", "index_keys"):
            store = getattr(self, name)
            if store is not None:
                store = stores[name] = copy.copy(store)
                store.data = tensors[name]
                if store.scales is not None:
                    store.scales = tensors[f"{name}_scales"]
        states = {
            f"{name}_state": (tensors[f"{name}_kv_state"], tensors[f"{name}_score_state"])
            for name in ("compress", "index")
            if getattr(self, f"{name}_state") is not None
        }
        kind = TracedLayerCache if isinstance(n_compressed, torch.Tensor) else LayerCache
        return kind(**{**vars(self), **stores, **states, "n_compressed": n_compressed})


class TracedLayerCache(LayerCache):
    """A layer cache whose position is a 0-d int64 tensor (``n_compressed`` too), for tracing one
    graph that serves every position (ONNX export). Nothing depends on the position's value: the
    whole compressed store is read (queries mask the entries they cannot see) and written
    through a mask, where :class:`LayerCache` slices to ``n_compressed``."""

    def compressed_entries(self) -> torch.Tensor:
        return self.compressed.read()

    def index_keys_with(self, new_keys: torch.Tensor) -> torch.Tensor:
        """The whole store with rows ``n_compressed, ...`` replaced by ``new_keys``, padding
        included: rows past this step's entries are beyond what any of its queries sees."""
        keys = self.index_keys.read()
        n = new_keys.shape[1]
        take, source = span(self.n_compressed, n, keys.shape[1], n, keys.device)
        return torch.where(take[:, None], new_keys[:, source], keys)

    def append_compressed(
        self, entries: torch.Tensor, index_entries: torch.Tensor | None, count: torch.Tensor
    ) -> None:
        """Store the first ``count`` (a tensor) of ``entries`` [B, n, d] (padded past it)."""
        self.compressed.write_span(self.n_compressed, count, entries)
        if index_entries is not None:
            self.index_keys.write_span(self.n_compressed, count, index_entries)
        self.n_compressed = self.n_compressed + count


def span(
    first: torch.Tensor, count: torch.Tensor | int, rows: int, width: int, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``[first, first + count)`` of a ``rows``-row store filled from a ``width``-row source:
    (take [rows] bool, source row [rows] int64, clamped into [0, width))."""
    offset = torch.arange(rows, device=device) - first
    return (offset >= 0) & (offset < count), offset.clamp(0, width - 1)


@dataclass
class Cache:
    """All layers' caches and the number of tokens consumed so far (``pos``: an int, or a 0-d
    tensor while tracing, see :meth:`with_tensors`)."""

    config: ModelConfig
    layers: list[LayerCache]
    capacity: int
    pos: int | torch.Tensor = 0

    @classmethod
    def new(
        cls, config: ModelConfig, batch: int, capacity: int, dtype: torch.dtype, device, ops: SimpleNamespace
    ) -> Cache:
        c = config
        kv_format = "fp8" if c.cache_format == "fp8" else "dense"
        index_format = "fp4" if c.cache_format == "fp8" and c.simulate_fp4_indexer else "dense"

        def store(rows: int, dim: int, fmt: str) -> VectorStore:
            return VectorStore(batch, rows, dim, fmt, dtype, device, ops, c.rope_head_dim)

        layers = []
        for layer in range(c.n_layers):
            ratio = c.compress_ratios[layer]
            lc = LayerCache(window=store(c.window_size, c.head_dim, kv_format))
            if ratio:
                lc.compressed = store(capacity // ratio, c.head_dim, kv_format)
                lc.compress_state = compressor_state(batch, ratio, c.head_dim, ratio == CSA_RATIO, device)
            if ratio == CSA_RATIO:
                lc.index_keys = store(capacity // ratio, c.index_head_dim, index_format)
                lc.index_state = compressor_state(batch, ratio, c.index_head_dim, True, device)
            layers.append(lc)
        return cls(config, layers, capacity)

    def named_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the cache as ``layers.<i>.<name>`` (see :meth:`LayerCache.named_tensors`)."""
        return {f"layers.{i}.{name}": t for i, lc in enumerate(self.layers) for name, t in lc.named_tensors().items()}

    def with_tensors(self, tensors: Mapping[str, torch.Tensor], pos: int | torch.Tensor) -> Cache:
        """A cache of this layout (same names, shapes and dtypes) holding ``tensors`` after ``pos``
        tokens. The tensors are used, not copied: the new cache's writes go to them.

        ``pos`` a 0-d int64 tensor gives a cache for tracing a position-generic graph (its layers
        are :class:`TracedLayerCache`); its range is then the caller's to check."""
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
        layers = []
        for i, (lc, ratio) in enumerate(zip(self.layers, self.config.compress_ratios)):
            own = {name: tensors[f"layers.{i}.{name}"] for name in lc.named_tensors()}
            layers.append(lc.with_tensors(own, pos // ratio if ratio else 0))
        return Cache(self.config, layers, self.capacity, pos)

    def check_room(self, n_tokens: int) -> None:
        if isinstance(self.pos, torch.Tensor):  # tracing: the position is a run-time value
            return
        if self.pos + n_tokens > self.capacity:
            raise RuntimeError(f"cache holds {self.capacity} tokens; {self.pos} used, {n_tokens} more requested")

    def nbytes(self) -> int:
        """Bytes the cache holds now (all layers, all sequences)."""
        return sum(t.numel() * t.element_size() for lc in self.layers for t in lc.tensors())

    def bytes_per_token(self) -> float:
        """Amortised bytes one sequence adds per token: compressed entries and indexer keys
        (``bytes_per_row / ratio`` each). The window ring and compressor states are a constant per
        sequence, not per token."""
        total = 0.0
        for layer, lc in enumerate(self.layers):
            ratio = self.config.compress_ratios[layer]
            for store in (lc.compressed, lc.index_keys):
                if store is not None:
                    total += store.bytes_per_row / ratio
        return total
