"""Small, valid argument sets for every op, built from each contract's shapes.

``args, kwargs = example_args("fp8_gemm")`` gives arguments that pass the op's contract, so
``plan.ops.fp8_gemm(*args, **kwargs)`` runs; tests perturb them to build invalid calls, and the
conformance suite feeds them to every backend. Shapes are tiny but exercise the awkward cases
(N not a multiple of 128, -1 slots in index tensors, queries that see fewer entries than top-k).

``dtype`` is the precision of the op's float data (activations, dense weights). Inputs that the
contract keeps in fp32 (scales, gate bias, mHC parameters, RoPE frequencies...) are float64 when
``dtype`` is float64 and float32 otherwise; the compressor state is always fp32 and quantised
operands always come from the reference codecs. A dtype the op does not accept raises the op's
:class:`~seahal.hal.SpecError` (e.g. ``kv_cache_pack`` has no float64 form).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from seahal.backends.cpu.reference.quant import kv_cache_pack
from seahal.hal import get_spec
from seahal.hal.formats import fp4_quantize, fp8_quantize, index_key_bytes, index_key_pack
from seahal.hal.ops.compressor import compressor_state
from seahal.hal.ops.quant import kv_record_bytes
from seahal.hal.ops.rope import rope_frequencies

WEIGHT_FORMATS = ("dense", "fp8", "fp4")
FP8_BLOCK = 128


@dataclass
class _Draw:
    """Seeded random tensors in the dtypes an example asks for (built on the CPU)."""

    gen: torch.Generator
    dtype: torch.dtype
    weight_format: str

    @property
    def param_dtype(self) -> torch.dtype:
        return torch.float64 if self.dtype == torch.float64 else torch.float32

    def data(self, *shape: int, scale: float = 1.0) -> torch.Tensor:
        """Standard normal times ``scale`` in the example's dtype."""
        return self.normal(shape, scale, self.dtype)

    def param(self, *shape: int, scale: float = 1.0) -> torch.Tensor:
        """Standard normal times ``scale`` in the parameter dtype (fp32, or fp64 for fp64 examples)."""
        return self.normal(shape, scale, self.param_dtype)

    def normal(self, shape: tuple[int, ...], scale: float, dtype: torch.dtype) -> torch.Tensor:
        return (torch.randn(shape, generator=self.gen, dtype=torch.float64) * scale).to(dtype)

    def ints(self, low: int, high: int, *shape: int) -> torch.Tensor:
        """int32 uniform in [low, high)."""
        return torch.randint(low, high, shape, generator=self.gen, dtype=torch.int32)


def fp8_block_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise a weight in 128x128 blocks with ue8m0 scales (the reference fp8 codec per block).

    w: [..., R, C] float, C % 128 == 0 -> (e4m3 [..., R, C], fp32 [..., ceil(R/128), C/128]).
    Rows are zero-padded to whole blocks, which leaves every block's amax unchanged.
    """
    *lead, rows, cols = w.shape
    row_blocks, col_blocks = -(-rows // FP8_BLOCK), cols // FP8_BLOCK
    padded = torch.nn.functional.pad(w.to(torch.float32), (0, 0, 0, row_blocks * FP8_BLOCK - rows))
    tiles = padded.reshape(*lead, row_blocks, FP8_BLOCK, col_blocks, FP8_BLOCK).transpose(-3, -2)
    q, scale = fp8_quantize(tiles.reshape(*lead, row_blocks, col_blocks, FP8_BLOCK**2), FP8_BLOCK**2)
    q = q.reshape(*lead, row_blocks, col_blocks, FP8_BLOCK, FP8_BLOCK).transpose(-3, -2)
    return q.reshape(*lead, row_blocks * FP8_BLOCK, cols)[..., :rows, :].contiguous(), scale.squeeze(-1)


Builder = Callable[[_Draw], tuple[tuple, dict]]
_BUILDERS: dict[str, Builder] = {}


def _example(op: str) -> Callable[[Builder], Builder]:
    def register(builder: Builder) -> Builder:
        _BUILDERS[op] = builder
        return builder

    return register


@_example("fp8_act_quant")
def _fp8_act_quant(d: _Draw):
    return (d.data(3, 256),), {}


@_example("fp4_quant")
def _fp4_quant(d: _Draw):
    return (d.data(3, 64),), {}


@_example("hadamard_rotate")
def _hadamard_rotate(d: _Draw):
    """x [2, 3, 2, 32] (two heads of a small indexer query at 3 positions), FP4 blocks of 16; with
    fp32/fp64 data roped first (int32 positions, the last 16 dims), none with bf16: the suite's bf16
    and fp32 example cases hold both forms."""
    x = d.data(2, 3, 2, 32)
    if d.dtype == torch.bfloat16:
        return (x, 16), {}
    return (x, 16), {"positions": d.ints(0, 1000, 2, 3), "freqs": rope_frequencies(8, 10000.0).to(d.param_dtype)}


@_example("index_key_pack")
def _index_key_pack(d: _Draw):
    """Keys [2, 3, 64] as 34-byte FP4 records (two 32-blocks)."""
    return (d.data(2, 3, 64), "fp4"), {}


@_example("index_key_store")
def _index_key_store(d: _Draw):
    """The index_key_pack example's keys (B=2, n=3, d=64) as 34-byte FP4 records stored into a
    store of 5 random-byte records per sequence, at rows [4, 0, 2] and [1, 3, 0] (int32 slots)."""
    store = torch.randint(0, 256, (2, 5, index_key_bytes(64, "fp4")), generator=d.gen, dtype=torch.uint8)
    slots = torch.tensor([[4, 0, 2], [1, 3, 0]], dtype=torch.int32)
    return (d.data(2, 3, 64), store, slots, "fp4"), {}


@_example("kv_cache_pack")
def _kv_cache_pack(d: _Draw):
    """dim 96 = 64 nope (two 32-wide tiles) + 32 rope."""
    return (d.data(2, 3, 96), 32, 32), {}


@_example("kv_cache_store")
def _kv_cache_store(d: _Draw):
    """The kv_cache_pack example's vectors (B=2, n=3, dim 96) stored into a cache of 5 random-byte
    136-byte records per sequence, at rows [4, 0, 2] and [1, 3, 0] (int32 slots); with fp32 data
    normalised (a norm weight) and rotated first (int32 positions, the last 32 dims), none with
    bf16 or fp16 (which has no such form): the suite's bf16 and fp32 example cases hold both forms."""
    cache = torch.randint(0, 256, (2, 5, kv_record_bytes(96, 32, 32)), generator=d.gen, dtype=torch.uint8)
    slots = torch.tensor([[4, 0, 2], [1, 3, 0]], dtype=torch.int32)
    args = (d.data(2, 3, 96), cache, slots, 32, 32)
    if d.dtype != torch.float32:
        return args, {}
    rotation = {"positions": d.ints(0, 1000, 2, 3), "freqs": rope_frequencies(32, 10000.0),
                "norm_weight": d.param(96).abs() + 0.5}
    return args, rotation


@_example("kv_cache_unpack")
def _kv_cache_unpack(d: _Draw):
    """Records of the kv_cache_pack example, packed by the reference."""
    return (kv_cache_pack(d.normal((2, 3, 96), 1.0, torch.float32), 32, 32), 96, 32, 32), {}


def _fp8_activation(d: _Draw, rows: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return fp8_quantize(d.normal((rows, k), 1.0, torch.float32), FP8_BLOCK)


@_example("fp8_gemm")
def _fp8_gemm(d: _Draw):
    """M=3, N=130 (two row blocks, the second partial), K=256."""
    a, a_scale = _fp8_activation(d, 3, 256)
    b, b_scale = fp8_block_quantize(d.normal((130, 256), 0.1, torch.float32))
    return (a, a_scale, b, b_scale), {}


@_example("fp4_gemm")
def _fp4_gemm(d: _Draw):
    """M=3, N=130, K=256."""
    a, a_scale = _fp8_activation(d, 3, 256)
    b, b_scale = fp4_quantize(d.normal((130, 256), 0.1, torch.float32))
    return (a, a_scale, b, b_scale), {}


@_example("act_quant_gemm")
def _act_quant_gemm(d: _Draw):
    """x [3, 256] in the example's dtype (quantised by the op), the fp8_gemm example's weights:
    N=130 (two row blocks, the second partial), 128x128 ue8m0 scales."""
    b, b_scale = fp8_block_quantize(d.normal((130, 256), 0.1, torch.float32))
    return (d.data(3, 256), b, b_scale), {}


@_example("moe_gate")
def _moe_gate(d: _Draw):
    """T=5 tokens, D=16, E=8 experts, top-2."""
    return (d.data(5, 16), d.data(8, 16, scale=0.25), d.param(8, scale=0.1), 2), {}


def _expert_weight(d: _Draw, experts: int, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    w = d.normal((experts, rows, cols), cols**-0.5, torch.float32)
    if d.weight_format == "fp8":
        return fp8_block_quantize(w)
    if d.weight_format == "fp4":
        return fp4_quantize(w)
    return w.to(d.dtype), None


@_example("moe_experts")
def _moe_experts(d: _Draw):
    """T=4 tokens, top-2 of E=3 experts (one slot -1); D=I=16 dense, 128 when quantised."""
    dim = 16 if d.weight_format == "dense" else 128
    ids = d.ints(0, 3, 4, 2)
    ids[1, 1] = -1
    w1, w1_scale = _expert_weight(d, 3, dim, dim)
    w3, w3_scale = _expert_weight(d, 3, dim, dim)
    w2, w2_scale = _expert_weight(d, 3, dim, dim)
    weights = torch.softmax(d.param(4, 2), dim=-1)
    return (d.data(4, dim), weights, ids, w1, w1_scale, w3, w3_scale, w2, w2_scale), {}


@_example("kv_compress")
def _kv_compress(d: _Draw):
    """Overlapped (CSA) compressor, m=4, d=16 with 8 rope dims; 9 tokens from a reset state."""
    batch, tokens, ratio, dim = 2, 9, 4, 16
    kv_state, score_state = compressor_state(batch, ratio, dim, overlap=True)
    args = (
        d.param(batch, tokens, 2 * dim),
        d.param(batch, tokens, 2 * dim),
        d.param(ratio, 2 * dim, scale=0.1),
        1.0 + d.param(dim, scale=0.1),
        rope_frequencies(8, 10000.0).to(d.param_dtype),
        kv_state,
        score_state,
        ratio,
        True,
        0,
    )
    return args, {}


@_example("kv_compress_fp8")
def _kv_compress_fp8(d: _Draw):
    """The kv_compress example's entries as 32-byte FP8 records: 8 e4m3 dims (one 8-wide tile) +
    8 bf16 RoPE dims + one scale byte padded to 8."""
    args, _ = _kv_compress(d)
    return (*args, 1e-6, 8, 8), {}


@_example("kv_compress_store")
def _kv_compress_store(d: _Draw):
    """The kv_compress_fp8 example's first 8 tokens, whose 2 records per sequence (as many at a
    tensor position: 8 tokens from a block boundary complete ceil(8/4)) go into a store of 5
    random-byte 32-byte records per sequence, at rows [3, 0] and [1, 4] (int32 slots)."""
    kv, score, *rest = _kv_compress(d)[0]
    args = (kv[:, :8], score[:, :8], *rest)
    store = torch.randint(0, 256, (2, 5, kv_record_bytes(16, 8, 8)), generator=d.gen, dtype=torch.uint8)
    slots = torch.tensor([[3, 0], [1, 4]], dtype=torch.int32)
    return (*args, store, slots, 1e-6, 8, 8), {}


_INDEXER_SELECTION = {"weights_scale": 0.3, "offset": 6}
"""The indexer examples' head-weight scale and index offset (entry j returned as 6 + j)."""


@_example("indexer_topk")
def _indexer_topk(d: _Draw):
    """Queries at positions 8..12 with m=4 see 2 or 3 of N=4 entries; top-3 leaves -1 slots. The
    head weights in the data's dtype (bf16, as the model's projection gives them), scaled by the op."""
    return (d.data(2, 5, 3, 16), d.data(2, 5, 3, scale=0.25), d.data(2, 4, 16), 4, 8, 3), _INDEXER_SELECTION


@_example("indexer_topk_packed")
def _indexer_topk_packed(d: _Draw):
    """As indexer_topk with d=32 and the keys packed as FP4 (4 x 17-byte records)."""
    keys = index_key_pack(d.normal((2, 4, 32), 1.0, torch.float32), "fp4")
    return (d.data(2, 5, 3, 32), d.data(2, 5, 3, scale=0.25), keys, "fp4", 4, 8, 3), _INDEXER_SELECTION


def _output_rotation(d: _Draw) -> dict[str, torch.Tensor | None]:
    """sparse_attention's output rotation (its query's inverse RoPE on the last 8 of 16 dims, int32
    positions of the example's [2, 3] queries) with fp32/fp64 data, none with bf16: the suite's bf16
    and fp32 example cases hold both forms."""
    if d.dtype == torch.bfloat16:
        return {"positions": None, "freqs": None}
    return {"positions": d.ints(0, 1000, 2, 3), "freqs": rope_frequencies(8, 10000.0).to(d.param_dtype)}


@_example("sparse_attention")
def _sparse_attention(d: _Draw):
    """B=2, S=3 queries, H=4 heads of D=16, N=6 keys, K=4 slots (some -1)."""
    indices = d.ints(-1, 6, 2, 3, 4)
    return (d.data(2, 3, 4, 16), d.data(2, 6, 16), indices, d.param(4), 16**-0.5), _output_rotation(d)


@_example("sparse_attention_fp8")
def _sparse_attention_fp8(d: _Draw):
    """The sparse_attention example's queries over FP8 records of D=16 keys: 8 e4m3 dims (one
    8-wide tile) + 8 bf16 RoPE dims + one scale byte padded to 8 = 32 bytes."""
    indices = d.ints(-1, 6, 2, 3, 4)
    records = kv_cache_pack(d.normal((2, 6, 16), 1.0, torch.float32), 8, 8)
    return (d.data(2, 3, 4, 16), records, indices, d.param(4), 16**-0.5, 8, 8), _output_rotation(d)


def _hc_norm_weight(d: _Draw, dim: int) -> torch.Tensor | None:
    """hc_pre's / hc_head's ``norm_weight`` (the folded RMSNorm) with fp32/fp64 data, none with bf16:
    the suite's bf16 and fp32 example cases hold both forms."""
    return None if d.dtype == torch.bfloat16 else d.param(dim).abs() + 0.5


@_example("hc_pre")
def _hc_pre(d: _Draw):
    """B=2, S=3, n=4 streams of D=8."""
    n, dim = 4, 8
    args = (d.data(2, 3, n, dim), d.param((2 + n) * n, n * dim, scale=0.1), d.param((2 + n) * n), d.param(3))
    return args, {"norm_weight": _hc_norm_weight(d, dim)}


@_example("hc_post")
def _hc_post(d: _Draw):
    """B=2, S=3, n=4 streams of D=8; with fp32/fp64 data the sub-layer output in two parts (an
    ``addend`` in f's dtype), none with bf16: the suite's bf16 and fp32 example cases hold both forms."""
    n = 4
    comb = torch.softmax(d.param(2, 3, n, n), dim=-1)
    args = (d.data(2, 3, 8), d.data(2, 3, n, 8), torch.sigmoid(d.param(2, 3, n)) * 2, comb)
    return args, {"addend": None if d.dtype == torch.bfloat16 else d.data(2, 3, 8)}


@_example("hc_post_pre")
def _hc_post_pre(d: _Draw):
    """hc_post's example, then hc_pre's parameters for the streams it makes (B=2, S=3, n=4 streams of
    D=8); with fp32/fp64 data an ``addend`` and a ``norm_weight``, neither with bf16: the suite's bf16
    and fp32 example cases hold both forms."""
    n, dim = 4, 8
    comb = torch.softmax(d.param(2, 3, n, n), dim=-1)
    post_args = (d.data(2, 3, dim), d.data(2, 3, n, dim), torch.sigmoid(d.param(2, 3, n)) * 2, comb)
    pre_args = (d.param((2 + n) * n, n * dim, scale=0.1), d.param((2 + n) * n), d.param(3))
    addend = None if d.dtype == torch.bfloat16 else d.data(2, 3, dim)
    return post_args + pre_args, {"norm_weight": _hc_norm_weight(d, dim), "addend": addend}


@_example("hc_head")
def _hc_head(d: _Draw):
    n, dim = 4, 8
    args = (d.data(2, 3, n, dim), d.param(n, n * dim, scale=0.1), d.param(n), d.param(1))
    return args, {"norm_weight": _hc_norm_weight(d, dim)}


@_example("rope")
def _rope(d: _Draw):
    """B=2, S=3, H=4, D=16 with the last 8 dims rotated."""
    positions = torch.randint(0, 1000, (2, 3), generator=d.gen)
    return (d.data(2, 3, 4, 16), positions, rope_frequencies(8, 10000.0).to(d.param_dtype)), {}


@_example("rms_norm")
def _rms_norm(d: _Draw):
    """x [2, 3, 16] with a per-channel weight."""
    return (d.data(2, 3, 16), d.param(16).abs() + 0.5, 1e-6), {}


@_example("rms_norm_rope")
def _rms_norm_rope(d: _Draw):
    """x [2, 3, 1, 16] (one KV head) with its norm weight, the last 8 dims rotated."""
    positions = torch.randint(0, 1000, (2, 3), generator=d.gen)
    weight = d.param(16).abs() + 0.5
    return (d.data(2, 3, 1, 16), weight, 1e-6, positions, rope_frequencies(8, 10000.0).to(d.param_dtype)), {}


@_example("fp32_linear")
def _fp32_linear(d: _Draw):
    """x [2, 1, 16], W [40, 16]."""
    return (d.data(2, 1, 16), d.param(40, 16, scale=0.25)), {}


@_example("grouped_linear")
def _grouped_linear(d: _Draw):
    """x [2, 1, 4, 16] (4 groups), W [4 * 8, 16] dense: z_g = W_g x_g."""
    return (d.data(2, 1, 4, 16), d.param(32, 16, scale=0.25), None), {}


def example_args(
    op: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    weight_format: str = "dense",
) -> tuple[tuple, dict]:
    """A small valid ``(args, kwargs)`` for ``op``, checked against its contract.

    ``dtype``: precision of the float data (see the module docstring); ``device``: where every
    tensor is placed; ``seed``: the random draw; ``weight_format``: ``"dense"``, ``"fp8"`` or
    ``"fp4"`` expert weights (``moe_experts`` only). Fresh tensors on every call, so a kernel may
    mutate them (``kv_compress`` updates its state in place).
    """
    if op not in _BUILDERS:
        raise KeyError(f"no example for op {op!r}; examples exist for: {', '.join(_BUILDERS)}")
    if weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"weight_format must be one of {list(WEIGHT_FORMATS)}, got {weight_format!r}")
    if weight_format != "dense" and op != "moe_experts":
        raise ValueError(f"weight_format applies to moe_experts only, got {weight_format!r} for {op!r}")
    draw = _Draw(torch.Generator().manual_seed(seed), dtype, weight_format)
    args, kwargs = _BUILDERS[op](draw)
    args = tuple(_to(a, device) for a in args)
    kwargs = {k: _to(v, device) for k, v in kwargs.items()}
    get_spec(op).check(*args, **kwargs)
    return args, kwargs


def _to(value: object, device: str | torch.device) -> object:
    return value.to(device) if isinstance(value, torch.Tensor) else value
