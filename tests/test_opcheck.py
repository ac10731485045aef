"""Every cpu kernel is a well-formed torch.library op (schema, fake = contract, mutation
annotations), and code calling plan ops compiles with torch.compile(fullgraph=True) and exports
with torch.export, giving the eager results."""

from __future__ import annotations

import pytest
import torch

from seahal import hal
from seahal.hal.plan import BoundOp
from seahal.hal.registry import REGISTRY
from seahal.testing.examples import example_args, fp8_block_quantize

CPU_KERNELS = [(op, k) for op in hal.specs() for k in REGISTRY.kernels_for(op) if k.backend == "cpu"]

FLOAT8 = tuple(getattr(torch, name) for name in ("float8_e4m3fn", "float8_e8m0fnu") if hasattr(torch, name))


def _has_float8(args: tuple) -> bool:
    return any(isinstance(a, torch.Tensor) and a.dtype in FLOAT8 for a in args)


@pytest.mark.parametrize("op, kernel", CPU_KERNELS, ids=[f"{op}-{k.name}" for op, k in CPU_KERNELS])
def test_opcheck(op, kernel):
    args, kwargs = example_args(op)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    if _has_float8(args):
        # torch's SchemaCheckMode compares inputs before/after each aten call with allclose, which has
        # no float8 CPU kernel (pytorch/pytorch#135998); the other checks handle float8.
        utils = utils[1:]
    torch.library.opcheck(BoundOp(hal.get_spec(op), kernel).torch_op, args, kwargs, test_utils=utils)


class AttendAndProject(torch.nn.Module):
    """rope -> sparse_attention -> fp8_act_quant -> fp8_gemm, every op through one plan."""

    def __init__(self, plan: hal.Plan, weight: torch.Tensor):
        super().__init__()
        self.plan = plan
        self.ops = plan.ops
        w, w_scale = fp8_block_quantize(weight)
        self.register_buffer("w", w)
        self.register_buffer("w_scale", w_scale)

    def forward(self, q, positions, freqs, kv, indices, sink):
        q = self.ops.rope(q, positions, freqs)
        o = self.ops.sparse_attention(q, kv, indices, sink, q.shape[-1] ** -0.5)
        x, x_scale = self.ops.fp8_act_quant(o.flatten(2).flatten(0, 1))  # [B*S, H*D] = [6, 128]
        return self.ops.fp8_gemm(x, x_scale, self.w, self.w_scale, torch.float32)


def _model_inputs():
    (q, kv, indices, sink, _), _ = example_args("sparse_attention", seed=1)  # H*D = 4*16; widen H to 8
    q = torch.cat((q, q.flip(-1)), dim=2)
    (_, positions, freqs), _ = example_args("rope", seed=1)
    return q, positions, freqs, kv, indices, torch.cat((sink, sink))


@pytest.fixture(scope="module")
def model():
    p = hal.plan("cpu", ops=["rope", "sparse_attention", "fp8_act_quant", "fp8_gemm"], announce=False, environ={})
    return AttendAndProject(p, torch.randn(130, 128, generator=torch.Generator().manual_seed(2)) * 0.1)


def test_compile_fullgraph_matches_eager(model):
    inputs = _model_inputs()
    eager = model(*inputs)
    assert eager.shape == (6, 130) and eager.dtype == torch.float32
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    # the same kernels run in the same order: bitwise equal
    torch.testing.assert_close(compiled(*inputs), eager, rtol=0, atol=0)


def test_export_matches_eager(model):
    inputs = _model_inputs()
    exported = torch.export.export(model, inputs)
    called = [str(n.target) for n in exported.graph.nodes if n.op == "call_function"]
    # the plan's kernels appear as opaque ops, in call order (reshapes may sit between them)
    bound = [str(model.plan[op].torch_op) for op in ("rope", "sparse_attention", "fp8_act_quant", "fp8_gemm")]
    assert [name for name in called if name.startswith("seahal.")] == bound
    torch.testing.assert_close(exported.module()(*inputs), model(*inputs), rtol=0, atol=0)
