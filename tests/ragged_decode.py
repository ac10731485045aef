"""Stepping sequences at their own positions together: the check tests/test_decode_graph.py runs
on the CPU reference and on a GPU (captured), and tests/test_cuda_decode_graph.py through the cuda
backend's position-taking Triton kernels."""

from __future__ import annotations

import torch

from seahal.model.decode_graph import DecodeGraph

LENGTHS = (3, 9, 14)
"""Prompt lengths: each sequence's CSA/HCA blocks complete at other decode steps."""

TOLERANCE = {"dense": 1e-5, "fp8": 1e-3}
"""The largest error :func:`ragged_decode_errors` may give an fp32 model, by cache format, relative
to the logit scale. A batch of 3 sums the fp32 projections in other orders than a batch of 1 (other
GEMM shapes: ~1e-7 relative each); with a dense cache that stays below 1e-5 through 4 layers. An
FP8 cache rounds every KV vector to e4m3 codes, and a code whose value lies within that ~1e-7 of a
rounding midpoint may round the other way in one of the two runs: that element one e4m3 step (up to
2^-3 relative) off in every later step that reads the row. Such flips are rare and each moves the
logits little (one machine: three codes of one compressed entry, one step apart, by the third 4-token
step: 3e-5; another machine none: 2e-6), so 1e-3 bounds them; a sequence decoded one position off is
0.06 off, 60 times that. Both bounds are for dense linears: FP8 ones round their activations to e4m3
every call, and the same flips there move the logits by percents."""


def ragged_decode_errors(model, capture: bool, steps: int = 20, against: str = "alone", chunk: int = 1) -> list[float]:
    """Prompts of :data:`LENGTHS` tokens prefilled into rows of one cache, then ``steps`` steps of
    all three together at their own positions through a :class:`DecodeGraph` (captured if
    ``capture``), ``chunk`` tokens a sequence a step (1: decode; more: each prompt's next chunk,
    as a server batching prefill chunks of sequences at different positions does); per step, the
    largest error relative to the logit scale against ``against``:

    - ``"alone"``: each sequence decoded alone by the ordinary call (batch 1, its own cache): the
      semantics of per-sequence positions;
    - ``"eager"``: the same three-sequence step run eagerly (``capture=False``) on a cache of its
      own: what the capture alone changes, with the same batch, shapes and kernels.
    """
    device = model.device
    ids = torch.randint(0, 512, (3, 40), generator=torch.Generator().manual_seed(5)).to(device)
    cache = model.new_cache(3, 64)
    alone = [model.new_cache(1, 64) for _ in LENGTHS]
    eager_cache = model.new_cache(3, 64)
    for b, n in enumerate(LENGTHS):
        for target in (cache.rows(b, b + 1), alone[b] if against == "alone" else eager_cache.rows(b, b + 1)):
            model(ids[b : b + 1, :n], cache=target)
    graph = DecodeGraph(model, cache, capture=capture, positions=list(LENGTHS))
    eager = DecodeGraph(model, eager_cache, capture=False, positions=list(LENGTHS)) if against == "eager" else None
    errors = []
    assert max(LENGTHS) + steps * chunk <= ids.shape[1]
    for step in range(steps):
        spans = [(n + step * chunk, n + (step + 1) * chunk) for n in LENGTHS]
        tokens = torch.stack([ids[b, start:stop] for b, (start, stop) in enumerate(spans)])
        together = graph.step(tokens).clone()
        if eager is not None:
            expected = eager.step(tokens)
        else:
            expected = torch.cat([
                model(ids[b : b + 1, start:stop], cache=alone[b], last_only=True) for b, (start, stop) in enumerate(spans)
            ])
        errors.append(((together - expected).abs().amax(dim=(1, 2)) / expected.abs().amax(dim=(1, 2))).max().item())
    assert graph.positions == [n + steps * chunk for n in LENGTHS]
    return errors
