"""Per-device memory plan of a DeepSeek-V4 deployment: weights, KV cache, workspace, largest context.

    seahal plan-memory --config V4-Flash --devices 8xH100 --context 1048576

- **Weights** are counted as seahal installs them (model/checkpoint.py, layers.py, moe.py):
  FP8 linears keep e4m3 bytes plus one scale per 128x128 block (``wo_a`` included:
  ``grouped_linear`` reads its FP8 bytes), FP4 routed experts keep packed e2m1 bytes plus one
  ue8m0 scale per 1x32 tile, every dense weight is stored in the model dtype, and the other
  tensors keep the dtype the model declares (the output head, norms, router, mHC and compressor
  biases are fp32). The MTP block is not loaded. The shapes are one rank's: the model graph is
  built on the meta device with that rank's placement (model/parallel.py), and the split is
  checked against the sharded loader's rules (model/sharding.py), so the figures follow the
  parallel graph by construction.
- **KV cache**: a cache of ``context`` tokens built by model/cache.py on the meta device, so its
  bytes are exactly what ``model.new_cache`` allocates (window ring, compressed entries,
  indexer keys, compressor states). Heads are split by tp but the single shared KV vector is not:
  every rank holds the whole cache of the sequences it runs attention on (all of the batch, or
  its TP group's share under dp_attention).
- **Workspace**: an estimate of the largest transient set of one layer in one forward step
  (see :func:`workspace_bytes`), plus the fraction of device memory left unused for the runtime.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from seahal.device_memory import DeviceMemory, parse_devices

if TYPE_CHECKING:
    import torch

    from seahal.model.config import ModelConfig
    from seahal.model.parallel import Parallel

GIB = 1 << 30
DEFAULT_CONTEXT = 1 << 20
DEFAULT_USABLE_FRACTION = 0.9
FP8_BLOCK = 128
FP4_TILE = 32
_HEADER_FORMAT = {"F8_E4M3": "fp8", "U8": "fp4", "BF16": "dense", "F16": "dense", "F32": "dense"}
_HEADER_SCALE_FMT = {"F8_E8M0": "ue8m0", "F32": "fp32"}
_COMPONENTS = (
    (re.compile(r"\.ffn\.experts\."), "routed experts"),
    (re.compile(r"\.ffn\.shared_experts\."), "shared expert"),
    (re.compile(r"\.attn\."), "attention"),
    (re.compile(r"^(embed|head)\."), "embedding + head"),
)
"""Report groups by tensor name; anything else is "norms, router, mHC"."""


@dataclass(frozen=True)
class WeightFormats:
    """How a checkpoint stores its weights: ``linears`` (attention and shared-expert
    projections: ``"fp8"`` or ``"dense"``), routed ``experts`` (``"fp4"``, ``"fp8"`` or
    ``"dense"``) and FP8 block scales (``"ue8m0"``: e8m0 bytes, else ``"fp32"``)."""

    linears: str = "fp8"
    experts: str = "fp4"
    scale_fmt: str = "ue8m0"

    @classmethod
    def from_config(cls, raw: dict[str, Any]) -> WeightFormats:
        """From config.json: official keys (``dtype: fp8``, ``scale_fmt``, ``expert_dtype``) or
        transformers' ``quantization_config``; no quantisation keys means a dense checkpoint."""
        quant = raw.get("quantization_config") or {}
        fp8 = quant.get("quant_method") == "fp8" or raw.get("dtype") == "fp8"
        linears = "fp8" if fp8 else "dense"
        experts = raw.get("expert_dtype") or quant.get("expert_dtype") or linears
        scale_fmt = quant.get("scale_fmt", raw.get("scale_fmt"))
        return cls(linears, "dense" if experts == "bf16" else experts, "ue8m0" if scale_fmt == "ue8m0" else "fp32")

    @classmethod
    def from_checkpoint(cls, path: Path) -> WeightFormats:
        """Read off the safetensors headers (no tensor data is read)."""
        from safetensors import safe_open

        from seahal.model.checkpoint import canonical_name, shard_files

        found: dict[str, set[str]] = {"linears": set(), "experts": set(), "scales": set()}
        for file in shard_files(path):
            with safe_open(str(file), framework="pt") as f:
                for stored in f.keys():
                    name, dtype = canonical_name(stored), f.get_slice(stored).get_dtype()
                    is_scale = name.endswith(".scale")
                    group = _release_group(name.removesuffix(".scale") + ".weight" if is_scale else name)
                    if group is None or name.startswith("mtp."):
                        continue
                    if not is_scale:
                        found[group].add(_HEADER_FORMAT[dtype])
                    elif group == "linears":  # FP8 experts' scales are assumed alike
                        found["scales"].add(_HEADER_SCALE_FMT[dtype])
        for group, formats in found.items():
            if len(formats) > 1:
                raise ValueError(f"{path}: mixed {group} formats {sorted(formats)}; the planner needs one per group")
        return cls(*(next(iter(found[g]), default) for g, default in
                     (("linears", "dense"), ("experts", "dense"), ("scales", "ue8m0"))))

    def checkpoint_format(self, name: str) -> str:
        """The stored format of checkpoint weight ``name`` (official spelling) in this layout."""
        group = _release_group(name)
        return "dense" if group is None else getattr(self, group)

    @property
    def scale_dtype(self) -> torch.dtype:
        import torch

        from seahal.hal.formats import E8M0_HELD_DTYPE

        return E8M0_HELD_DTYPE if self.scale_fmt == "ue8m0" else torch.float32


def _release_group(weight_name: str) -> str | None:
    """``"experts"`` for routed-expert weights, ``"linears"`` for the weights the release stores
    in FP8 (model/convert.py's table), None for weights that are always dense."""
    from seahal.model.convert import FP8_LINEAR, ROUTED_EXPERT

    if ROUTED_EXPERT.search(weight_name):
        return "experts"
    return "linears" if FP8_LINEAR.search(weight_name) else None


@dataclass(frozen=True)
class StoredTensor:
    """One tensor a loaded model holds: its model name, shape, dtype and storage ``fmt``
    (``dense``, ``fp8``, ``fp8 scale``, ``fp4``, ``fp4 scale``)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    fmt: str

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def component(self) -> str:
        return next((what for pattern, what in _COMPONENTS if pattern.search(self.name)), "norms, router, mHC")


def _installed(
    name: str, shape: tuple[int, ...], fmt: str, dtype: torch.dtype, formats: WeightFormats, scale_name: str
) -> list[StoredTensor]:
    """A [..., rows, cols] weight as installed: dense in ``dtype``, or quantised with its scale
    (fp8: one per 128x128 block; fp4: two codes a byte, one e8m0 scale per 1x32 tile)."""
    import torch

    from seahal.hal.formats import E8M0_HELD_DTYPE

    *lead, rows, cols = shape
    if fmt == "dense":
        return [StoredTensor(name, shape, dtype, "dense")]
    if fmt == "fp8":
        scale = (*lead, -(-rows // FP8_BLOCK), cols // FP8_BLOCK)
        return [StoredTensor(name, shape, torch.float8_e4m3fn, "fp8"),
                StoredTensor(scale_name, scale, formats.scale_dtype, "fp8 scale")]
    return [StoredTensor(name, (*lead, rows, cols // 2), torch.uint8, "fp4"),
            StoredTensor(scale_name, (*lead, rows, cols // FP4_TILE), E8M0_HELD_DTYPE, "fp4 scale")]


def stored_tensors(
    config: ModelConfig, formats: WeightFormats, dtype: torch.dtype, parallel: Parallel | None = None,
    conversions: Mapping[str, str] | None = None,
) -> list[StoredTensor]:
    """Every tensor ``seahal.model.load`` installs for ``config`` from a checkpoint in ``formats``
    with model dtype ``dtype``, on the rank ``parallel`` places (default: one process).
    ``conversions``: a plan's ``weight_conversions`` (``{op: dtype}``, the quantised weights an op
    reads dequantised at load; default none, as on a GPU)."""
    import torch

    from seahal import hal
    from seahal.model.layers import Linear
    from seahal.model.moe import Experts
    from seahal.model.parallel import SINGLE_PROCESS
    from seahal.model.transformer import MODEL_OPS, Transformer

    conversions = dict(conversions or {})

    def installed(name: str, shape: tuple[int, ...], fmt: str, reader: str, scale_name: str) -> list[StoredTensor]:
        if fmt != "dense" and reader in conversions:
            return _installed(name, shape, "dense", getattr(torch, conversions[reader]), formats, scale_name)
        return _installed(name, shape, fmt, dtype, formats, scale_name)

    plan = hal.plan("cpu", ops=MODEL_OPS, announce=False, environ={})
    with torch.device("meta"):
        model = Transformer(config, plan, dtype, parallel or SINGLE_PROCESS)
    out: list[StoredTensor] = []
    for owner, module in model.named_modules():
        prefix = f"{owner}." if owner else ""
        if isinstance(module, Linear):
            fmt = formats.checkpoint_format(prefix + "weight")
            reader = module.reader or {"fp8": "fp8_gemm", "fp4": "fp4_gemm"}.get(fmt, "")
            shape = (module.out_features, module.in_features)
            out += installed(prefix + "weight", shape, fmt, reader, prefix + "scale")
        elif isinstance(module, Experts):
            for w in ("w1", "w2", "w3"):
                expert = f"{prefix}{w}" if owner.endswith("shared_experts") else f"{prefix}0.{w}"
                fmt = formats.checkpoint_format(expert + ".weight")
                out += installed(prefix + w, tuple(getattr(module, w).shape), fmt, "moe_experts", f"{prefix}{w}_scale")
        else:
            tensors = {**module._parameters, **module._buffers}
            out += [StoredTensor(prefix + leaf, tuple(t.shape), t.dtype, "dense")
                    for leaf, t in tensors.items() if t is not None]
    return out


def release_headers(config: ModelConfig, formats: WeightFormats) -> dict:
    """The safetensors headers (model/sharding.py ``TensorHeader``) of ``config``'s checkpoint in
    ``formats``, by official name; routed experts other than expert 0 are left out (same shapes)."""
    from seahal.model.convert import official_shapes
    from seahal.model.sharding import TensorHeader

    dtypes = {"fp8": "F8_E4M3", "fp4": "U8", "dense": "BF16"}
    headers = {}
    for name, shape in official_shapes(config).items():
        if re.search(r"\.experts\.[1-9]\d*\.", name):
            continue  # every routed expert has expert 0's shapes
        fmt = formats.checkpoint_format(name)
        if fmt == "dense":
            headers[name] = TensorHeader(dtype="BF16", shape=shape)
            continue
        rows, cols = shape
        headers[name] = TensorHeader(dtype=dtypes[fmt], shape=(rows, cols // 2) if fmt == "fp4" else shape)
        scale = (-(-rows // FP8_BLOCK), cols // FP8_BLOCK) if fmt == "fp8" else (rows, cols // FP4_TILE)
        headers[name.removesuffix(".weight") + ".scale"] = TensorHeader(dtype="F8_E8M0", shape=scale)
    return headers


def check_shardable(config: ModelConfig, headers: dict, parallel: Parallel) -> None:
    """Raise ValueError when the sharded loader (model/sharding.py) cannot split the checkpoint
    with ``headers`` (:func:`release_headers`) over ``parallel`` (e.g. it would cut an FP8 block)."""
    from seahal.model.sharding import ShardingError, ShardPlan

    parallel.config.check(config)
    shards = ShardPlan(headers, parallel, config.n_routed_experts)
    try:
        for name in headers:
            shards.select(name)
    except ShardingError as exc:
        raise ValueError(str(exc)) from None


@dataclass
class WeightBytes:
    """One device's weight bytes, by model component and by storage format."""

    total: int = 0
    by_component: dict[str, int] = field(default_factory=dict)
    by_format: dict[str, int] = field(default_factory=dict)

    @classmethod
    def of(cls, tensors: list[StoredTensor]) -> WeightBytes:
        out = cls()
        for t in tensors:
            fmt = f"dense {str(t.dtype).removeprefix('torch.')}" if t.fmt == "dense" else t.fmt
            out.total += t.nbytes
            out.by_component[t.component] = out.by_component.get(t.component, 0) + t.nbytes
            out.by_format[fmt] = out.by_format.get(fmt, 0) + t.nbytes
        return out


def new_meta_cache(config: ModelConfig, seqs: int, context: int, dtype: torch.dtype):
    """``model.new_cache(seqs, context)``'s cache, on the meta device (nothing allocated)."""
    from seahal.model.cache import Cache

    return Cache.new(config, seqs, context, dtype, "meta", ops=None)


def kv_cache_bytes(config: ModelConfig, seqs: int, context: int, dtype: torch.dtype) -> int:
    """Bytes of a cache for ``seqs`` sequences of ``context`` tokens (``config.cache_format``)."""
    return new_meta_cache(config, seqs, context, dtype).nbytes()


def workspace_bytes(config: ModelConfig, seqs: int, context: int, chunk: int, tp: int, dtype: torch.dtype) -> int:
    """Estimated peak transient bytes of one forward step of ``chunk`` tokens per sequence.

    Layers run one after another, so this is the largest one layer needs, taken over the layer
    kinds (ratio m: ``n = context // m`` compressed entries), as the reference graph allocates it:

    - keys: a chunk of several tokens attends ``[window | chunk | entries]`` concatenated in the
      cache's storage format (``row`` bytes: ``head_dim * act_bytes`` dense, the packed record for
      FP8): ``seqs * (W + chunk + n) * row``; a one-token decode step attends the layer's stored
      buffer in place (nothing);
    - attention over the selected ``K = W + (min(top-k, n) for CSA, n for HCA)`` keys: gathered
      fp32 values and fp32 logits and probabilities for the device's ``n_heads / tp`` heads:
      ``seqs * chunk * K * (4 * head_dim + 8 * n_heads / tp)``;
    - CSA indexer: fp32 per-head scores and their weighted ReLU over all entries:
      ``seqs * chunk * index_n_heads * n * 8``;

    plus the fp32 logits ``seqs * chunk * vocab * 4``. Projection and MoE activations
    (O(chunk * dim)) are small beside these and not counted; a fused attention kernel needs
    less, a long prefill chunk more (the indexer term grows as chunk * context).
    """
    from seahal.hal.ops.quant import kv_record_bytes

    c = config
    act = dtype.itemsize
    row = kv_record_bytes(c.head_dim, c.rope_head_dim) if c.cache_format == "fp8" else c.head_dim * act
    peak = 0
    for ratio in set(c.compress_ratios):
        n = context // ratio if ratio else 0
        csa = ratio == 4
        selected = c.window_size + (min(c.index_topk, n) if csa else n)
        layer = seqs * (c.window_size + chunk + n) * row if chunk > 1 else 0
        layer += seqs * chunk * selected * (4 * c.head_dim + 8 * c.n_heads // tp)
        if csa:
            layer += seqs * chunk * c.index_n_heads * n * 8
        peak = max(peak, layer)
    return peak + seqs * chunk * c.vocab_size * 4


@dataclass
class MemoryPlan:
    """The per-device figures (all byte counts are for one device) and what they assume."""

    model: str
    device: str
    devices: int
    tp: int
    ep: int
    dp_attention: bool
    batch: int
    seqs_per_device: int
    context: int
    chunk: int
    cache_format: str
    dtype: str
    formats: dict[str, str]
    device_bytes: int
    usable_bytes: int
    weights: WeightBytes
    kv_cache_bytes: int
    kv_bytes_per_token: float
    """Amortised cache bytes one sequence adds per token (``Cache.bytes_per_token``)."""
    kv_bytes_per_sequence_fixed: int
    """Cache bytes of one sequence that do not grow with the context (window ring, states)."""
    workspace_bytes: int
    total_bytes: int
    fits: bool
    max_context: int
    """Largest context per sequence that fits at this batch (0: not one token)."""
    max_batch: int
    """Largest batch that fits at this context."""
    model_max_context: int | None
    assumptions: list[str]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Budget:
    """What is fixed for one plan; :meth:`total` is one device's bytes."""

    config: Any
    weights: int
    dtype: Any
    chunk: int
    tp: int

    def total(self, seqs: int, context: int) -> int:
        return (self.weights + kv_cache_bytes(self.config, seqs, context, self.dtype)
                + workspace_bytes(self.config, seqs, context, self.chunk, self.tp, self.dtype))


def _largest(fits, limit: int = 1 << 40) -> int:
    """The largest n >= 0 with fits(n), for fits true up to some n and false after."""
    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi < limit and fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def load_config(spec: str | Path | dict) -> tuple[str, dict[str, Any], WeightFormats]:
    """(name, raw config.json dict, weight formats) for a preset name, a config.json, a
    checkpoint folder (whose safetensors headers, when present, give the formats) or a dict."""
    from seahal.model.presets import PRESETS, preset

    if isinstance(spec, dict):
        return "config", spec, WeightFormats.from_config(spec)
    names = {name.lower(): name for name in PRESETS}
    if str(spec).lower() in names:
        raw = preset(str(spec))
        return names[str(spec).lower()], raw, WeightFormats.from_config(raw)
    path = Path(spec)
    config_file = path / "config.json" if path.is_dir() else path
    if not config_file.is_file():
        raise ValueError(f"--config must be a preset ({', '.join(PRESETS)}), a config.json or a checkpoint "
                         f"folder; {str(spec)!r} is none of these")
    raw = json.loads(config_file.read_text())
    has_weights = path.is_dir() and any(path.glob("*.safetensors"))
    formats = WeightFormats.from_checkpoint(path) if has_weights else WeightFormats.from_config(raw)
    return path.resolve().name, raw, formats


def default_split(config: ModelConfig, devices: int, headers: dict) -> tuple[int, int]:
    """(tp, ep) for ``devices`` ranks: the largest tp the model and its FP8/FP4 blocks allow
    (the fewest bytes per device: tp also splits the attention heads, embedding and head),
    the rest as ep."""
    from seahal.model.parallel import Parallel, ParallelConfig

    for tp in sorted((t for t in range(1, devices + 1) if devices % t == 0), reverse=True):
        parallel = Parallel(ParallelConfig(tp, devices // tp))
        try:
            check_shardable(config, headers, parallel)
        except ValueError:
            continue
        return tp, devices // tp
    raise ValueError(f"no tp x ep split of {devices} devices fits this model (n_routed_experts="
                     f"{config.n_routed_experts}, n_heads={config.n_heads})")


def plan_memory(
    config: str | Path | dict,
    devices: str = "8xH100",
    tp: int | None = None,
    ep: int | None = None,
    context: int = DEFAULT_CONTEXT,
    batch: int = 1,
    cache_format: str = "fp8",
    usable_fraction: float = DEFAULT_USABLE_FRACTION,
    chunk: int = 1,
    dp_attention: bool = False,
    dtype: torch.dtype | None = None,
    formats: WeightFormats | None = None,
) -> MemoryPlan:
    """Plan one device's memory for serving ``batch`` sequences of ``context`` tokens.

    ``config``: a preset (``V4-Flash``, ``V4-Pro``), a config.json, a checkpoint folder or a raw
    dict. ``devices``: ``"8xH100"`` etc. (seahal.device_memory); ``tp * ep`` must equal the count
    (default: :func:`default_split`). ``formats`` overrides the weight formats read from the
    config or checkpoint. ``dtype``: the model (activation) dtype, default bf16 as on accelerators.
    """
    import torch

    from seahal.model.config import ModelConfig
    from seahal.model.parallel import Parallel, ParallelConfig

    dtype = dtype or torch.bfloat16
    name, raw, found = load_config(config)
    formats = formats or found
    count, device = parse_devices(devices)
    if context < 1 or batch < 1 or chunk < 1:
        raise ValueError(f"--context, --batch and --chunk must be positive, got {context}, {batch}, {chunk}")
    if not 0 < usable_fraction <= 1:
        raise ValueError(f"--usable-fraction must be in (0, 1], got {usable_fraction}")
    model_config = ModelConfig.from_dict({**raw, "cache_format": cache_format})
    headers = release_headers(model_config, formats)
    if tp is None and ep is None:
        tp, ep = default_split(model_config, count, headers)
    tp, ep = tp or count // ep, ep or count // tp
    if tp * ep != count:
        raise ValueError(f"--tp x --ep must equal the {count} devices, got tp={tp} x ep={ep}")
    if dp_attention and batch < ep:
        raise ValueError(f"--dp-attention spreads the batch over ep={ep} groups: --batch must be >= {ep}, got {batch}")
    parallel = Parallel(ParallelConfig(tp, ep, dp_attention))
    check_shardable(model_config, headers, parallel)

    weights = WeightBytes.of(stored_tensors(model_config, formats, dtype, parallel))
    budget = _Budget(model_config, weights.total, dtype, chunk, tp)
    usable = int(device.total_bytes * usable_fraction)
    groups = ep if dp_attention else 1
    seqs = -(-batch // groups)
    one_seq = new_meta_cache(model_config, 1, 0, dtype)
    total = budget.total(seqs, context)
    return MemoryPlan(
        model=name, device=device.name, devices=count, tp=tp, ep=ep, dp_attention=dp_attention,
        batch=batch, seqs_per_device=seqs, context=context, chunk=chunk, cache_format=cache_format,
        dtype=str(dtype).removeprefix("torch."),
        formats={"linears": formats.linears, "experts": formats.experts, "fp8_scales": formats.scale_fmt},
        device_bytes=device.total_bytes, usable_bytes=usable, weights=weights,
        kv_cache_bytes=kv_cache_bytes(model_config, seqs, context, dtype),
        kv_bytes_per_token=one_seq.bytes_per_token(), kv_bytes_per_sequence_fixed=one_seq.nbytes(),
        workspace_bytes=workspace_bytes(model_config, seqs, context, chunk, tp, dtype),
        total_bytes=total, fits=total <= usable,
        max_context=_largest(lambda n: budget.total(seqs, n) <= usable),
        max_batch=groups * _largest(lambda s: budget.total(s, context) <= usable),
        model_max_context=raw.get("max_position_embeddings"),
        assumptions=_assumptions(tp, ep, dp_attention, device, usable_fraction, chunk),
    )


def _assumptions(tp: int, ep: int, dp_attention: bool, device: DeviceMemory, usable: float, chunk: int) -> list[str]:
    return [
        f"device: {device.source}; {usable:.0%} usable (the rest: runtime context, allocator "
        "fragmentation, collective buffers)",
        f"tp={tp}, ep={ep}: {_SPLIT}",
        _cache_assumption(dp_attention),
        _workspace_assumption(chunk),
        _WEIGHTS,
    ]


_SPLIT = (
    "tp splits the query heads, sinks, output groups, every expert's intermediate dim, the shared expert "
    "and the vocabulary (embedding, head); ep splits the routed experts into blocks of E/ep; wq_a, wkv, "
    "compressors, indexer, norms, router and mHC are replicated (model/parallel.py, model/sharding.py)"
)
_WEIGHTS = (
    "weights as seahal installs them: FP8/FP4 kept with their scales, dense weights in the model dtype, "
    "fp32 head/norms/router/mHC; MTP block not loaded; no load-time dequantisation "
    "(`--linears dense` / `--experts dense` model a backend that converts)"
)


def _cache_assumption(dp_attention: bool) -> str:
    batch = "each TP group keeps only its share of the batch" if dp_attention else "every rank keeps the whole batch"
    return f"KV cache: one shared KV head, so not split by tp; {batch} (dp_attention={dp_attention})"


def _workspace_assumption(chunk: int) -> str:
    return (f"workspace: estimated peak transients of one layer in a step of {chunk} token(s) per sequence "
            "on the reference graph (`plan_memory.workspace_bytes`)")


def _gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def format_plan(plan: MemoryPlan) -> str:
    """Human-readable report of ``plan``."""
    w = plan.weights
    lines = [
        f"{plan.model} on {plan.devices}x {plan.device}: tp={plan.tp} x ep={plan.ep}"
        f"{', dp_attention' if plan.dp_attention else ''}, batch {plan.batch} ({plan.seqs_per_device} per "
        f"device), context {plan.context:,}, cache {plan.cache_format}, model dtype {plan.dtype}",
        f"weights: linears {plan.formats['linears']}, experts {plan.formats['experts']}, "
        f"FP8 scales {plan.formats['fp8_scales']}",
        "",
        "per device                      GiB",
        f"  weights                {_gib(w.total):>10}",
    ]
    lines += [f"    {k:<21}{_gib(v):>10}" for k, v in sorted(w.by_component.items(), key=lambda kv: -kv[1])]
    lines += ["    by stored format:"]
    lines += [f"    {k:<21}{_gib(v):>10}" for k, v in sorted(w.by_format.items(), key=lambda kv: -kv[1])]
    lines += [
        f"  KV cache               {_gib(plan.kv_cache_bytes):>10}   ({plan.kv_bytes_per_token:,.1f} B/token "
        f"+ {plan.kv_bytes_per_sequence_fixed / 2**20:,.1f} MiB fixed, per sequence)",
        f"  workspace (estimate)   {_gib(plan.workspace_bytes):>10}",
        f"  total                  {_gib(plan.total_bytes):>10}   of {_gib(plan.usable_bytes)} usable "
        f"({_gib(plan.device_bytes)} on the device): {'fits' if plan.fits else 'DOES NOT FIT'}",
        "",
        f"largest context at batch {plan.batch}: {plan.max_context:,} tokens"
        + (f" (the model's positions end at {plan.model_max_context:,})" if plan.model_max_context else ""),
        f"largest batch at context {plan.context:,}: {plan.max_batch}",
        "",
        "assumptions:",
    ]
    lines += [f"  - {a}" for a in plan.assumptions]
    return "\n".join(lines)


DOC_CASES = (
    ("V4-Flash", "8xH100"), ("V4-Flash", "8x910B"),
    ("V4-Pro", "8xH100"), ("V4-Pro", "8x910B"),
    ("V4-Pro", "8xH200"), ("V4-Pro", "16xH100"), ("V4-Pro", "16x910B"), ("V4-Pro", "32x910B"),
)
"""The deployments docs/scale-out-memory.md tabulates (first four: the issue's question)."""


def memory_doc() -> str:
    """docs/scale-out-memory.md: the presets on common clusters at 1M tokens, batch 1."""
    rows = []
    for model, devices in DOC_CASES:
        p = plan_memory(model, devices)
        rows.append(
            f"| {model} | {devices} | {p.tp}x{p.ep} | {_gib(p.weights.total)} | {_gib(p.kv_cache_bytes)} | "
            f"{_gib(p.workspace_bytes)} | {_gib(p.total_bytes)} | {_gib(p.usable_bytes)} | "
            f"{'yes' if p.fits else '**no**'} | {p.max_context:,} | {p.max_batch} |"
        )
    return "\n".join([
        "# Scale-out memory: DeepSeek-V4 per device",
        "",
        "Generated by `seahal plan-memory --write-doc docs/scale-out-memory.md` (a test fails when it",
        "drifts); plan any other deployment with `seahal plan-memory --config CONFIG --devices NxDEVICE`.",
        "Release weight formats (FP8 linears with ue8m0 128x128 block scales, FP4 routed experts with",
        "1x32 ue8m0 scales), model dtype bf16, FP8 production cache layout, 1,048,576-token context,",
        "batch 1, one decode step of workspace. GiB per device; tp x ep = the device count, with the",
        "largest tp the model's dimensions and FP8 blocks allow (`plan_memory.default_split`).",
        "",
        "| model | devices | tp x ep | weights | KV cache @1M | workspace | total | usable | fits | "
        "largest context (batch 1) | largest batch @1M |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Assumptions (device rows and sources: `src/seahal/device_memory.py`):",
        "",
        f"- {_SPLIT}",
        f"- {_cache_assumption(False)}",
        f"- {_workspace_assumption(1)}",
        f"- {_WEIGHTS}",
        "- usable memory is 90% of the device's (`--usable-fraction`); device sizes are the drivers' "
        "reported totals or the vendors' nominal figures, not measured here",
        "- the largest context is bounded by memory only; the models' positions end at 1,048,576",
        "",
    ])


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``plan-memory`` on the ``seahal`` command line."""
    p = subparsers.add_parser(
        "plan-memory", help="per-device weights, KV cache and largest context of a V4 deployment",
    )
    p.add_argument("--config", help="preset (V4-Flash, V4-Pro), config.json, or checkpoint folder")
    p.add_argument("--devices", default="8xH100", help="NxDEVICE, e.g. 8xH100, 8x910B, 16xMLU590 (default 8xH100)")
    p.add_argument("--tp", type=int, help="tensor-parallel size (default: the largest the model allows)")
    p.add_argument("--ep", type=int, help="expert-parallel size (tp x ep = the device count)")
    p.add_argument("--dp-attention", action="store_true", help="each TP group keeps only its share of the batch")
    p.add_argument("--context", type=int, default=DEFAULT_CONTEXT, help="tokens per sequence (default 1048576)")
    p.add_argument("--batch", type=int, default=1, help="sequences (default 1)")
    p.add_argument("--cache-format", choices=("fp8", "dense"), default="fp8")
    p.add_argument("--chunk", type=int, default=1, help="tokens per sequence per forward step (default 1: decode)")
    p.add_argument("--usable-fraction", type=float, default=DEFAULT_USABLE_FRACTION,
                   help=f"share of device memory the model may use (default {DEFAULT_USABLE_FRACTION})")
    p.add_argument("--linears", choices=("fp8", "dense"), help="override the attention/shared-expert weight format")
    p.add_argument("--experts", choices=("fp4", "fp8", "dense"), help="override the routed-expert weight format")
    p.add_argument("--json", metavar="PATH", help="also write the plan as JSON")
    p.add_argument("--write-doc", metavar="PATH", help="write the preset table (docs/scale-out-memory.md)")
    p.add_argument("--check-doc", metavar="PATH", help="exit 1 if PATH differs from the generated table")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    if args.write_doc or args.check_doc:
        text = memory_doc()
        if args.check_doc:
            if not Path(args.check_doc).exists() or Path(args.check_doc).read_text() != text:
                print(f"{args.check_doc} is out of date: run `seahal plan-memory --write-doc {args.check_doc}`")
                return 1
            return 0
        Path(args.write_doc).write_text(text)
        print(f"wrote {args.write_doc}")
        return 0
    if not args.config:
        raise SystemExit("seahal plan-memory: --config is required (a preset, config.json or checkpoint folder)")
    try:
        formats = None
        if args.linears or args.experts:
            found = load_config(args.config)[2]
            formats = WeightFormats(args.linears or found.linears, args.experts or found.experts, found.scale_fmt)
        plan = plan_memory(args.config, args.devices, args.tp, args.ep, args.context, args.batch,
                           args.cache_format, args.usable_fraction, args.chunk, args.dp_attention, formats=formats)
    except ValueError as exc:
        raise SystemExit(f"seahal plan-memory: {exc}") from None
    print(format_plan(plan))
    if args.json:
        Path(args.json).write_text(json.dumps(plan.to_json(), indent=2) + "\n")
    return 0
