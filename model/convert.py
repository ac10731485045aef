"""Quantise a DeepSeek-V4 checkpoint into the official release layout (v4_ops.md §6, §10, §11).

    seahal convert --src bf16_ckpt --dst fp8_ckpt [--experts fp4|fp8] [--linears fp8|bf16]

- FP8 linears (attention wq_a, wq_b, wkv, wo_a, wo_b; indexer wq_b; shared experts w1, w2, w3;
  MTP e_proj, h_proj): e4m3 weights with one ue8m0 scale per 128x128 block, stored as
  ``<module>.scale`` [ceil(rows/128), cols/128] float8_e8m0fnu.
- Routed experts ``ffn.experts.E.w{1,2,3}``: FP4 e2m1 codes packed two per byte (low nibble =
  first element) [rows, cols/2] uint8 with one ue8m0 scale per 1x32 tile [rows, cols/32]; or,
  with ``--experts fp8``, the FP8 layout above.
- Everything else (embedding, head, norms, gate, compressors, indexer weights_proj, mHC
  parameters, ape, sinks) is copied unchanged.

Names are written in the official spelling (``canonical_name``). An already quantised source
weight is dequantised first, so an FP4-expert release can be re-expressed with FP8 experts.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from seahal import hal
from seahal.hal.formats import dequantize_weight, e8m0_scales, fp4_quantize, fp8_quantize, ue8m0_encode

from .checkpoint import CheckpointError, iter_tensors
from .config import ModelConfig
from .transformer import MODEL_OPS, Transformer

FP8_BLOCK = 128
FP4_TILE = 32
EXPERT_FORMATS = ("fp4", "fp8")
LINEAR_FORMATS = ("fp8", "bf16")
DEFAULT_SHARD_BYTES = 4 << 30

FP8_LINEAR = re.compile(
    r"\.attn\.(wq_a|wq_b|wkv|wo_a|wo_b)\.weight$"
    r"|\.attn\.indexer\.wq_b\.weight$"
    r"|\.ffn\.shared_experts\.w[123]\.weight$"
    r"|\.(e_proj|h_proj)\.weight$"
)
ROUTED_EXPERT = re.compile(r"\.ffn\.experts\.\d+\.w[123]\.weight$")

QUANTIZATION_CONFIG = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "scale_fmt": "ue8m0",
    "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


class ConversionError(CheckpointError):
    """The source checkpoint cannot be converted (wrong shape, unpaired scale, bad option)."""


def _e8m0(scale: torch.Tensor) -> torch.Tensor:
    """Power-of-two fp32 scales -> float8_e8m0fnu (the stored scale dtype of the release; fp32
    on a torch without it, :func:`e8m0_scales`)."""
    return e8m0_scales(ue8m0_encode(scale))


def quantize_fp8_blocks(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One FP8 scale per 128x128 block of a weight.

    weight: [rows, cols] float, cols % 128 == 0 -> (e4m3 [rows, cols], e8m0 [ceil(rows/128), cols/128]).
    Per block: ``s = 2^ceil(log2(max(amax, 1e-4) / 448))``, ``q = e4m3_rne(clamp(w / s, -448, 448))``.
    The last row block may be partial; zero padding leaves its amax unchanged.
    """
    rows, cols = weight.shape
    row_blocks, col_blocks = -(-rows // FP8_BLOCK), cols // FP8_BLOCK
    padded = torch.zeros(row_blocks * FP8_BLOCK, cols, dtype=torch.float32, device=weight.device)
    padded[:rows] = weight
    blocks = padded.view(row_blocks, FP8_BLOCK, col_blocks, FP8_BLOCK).transpose(1, 2)
    q, scale = fp8_quantize(blocks.reshape(row_blocks, col_blocks, FP8_BLOCK * FP8_BLOCK), FP8_BLOCK * FP8_BLOCK)
    q = q.view(row_blocks, col_blocks, FP8_BLOCK, FP8_BLOCK).transpose(1, 2).reshape(-1, cols)[:rows]
    return q.contiguous(), _e8m0(scale.squeeze(-1))


def quantize_fp4_tiles(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FP4 e2m1 with one scale per 1x32 tile of a weight.

    weight: [rows, cols] float, cols % 32 == 0 -> (packed uint8 [rows, cols/2], e8m0 [rows, cols/32]).
    Per tile: ``s = 2^ceil(log2(max(amax, 6*2^-126) / 6))``, code = e2m1_rne(clamp(w / s, -6, 6)).
    """
    packed, scale = fp4_quantize(weight, FP4_TILE)
    return packed, _e8m0(scale)


def _target_format(name: str, experts: str, linears: str) -> str | None:
    """The stored format of the weight called ``name``: fp8, fp4, bf16, or None (copy unchanged)."""
    if ROUTED_EXPERT.search(name):
        return experts
    if FP8_LINEAR.search(name):
        return linears
    return None


def _encode(name: str, weight: torch.Tensor, fmt: str) -> list[tuple[str, torch.Tensor]]:
    """A dense weight in ``fmt``: [(name, weight)] plus its ``.scale`` when quantised."""
    needs = FP8_BLOCK if fmt == "fp8" else FP4_TILE
    if fmt != "bf16" and (weight.dim() != 2 or weight.shape[1] % needs):
        raise ConversionError(
            f"tensor {name!r}: {fmt} needs a [rows, cols] weight with cols a multiple of {needs}, "
            f"got {list(weight.shape)}"
        )
    if fmt == "bf16":
        return [(name, weight.to(torch.bfloat16))]
    q, scale = quantize_fp8_blocks(weight) if fmt == "fp8" else quantize_fp4_tiles(weight)
    return [(name, q), (name.removesuffix(".weight") + ".scale", scale)]


def _is_quantised(t: torch.Tensor) -> bool:
    return t.dtype in (torch.float8_e4m3fn, torch.uint8)


def convert_tensors(
    tensors: Iterable[tuple[str, torch.Tensor]],
    experts: str = "fp4",
    linears: str = "fp8",
    shapes: dict[str, tuple[int, ...]] | None = None,
    source: str = "checkpoint",
) -> Iterator[tuple[str, torch.Tensor]]:
    """(official name, tensor) pairs in -> the same in the quantised layout, streaming.

    ``shapes`` (dense shapes by official name, see :func:`official_shapes`) checks every
    weight that is converted. A quantised source weight waits for its ``.scale`` (and vice
    versa) and is dequantised before re-encoding; other tensors pass through unchanged.
    """
    if experts not in EXPERT_FORMATS or linears not in LINEAR_FORMATS:
        raise ConversionError(f"experts must be one of {EXPERT_FORMATS} and linears one of {LINEAR_FORMATS}, "
                              f"got {experts!r}, {linears!r}")
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors:
        is_scale = name.endswith(".scale")
        weight_name = name.removesuffix(".scale") + ".weight" if is_scale else name
        fmt = _target_format(weight_name, experts, linears)
        if fmt is not None and (is_scale or _is_quantised(tensor)):
            parts = pending.setdefault(weight_name, {})
            parts["scale" if is_scale else "weight"] = tensor
            if len(parts) < 2:
                continue
            del pending[weight_name]
            tensor = dequantize_weight(parts["weight"], parts["scale"], torch.float32)
        elif is_scale:
            yield name, tensor
            continue
        _check_shape(weight_name, tensor, shapes, source)
        if fmt is None:
            yield name, tensor
        else:
            yield from _encode(weight_name, tensor, fmt)
    if pending:
        name, parts = next(iter(pending.items()))
        missing = "scale" if "weight" in parts else "weight"
        raise ConversionError(f"{source}: quantised tensor {name!r} has no {missing} ({len(pending)} unpaired)")


def _check_shape(name: str, tensor: torch.Tensor, shapes: dict | None, source: str) -> None:
    if shapes is None or name not in shapes:
        return
    expected = tuple(shapes[name])
    if tuple(tensor.shape) != expected:
        raise ConversionError(f"tensor {name!r} in {source}: expected shape {list(expected)}, got {list(tensor.shape)}")


def official_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the model loads, by official checkpoint name, with its dense shape.

    Read off the model itself (built on the meta device, so nothing is allocated); stacked
    expert weights [E, rows, cols] become ``...experts.{e}.w1.weight`` [rows, cols] and the
    shared expert ``...shared_experts.w1.weight``.
    """
    plan = hal.plan("cpu", ops=MODEL_OPS, announce=False, environ={})
    with torch.device("meta"):
        model = Transformer(config, plan)
    shapes: dict[str, tuple[int, ...]] = {}
    for name, tensor in model.state_dict().items():
        owner, _, leaf = name.rpartition(".")
        if owner.endswith(".shared_experts"):
            shapes[f"{owner}.{leaf}.weight"] = tuple(tensor.shape[1:])
        elif owner.endswith(".experts"):
            shapes.update({f"{owner}.{e}.{leaf}.weight": tuple(tensor.shape[1:]) for e in range(tensor.shape[0])})
        else:
            shapes[name] = tuple(tensor.shape)
    return shapes


def write_checkpoint(
    tensors: Iterable[tuple[str, torch.Tensor]], dst: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES
) -> list[Path]:
    """Write tensors as ``model-0000i-of-0000n.safetensors`` shards of at most ``max_shard_bytes``
    (a single larger tensor gets a shard of its own) plus ``model.safetensors.index.json``."""
    dst.mkdir(parents=True, exist_ok=True)
    shard_names: list[list[str]] = []
    current: dict[str, torch.Tensor] = {}
    size = total = 0

    def flush() -> None:
        partial = dst / f"model-{len(shard_names) + 1:05d}.safetensors.partial"
        save_file({k: v.contiguous() for k, v in current.items()}, str(partial), metadata={"format": "pt"})
        shard_names.append(list(current))
        current.clear()

    seen: set[str] = set()
    for name, tensor in tensors:
        if name in seen:
            raise ConversionError(f"tensor {name!r} appears twice in the source")
        seen.add(name)
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            flush()
            size = 0
        current[name] = tensor.cpu()
        size += nbytes
        total += nbytes
    if current or not shard_names:
        flush()

    n = len(shard_names)
    files, weight_map = [], {}
    for i, names in enumerate(shard_names, 1):
        path = dst / f"model-{i:05d}-of-{n:05d}.safetensors"
        (dst / f"model-{i:05d}.safetensors.partial").replace(path)
        weight_map.update(dict.fromkeys(names, path.name))
        files.append(path)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return files


def quantised_config(raw: dict, experts: str, linears: str) -> dict:
    """config.json of the converted checkpoint: the source's, plus the release's quantisation keys."""
    out = {k: v for k, v in raw.items() if k != "quantization_config"}
    if "fp8" in (experts, linears):
        out["quantization_config"] = dict(QUANTIZATION_CONFIG)
    out["expert_dtype"] = experts
    return out


def convert(
    src: str | Path,
    dst: str | Path,
    experts: str = "fp4",
    linears: str = "fp8",
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    device: str | torch.device = "cpu",
) -> Path:
    """Convert the checkpoint folder ``src`` into ``dst`` (created; must hold no safetensors yet).

    Copies config.json (with ``quantization_config`` and ``expert_dtype`` added) and the
    tokenizer files; returns ``dst``. Raises :class:`CheckpointError` naming the file or tensor
    that is unreadable or has the wrong shape. ``device``: where each tensor is quantised (a GPU
    converts a V4-Flash-sized checkpoint in seconds; the CPU takes minutes).
    """
    src, dst = Path(src), Path(dst)
    if not (src / "config.json").exists():
        raise ConversionError(f"{src} has no config.json")
    if dst.exists() and any(dst.glob("*.safetensors")):
        raise ConversionError(f"destination {dst} already holds a checkpoint; choose an empty folder")
    raw = json.loads((src / "config.json").read_text())
    shapes = official_shapes(ModelConfig.from_dict(raw))
    tensors = ((name, tensor) for name, _, tensor in iter_tensors(src, torch.device(device)))
    write_checkpoint(convert_tensors(tensors, experts, linears, shapes, str(src)), dst, max_shard_bytes)
    (dst / "config.json").write_text(json.dumps(quantised_config(raw, experts, linears), indent=2) + "\n")
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)
    return dst
