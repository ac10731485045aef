"""Autoregressive generation on a :class:`Transformer`: prefill, then one token per step.

All prompts share one cache, a row each. Prompts are grouped by length and each group is
prefilled in one call into its rows (:meth:`Cache.rows`). On a GPU whose plan keeps positions on
the device, every sequence then decodes in one step at its own position, captured once as a CUDA
graph and replayed per token (:class:`seahal.model.decode_graph.DecodeGraph`); otherwise the
groups decode eagerly in lockstep, one call per group per token.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .cache import Cache
from .decode_graph import DecodeGraph

if TYPE_CHECKING:
    from .transformer import Transformer


@dataclass
class GenerationStats:
    """Token counts and wall-clock seconds of one :func:`generate` call (all groups together)."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    decoded_tokens: int = 0
    """New tokens produced by decode steps (each sequence's first new token comes from its prefill)."""
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_mode: str = "eager"
    """How decode steps ran: ``"cuda graph"`` (every sequence in one replayed step) or ``"eager"``."""
    cache_bytes: int = 0
    """``nbytes()`` of the batch's cache, as allocated."""
    cached_tokens: int = 0
    """Token positions those caches hold, summed over sequences."""
    cache_bytes_per_token: float = 0.0
    """Growing part of the cache per token (compressed entries and indexer keys)."""

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decoded_tokens / self.decode_seconds if self.decode_seconds else 0.0


class Generation(list):
    """The generated tokens per prompt (``list[list[int]]``, prompts excluded), plus ``stats``."""

    stats: GenerationStats


def _check_prompts(prompts: list[list[int]], vocab_size: int) -> None:
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError(f"prompt {i} is empty")
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token ids outside [0, {vocab_size}): {bad[:5]}")


def sample(
    logits: torch.Tensor, temperature: float, top_p: float, greedy: bool, generator: torch.Generator | None
) -> torch.Tensor:
    """Next tokens from logits [B, vocab] (computed in fp32 on the CPU) -> [B] int64.

    Greedy (or temperature 0): ``argmax`` (first maximum). Otherwise ``p = softmax(logits / T)``,
    restricted to the smallest set of most likely tokens whose mass reaches ``top_p`` (ties in
    index order, the most likely token always kept), renormalised, sampled with ``generator``.
    """
    logits = logits.float().cpu()
    if greedy or temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
        keep = sorted_probs.cumsum(dim=-1) - sorted_probs < top_p
        keep[:, 0] = True
        sorted_probs = torch.where(keep, sorted_probs, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class _Group:
    """Prompts of one length, rows ``first ...`` of the batch's cache (``cache``: a view of those
    rows, prefilled and decoded eagerly in one call each); ``rows`` index the caller's prompts.
    Without a batch cache (data-parallel attention: each rank holds its own share of a batch's
    rows), a cache of its own of ``capacity`` tokens."""

    def __init__(
        self, model: Transformer, rows: list[int], prompts: list[list[int]], batch_cache: Cache | None, first: int,
        capacity: int,
    ):
        self.rows = rows
        self.inputs = torch.tensor([prompts[r] for r in rows], dtype=torch.long, device=model.device)
        """The tokens the next forward consumes: the prompts, then the last sampled tokens."""
        if batch_cache is None:
            self.cache = model.new_cache(len(rows), capacity)
        else:
            self.cache = batch_cache.rows(first, first + len(rows))
        self.done = [False] * len(rows)

    def logits(self, model: Transformer) -> torch.Tensor:
        """The last position's logits [n, vocab] of consuming ``inputs``."""
        return model(self.inputs, cache=self.cache, last_only=True)[:, -1]


def generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]] | torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
    eos_token_id: int | Sequence[int] | None = None,
    stream: Callable[[int, int], None] | None = None,
    seed: int | None = None,
) -> Generation:
    """Continue each prompt by up to ``max_new_tokens`` tokens.

    prompts: lists of token ids (any lengths) or a [B, S] tensor -> the new tokens per prompt,
    in order (an ``eos_token_id`` that stops a sequence is included; None: never stop early).
    ``stream(i, token)`` is called for each token of prompt i as it is produced. Sampling is in
    fp32 with a ``torch.Generator`` seeded by ``seed`` (see :func:`sample`). Timing and cache
    figures are in the result's ``stats``.
    """
    if isinstance(prompts, torch.Tensor):
        prompts = prompts.tolist()
    prompts = [list(map(int, p)) for p in prompts]
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    _check_prompts(prompts, model.config.vocab_size)
    longest = max((len(p) for p in prompts), default=0) + max_new_tokens
    if longest > model.config.max_seq_len:
        raise ValueError(f"prompt + max_new_tokens = {longest} tokens exceeds max_seq_len={model.config.max_seq_len}")
    stops = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)

    result = Generation([] for _ in prompts)
    stats = result.stats = GenerationStats(prompt_tokens=sum(map(len, prompts)))
    if max_new_tokens == 0:
        return result
    by_length: dict[int, list[int]] = {}
    for row, prompt in enumerate(prompts):
        by_length.setdefault(len(prompt), []).append(row)
    cache = None if model.parallel.config.dp_attention else model.new_cache(len(prompts), longest)
    groups, first = [], 0
    for _, rows in sorted(by_length.items()):
        groups.append(_Group(model, rows, prompts, cache, first, longest))
        first += len(rows)

    def consume(group: _Group, logits: torch.Tensor, decoding: bool) -> None:
        tokens = sample(logits, temperature, top_p, greedy, generator).tolist()
        for i, (row, token) in enumerate(zip(group.rows, tokens)):
            if group.done[i]:
                continue
            result[row].append(token)
            stats.new_tokens += 1
            stats.decoded_tokens += decoding
            if stream is not None:
                stream(row, token)
            group.done[i] = token in stops or len(result[row]) == max_new_tokens
        group.inputs = torch.tensor(tokens, dtype=torch.long, device=model.device).unsqueeze(1)

    for group in groups:
        start = time.perf_counter()
        consume(group, group.logits(model), decoding=False)
        stats.prefill_seconds += time.perf_counter() - start
    graph = None
    if cache is not None and DecodeGraph.capturable(model):  # every sequence in one replayed step, at its position
        graph = DecodeGraph(model, cache, capture=True, positions=[len(prompts[r]) for g in groups for r in g.rows])
        stats.decode_mode = "cuda graph"
    while active := [g for g in groups if not all(g.done)]:
        start = time.perf_counter()
        if graph is not None:
            logits = graph.step(torch.cat([g.inputs for g in groups]))[:, -1]
            for group, rows in zip(groups, logits.split([len(g.rows) for g in groups])):
                if group in active:  # a finished group's rows step along, unread (and draw no samples)
                    consume(group, rows, decoding=True)
        else:
            for group in active:
                consume(group, group.logits(model), decoding=True)
        stats.decode_seconds += time.perf_counter() - start

    caches = [cache] if cache is not None else [g.cache for g in groups]
    stats.cache_bytes = sum(c.nbytes() for c in caches)
    held = graph.positions if graph is not None else [g.cache.pos for g in groups for _ in g.rows]
    stats.cached_tokens = sum(held)
    stats.cache_bytes_per_token = caches[0].bytes_per_token()
    return result
