"""One decode step with the positions as data, captured once as a CUDA graph and replayed per token;
and the same for a step of several tokens a sequence (a prefill chunk).

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

A step of S > 1 tokens a sequence (every sequence S) is the same position-generic forward, the
prompt's chunk attending over the cache before it and within itself: a prefill whose graph replays
in the kernels' time. A prefill launches ~260 kernels (4-layer V4-Flash, 1k tokens), and on the
H100 at d2669c9 its host took longer to issue them (bf16: 18.9 ms) than the GPU to run them (14.1
ms). Each step length S gets its own graphs (one per bucket), captured at its first use.

Capture needs a plan whose kernels keep the position on the device (``Plan.host_position_ops``
empty) and no host synchronisation anywhere in the step; off a GPU (or with ``capture=False``)
the same step runs eagerly, which is how the CPU tests check it against the ordinary forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from .cache import Cache

if TYPE_CHECKING:
    from .transformer import Transformer


class DecodeGraph:
    """Steps of ``model`` over ``cache``'s B sequences, one graph per context bucket and step length.

    ``step(tokens [B, S] int64) -> logits [B, 1, vocab] fp32`` consumes S tokens per sequence (1:
    decode; more: a prefill chunk) and advances each sequence by S, like ``model(tokens,
    cache=cache, last_only=True)``. The sequences are at
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
        self.batch = batch
        self.tokens: dict[int, torch.Tensor] = {}
        """The step's input buffer [B, S] for each step length S a step has taken."""
        self.position = torch.tensor(self.positions, dtype=torch.long, device=device)
        """The positions as the step reads them; the step itself advances them (no host write per step)."""
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        """Captured steps by (bucket, step length): the graph and its logits buffer."""
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
        """tokens: [B, S] int64 on the model's device -> logits [B, 1, vocab] fp32 of each
        sequence's last token (the output buffer)."""
        if tokens.dim() != 2 or tokens.shape[0] != self.batch or tokens.shape[1] == 0:
            raise ValueError(f"tokens must be [{self.batch}, S] with S >= 1, got {list(tokens.shape)}")
        n = tokens.shape[1]
        reach = max(self.positions) + n
        if reach > self.cache.capacity:
            raise RuntimeError(
                f"cache holds {self.cache.capacity} tokens; a sequence at {max(self.positions)} cannot take {n} more")
        if n not in self.tokens:
            self.tokens[n] = torch.zeros((self.batch, n), dtype=torch.long, device=self.position.device)
        self.tokens[n].copy_(tokens)
        extent = self.bucket(reach)
        if not self.captured:
            logits = self._forward(self.cache.truncated(extent), self.position, self.tokens[n])
        else:
            if (extent, n) not in self.graphs:
                self.graphs[extent, n] = self._capture(self.cache.truncated(extent), self.tokens[n])
            graph, logits = self.graphs[extent, n]
            graph.replay()
        self._advance(n)
        return logits

    def _forward(self, cache: Cache, position: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The step of ``tokens`` over ``cache``'s tensors at ``position`` [B], which it then advances."""
        traced = cache.with_tensors(cache.named_tensors(), position)
        logits = self.model(tokens, cache=traced, last_only=True)
        position.add_(tokens.shape[1])
        return logits

    def _capture(self, view: Cache, tokens: torch.Tensor) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Warm up on a scratch copy of ``view`` (same strides: Triton compiles the variants the
        graph launches, cuBLAS picks its algorithms; the real cache must not see the warm-up's
        writes), then record one step over ``view`` itself."""
        scratch = view.with_tensors({k: _same_layout_copy(t) for k, t in view.named_tensors().items()}, view.pos)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._forward(scratch, self.position.clone(), tokens)
        torch.cuda.current_stream().wait_stream(side)
        del scratch
        graph = torch.cuda.CUDAGraph()
        # captured on the warm-up's stream: per-stream workspaces the kernels made there (the
        # split-K and last-program arrival counters) are the ones the graph then replays on
        with torch.cuda.graph(graph, pool=self.pool, stream=side):
            logits = self._forward(view, self.position, tokens)
        return graph, logits

    def restart(self, positions: Sequence[int] | None = None) -> None:
        """Serve new prompts from this cache and its captured graphs: each sequence's position is
        0 (a new prompt in its rows) or where it stands (it goes on); default: every one at 0.
        Nothing is cleared: a step reads no key row, compressed entry or compressor state at or past
        its sequence's position (each is masked by position, or written before it is read).

        Not a rewind: the window ring and the compressors' partial blocks hold only a sequence's
        latest tokens, so a step from an earlier position of its own would read rows its later
        tokens overwrote (and skipping ahead, rows never written); such positions are refused. A
        new prompt of its own length in one row: :meth:`prefill`."""
        positions = [0] * self.batch if positions is None else list(positions)
        if len(positions) != self.batch or min(positions) < 0 or max(positions) > self.cache.capacity:
            raise ValueError(f"positions must be {self.batch} ints in [0, {self.cache.capacity}], got {positions}")
        moved = [i for i, (new, now) in enumerate(zip(positions, self.positions)) if new not in (0, now)]
        if moved:
            raise ValueError(
                f"restart takes each sequence to 0 (a new prompt) or leaves it where it stands ({self.positions}), "
                f"got {positions}: sequence(s) {moved} cannot go to another position, since its window ring and "
                "compressor states hold only its latest tokens"
            )
        self.positions = positions
        self.position.copy_(torch.tensor(positions, dtype=torch.long))
        self._publish()

    def prefill(self, row: int, tokens: torch.Tensor) -> torch.Tensor:
        """A new prompt in sequence ``row``: ``tokens`` [1, n] run from position 0 by the model's
        ordinary forward over that row's cache (:meth:`Cache.rows`, eager), after which the row
        decodes from position n in the captured steps with the others, which keep their positions
        and rows. Returns the prompt's last logits [1, 1, vocab] fp32.

        What a server needs when a sequence ends and the next prompt has a length of its own:
        :meth:`restart` to 0 and :meth:`step` would prefill every row by the same S tokens. As with
        restart, nothing is cleared (a row's rows at or past its position are never read)."""
        if not 0 <= row < self.batch:
            raise ValueError(f"row must be in [0, {self.batch}), got {row}")
        if tokens.dim() != 2 or tokens.shape[0] != 1 or not 0 < tokens.shape[1] <= self.cache.capacity:
            raise ValueError(f"tokens must be [1, n] with 1 <= n <= {self.cache.capacity}, got {list(tokens.shape)}")
        logits = self.model(tokens.to(self.position.device), cache=self.cache.rows(row, row + 1), last_only=True)
        self.positions[row] = tokens.shape[1]
        self.position[row] = tokens.shape[1]
        self._publish()
        return logits

    def _advance(self, n: int) -> None:
        """The host's view after a step: every sequence ``n`` tokens further."""
        self.positions = [p + n for p in self.positions]
        self._publish()

    def _publish(self) -> None:
        """The cache's position and compressed-entry counts (``pos // m``), while the sequences are
        all at one position."""
        if len(set(self.positions)) == 1:
            pos = self.positions[0]
            self.cache.pos = pos
            for lc, ratio in zip(self.cache.layers, self.model.config.compress_ratios):
                if ratio:
                    lc.n_compressed = pos // ratio


def _same_layout_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` with its strides (a view into a larger store keeps that store's row pitch)."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).copy_(t)
