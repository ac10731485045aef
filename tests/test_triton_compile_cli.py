"""``python -m seahal.testing.triton_compile -c CODE``: the sm_90 resources and SASS counts of the
launches some code makes, without a GPU (the figures TUNING.md quotes for kernels not yet run)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from seahal.testing.triton_interpreter import require_triton

ROUTING = """from seahal.backends.cuda import moe_gate
logits, bias = torch.empty(1, 16384, 256, device='cuda'), torch.empty(256, device='cuda')
moe_gate.route(logits, bias, 6)
moe_gate.route(logits, bias, 6, route_warps=1)"""


def _run(code: str, interpret: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | ({"TRITON_INTERPRET": "1"} if interpret else {})
    return subprocess.run([sys.executable, "-m", "seahal.testing.triton_compile", "-c", code],
                          capture_output=True, text=True, env=env, timeout=600, check=False)


@pytest.fixture
def toolchain():
    require_triton()
    from seahal.testing.triton_compile import toolchain_missing

    missing = toolchain_missing()
    if missing:
        pytest.skip(f"cannot compile for sm_90 here: {missing}")


def test_the_routing_kernel_on_one_warp_has_no_block_barriers_in_its_top_k(toolchain):
    done = _run(ROUTING)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in done.stdout.splitlines() if line.startswith("| _route_kernel")]
    assert len(rows) == 2, done.stdout
    (four, one) = ({k: v.strip() for k, v in zip(("launch", "registers", "shared", "resident", "instructions",
                                                  "barriers", "loop", "loop_barriers"), row)} for row in rows)
    assert "num_warps=4" in four["launch"] and "num_warps=1" in one["launch"]
    # four warps reduce each top-k round through shared memory; one warp keeps a token's row
    assert int(four["barriers"]) >= 6 * 2 and int(one["barriers"]) <= 1
    # per token (blocks of 4 tokens): one warp's instructions against four warps'
    assert int(one["instructions"]) < 4 * int(four["instructions"])


def test_no_launch_and_the_interpreter_are_reported(toolchain):
    assert _run("x = 1").stdout.strip() == "the code made no Triton launch"
    done = _run(ROUTING, interpret=True)
    assert done.returncode == 2 and "TRITON_INTERPRET=1 is set" in done.stderr
