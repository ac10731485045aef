"""Every torch_npu call of the Ascend backend, checked against the real torch-npu 2.14 API.

The torch-npu wheel carries its operator schemas (``npu_native_functions_by_codegen.yaml``) and the
pure-Python meta (shape) rules of its ops (``op_plugin/meta/_meta_registrations.py``). The wheel
is downloaded (``pip download --no-deps``, ~44 MB, cached under ``$SEAHAL_CACHE/wheels``) and only
unzipped, never installed (installing it without CANN breaks ``import torch``). The schemas are
defined in a ``torch.library`` namespace ``npu``, the meta rules are executed against it, and the
backend's kernels run on ``meta`` tensors with a ``torch_npu`` whose operators are
``torch.ops.npu.*``, as the real package exports them: a wrong operator name, an unknown keyword,
a wrong positional count, an output shape or dtype other than the contract's, and the vendor's own
input validation all fail here without hardware. Numerics are not checked (meta tensors have none).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from vendor_emulation import installed_modules

from seahal.hal import get_spec
from seahal.hal.formats import E8M0_HELD_DTYPE

TORCH_NPU = "torch-npu==2.14.*"
SCHEMAS = "torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml"
META_RULES = "torch_npu/op_plugin/meta/_meta_registrations.py"
ASCEND_950 = 260
"""What the stubbed ``get_soc_version`` answers: the meta rules' FP8 branches are the 950's."""


def _cache() -> Path:
    return Path(os.environ.get("SEAHAL_CACHE", Path.home() / ".cache" / "seahal")) / "wheels"


@pytest.fixture(scope="module")
def wheel() -> Path:
    """The torch-npu 2.14 wheel, from the cache or downloaded into it (cp311 manylinux wheel, the
    same files for any Python running the test). Skips only if the package index is unreachable."""
    cache = _cache()
    found = sorted(cache.glob("torch_npu-2.14*.whl"))
    if not found:
        cache.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.11",
            "--platform", "manylinux_2_28_x86_64", "--dest", str(cache), TORCH_NPU,
        ]
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
        found = sorted(cache.glob("torch_npu-2.14*.whl"))
        if not found:
            offline = re.search(r"(Connection|resolve|Network is unreachable|Max retries|timed out)", result.stderr, re.I)
            if offline:
                pytest.skip(f"the package index is unreachable, cannot download {TORCH_NPU}: {offline[0]}")
            raise AssertionError(f"pip download {TORCH_NPU} failed:\n{result.stdout}\n{result.stderr}")
    return found[-1]


def _stub_modules() -> dict[str, types.ModuleType]:
    """The five torch_npu symbols the meta file imports, and the package exporting every
    ``torch.ops.npu`` operator as ``torch_npu.<name>`` (what torch_npu's ``_exports.py`` does)."""

    class NpuOps(types.ModuleType):
        def __getattr__(self, name: str):
            if name.startswith("npu_"):
                return getattr(torch.ops.npu, name)
            raise AttributeError(name)

    package = NpuOps("torch_npu")
    for i, name in enumerate(("int4", "hifloat8", "float8_e8m0fnu", "float4_e2m1fn_x2", "float4_e1m2fn_x2")):
        setattr(package, name, 290 + i)  # torch_npu's own dtype codes: ints the meta rules compare against
    error_code = types.ModuleType("torch_npu.utils._error_code")
    error_code.ErrCode = types.SimpleNamespace(VALUE="", TYPE="", PARAM="", NOT_SUPPORT="", INTERNAL="", UNAVAIL="")
    error_code.ops_error = lambda *codes: ""
    npu_utils = types.ModuleType("torch_npu.npu.utils")
    npu_utils.get_cann_version = lambda: "9.0.0"
    backends = types.ModuleType("torch_npu.npu._backends")
    backends.get_soc_version = lambda: ASCEND_950
    modules = {"torch_npu": package, "torch_npu.utils._error_code": error_code, "torch_npu.npu.utils": npu_utils,
               "torch_npu.npu._backends": backends}
    for parent in ("torch_npu.utils", "torch_npu.npu"):
        modules[parent] = types.ModuleType(parent)
    return modules


@pytest.fixture(scope="module")
def npu_ops(wheel):
    """``torch.ops.npu`` defined from the wheel's schemas with the wheel's meta rules; yields the
    stub modules to install as ``torch_npu``."""
    with zipfile.ZipFile(wheel) as z:
        schemas = yaml.safe_load(z.read(SCHEMAS))
        meta_source = z.read(META_RULES).decode()
    library = torch.library.Library("npu", "DEF")
    defined = set()
    for section in ("custom", "symint"):
        for entry in schemas.get(section) or []:
            schema = entry["func"] if isinstance(entry, dict) else None
            name = schema.split("(")[0] if schema else None
            if name is None or name in defined:
                continue
            try:
                library.define(schema)
                defined.add(name)
            except RuntimeError:
                continue  # aten-style entries the dispatcher cannot define standalone
    assert len(defined) > 380, f"only {len(defined)} schemas defined from {SCHEMAS}"
    stubs = _stub_modules()
    saved = {name: sys.modules.get(name) for name in stubs}
    sys.modules.update(stubs)
    try:
        exec(compile(meta_source, META_RULES, "exec"), {"__name__": "torch_npu_meta_rules"})
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    yield stubs
    library._destroy()


def _no_fallback(op: str, reason: str, *args):
    raise AssertionError(f"{op} took the portable fallback ({reason}); these tests check the vendor call")


@pytest.fixture
def kernels(npu_ops, monkeypatch):
    """The backend's kernel modules imported with the meta-backed ``torch_npu``; the per-call
    portable fallback is disabled, so every test here reaches its vendor operator."""
    with installed_modules(npu_ops, backend="ascend"):
        from seahal.backends.ascend import attention, gemm, mhc, moe, quant, rope

        modules = types.SimpleNamespace(moe=moe, attention=attention, gemm=gemm, mhc=mhc, quant=quant, rope=rope)
        for module in vars(modules).values():
            if hasattr(module, "portable"):
                monkeypatch.setattr(module, "portable", _no_fallback)
        yield modules


def meta(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def assert_matches_contract(op: str, args: tuple, outputs) -> None:
    """The outputs on meta have exactly the shapes and dtypes the HAL contract promises."""
    want = get_spec(op).check(*args)
    want = (want,) if not isinstance(want, tuple) or hasattr(want, "shape") else want
    got = (outputs,) if isinstance(outputs, torch.Tensor) else tuple(outputs)
    assert [(tuple(t.shape), t.dtype) for t in got] == [(tuple(w.shape), w.dtype) for w in want]
    assert all(t.device.type == "meta" for t in got)


def test_moe_gate_score_and_hash_routing(kernels):
    x, weight, bias = meta(16, 64), meta(256, 64), meta(256, dtype=torch.float32)
    args = (x, weight, bias, 8, "sigmoid", 2.5, 8, 4, None, None)
    assert_matches_contract("moe_gate", args, kernels.moe.moe_gate(*args))
    ids, table = meta(16, dtype=torch.int64), meta(1000, 8, dtype=torch.int32)
    args = (x, weight, None, 8, "softmax", 1.0, 1, 1, ids, table)
    assert_matches_contract("moe_gate", args, kernels.moe.moe_gate(*args))


def test_moe_experts_dispatch_gemms_and_combine(kernels):
    x, weights, ids = meta(6, 64), meta(6, 2, dtype=torch.float32), meta(6, 2, dtype=torch.int32)
    w1, w3, w2 = meta(8, 32, 64), meta(8, 32, 64), meta(8, 64, 32)
    args = (x, weights, ids, w1, None, w3, None, w2, None, 10.0)
    assert_matches_contract("moe_experts", args, kernels.moe.moe_experts(*args))


def test_sparse_attention_with_sinks(kernels):
    q, kv, indices, sink = meta(2, 5, 4, 512), meta(2, 40, 512), meta(2, 5, 24, dtype=torch.int32), meta(4, dtype=torch.float32)
    args = (q, kv, indices, sink, 0.04)
    assert_matches_contract("sparse_attention", args, kernels.attention.sparse_attention(*args))


def test_sparse_attention_rotated_back_on_rotary_mul(kernels, monkeypatch):
    """The output's inverse RoPE on an A2 (interleaved npu_rotary_mul): V4's D = 512 with 64 rotated dims."""
    monkeypatch.setattr(kernels.attention.torch_npu, "npu", types.SimpleNamespace(get_soc_version=lambda: 220),
                        raising=False)
    q, kv, indices = meta(2, 5, 64, 512), meta(2, 40, 512), meta(2, 5, 24, dtype=torch.int32)
    rotation = (meta(2, 5, dtype=torch.int64), meta(32, dtype=torch.float32))
    args = (q, kv, indices, meta(64, dtype=torch.float32), 0.04, *rotation)
    assert_matches_contract("sparse_attention", args, kernels.attention.sparse_attention(*args))


def test_indexer_paged_keys(kernels):
    q, weights, keys = meta(2, 7, 64, 128), meta(2, 7, 64, dtype=torch.float32), meta(2, 300, 128)
    args = (q, weights, keys, 4, 1200, 512)
    assert_matches_contract("indexer_topk", args, kernels.attention.indexer_topk(*args))


def test_fp8_block_gemm_g_b_mode(kernels):
    e4m3 = torch.float8_e4m3fn
    a, a_scale = meta(32, 7168, dtype=e4m3), meta(32, 56, dtype=torch.float32)
    b, b_scale = meta(2048, 7168, dtype=e4m3), meta(16, 56, dtype=E8M0_HELD_DTYPE)
    for out_dtype in (None, torch.float32):
        args = (a, a_scale, b, b_scale, out_dtype)
        assert_matches_contract("fp8_gemm", args, kernels.gemm.fp8_gemm(*args))


def test_mhc_pre_sinkhorn_head_and_post(kernels):
    """V4-Flash geometry (n = 4 streams of D = 4096), 4-D [B, S, n, D] streams; hc_pre and hc_head
    without and with the folded RMSNorm weight (the portable norm after npu_mhc_pre), hc_post
    without and with an addend (npu_mhc_post on the sum); hc_post_pre (npu_mhc_post, then
    npu_mhc_pre -> npu_mhc_sinkhorn on its streams) without and with both."""
    f32 = torch.float32
    x = meta(2, 3, 4, 4096)
    for norm_weight in (None, meta(4096, dtype=f32)):
        args = (x, meta(24, 16384, dtype=f32), meta(24, dtype=f32), meta(3, dtype=f32), 20, 1e-6, 1e-6, norm_weight)
        assert_matches_contract("hc_pre", args, kernels.mhc.hc_pre(*args))
        args = (x, meta(4, 16384, dtype=f32), meta(4, dtype=f32), meta(1, dtype=f32), 1e-6, 1e-6, norm_weight)
        assert_matches_contract("hc_head", args, kernels.mhc.hc_head(*args))
    for addend in (None, meta(2, 3, 4096)):
        args = (meta(2, 3, 4096), x, meta(2, 3, 4, dtype=f32), meta(2, 3, 4, 4, dtype=f32), addend)
        assert_matches_contract("hc_post", args, kernels.mhc.hc_post(*args))
    for addend, norm_weight in ((None, None), (meta(2, 3, 4096), meta(4096, dtype=f32))):
        args = (meta(2, 3, 4096), x, meta(2, 3, 4, dtype=f32), meta(2, 3, 4, 4, dtype=f32), meta(24, 16384, dtype=f32),
                meta(24, dtype=f32), meta(3, dtype=f32), 20, 1e-6, 1e-6, norm_weight, addend)
        assert_matches_contract("hc_post_pre", args, kernels.mhc.hc_post_pre(*args))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rope_interleave_on_the_rope_dims(kernels, dtype):
    x, positions, freqs = meta(2, 5, 64, 512, dtype=dtype), meta(2, 5, dtype=torch.int64), meta(32, dtype=torch.float32)
    for inverse in (False, True):
        args = (x, positions, freqs, inverse)
        assert_matches_contract("rope", args, kernels.rope.rope(*args))


def test_fp8_act_quant_fp32_scales(kernels):
    for shape, block in (((4, 7, 7168), 128), ((16, 512), 64)):
        args = (meta(*shape), block, "fp32")
        assert_matches_contract("fp8_act_quant", args, kernels.quant.fp8_act_quant(*args))


def test_the_vendor_rules_reject_misuse(npu_ops):
    """The wheel's own validation runs: what the backend must never do fails here too."""
    x = meta(16, 256, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="input_ids and tid2eid must be both provided or both omitted"):
        torch.ops.npu.npu_moe_gating_top_k(x, 8, tid2eid=meta(100, 8, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="unexpected keyword|Unknown keyword"):
        torch.ops.npu.npu_moe_gating_top_k(x, 8, n_groups=8)
    e4m3 = torch.float8_e4m3fn
    with pytest.raises(RuntimeError):
        torch.ops.npu.npu_quant_matmul(
            meta(32, 7168, dtype=e4m3), meta(7168, 2048, dtype=e4m3), meta(56, 16, dtype=torch.float32),
            pertoken_scale=meta(32, 56, dtype=torch.float32), output_dtype=torch.bfloat16, group_sizes=[1, 64, 128],
        )
    with pytest.raises(RuntimeError, match="num_iters must be within"):
        torch.ops.npu.npu_mhc_sinkhorn(meta(2, 4, 4, dtype=torch.float32), num_iters=101)
    with pytest.raises(RuntimeError, match="Input alpha must have 3 or 2 elements"):
        torch.ops.npu.npu_mhc_pre(meta(2, 4, 512), meta(24, 2048, dtype=torch.float32), meta(1, dtype=torch.float32),
                                  meta(24, dtype=torch.float32))
