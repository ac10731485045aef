"""The experts tuner sweeps the expert calls the end-to-end bench's prefill makes.

``python -m seahal.bench.cuda_moe_experts --tune`` times launch configs per table key (weight
format, routed rows rounded up to a power of two, I, D); its end-to-end rows
(:func:`seahal.bench.cuda_moe_experts.end_to_end_rows`) exist so that the configs it commits serve
``seahal bench --ops model``'s prefill. Here that model (the 4-layer V4-Flash, 64 experts, FP4
routed and FP8 shared experts) prefills 1k and 4k tokens on meta tensors posing as an H100 (as in
tests/test_decode_census.py), and every key its ``moe_experts`` launches look up is recorded. Runs in
a child process: the plan must see the posing CUDA device from its first probe.

    python tests/test_experts_tuning_rows.py     # prints the looked-up keys as JSON
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from unittest import mock

from seahal.testing.triton_interpreter import require_triton


def prefill_lookups(context: int) -> list[tuple[str, int, int, int]]:
    """The (format, rows class, I, D) keys the model bench's prefill of ``context`` tokens looks up."""
    from seahal.backends.cuda import moe_experts

    from seahal.testing.model_on_meta import model_steps
    from seahal.testing.triton_compile import RunKernelFunctions, capture_launches

    keys = []
    select = moe_experts.select_experts_config

    def recording(rows, weight_format, inter, dim, device):
        keys.append((weight_format, moe_experts.rows_class(rows), inter, dim))
        return select(rows, weight_format, inter, dim, device)

    with capture_launches(), mock.patch.object(moe_experts, "select_experts_config", recording):
        phase, run = next(iter(model_steps("release", context, 4)))
        assert phase == "prefill"
        with RunKernelFunctions():  # the kernels' functions, not the ops' fakes
            run()
    return sorted(set(keys))


def test_the_tuner_sweeps_the_end_to_end_prefill_s_expert_calls():
    require_triton()
    import torch
    from seahal.backends.cuda.moe_experts import rows_class

    from seahal.bench import cuda_moe_experts as bench
    from seahal.bench.model_e2e import scale

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    looked_up = {tuple(key) for key in json.loads(done.stdout.splitlines()[-1])}
    cuda = torch.device("cuda")

    def key(dims, fmt, tokens):
        return fmt, rows_class(tokens * dims.top_k), dims.inter, dims.dim

    rows = bench.end_to_end_rows(cuda)
    assert {tokens for _, _, _, tokens in rows} == set(scale(cuda, quick=False).contexts) == {1024, 4096}
    tuned = {key(dims, fmt, tokens) for dims, fmt, _, tokens in rows}
    assert tuned == looked_up  # the shared expert (fp8, every token) and the routed ones (fp4, 64 experts)
    swept = bench._tuned_rows(cuda, quick=True, tokens_only=None, model="V4-Flash")
    assert swept[:len(rows)] == rows  # swept first: a step cut at its limit keeps them
    benched = {key(dims, fmt, tokens) for dims, fmt, _, tokens in bench._rows(cuda, quick=False)}
    assert not tuned & benched  # no bench row reaches these table entries
    assert bench.end_to_end_rows(torch.device("cpu")) == []


if __name__ == "__main__":
    print(json.dumps(sorted({key for context in (1024, 4096) for key in prefill_lookups(context)})))
