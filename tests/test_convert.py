"""seahal convert: a random transformers-made V4 checkpoint quantised into the release layout.

Checked three ways: the quantisers against brute-force nearest-value rounding; every converted
tensor against its source within the format's rounding bound; the loaded FP8/FP4 model's logits
against the fp32 model's. Broken inputs must fail naming the file or the tensor.
"""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from seahal.hal import formats
from seahal.hal.formats import E2M1_VALUES, decode_scale, dequantize_weight
from seahal.model import load
from seahal.model.checkpoint import CheckpointError, iter_tensors
from seahal.model.convert import ConversionError, convert, quantize_fp4_tiles, quantize_fp8_blocks

from v4_checkpoints import CSA, HCA, SWA, make_hf_model, save_hf_checkpoint

FP8_LINEARS = {"attn.wq_a", "attn.wq_b", "attn.wkv", "attn.wo_a", "attn.wo_b", "attn.indexer.wq_b",
               "ffn.shared_experts.w1", "ffn.shared_experts.w2", "ffn.shared_experts.w3"}
"""Per layer, the linears the release stores in FP8 (v4_ops §6, §11.2); routed experts are FP4."""

# Logits of the quantised model vs the fp32 model, as ||delta|| / ||reference|| over all logits.
# One FP8 GEMM rounds weights and activations to e4m3 (3 mantissa bits: each value within 2^-4
# relative, uniformly spread), so its output is off by ~2^-4 * sqrt(2/3) ~ 0.05 relative (measured
# 0.04 per linear). A sublayer chains ~4 GEMMs (~0.08); its output is ~1/sqrt(2 n_layers) of the
# residual stream here (as in a trained model), and 8 sublayers add up to ~0.08 at the logits
# (measured 0.07-0.10 over seeds). FP4 e2m1 experts round weights to ~12% RMS (measured on normal
# weights): measured 0.13-0.15. Routing and indexer top-k flips make rare larger outliers, so the
# bound is on the RMS, about 1.6x the largest measurement; unrelated logits would give ~sqrt(2).
LOGIT_TOLERANCE = {"fp8": 0.15, "fp4": 0.25}


def _residual_dominated(model) -> None:
    """Re-draw weights at trained-model scales: N(0, 1/fan_in) matrices, output projections
    1/sqrt(2 n_layers) smaller, N(0, 1) embedding, unit norms, small mHC mixing weights."""
    n_layers = model.config.num_hidden_layers
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif "embed" in name:
                p.normal_(0, 1.0)
            elif p.dim() >= 2:
                std = p.shape[-1] ** -0.5 * (0.1 if name.endswith("fn") else 1.0)
                if any(k in name for k in ("o_b_proj", "wo_b", "down_proj", "w2")):
                    std /= math.sqrt(2 * n_layers)
                p.normal_(0, std)
            else:
                p.normal_(0, 0.1)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    hf = make_hf_model([SWA, CSA, HCA, CSA], n_hash_layers=1, seed=3)
    _residual_dominated(hf)
    return save_hf_checkpoint(hf, tmp_path_factory.mktemp("fp32"))


@pytest.fixture(scope="module")
def converted(source, tmp_path_factory):
    return convert(source, tmp_path_factory.mktemp("fp8") / "ckpt", max_shard_bytes=1 << 20)


def _tensors(path) -> dict[str, torch.Tensor]:
    return {name: t for name, _, t in iter_tensors(path, torch.device("cpu"))}


def _e4m3_values() -> torch.Tensor:
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    return codes[codes.isfinite()].unique()


def _nearest(x: torch.Tensor, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest grid value to each x by brute force, and whether x is (near) a midpoint tie."""
    distance = (x.reshape(-1, 1) - grid.reshape(1, -1)).abs()
    two = distance.topk(2, dim=1, largest=False).values
    nearest = grid[distance.argmin(dim=1)].reshape(x.shape)
    return nearest, (two[:, 1] - two[:, 0] <= 1e-6 * two[:, 1]).reshape(x.shape)


def test_a_torch_without_the_e8m0_dtype_reads_e8m0_scales_as_their_fp32_values(converted, monkeypatch):
    """Before torch 2.7 safetensors cannot hand over an F8_E8M0 tensor: the reader decodes its bytes
    from the shard (each of the converted checkpoint's many shards), whole or a rank's part of it."""
    stored = _tensors(converted)
    e8m0 = {name: t for name, t in stored.items() if t.dtype == torch.float8_e8m0fnu}
    assert len(e8m0) > 4
    monkeypatch.setattr(formats, "E8M0_DTYPE", None)
    read = _tensors(converted)
    assert {name: t.dtype for name, t in read.items() if name not in e8m0} == {
        name: t.dtype for name, t in stored.items() if name not in e8m0}
    for name, t in e8m0.items():
        assert read[name].dtype == torch.float32 and torch.equal(read[name], decode_scale(t)), name
    name, t = next(iter(e8m0.items()))
    part = (slice(1, 3),)
    (_, _, got), = iter_tensors(converted, torch.device("cpu"), select=lambda n: part if n == name else "skip")
    assert torch.equal(got, decode_scale(t)[part])


def test_fp8_blocks_round_to_the_nearest_e4m3_with_power_of_two_block_scales():
    g = torch.Generator().manual_seed(0)
    # 200 rows: a partial second row block; rows spread over 5 decades, one all-zero row.
    w = torch.randn(200, 256, generator=g) * torch.logspace(-4, 1, 200)[:, None]
    w[7] = 0
    q, scale = quantize_fp8_blocks(w)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (200, 256)
    assert scale.dtype == formats.E8M0_HELD_DTYPE and scale.shape == (2, 2)
    s = decode_scale(scale)
    for rb in range(2):
        for cb in range(2):
            block = w[rb * 128 : (rb + 1) * 128, cb * 128 : (cb + 1) * 128]
            amax = max(block.abs().max().item(), 1e-4)
            assert s[rb, cb].item() == 2.0 ** math.ceil(math.log2(amax / 448))
            x = block / s[rb, cb]
            nearest, tie = _nearest(x, _e4m3_values())
            got = q[rb * 128 : (rb + 1) * 128, cb * 128 : (cb + 1) * 128].float()
            assert torch.equal(got[~tie], nearest[~tie])


def test_fp4_tiles_round_to_the_nearest_e2m1_and_pack_low_nibble_first():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(8, 64, generator=g) * torch.logspace(-2, 2, 8)[:, None]
    packed, scale = quantize_fp4_tiles(w)
    assert packed.dtype == torch.uint8 and packed.shape == (8, 32)
    assert scale.dtype == formats.E8M0_HELD_DTYPE and scale.shape == (8, 2)
    s = decode_scale(scale)
    tiles = w.view(8, 2, 32)
    assert torch.equal(s, torch.exp2(torch.ceil(torch.log2(tiles.abs().amax(-1) / 6))))
    grid = torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES))
    nearest, tie = _nearest(tiles / s[..., None], grid)
    got = dequantize_weight(packed, scale).view(8, 2, 32) / s[..., None]
    assert torch.equal(got[~tie], nearest[~tie])

    row = torch.zeros(1, 32)
    row[0, :2] = torch.tensor([6.0, -0.5])  # amax 6 -> scale 2^0; codes 7 (6) and 8|1 (-0.5)
    packed, scale = quantize_fp4_tiles(row)
    assert packed[0, 0].item() == 0x97 and decode_scale(scale).item() == 1.0


def test_layout_and_every_tensor_within_its_format(source, converted):
    src, out = _tensors(source), _tensors(converted)
    index = json.loads((converted / "model.safetensors.index.json").read_text())
    files = sorted({f for f in index["weight_map"].values()})
    assert len(files) > 1 and sorted(index["weight_map"]) == sorted(out)
    for f in files:  # shards hold at most 1 MiB unless a single tensor is larger
        shard = load_file(converted / f)
        assert len(shard) == 1 or sum(t.numel() * t.element_size() for t in shard.values()) <= 1 << 20

    config = json.loads((converted / "config.json").read_text())
    assert config["expert_dtype"] == "fp4"
    assert config["quantization_config"]["weight_block_size"] == [128, 128]
    assert config["quantization_config"]["scale_fmt"] == "ue8m0" and config["quantization_config"]["fmt"] == "e4m3"
    assert config["hidden_size"] == 256

    quantised = 0
    for name, w in src.items():
        module = name.removesuffix(".weight")
        per_layer = module.split(".", 2)[-1]
        if per_layer in FP8_LINEARS and name.startswith("layers."):
            q, scale = out[name], out[module + ".scale"]
            assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float8_e8m0fnu
            assert scale.shape == (math.ceil(w.shape[0] / 128), w.shape[1] // 128)
            s = decode_scale(scale).repeat_interleave(128, 0)[: w.shape[0]].repeat_interleave(128, 1)
            # e4m3 round to nearest: 2^-4 relative for normals, half the 2^-9 subnormal step below.
            bound = 2**-4 * w.abs() + 2**-10 * s
            assert ((dequantize_weight(q, scale) - w).abs() <= bound).all(), name
            quantised += 1
        elif ".ffn.experts." in name:
            q, scale = out[name], out[module + ".scale"]
            assert q.dtype == torch.uint8 and q.shape == (w.shape[0], w.shape[1] // 2)
            assert scale.dtype == torch.float8_e8m0fnu and scale.shape == (w.shape[0], w.shape[1] // 32)
            s = decode_scale(scale).repeat_interleave(32, 1)
            x = (w / s).abs()  # e2m1 gaps: 0.5 up to 2, 1 up to 4, 2 up to 6 -> half a gap at most
            half_gap = torch.where(x <= 2, 0.25, torch.where(x <= 4, 0.5, 1.0)) * s
            assert ((dequantize_weight(q, scale) - w).abs() <= half_gap * (1 + 1e-6)).all(), name
            quantised += 1
        else:  # compressors, indexer weights_proj, gate, embed, head, norms, mHC, ape, sinks
            assert out[name].dtype == w.dtype and torch.equal(out[name], w), name
            assert module + ".scale" not in out
    assert quantised == 2 * 9 + 2 * 8 + 4 * 8 * 3  # FP8: 9 per CSA layer, 8 on SWA/HCA; 8 experts x 3


def test_reconverting_a_quantised_checkpoint_requantises_its_dequantised_weights(converted, tmp_path):
    again = _tensors(convert(converted, tmp_path / "fp8-experts", experts="fp8"))
    first = _tensors(converted)
    for name in ("layers.1.attn.wq_b.weight", "layers.2.ffn.shared_experts.w2.weight"):
        scale = name.removesuffix("weight") + "scale"
        # FP8 -> FP8: the block amax is a stored e4m3 value times the same power-of-two scale.
        assert torch.equal(dequantize_weight(again[name], again[scale]), dequantize_weight(first[name], first[scale]))
    name, scale = "layers.3.ffn.experts.5.w2.weight", "layers.3.ffn.experts.5.w2.scale"
    assert again[name].dtype == torch.float8_e4m3fn and again[scale].shape == (2, 1)
    w = dequantize_weight(first[name], first[scale])
    s = decode_scale(again[scale]).repeat_interleave(128, 0).repeat_interleave(128, 1)
    assert ((dequantize_weight(again[name], again[scale]) - w).abs() <= 2**-4 * w.abs() + 2**-10 * s).all()


@pytest.mark.parametrize("experts", ["fp4", "fp8"])
def test_quantised_logits_stay_close_to_fp32(source, converted, experts, tmp_path):
    path = converted if experts == "fp4" else convert(source, tmp_path / "ckpt", experts="fp8")
    reference = load(source, device="cpu", announce=False)
    model = load(path, device="cpu", announce=False)
    assert model.layers[1].attn.wq_b.format == "fp8"
    assert model.layers[1].ffn.experts.w1.dtype == (torch.uint8 if experts == "fp4" else torch.float8_e4m3fn)
    ids = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(2))  # > window, > 8 CSA entries
    expected, got = reference(ids), model(ids)
    assert (got - expected).norm() <= LOGIT_TOLERANCE[experts] * expected.norm()


def _truncate(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_truncated_shard_fails_naming_the_file(source, converted, tmp_path):
    broken = shutil.copytree(converted, tmp_path / "broken")
    shard = sorted(broken.glob("*.safetensors"))[1]
    _truncate(shard)
    with pytest.raises(CheckpointError, match=shard.name):
        load(broken, device="cpu", announce=False)

    broken_source = shutil.copytree(source, tmp_path / "broken-source")
    _truncate(broken_source / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        convert(broken_source, tmp_path / "out")


def _with_tensor(folder, dst, name: str, tensor: torch.Tensor):
    """A copy of a single-file checkpoint with one tensor replaced."""
    dst.mkdir()
    tensors = load_file(folder / "model.safetensors")
    tensors[name] = tensor
    save_file(tensors, dst / "model.safetensors")
    shutil.copy(folder / "config.json", dst / "config.json")
    return dst


def test_wrong_shape_fails_naming_the_tensor_and_expected_shape(source, tmp_path):
    bad = _with_tensor(source, tmp_path / "bad", "model.layers.1.attn.wq_b.weight", torch.zeros(512, 64))
    with pytest.raises(ConversionError, match=r"'layers\.1\.attn\.wq_b\.weight'.*expected shape \[512, 128\]"):
        convert(bad, tmp_path / "out")
    with pytest.raises(CheckpointError, match=r"'layers\.1\.attn\.wq_b\.weight'.*expected shape \[512, 128\]"):
        load(bad, device="cpu", announce=False)
