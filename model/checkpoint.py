"""Checkpoint reading: official DeepSeek-V4 layout (also what transformers' save_pretrained writes).

Tensors are read lazily, shard by shard, from memory-mapped safetensors and moved straight to the
target device. Weights keep their stored format: bf16/fp32, FP8 e4m3 with ``.scale`` block scales
(e8m0 or fp32), FP4 e2m1 experts (packed bytes + 1x32 e8m0 scales). A torch without the e8m0
dtype (before 2.7) gets e8m0 scales as their fp32 values (:func:`read_tensor`).
"""

from __future__ import annotations

import functools
import json
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open

from seahal.hal import formats
from seahal.hal.formats import dequantize_weight

from .layers import Head, Linear
from .moe import Experts

if TYPE_CHECKING:
    from .sharding import ShardPlan

_ALIASES = (
    (re.compile(r"^model\."), ""),
    (re.compile(r"^embed_tokens\."), "embed."),
    (re.compile(r"^lm_head\."), "head."),
    (re.compile(r"^hc_head\.hc_(fn|base|scale)$"), r"hc_head_\1"),
    (re.compile(r"^(layers\.\d+\.attn)\.norm\."), r"\1.kv_norm."),
    (re.compile(r"\.weight_scale_inv$"), ".scale"),
)
"""transformers' save_pretrained and older exports spell a few names differently."""

_EXPERT = re.compile(r"^(layers\.\d+\.ffn)\.experts\.(\d+)\.(w[123])\.(weight|scale)$")
_SHARED = re.compile(r"^(layers\.\d+\.ffn)\.shared_experts\.(w[123])\.(weight|scale)$")


class CheckpointError(RuntimeError):
    """A tensor is missing, truncated or does not match the model."""


def canonical_name(name: str) -> str:
    for pattern, replacement in _ALIASES:
        name = pattern.sub(replacement, name)
    return name


def shard_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / f for f in files]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {path}")
    return files


def iter_tensors(
    path: Path,
    device: torch.device,
    progress: bool = False,
    select: Callable[[str], tuple[slice, ...] | str | None] | None = None,
) -> Iterator[tuple[str, str, torch.Tensor]]:
    """(canonical name, file, tensor on device) for every tensor, one shard at a time;
    ``progress`` prints a line per shard to stderr (long loads of many shards).

    ``select(canonical name)`` (a rank's :meth:`ShardPlan.select`) makes it read only part of
    each tensor: a tuple of slices (read through ``get_slice``, the rest of the tensor is never
    read), None (all of it) or ``"skip"`` (nothing, and the tensor is not yielded)."""
    files = shard_files(path)
    start = time.perf_counter()
    for i, file in enumerate(files):
        if progress and len(files) > 1:
            print(f"\rloading shard {i + 1}/{len(files)} ({time.perf_counter() - start:.0f} s)", end="", file=sys.stderr)
        try:
            handle = safe_open(str(file), framework="pt", device="cpu")
        except Exception as exc:
            raise CheckpointError(f"cannot read {file}: {exc} (truncated or not a safetensors file?)") from exc
        with handle as f:
            for name in f.keys():
                part = select(canonical_name(name)) if select is not None else None
                if part == "skip":
                    continue
                try:
                    tensor = read_tensor(f, file, name, part)
                except Exception as exc:
                    raise CheckpointError(f"cannot read tensor {name!r} from {file}: {exc}") from exc
                yield canonical_name(name), file.name, tensor.to(device)
    if progress and len(files) > 1:
        print(f"\rloaded {len(files)} shards in {time.perf_counter() - start:.0f} s", file=sys.stderr)


def read_tensor(handle, file: Path, name: str, part: tuple[slice, ...] | None = None) -> torch.Tensor:
    """Tensor ``name`` (or its ``part``) of the open shard ``handle`` of ``file``. On a torch
    without ``float8_e8m0fnu`` (before 2.7), which safetensors cannot hand an e8m0 tensor to, its
    bytes are read from the file and decoded to the fp32 scales they are (exact; every kernel
    takes fp32 scales)."""
    if formats.E8M0_DTYPE is None and handle.get_slice(name).get_dtype() == "F8_E8M0":
        codes = _tensor_bytes(file, name)
        return formats.e8m0_scales(codes if part is None else codes[part])
    return handle.get_tensor(name) if part is None else handle.get_slice(name)[part]


def _tensor_bytes(file: Path, name: str) -> torch.Tensor:
    """Tensor ``name`` of a safetensors ``file`` as its raw bytes, uint8 in its shape."""
    data_start, header = _safetensors_header(file)
    entry = header[name]
    start, end = entry["data_offsets"]
    with open(file, "rb") as f:
        f.seek(data_start + start)
        data = bytearray(f.read(end - start))
    flat = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    return flat.reshape(entry["shape"])


def _safetensors_header(file: Path) -> tuple[int, dict]:
    """(offset of the data, the JSON header) of a safetensors file: an 8-byte little-endian header
    size, the header (each tensor's dtype, shape and data offsets), then the data. Cached per
    version of the file: a shard's scales are read one after another."""
    stat = file.stat()
    return _header_of(file, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _header_of(file: Path, mtime_ns: int, file_size: int) -> tuple[int, dict]:
    """:func:`_safetensors_header` of one version of ``file`` (``mtime_ns``, ``file_size``: the cache key)."""
    with open(file, "rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
        return 8 + header_size, json.loads(f.read(header_size))


def _expected_scale_shape(weight_shape: tuple[int, ...], fmt: str) -> tuple[int, ...]:
    rows, cols = weight_shape[-2], weight_shape[-1]
    return (-(-rows // 128), cols // 128) if fmt == "fp8" else (rows, cols * 2 // 32)


def _format(t: torch.Tensor) -> str:
    return "fp8" if t.dtype == torch.float8_e4m3fn else "fp4" if t.dtype == torch.uint8 else "dense"


def _check_weight(name: str, file: str, t: torch.Tensor, rows: int, cols: int) -> None:
    fmt = _format(t)
    expected = (rows, cols // 2) if fmt == "fp4" else (rows, cols)
    if tuple(t.shape) != expected:
        raise CheckpointError(
            f"tensor {name!r} in {file}: expected shape {list(expected)} ({fmt}), got {list(t.shape)} {t.dtype}"
        )


def expert_key(name: str) -> tuple[str, int, str, str] | None:
    """``layers.3.ffn.experts.7.w1.weight`` -> ("layers.3.ffn.experts", 7, "w1", "weight");
    the shared expert is expert 0 of ``layers.N.ffn.shared_experts``."""
    if match := _EXPERT.match(name):
        ffn, e, w, kind = match.groups()
        return f"{ffn}.experts", int(e), w, kind
    if match := _SHARED.match(name):
        ffn, w, kind = match.groups()
        return f"{ffn}.shared_experts", 0, w, kind
    return None


def _assign(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Replace parameter or buffer ``name`` by ``tensor`` cast to the dtype the model declares."""
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner)
    if leaf in module._parameters:
        declared = module._parameters[leaf].dtype
        module._parameters[leaf] = torch.nn.Parameter(tensor.to(declared), requires_grad=False)
    else:
        module._buffers[leaf] = tensor.to(module._buffers[leaf].dtype)


def load_weights(
    model: torch.nn.Module,
    path: Path,
    device: torch.device,
    dtype: torch.dtype,
    progress: bool = False,
    conversions: Mapping[str, str] | None = None,
    shards: ShardPlan | None = None,
) -> None:
    """Install every checkpoint tensor into ``model`` (typically built on the meta device, so no
    placeholder memory is ever allocated); raise CheckpointError naming what is wrong.

    ``conversions`` (a plan's ``weight_conversions``, ``{op: dtype}``) dequantises the quantised
    weights that would feed ``op`` (``fp8_gemm``/``fp4_gemm`` for linears, or the linear's
    ``reader``: ``grouped_linear`` for wo_a; ``moe_experts`` for experts) to that dtype as they
    are installed. ``shards`` (one rank of a tensor/expert-parallel model, see model/sharding.py)
    reads only that rank's slices and experts."""
    conversions = dict(conversions or {})
    modules = dict(model.named_modules())
    targets = dict(model.state_dict(keep_vars=True))
    linear_parts: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    expert_parts: dict[tuple[str, str], dict[int, dict[str, torch.Tensor]]] = {}
    seen: set[str] = set()

    select = shards.select if shards is not None else None
    for name, file, tensor in iter_tensors(path, device, progress, select):
        if name.startswith("mtp."):
            continue  # the MTP block is not used for generation here
        if key := expert_key(name):
            container, e, w, kind = key
            if shards is not None and container.endswith(".experts"):
                e = shards.local_expert(e)  # iter_tensors skipped the experts other ranks hold
            expert_parts.setdefault((container, w), {}).setdefault(e, {})[kind] = tensor
            continue
        owner, _, leaf = name.rpartition(".")
        if isinstance(modules.get(owner), Linear):
            linear_parts.setdefault(owner, {})[leaf] = (file, tensor)
            continue
        if name not in targets:
            raise CheckpointError(f"tensor {name!r} in {file} does not belong to this model (config mismatch?)")
        if tuple(targets[name].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"tensor {name!r} in {file}: expected shape {list(targets[name].shape)}, got {list(tensor.shape)}"
            )
        if isinstance(modules.get(owner), Head):
            modules[owner].set_weight(tensor)  # in its stored dtype, not the model's
        else:
            _assign(model, name, tensor)
        seen.add(name)

    for owner, parts in linear_parts.items():
        linear: Linear = modules[owner]
        if "weight" not in parts:
            raise CheckpointError(f"tensor {owner + '.weight'!r} is missing (found only its scale)")
        file, weight = parts["weight"]
        _check_weight(owner + ".weight", file, weight, linear.out_features, linear.in_features)
        scale = _linear_scale(owner, parts, weight)
        reader = {"fp8": "fp8_gemm", "fp4": "fp4_gemm"}.get(_format(weight))
        reader = linear.reader if reader and linear.reader else reader
        if reader in conversions:
            weight, scale = dequantize_weight(weight, scale, getattr(torch, conversions[reader])), None
        linear.set_weight(weight, scale, dtype)
        seen.add(owner + ".weight")

    for (owner, w), per_expert in expert_parts.items():
        experts: Experts = modules[owner]
        _install_experts(owner, w, per_expert, experts, dtype, conversions.get("moe_experts"))
        seen.add(f"{owner}.{w}")

    _check_complete(model, seen)


def _linear_scale(owner: str, parts: dict, weight: torch.Tensor) -> torch.Tensor | None:
    fmt = _format(weight)
    if fmt == "dense":
        return None
    if "scale" not in parts:
        raise CheckpointError(f"tensor {owner + '.scale'!r} is missing for the {fmt} weight {owner + '.weight'!r}")
    file, scale = parts["scale"]
    expected = _expected_scale_shape(tuple(weight.shape), fmt)
    if tuple(scale.shape) != expected:
        raise CheckpointError(f"tensor {owner + '.scale'!r} in {file}: expected shape {list(expected)}, got {list(scale.shape)}")
    return scale


def _install_experts(
    owner: str, w: str, per_expert: dict, experts: Experts, dtype: torch.dtype, convert_to: str | None = None
) -> None:
    """Stack one expert weight of every expert; quantised ones are dequantised to ``convert_to``
    when given (a plan's conversion for ``moe_experts``)."""
    target = getattr(experts, w)
    n = target.shape[0]
    missing = [e for e in range(n) if e not in per_expert or "weight" not in per_expert[e]]
    if missing:
        raise CheckpointError(f"tensor {owner}.{missing[0]}.{w}.weight is missing ({len(missing)} of {n} experts)")
    rows, cols = target.shape[1], target.shape[2]
    weights = []
    scales = []
    for e in range(n):
        weight = per_expert[e]["weight"]
        name = f"{owner}.{e}.{w}.weight" if n > 1 or "shared" not in owner else f"{owner}.{w}.weight"
        _check_weight(name, "checkpoint", weight, rows, cols)
        fmt = _format(weight)
        if fmt == "dense":
            weights.append(weight.to(dtype))
            continue
        scale = per_expert[e].get("scale")
        if scale is None:
            raise CheckpointError(f"tensor {name[:-len('weight')]}scale is missing for the {fmt} weight {name}")
        if convert_to is not None:
            weights.append(dequantize_weight(weight, scale, getattr(torch, convert_to)))
        else:
            weights.append(weight)
            scales.append(scale)
    experts.set_weights(w, torch.stack(weights), torch.stack(scales) if scales else None)


def _expected_names(model: torch.nn.Module) -> set[str]:
    """Every tensor the checkpoint must provide: one per Linear weight, per stacked expert
    weight, and per other persistent parameter or buffer."""
    expected, owned = set(), set()
    for name, module in model.named_modules():
        if isinstance(module, Linear):
            expected.add(f"{name}.weight")
            owned.add(name)
        elif isinstance(module, Experts):
            expected.update(f"{name}.{w}" for w in ("w1", "w2", "w3"))
            owned.add(name)
    for name in model.state_dict():
        if name.rpartition(".")[0] not in owned:
            expected.add(name)
    return expected


def _check_complete(model: torch.nn.Module, seen: set[str]) -> None:
    missing = sorted(_expected_names(model) - seen)
    if missing:
        raise CheckpointError(f"{len(missing)} tensor(s) missing from the checkpoint, first: {missing[0]!r}")
