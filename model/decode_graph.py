"""One decode step with the positions as data, captured once as a CUDA graph and replayed per token.

A decode step pays a launch for every kernel of every layer (about 30 per layer), which at batch 1
costs more than the kernels themselves. A CUDA graph replays them all with one launch, but it
replays the arguments of capture time, so the step must not depend on the positions through a
host value. Here it does not: the step reads its tokens and positions (one per sequence, so
sequences of different lengths decode together) from device buffers and advances the positions
itself, runs the model over the cache as :class:`seahal.model.cache.TracedLayerCache` sees it
(every compressed row offered to attention and the indexer, masked by position; each new entry
scattered into its row), and the position-dependent HAL ops take the positions as a [B] device
tensor (:attr:`seahal.hal.OpSpec.position`). The cache tensors are the graph's: a replay updates the
caller's cache in place, and :meth:`DecodeGraph.step` advances the host's bookkeeping.

Cost of position-generic work: each layer scores and attends over every compressed row of the
step's bucket (masked), not only the valid ones; buckets double from ``min_bucket`` positions, so
that is at most twice the rows the longest sequence has (or ``min_bucket``'s).

Capture needs a plan whose kernels keep the position on the device (``Plan.host_position_ops``
empty) and no host synchronisation anywhere in the step; off a GPU (or with ``capture=False``)
the same step runs eagerly, which is how the CPU tests check it against the ordinary decode.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from .cache import Cache

if TYPE_CHECKING:
    from .transformer import Transformer


class DecodeGraph:
    """Decode steps of ``model`` over ``cache``'s B sequences, one graph per context bucket.

    ``step(tokens [B, 1] int64) -> logits [B, 1, vocab] fp32`` consumes one token per sequence
    and advances it, like ``model(tokens, cache=cache, last_only=True)``. The sequences are at
    ``positions`` (one per sequence, e.g. prompts of different lengths prefilled into
    :meth:`Cache.rows`), by default all at ``cache.pos``; the cache's own ``pos`` follows only
    while they are all equal, :attr:`positions` always. The logits tensor is the graph's output
    buffer, overwritten by the next step: copy what you keep. ``capture``: None captures on CUDA
    only; True requires it (and raises if the plan cannot).

    A step runs over :meth:`Cache.truncated` to its *bucket*, the smallest of ``min_bucket * 2^i``
    (and the capacity) above every sequence's position: its work follows the context served,
    within 2x, not the capacity. Each bucket's graph is captured the first time a step needs it
    (a capture costs two warm-up steps on a scratch copy and the recording), all of them in one
    memory pool.
    """

    def __init__(
        self, model: Transformer, cache: Cache, capture: bool | None = None, positions: Sequence[int] | None = None,
        min_bucket: int = 1024,
    ):
        device = model.device
        if capture is None:
            capture = self.capturable(model)
        if capture and device.type != "cuda":
            raise ValueError(f"capture=True needs a CUDA model, got one on {device}")
        if capture and model.plan.host_position_ops:
            raise ValueError(
                "these ops' kernels read the position on the host, which a CUDA graph cannot capture: "
                f"{', '.join(model.plan.host_position_ops)}"
            )
        if min_bucket <= 0:
            raise ValueError(f"min_bucket must be positive, got {min_bucket}")
        self.model, self.cache, self.captured, self.min_bucket = model, cache, capture, min_bucket
        batch = cache.layers[0].kv.data.shape[0] if cache.layers else 1
        self.positions = [cache.pos] * batch if positions is None else list(positions)
        """Each sequence's position: tokens it holds."""
        if len(self.positions) != batch:
            raise ValueError(f"positions must give one position per sequence ({batch}), got {len(self.positions)}")
        self.tokens = torch.zeros((batch, 1), dtype=torch.long, device=device)
        self.position = torch.tensor(self.positions, dtype=torch.long, device=device)
        """The positions as the step reads them; the step itself advances them (no host write per step)."""
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        """Captured steps by bucket: the graph and its logits buffer."""
        self.pool = torch.cuda.graph_pool_handle() if capture else None

    @staticmethod
    def capturable(model: Transformer) -> bool:
        """Whether decode steps of ``model`` can be captured: on CUDA, every position-taking op's
        kernel keeping the position on the device."""
        return model.device.type == "cuda" and not model.plan.host_position_ops

    def bucket(self, tokens: int) -> int:
        """The cache extent a step reaching ``tokens`` positions runs over: the smallest
        ``min_bucket * 2^i`` holding them, at most the capacity."""
        extent = min(self.min_bucket, self.cache.capacity)
        while extent < tokens:
            extent = min(2 * extent, self.cache.capacity)
        return extent

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: [B, 1] int64 on the model's device -> logits [B, 1, vocab] fp32 (the output buffer)."""
        if tokens.shape != self.tokens.shape:
            raise ValueError(f"tokens must be {list(self.tokens.shape)}, got {list(tokens.shape)}")
        reach = max(self.positions) + 1
        if reach > self.cache.capacity:
            raise RuntimeError(f"cache holds {self.cache.capacity} tokens; a sequence is at {max(self.positions)}")
        self.tokens.copy_(tokens)
        extent = self.bucket(reach)
        if not self.captured:
            logits = self._forward(self.cache.truncated(extent), self.position)
        else:
            if extent not in self.graphs:
                self.graphs[extent] = self._capture(self.cache.truncated(extent))
            graph, logits = self.graphs[extent]
            graph.replay()
        self._advance()
        return logits

    def _forward(self, cache: Cache, position: torch.Tensor) -> torch.Tensor:
        """The step over ``cache``'s tensors at ``position`` [B], which it then advances."""
        traced = cache.with_tensors(cache.named_tensors(), position)
        logits = self.model(self.tokens, cache=traced, last_only=True)
        position.add_(1)
        return logits

    def _capture(self, view: Cache) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Warm up on a scratch copy of ``view`` (same strides: Triton compiles the variants the
        graph launches, cuBLAS picks its algorithms; the real cache must not see the warm-up's
        writes), then record one step over ``view`` itself."""
        scratch = view.with_tensors({k: _same_layout_copy(t) for k, t in view.named_tensors().items()}, view.pos)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward(scratch, self.position.clone())
        torch.cuda.current_stream().wait_stream(side)
        del scratch
        graph = torch.cuda.CUDAGraph()
        # captured on the warm-up's stream: per-stream workspaces the kernels made there (the
        # split-K and last-program arrival counters) are the ones the graph then replays on
        with torch.cuda.graph(graph, pool=self.pool, stream=side):
            logits = self._forward(view, self.position)
        return graph, logits

    def _advance(self) -> None:
        """The host's view after a step: every sequence one token further; the cache's position and
        compressed-entry counts (``pos // m``) while the sequences are all at one position."""
        self.positions = [p + 1 for p in self.positions]
        if len(set(self.positions)) == 1:
            pos = self.positions[0]
            self.cache.pos = pos
            for lc, ratio in zip(self.cache.layers, self.model.config.compress_ratios):
                if ratio:
                    lc.n_compressed = pos // ratio


def _same_layout_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` with its strides (a view into a larger store keeps that store's row pitch)."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).copy_(t)
