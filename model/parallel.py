"""Tensor and expert parallelism over ``torch.distributed``: who holds what, and the collectives.

    torchrun --nproc-per-node 4 -m seahal run --model PATH --tp 2 --ep 2

The ``tp * ep`` ranks form a grid of ``ep`` rows of ``tp`` ranks, ``rank = ep_rank * tp + tp_rank``
(tp innermost, so a TP group is consecutive ranks: normally one node's fast links). A *TP group*
is one row (same ep_rank), an *EP group* one column (same tp_rank).

What is split (see docs/scale-out.md for the reasoning):

- attention: query heads (``wq_b`` rows, ``attn_sink``) and output groups (``wo_a`` rows, ``wo_b``
  columns) over the TP group; ``wo_b``'s partial sums are all-reduced. The single shared KV
  projection, the compressors and the indexer are replicated: every head needs all of their
  output, they cost one head's worth of work, and computing them on each rank replaces a
  broadcast per layer (and keeps the indexer's top-k identical on every rank).
- MoE: routed experts over the EP group (``E / ep`` consecutive experts per rank) and every
  expert's intermediate dimension over the TP group (``w1``/``w3`` rows, ``w2`` columns); the
  shared expert's intermediate dimension over the TP group. Tokens reach the experts by
  all-to-all (large batches) or by gathering every token on every rank (small batches).
- embedding and output head: vocabulary-parallel over the TP group.
- mHC, norms, router: replicated (small).
- ``dp_attention``: each TP group (grid row) runs attention, mHC and the head on its own share
  of the batch (and keeps only that share's cache); the MoE is the only layer that mixes rows.

With ``tp = ep = 1`` (one process) every collective returns its input untouched.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from seahal.hal import resolve_device

from .config import ModelConfig

MOE_COMMS = ("auto", "all_to_all", "gather")

# torch 2.13 renamed the fused collectives; older releases (the CUDA stack is verified with 2.11)
# only have the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _collective_output(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """An empty tensor like ``x`` of ``shape`` for a collective to write: never an inference
    tensor, even under the forward's inference mode, as gloo in torch 2.5 writes gathered rows
    from its own thread, outside that mode, where writing an inference tensor raises."""
    with torch.inference_mode(False):
        return x.new_empty(shape)


@dataclass(frozen=True)
class ParallelConfig:
    """How to split the model over ``tp * ep`` processes."""

    tp: int = 1
    """Tensor-parallel size: attention heads, expert/shared intermediate dims, vocabulary."""
    ep: int = 1
    """Expert-parallel size: routed experts."""
    dp_attention: bool = False
    """Each TP group runs the dense layers on its own share of the batch (needs batch >= ep)."""
    moe_comm: str = "auto"
    """``"all_to_all"``: dispatch tokens to the experts' ranks and back; ``"gather"``: every rank
    sees every token and the partial sums are reduced; ``"auto"``: all-to-all from
    ``a2a_min_tokens`` tokens per MoE call on, gather below (latency beats volume there)."""
    a2a_min_tokens: int = 256

    def __post_init__(self) -> None:
        if self.tp < 1 or self.ep < 1:
            raise ValueError(f"tp and ep must be >= 1, got tp={self.tp}, ep={self.ep}")
        if self.moe_comm not in MOE_COMMS:
            raise ValueError(f"moe_comm must be one of {MOE_COMMS}, got {self.moe_comm!r}")

    @property
    def world(self) -> int:
        return self.tp * self.ep

    def check(self, config: ModelConfig) -> None:
        """Raise ValueError listing every dimension that tp / ep do not divide."""
        problems = [
            f"{name}={value} is not a multiple of {by}={size}"
            for name, value, by, size in (
                ("n_heads", config.n_heads, "tp", self.tp),
                ("o_groups", config.o_groups, "tp", self.tp),
                ("vocab_size", config.vocab_size, "tp", self.tp),
                ("moe_inter_dim", config.moe_inter_dim, "tp", self.tp),
                ("n_routed_experts", config.n_routed_experts, "ep", self.ep),
            )
            if value % size
        ]
        if problems:
            raise ValueError(f"cannot split this model with tp={self.tp}, ep={self.ep}: " + "; ".join(problems))


@dataclass(frozen=True)
class TokenLayout:
    """Where one forward's tokens sit across the EP group: ``counts[j]`` tokens on EP rank j,
    the same tokens on every rank (``distinct`` False) or each rank its own (dp_attention)."""

    counts: tuple[int, ...]
    distinct: bool

    @property
    def total(self) -> int:
        """Distinct tokens in the group."""
        return sum(self.counts) if self.distinct else self.counts[0]


def split_sizes(n: int, parts: int) -> list[int]:
    """Sizes of ``torch.tensor_split(range(n), parts)``: the first ``n % parts`` get one more."""
    return [n // parts + (i < n % parts) for i in range(parts)]


def pad_rows(x: torch.Tensor, rows: int, value: float = 0) -> torch.Tensor:
    """x: [n, ...] -> [rows, ...], the new rows filled with ``value`` (n <= rows)."""
    if x.shape[0] == rows:
        return x
    pad = x.new_full((rows - x.shape[0], *x.shape[1:]), value)
    return torch.cat((x, pad))


class Parallel:
    """This process's place in the grid, its process groups, and the collectives the model uses.

    Collectives on a group of one return their input; a ``Parallel`` made without process groups
    (``Parallel(config, rank)``) can place and load weights but not run a forward over > 1 rank.
    """

    def __init__(
        self,
        config: ParallelConfig,
        rank: int = 0,
        device: torch.device | None = None,
        tp_group: dist.ProcessGroup | None = None,
        ep_group: dist.ProcessGroup | None = None,
    ):
        if not 0 <= rank < config.world:
            raise ValueError(f"rank must be in [0, tp*ep={config.world}), got {rank}")
        self.config, self.rank, self.device = config, rank, device
        self.tp, self.ep = config.tp, config.ep
        self.tp_rank, self.ep_rank = rank % config.tp, rank // config.tp
        self._tp_group, self._ep_group = tp_group, ep_group

    @property
    def world(self) -> int:
        return self.config.world

    @property
    def distributed(self) -> bool:
        """Whether this placement came with process groups (``init_parallel``)."""
        return self._tp_group is not None

    def __repr__(self) -> str:
        return f"Parallel(rank {self.rank}/{self.world}: tp {self.tp_rank}/{self.tp}, ep {self.ep_rank}/{self.ep})"

    # -- placement ----------------------------------------------------------------------------
    def tp_range(self, n: int) -> tuple[int, int]:
        """This rank's ``[start, end)`` of n items split evenly over the TP group."""
        return _share(n, self.tp, self.tp_rank, "tp")

    def ep_range(self, n: int) -> tuple[int, int]:
        """This rank's ``[start, end)`` of n items split evenly over the EP group."""
        return _share(n, self.ep, self.ep_rank, "ep")

    def batch_sizes(self, batch: int) -> list[int]:
        """Sequences each EP rank's TP group runs under dp_attention."""
        if batch < self.ep:
            raise ValueError(
                f"dp_attention splits each batch over the ep={self.ep} rows of ranks: batch {batch} < {self.ep}"
            )
        return split_sizes(batch, self.ep)

    def local_batch_size(self, batch: int) -> int:
        """Sequences this rank runs attention on (all of them unless dp_attention)."""
        return self.batch_sizes(batch)[self.ep_rank] if self.config.dp_attention else batch

    def local_batch(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, ...] -> this rank's sequences (all of them unless dp_attention)."""
        if not self.config.dp_attention:
            return x
        sizes = self.batch_sizes(x.shape[0])
        start = sum(sizes[: self.ep_rank])
        return x[start : start + sizes[self.ep_rank]]

    def token_layout(self, batch: int, seq: int) -> TokenLayout:
        if self.config.dp_attention:
            return TokenLayout(tuple(b * seq for b in self.batch_sizes(batch)), True)
        return TokenLayout((batch * seq,) * self.ep, False)

    def use_all_to_all(self, layout: TokenLayout) -> bool:
        """The MoE's choice of token exchange; the same on every rank (``layout`` is global)."""
        comm = self.config.moe_comm
        return comm == "all_to_all" or (comm == "auto" and layout.total >= self.config.a2a_min_tokens)

    # -- collectives --------------------------------------------------------------------------
    def _group(self, which: str) -> dist.ProcessGroup:
        group = self._tp_group if which == "tp" else self._ep_group
        if group is None:
            raise RuntimeError(f"{self!r} has no process groups: use init_parallel() to run a forward over ranks")
        return group

    def tp_all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of x over the TP group (partial sums of split heads, groups or columns)."""
        if self.tp > 1:
            dist.all_reduce(x, group=self._group("tp"))
        return x

    def tp_all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """The TP group's x concatenated along ``dim`` in rank order (vocabulary-parallel logits)."""
        if self.tp == 1:
            return x
        out = _collective_output(x, (self.tp * x.shape[0], *x.shape[1:]))
        _all_gather_single(out, x.contiguous(), group=self._group("tp"))
        return torch.cat(out.chunk(self.tp), dim=dim)

    def ep_all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.ep > 1:
            dist.all_reduce(x, group=self._group("ep"))
        return x

    def ep_all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """x: [n, ...] on each EP rank -> [ep * n, ...] in rank order."""
        if self.ep == 1:
            return x
        out = _collective_output(x, (self.ep * x.shape[0], *x.shape[1:]))
        _all_gather_single(out, x.contiguous(), group=self._group("ep"))
        return out

    def ep_reduce_scatter(self, x: torch.Tensor) -> torch.Tensor:
        """x: [ep * n, ...] -> rows ``[ep_rank * n, (ep_rank + 1) * n)`` of the EP group's sum."""
        if self.ep == 1:
            return x
        out = _collective_output(x, (x.shape[0] // self.ep, *x.shape[1:]))
        _reduce_scatter_single(out, x.contiguous(), group=self._group("ep"))
        return out

    def ep_gather_rows(self, x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Concatenate the EP group's x of ``sizes[j]`` rows each (uneven: padded, then trimmed)."""
        if self.ep == 1:
            return x
        rows = max(sizes)
        chunks = self.ep_all_gather(pad_rows(x, rows)).split(rows)
        return torch.cat([chunk[:n] for chunk, n in zip(chunks, sizes)])

    def ep_all_to_all(self, x: torch.Tensor, send: list[int], recv: list[int]) -> torch.Tensor:
        """Send ``x[sum(send[:j]) : sum(send[:j+1])]`` to EP rank j; receive ``recv[j]`` rows from it."""
        out = _collective_output(x, (sum(recv), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv, send, group=self._group("ep"))
        return out

    def ep_exchange_counts(self, send: torch.Tensor) -> torch.Tensor:
        """send: [ep] rows for each EP rank -> [ep] rows each EP rank will send here."""
        recv = _collective_output(send, send.shape)
        dist.all_to_all_single(recv, send, group=self._group("ep"))
        return recv

    def gather_batch(self, x: torch.Tensor, batch: int) -> torch.Tensor:
        """Under dp_attention, this TP group's sequences [b, ...] -> the whole batch [B, ...]."""
        if not self.config.dp_attention:
            return x
        return self.ep_gather_rows(x, self.batch_sizes(batch))


def _share(n: int, parts: int, index: int, name: str) -> tuple[int, int]:
    if n % parts:
        raise ValueError(f"{n} items cannot be split evenly over {name}={parts}")
    size = n // parts
    return index * size, (index + 1) * size


SINGLE_PROCESS = Parallel(ParallelConfig())
"""The placement of an ordinary one-process model: everything local, no collectives."""


def init_parallel(config: ParallelConfig, device: str | torch.device = "auto") -> Parallel:
    """Join (or start) the process group of a ``tp * ep`` run and make this rank's placement.

    The collective backend is the device backend's ``collective_backend`` (nccl on cuda, hccl on
    ascend, cncl on cambricon, gloo on cpu). Under ``torchrun`` the process group comes from its
    environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...); without it, a world of one is
    created in-process. An accelerator device without an index becomes ``LOCAL_RANK``'s device.
    """
    torch_device, backend = resolve_device(device)
    if backend.collective_backend is None:
        raise RuntimeError(
            f"backend {backend.name!r} declares no collective_backend: it cannot run a model split over processes"
        )
    if torch_device.type != "cpu" and torch_device.index is None:
        torch_device = torch.device(torch_device.type, int(os.environ.get("LOCAL_RANK", 0)))
    device_module = getattr(torch, torch_device.type, None)
    if torch_device.index is not None and hasattr(device_module, "set_device"):
        device_module.set_device(torch_device)
    if not dist.is_initialized():
        if "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend.collective_backend)
        elif config.world == 1:
            dist.init_process_group(backend.collective_backend, store=dist.HashStore(), rank=0, world_size=1)
        else:
            raise RuntimeError(
                f"tp={config.tp} x ep={config.ep} needs {config.world} processes: launch with "
                f"torchrun --nproc-per-node {config.world} -m seahal run ... (or set RANK/WORLD_SIZE/MASTER_ADDR)"
            )
    if dist.get_world_size() != config.world:
        raise RuntimeError(
            f"tp={config.tp} x ep={config.ep} = {config.world} ranks, but the process group has "
            f"{dist.get_world_size()} (torchrun --nproc-per-node {config.world})"
        )
    rank = dist.get_rank()
    tp_group = ep_group = None
    # every rank creates every group, in the same order (torch.distributed requires it)
    for row in range(config.ep):
        group = dist.new_group([row * config.tp + t for t in range(config.tp)])
        if row == rank // config.tp:
            tp_group = group
    for column in range(config.tp):
        group = dist.new_group([e * config.tp + column for e in range(config.ep)])
        if column == rank % config.tp:
            ep_group = group
    parallel = Parallel(config, rank, torch_device, tp_group, ep_group)
    _check_agreement(parallel)
    return parallel


def shutdown_parallel() -> None:
    """Leave the process group :func:`init_parallel` joined. Without it the collective backend's
    threads are still running at interpreter exit, which can abort the process (gloo:
    "terminate called without an active exception")."""
    if dist.is_initialized():
        dist.destroy_process_group()


def _check_agreement(parallel: Parallel) -> None:
    """Fail on every rank (not hang on some) when ranks were started with different settings.

    Also the first collective of a run: it proves the collective backend works on the device.
    """
    c = parallel.config
    mine = torch.tensor([c.tp, c.ep, int(c.dp_attention), c.a2a_min_tokens, MOE_COMMS.index(c.moe_comm)])
    both = torch.cat((mine, -mine)).to(parallel.device or "cpu")
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    high, low = both[: len(mine)].cpu(), -both[len(mine) :].cpu()
    if not torch.equal(high, low):
        raise RuntimeError(f"ranks disagree on the parallel settings (tp, ep, dp_attention, ...): {low} vs {high}")


def placement(model: torch.nn.Module, parallel: Parallel) -> dict:
    """What this rank holds: its slices of heads, groups, experts, dims and vocabulary, and bytes."""
    c: ModelConfig = model.config
    nbytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    return {
        "rank": parallel.rank,
        "tp": parallel.tp_rank,
        "ep": parallel.ep_rank,
        "device": str(parallel.device or model.device),
        "heads": _span(parallel.tp_range(c.n_heads), c.n_heads),
        "o_groups": _span(parallel.tp_range(c.o_groups), c.o_groups),
        "experts": _span(parallel.ep_range(c.n_routed_experts), c.n_routed_experts),
        "expert_dims": _span(parallel.tp_range(c.moe_inter_dim), c.moe_inter_dim),
        "vocab": _span(parallel.tp_range(c.vocab_size), c.vocab_size),
        "batch": "own share" if parallel.config.dp_attention else "all",
        "weights": f"{nbytes / 2**20:.1f} MiB",
    }


def _span(span: tuple[int, int], n: int) -> str:
    return f"{span[0]}-{span[1] - 1} of {n}"


def placement_table(model: torch.nn.Module, parallel: Parallel) -> str:
    """Every rank's :func:`placement` as a table (a collective: call it on every rank)."""
    row = placement(model, parallel)
    rows = [row]
    if parallel.distributed and parallel.world > 1:
        rows = [None] * parallel.world
        dist.all_gather_object(rows, row)
    header = list(row)
    cells = [header] + [[str(r[k]) for k in header] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(header))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(line, widths)).rstrip() for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    c = parallel.config
    title = f"placement: tp={c.tp} x ep={c.ep}" + (", dp_attention" if c.dp_attention else "")
    return title + f", moe_comm={c.moe_comm}\n" + "\n".join(lines)
