"""Which part of each tensor a rank holds, and which slice of each checkpoint tensor it reads.

The placement of every model tensor (state_dict names; stacked experts ``...ffn.experts.w1``
[E, I, D]) over the ``tp x ep`` grid of model/parallel.py; anything not listed is replicated:

    embed.weight, head.weight                       dim 0 (vocabulary)     over tp
    attn.wq_b, attn.wo_a (+ .scale), attn_sink      dim 0 (heads, groups)  over tp
    attn.wo_b (+ .scale)                            dim 1 (groups)         over tp
    ffn.experts.w1, w3 (+ _scale)                   dim 0 over ep, dim 1 (inter) over tp
    ffn.experts.w2 (+ _scale)                       dim 0 over ep, dim 2 (inter) over tp
    ffn.shared_experts.w1, w3 / w2 (+ _scale)       dim 1 / dim 2 (inter)  over tp

Loading reads only the rank's slice of each checkpoint tensor (``safe_open(...).get_slice``), and
skips the routed experts other ranks hold. Quantised weights are cut together with their scales,
on block boundaries only: FP8 e4m3 weights have one scale per 128x128 block (scale
[ceil(rows/128), cols/128]), so both dims split in multiples of 128; FP4 e2m1 weights store two
codes per byte ([rows, cols/2]) with one scale per 1x32 tile, and their columns split in
multiples of 128 because the GEMM's input is FP8-quantised in 1x128 tiles. A split that would cut
a block raises :class:`ShardingError` naming the tensor.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from .checkpoint import CheckpointError, canonical_name, expert_key, shard_files
from .parallel import Parallel

TP, EP = "tp", "ep"


@dataclass(frozen=True)
class ShardRule:
    """Dimension ``dim`` of a tensor is split evenly over the ``axis`` (``"tp"`` or ``"ep"``) group."""

    axis: str
    dim: int


_RULES = (
    (re.compile(r"^(embed|head)\.weight$"), (ShardRule(TP, 0),)),
    (re.compile(r"\.attn\.(wq_b|wo_a)\.(weight|scale)$"), (ShardRule(TP, 0),)),
    (re.compile(r"\.attn\.attn_sink$"), (ShardRule(TP, 0),)),
    (re.compile(r"\.attn\.wo_b\.(weight|scale)$"), (ShardRule(TP, 1),)),
    (re.compile(r"\.ffn\.experts\.w[13](_scale)?$"), (ShardRule(EP, 0), ShardRule(TP, 1))),
    (re.compile(r"\.ffn\.experts\.w2(_scale)?$"), (ShardRule(EP, 0), ShardRule(TP, 2))),
    (re.compile(r"\.ffn\.shared_experts\.w[13](_scale)?$"), (ShardRule(TP, 1),)),
    (re.compile(r"\.ffn\.shared_experts\.w2(_scale)?$"), (ShardRule(TP, 2),)),
)

# Units a TP split must be a whole multiple of, per weight format and logical dim (rows, cols).
_BLOCKS = {"fp8": (128, 128), "fp4": (1, 128), "dense": (1, 1)}
_BLOCK_NAMES = {"fp8": "128x128 FP8 scale blocks", "fp4": "1x128 FP8 input tiles of the FP4 GEMM"}
# Logical weight elements per stored scale element, per format and dim.
_SCALE_UNITS = {"fp8": (128, 128), "fp4": (1, 32)}
SKIP = "skip"
"""A :meth:`ShardPlan.select` answer: this rank does not read the tensor at all."""


def shard_rules(name: str) -> tuple[ShardRule, ...]:
    """How model tensor ``name`` is split; () when every rank holds all of it."""
    for pattern, rules in _RULES:
        if pattern.search(name):
            return rules
    return ()


class ShardingError(CheckpointError):
    """A tensor cannot be split the way tp / ep ask (not divisible, or it would cut a block)."""


@dataclass(frozen=True)
class TensorHeader:
    """A checkpoint tensor as its safetensors header describes it (no data read)."""

    dtype: str
    """safetensors dtype: ``"F8_E4M3"``, ``"U8"``, ``"BF16"``, ``"F32"``..."""
    shape: tuple[int, ...]

    @property
    def format(self) -> str:
        return "fp8" if self.dtype == "F8_E4M3" else "fp4" if self.dtype == "U8" else "dense"


def read_headers(path: Path) -> dict[str, TensorHeader]:
    """Every checkpoint tensor's dtype and shape by canonical name, from the shards' headers only."""
    headers = {}
    for file in shard_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                part = f.get_slice(name)
                headers[canonical_name(name)] = TensorHeader(part.get_dtype(), tuple(part.get_shape()))
    return headers


def _model_name(name: str) -> tuple[str, bool]:
    """Checkpoint name -> (model tensor name, whether it is one expert's slice of a stacked tensor)."""
    key = expert_key(name)
    if key is None:
        return name, False
    container, _, w, kind = key
    return f"{container}.{w}" + ("_scale" if kind == "scale" else ""), True


class ShardPlan:
    """What one rank reads of each checkpoint tensor, decided from the headers of all shards."""

    def __init__(self, headers: Mapping[str, TensorHeader], parallel: Parallel, n_routed_experts: int):
        self.headers, self.parallel = headers, parallel
        self.first_expert, self.end_expert = parallel.ep_range(n_routed_experts)

    def check(self) -> None:
        """Raise :class:`ShardingError` now if any tensor cannot be split (before reading any)."""
        for name in self.headers:
            self.select(name)

    def local_expert(self, e: int) -> int | None:
        """Routed expert e's index on this rank (None: another EP rank holds it)."""
        return e - self.first_expert if self.first_expert <= e < self.end_expert else None

    def select(self, name: str) -> tuple[slice, ...] | str | None:
        """Checkpoint tensor ``name`` -> the slices to read, None (all of it) or :data:`SKIP`."""
        model_name, per_expert = _model_name(name)
        key = expert_key(name)
        if key is not None and key[0].endswith(".experts") and self.local_expert(key[1]) is None:
            return SKIP
        tp_dims = [r.dim - per_expert for r in shard_rules(model_name) if r.axis == TP]
        if not tp_dims or self.parallel.tp == 1:
            return None
        dim = tp_dims[0]
        header = self.headers[name]
        if not name.endswith(".scale"):
            start, end = self._logical_range(name, header, dim)
            packed = 2 if header.format == "fp4" and dim == len(header.shape) - 1 else 1
            return _index(len(header.shape), dim, start // packed, end // packed)
        weight_name = name.removesuffix(".scale") + ".weight"
        weight = self.headers.get(weight_name)
        if weight is None or weight.format == "dense":
            raise ShardingError(f"tensor {name!r} is not the scale of a quantised weight {weight_name!r}")
        start, end = self._logical_range(weight_name, weight, dim)
        unit = _SCALE_UNITS[weight.format][dim]
        return _index(len(header.shape), dim, start // unit, -(-end // unit))

    def _logical_range(self, name: str, header: TensorHeader, dim: int) -> tuple[int, int]:
        """This TP rank's ``[start, end)`` along logical dim ``dim`` of weight ``name``."""
        fmt = header.format
        matrix = len(header.shape) == 2
        length = header.shape[dim] * (2 if fmt == "fp4" and dim == 1 else 1)
        tp = self.parallel.tp
        block = _BLOCKS[fmt][dim] if matrix else 1
        if length % tp or (length // tp) % block:
            raise ShardingError(
                f"tensor {name!r} ({fmt}, dim {dim} of {length}) cannot be split over tp={tp}: each rank "
                f"would hold {length / tp:g}, which must be a whole number of {block} "
                f"({_BLOCK_NAMES.get(fmt, 'elements')}); use a smaller tp"
            )
        return self.parallel.tp_range(length)


def _index(ndim: int, dim: int, start: int, end: int) -> tuple[slice, ...]:
    return tuple(slice(start, end) if d == dim else slice(None) for d in range(ndim))
