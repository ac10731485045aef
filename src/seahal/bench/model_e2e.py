"""``seahal bench --backend cuda --ops model``: the model graph end to end against transformers.

The model: 4 layers with V4-Flash dimensions (hidden 4096; 64 heads of 512 with 64 RoPE dims;
q LoRA 1024, output 8 groups x 1024; indexer 64 heads x 128, top-512; window 128; mHC x4; vocab
129280) and the release's first four layers: SWA, SWA, CSA (m=4), HCA (m=128), the first three
hash-routed; 64 routed experts of 2048 (top-6) plus one shared. 8.1 B parameters (16 GB in
bf16), drawn at random once (``seahal.model.tiny``'s trained-model scales) and written in the
official layout with a transformers ``config.json``: seahal and transformers'
``DeepseekV4ForCausalLM`` load the same folder. ``seahal convert`` quantises it into the release
layout (FP8 linears, FP4 experts).

Rows, batch 1, for each context (1k and 4k tokens):

- ``prefill <ctx>``: one forward over the prompt into an empty cache; ``tokens_per_s`` = ctx / time;
- ``decode @<ctx>``: one token after the prompt, the median over ``decode_steps`` steps (``us`` is
  the time per token).

Each row is one seahal model on the device's plan (the HAL picks the kernels): ``seahal bf16`` (the
dense folder) or ``seahal fp8+fp4`` (the release layout, with the official FP8-rounded KV), beside
the peer: transformers eager on the dense folder in bf16 with its default experts implementation
(``speedup`` = transformers' time / seahal's). On a GPU each row carries the issue's goal
(``goal_us``): 25x transformers' decode speed, 5x its prefill. transformers is the peer in bf16
because that is what it runs from this folder; given the release layout it would dequantise the
FP8/FP4 weights to bf16 on a CPU (or a GPU older than sm_89) and run its own FP8/FP4 Triton kernels
on newer GPUs, neither the eager bf16 model the issue measured (42 ms/token, 16-18k tokens/s).

Checked before timing: each model's last-position prefill logits for three prompts against an
oracle, transformers' fp32 full forward on the same folder (the peer upcast in place, which is exact,
its experts as the plain per-expert loop; ``check.err``: the median over the prompts of
``||logits - oracle|| / ||oracle||``, see :func:`check_error`; the peer's own error is in
``peer.transformers.err``). Never transformers' decode: its incremental CSA decode does not
reproduce its own full forward, so its decode is reported only as a speed. The oracle is fp32, not
the bf16 peer: transformers' bf16 forward can be far off its own fp32 forward (0.23 on a tiny model
with an HCA ratio of 16, where bf16 index scores reorder its indexer's top-k). A model whose check
fails is not timed.

Timing: each call as a caller makes it (prefill eager, decode through the graph where there is
one). On a GPU each call is bracketed by CUDA events after a synchronize and waited for,
so launch gaps and host work count, as they do for a served token; warm-up calls first (Triton
compiles and autotunes there); median. On the CPU, ``time.perf_counter``.

The plan is the one ``seahal.model.load`` makes for the device; the cuda backend's kernels not
yet run on a GPU serve it only with ``SEAHAL_CUDA_UNVERIFIED=1`` (otherwise those ops run the
portable reference; each row's ``plan.fallbacks`` lists them).

Decode on a GPU replays one CUDA graph per cache (:class:`seahal.model.decode_graph.DecodeGraph`,
captured during the warm-up steps) when the plan keeps positions on the device; the row's
``timing.seahal`` says ``cuda graph`` or ``eager``, and a graph row also carries the same steps
run eagerly as the peer ``seahal eager (no graph)``, captured again with each layer's shared
expert on a side stream (``SEAHAL_SIDE_STREAM=1``) as ``seahal graph, shared expert on a side
stream`` and, on the cuda plan, with programmatic dependent launch (``SEAHAL_CUDA_PDL=1``) as
``seahal graph, PDL launches`` and with both as ``seahal graph, PDL launches and a side stream``
(:data:`OPT_IN_DECODES`). Prefill
is eager; where decode has a graph, the prefill row also carries the prompt as one captured step
of all its tokens (:meth:`_Seahal.prefill_graph`, a graph per prompt length) as the peer ``seahal
graph, one captured step``, timed only when its last logits are within GRAPH_PREFILL_TOLERANCE of
the eager call's (``graph_prefill_err``; else ``graph_prefill_error`` says why). A GPU decode row also carries ``decode_kernels``: one eager step under torch.profiler,
its kernels' summed device time (``busy_us``; the graph's time minus it is what launches and gaps
cost), the longest kernels by name and the host's CUDA API calls by time (``host_api``: a call
that waits on the device shows long; :func:`seahal.bench.common.summarize_profile`), also printed
to the log; a GPU prefill row
``prefill_kernels``, the same for one prefill, ``host_us``, the median time until the timed
prefill calls returned to the host (the device idle before each; :func:`_call_us`): about the
row's time when the host's launches bound the call, as on the H100 (18.9 of 25.2 ms for 14.1 ms of
kernels at 1k tokens, bf16, d2669c9, where it still came from separate calls), and
``host_profile``, where that host time goes by Python function (:func:`common.host_profile`), and
``allocator``, the CUDA caching allocator's trips to the driver during one warm prefill
(:func:`common.allocator_events`: each should be 0).

``--device cpu``: the same code on a tiny model (dim 256, 8 experts, the same layer pattern) at 128
and 256 tokens, in seconds: it exercises the checkpoint, both loaders, the check and the JSON.
"""

from __future__ import annotations

import gc
import importlib.util
import inspect
import json
import math
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from unittest import mock

import torch

from seahal.bench import common
from seahal.hal.streams import SIDE_STREAM_VARIABLE
from seahal.model import load
from seahal.model.config import ModelConfig
from seahal.model.convert import ROUTED_EXPERT, convert, official_shapes
from seahal.model.decode_graph import DecodeGraph
from seahal.model.presets import preset
from seahal.model.tiny import write_tiny_checkpoint

FLASH = preset("V4-Flash")
FIRST_LAYERS = 4
V4_FLASH_4_LAYERS = {**FLASH, "n_layers": FIRST_LAYERS, "compress_ratios": FLASH["compress_ratios"][:FIRST_LAYERS],
                     "n_routed_experts": 64}
"""V4-Flash with its first four layers (SWA, SWA, CSA, HCA; three hash-routed) and 64 experts."""
TINY_4_LAYERS = {"n_layers": FIRST_LAYERS, "compress_ratios": FLASH["compress_ratios"][:FIRST_LAYERS],
                 "n_hash_layers": FLASH["n_hash_layers"]}
"""The tiny model's dimensions with V4-Flash's first four layers: the CPU smoke scale."""

DENSE_TOLERANCE = 0.03
"""``seahal bf16`` against the fp32 oracle (:func:`check_error`). bf16 keeps 8 significant bits
(unit roundoff 2^-8 = 0.004) and every op rounds its output to it; over the 4-layer graph the
roundings mostly average out: measured 0.004-0.006 at the CPU scale (transformers' own bf16: 0.006).
0.03 leaves other kernels' accumulation orders several times that; a wiring mistake is larger: one
sublayer's output projection 20% too large moves these logits by 0.03, a negated one by 0.44."""
RELEASE_TOLERANCE = 0.25
"""``seahal fp8+fp4`` against the fp32 oracle of the bf16 weights: the bound of
tests/test_convert.py, whose reasoning holds here (FP4 e2m1 experts round each weight by ~12% RMS,
FP8 linears and activations by ~4%; measured 0.13-0.15 at the logits there, 0.08-0.10 at the CPU
scale here with the FP8-rounded KV and FP4 indexer on); unrelated logits would be ~1.4 off."""
GOALS = {"prefill": 5.0, "decode": 25.0}
"""Issue #6: seahal's prefill >= 5x and decode >= 25x transformers' eager speed (on a GPU)."""


@dataclass(frozen=True)
class Scale:
    """What one run builds and measures."""

    name: str
    config: dict
    """Official config keys replacing the tiny config's (see ``write_tiny_checkpoint``)."""
    contexts: tuple[int, ...]
    decode_steps: int
    prefill_repeats: int
    warmup: int = 2
    """Untimed calls before the timed ones (prefills, then decode steps)."""
    check_prompts: int = 3
    """Prompts the check compares (the first is also the timed one)."""

    def capacity(self, context: int) -> int:
        """Cache rows a context needs: the prompt, then warm-up and timed decode steps."""
        return context + self.warmup + self.decode_steps


def scale(device: torch.device, quick: bool, contexts: tuple[int, ...] | None = None) -> Scale:
    """The 4-layer V4-Flash model at 1k and 4k tokens on a GPU (quick: 1k only); tiny on the CPU.
    ``contexts``: these prompt lengths instead (``seahal bench --contexts``), each > 0."""
    if device.type == "cuda":
        s = Scale("4-layer V4-Flash, 64 experts", V4_FLASH_4_LAYERS, (1024,) if quick else (1024, 4096),
                  16 if quick else 32, 3)
    else:
        s = Scale("tiny, V4-Flash layer pattern", TINY_4_LAYERS, (128, 256), 4 if quick else 8, 1 if quick else 3,
                  warmup=1)
    if contexts is None:
        return s
    if not contexts or min(contexts) < 1:
        raise ValueError(f"contexts must be positive prompt lengths, got {list(contexts)}")
    return replace(s, contexts=tuple(contexts))


# -- the checkpoint ---------------------------------------------------------------------------------
def write_checkpoints(folder: Path, s: Scale, device: torch.device, seed: int = 0) -> tuple[Path, Path]:
    """Random weights for ``s`` drawn on ``device`` -> (dense folder, release-layout folder).

    dense: bf16 matrices (fp32 mHC, sinks, ape, gate bias) with a transformers config.json, which
    seahal reads as well; release: the same weights through ``seahal convert`` (FP8 e4m3 linears
    with 128x128 ue8m0 scales, FP4 e2m1 experts with 1x32 scales).
    """
    capacity = max(s.capacity(ctx) for ctx in s.contexts)
    dense = write_tiny_checkpoint(folder / "bf16", seed, quantise=False, device=device,
                                  **{**s.config, "max_seq_len": capacity})
    config = ModelConfig.from_file(dense)
    # The YaRN length as max_position_embeddings, as the release's config has it (transformers
    # warns when the two disagree); seahal's caches are sized by the benchmark, not by this.
    yarn_length = int(config.original_seq_len * config.rope_factor)
    hf = config.to_hf_dict() | {"max_position_embeddings": max(capacity, yarn_length)}
    (dense / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    return dense, convert(dense, folder / "release", device=device)


def _prompts(vocab: int, s: Scale, context: int, device: torch.device) -> torch.Tensor:
    """[check_prompts, capacity] random token ids: each row a prompt, then (first row) the tokens
    the decode steps feed."""
    g = torch.Generator().manual_seed(context)
    return torch.randint(0, vocab, (s.check_prompts, s.capacity(context)), generator=g).to(device)


def check_error(logits: torch.Tensor, oracle: torch.Tensor) -> float:
    """The median over prompts of ``||logits - oracle|| / ||oracle||`` (logits, oracle: [prompts, vocab]).

    The median, because the last position's logits jump where the two implementations' roundings
    put a near-tie on different sides of a discrete choice: the score-routed layer's top-k experts,
    the indexer's top-k keys (measured at the CPU scale: 0.044 once in 12 prompts, 0.004-0.006 else).
    One such prompt in three then cannot fail the check; a wrong model fails on every prompt.
    """
    return statistics.median(common.rel_err(a, b) for a, b in zip(logits, oracle, strict=True))


# -- the two implementations --------------------------------------------------------------------------
class _Seahal:
    """seahal's model on the device's plan; ``prefill`` fills a new cache, ``decode`` adds one token."""

    def __init__(self, path: Path, device: torch.device, capacity: int, **overrides):
        self.model = load(path, device=device, dtype=torch.bfloat16, announce=False, **overrides)
        self.capacity = capacity
        self.graph: DecodeGraph | None = None
        """The decode graph of the cache being decoded (captured at its first step)."""
        self.prompt_graph: DecodeGraph | None = None
        """:meth:`prefill_graph`'s cache and graphs, restarted at position 0 for each prompt."""

    def prefill(self, ids: torch.Tensor) -> tuple[torch.Tensor, object]:
        cache = self.model.new_cache(1, self.capacity)
        return self.model(ids, cache=cache, last_only=True)[0, -1], cache

    def prefill_graph(self, ids: torch.Tensor) -> torch.Tensor:
        """The prompt's last logits from one step of all its tokens through a :class:`DecodeGraph`
        (captured on CUDA at the first prompt of each length, replayed after; eager elsewhere), on
        a cache of its own kept across calls: the prefill without the host's launches."""
        if self.prompt_graph is None:
            self.prompt_graph = DecodeGraph(self.model, self.model.new_cache(1, self.capacity), positions=[0])
        else:
            self.prompt_graph.restart()
        return self.prompt_graph.step(ids)[0, -1]

    @property
    def decode_timing(self) -> str:
        """How decode steps run: ``cuda graph`` (one captured step replayed) or ``eager``."""
        return "cuda graph" if DecodeGraph.capturable(self.model) else "eager"

    def decode(self, cache, token: torch.Tensor) -> None:
        if not DecodeGraph.capturable(self.model):
            self.decode_eager(cache, token)
            return
        if self.graph is None or self.graph.cache is not cache:
            self.graph = DecodeGraph(self.model, cache, capture=True)
        self.graph.step(token)

    def decode_eager(self, cache, token: torch.Tensor) -> None:
        """A decode step without the graph: every launch from the host."""
        self.model(token, cache=cache, last_only=True)


class _Transformers:
    """transformers' DeepseekV4ForCausalLM in bf16 (eager attention, its default experts implementation)."""

    def __init__(self, path: Path, device: torch.device):
        from transformers import DeepseekV4ForCausalLM

        placement = {"device_map": str(device)} if importlib.util.find_spec("accelerate") else {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = DeepseekV4ForCausalLM.from_pretrained(
                path, dtype=torch.bfloat16, attn_implementation="eager", **placement
            )
        self.model = model.to(device).eval()
        self.experts = model.config._experts_implementation
        # Newer transformers name the cache argument `cache` (past_key_values is deprecated there).
        self.cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def as_oracle(self) -> _Transformers:
        """The same model in fp32, in place: bf16 -> fp32 is exact, so it is what an fp32 load of the
        folder gives (the same state dict and logits, checked with transformers 5.24); the experts
        switched to the plain per-expert loop (grouped GEMMs may lack fp32 kernels)."""
        self.model.float()
        self.model.set_experts_implementation("eager")
        return self

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor) -> tuple[torch.Tensor, object]:
        out = self.model(ids, use_cache=True, logits_to_keep=1)
        return out.logits[0, -1].float(), out.past_key_values

    @torch.inference_mode()
    def decode(self, cache, token: torch.Tensor) -> None:
        self.model(token, use_cache=True, logits_to_keep=1, **{self.cache_arg: cache})


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# -- timing -------------------------------------------------------------------------------------------
def _elapsed_us(fn: Callable[[], object], device: torch.device) -> float:
    """Microseconds of one call of ``fn``, waited for: CUDA events on a GPU, the host clock on the CPU."""
    return _call_us(fn, device)[0]


def _call_us(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """One call of ``fn`` after the device is idle: (microseconds until its work is done, on CUDA
    events; microseconds until it returns to the host). Both of one call: about equal when the
    host's launches bound the call, the first longer when the device does."""
    if device.type != "cuda":
        start = time.perf_counter()
        fn()
        us = 1e6 * (time.perf_counter() - start)
        return us, us
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    begin.record()
    start = time.perf_counter()
    fn()
    host = 1e6 * (time.perf_counter() - start)
    end.record()
    end.synchronize()
    return 1e3 * begin.elapsed_time(end), host


PDL_VARIABLE = "SEAHAL_CUDA_PDL"
OPT_IN_DECODES = {
    "pdl": ((PDL_VARIABLE,), "seahal graph, PDL launches"),
    "side_stream": ((SIDE_STREAM_VARIABLE,), "seahal graph, shared expert on a side stream"),
    "pdl_side_stream": ((PDL_VARIABLE, SIDE_STREAM_VARIABLE), "seahal graph, PDL launches and a side stream"),
}
"""Opt-in ways to run the step that a graph decode row also times, each in a graph captured with
it: key -> (the environment variables it sets, the peer's name). ``pdl``: the cuda backend's
kernels launched with programmatic dependent launch (each may start while the one ahead finishes,
then waits for it; cuda plans only); ``side_stream``: each layer's shared expert on a side stream
beside its gate and routed experts (:mod:`seahal.hal.streams`); ``pdl_side_stream``: both, the step
the two would make together (on the H100 at 14a3a20 PDL alone took 1513 of the graph's 1638.5 us,
and issue #6 asks for 1287)."""


def _opt_ins(model: _Seahal) -> list[str]:
    """The keys of :data:`OPT_IN_DECODES` that apply to ``model``'s plan (PDL: the cuda plan's only)."""
    cuda = model.model.plan.backend.name == "cuda"
    return [key for key, (variables, _) in OPT_IN_DECODES.items() if cuda or PDL_VARIABLE not in variables]


def _failed_part(key: str, details: dict) -> str | None:
    """The opt-in among ``key``'s parts (those of :data:`OPT_IN_DECODES` whose variables it also
    sets) that failed alone (``<part>_error`` in ``details``), else None."""
    variables = set(OPT_IN_DECODES[key][0])
    return next((part for part, (part_variables, _) in OPT_IN_DECODES.items()
                 if part != key and set(part_variables) <= variables and f"{part}_error" in details), None)


def _opted_in_decode_us(key: str, model: _Seahal, prompt: torch.Tensor, steps: list[torch.Tensor], s: Scale,
                        device: torch.device) -> float:
    """The median decode step of a graph captured with the opt-in ``key`` of
    :data:`OPT_IN_DECODES`, over a fresh prefill: what it saves between or beside the step's kernels."""
    with mock.patch.dict(os.environ, dict.fromkeys(OPT_IN_DECODES[key][0], "1")):  # restored after
        try:
            model.graph = None  # captured again, at its first step, with the opt-in
            return _decode_us(model.decode, model, prompt, steps, s, device)
        finally:
            model.graph = None


GRAPH_PREFILL_TOLERANCE = 2e-2
"""The captured prefill's last logits against the eager call's (relative norm): cuBLAS may pick
other algorithms inside a capture, and a bf16 output one ulp apart (2^-8) grows through the layers
(the GPU tests of tests/test_decode_graph.py allow 2e-2 of the logit scale); a step at wrong
positions is O(1) off."""


def _graph_prefill(model: _Seahal, prompt: torch.Tensor, eager_logits: torch.Tensor, s: Scale,
                   device: torch.device) -> dict:
    """``prompt`` as one captured step (:meth:`_Seahal.prefill_graph`): its median microseconds and
    its last logits' error against ``eager_logits`` (the eager prefill's, [vocab] fp32 on the host),
    or why it was not timed (a capture that failed, logits more than GRAPH_PREFILL_TOLERANCE off)."""
    try:
        err = common.rel_err(model.prefill_graph(prompt).float().cpu(), eager_logits)  # the capture
    except Exception as exc:  # noqa: BLE001 - a step that cannot be captured is a finding, not the row's end
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return {"graph_prefill_error": f"{type(exc).__name__}: {str(exc)[:160]}"}
    if err > GRAPH_PREFILL_TOLERANCE:
        return {"graph_prefill_error": f"last logits {err:.3g} off the eager prefill's: not timed"}
    us = statistics.median(_elapsed_us(lambda: model.prefill_graph(prompt), device) for _ in range(s.prefill_repeats))
    return {"graph_prefill_us": us, "graph_prefill_err": err}


def _decode_us(step: Callable[[object, torch.Tensor], None], model, prompt: torch.Tensor, steps: list[torch.Tensor],
               s: Scale, device: torch.device) -> float:
    """The median microseconds of ``step(cache, token)`` over ``steps`` after a fresh prefill of
    ``prompt``, the first ``s.warmup`` steps untimed."""
    _, cache = model.prefill(prompt)
    for token in steps[: s.warmup]:
        step(cache, token)
    return statistics.median(_elapsed_us(lambda t=t: step(cache, t), device) for t in steps[s.warmup :])


def _last_logits(model, ids: torch.Tensor, context: int) -> torch.Tensor:
    """[prompts, vocab] fp32 on the host: the last-position logits of each prompt ``ids[p, :context]``."""
    return torch.stack([model.prefill(ids[p : p + 1, :context])[0].float().cpu() for p in range(len(ids))])


@dataclass
class _Measured:
    """One model at one context: last-position prefill logits [prompts, vocab], and the median
    prefill / decode microseconds of the first prompt."""

    logits: torch.Tensor
    prefill_us: float | None = None
    decode_us: float | None = None
    details: dict = field(default_factory=dict)
    """What the row says about the model (the peer's dtype and implementations)."""


def _measure(model, ids: torch.Tensor, context: int, s: Scale, device: torch.device,
             oracle: torch.Tensor | None = None, tolerance: float = math.inf) -> _Measured:
    """Prefill each prompt ``ids[p, :context]`` once; then, unless the logits are more than
    ``tolerance`` off ``oracle`` (:func:`check_error`), time the first prompt's prefill and decode."""
    measured = _Measured(_last_logits(model, ids, context))
    if oracle is not None and check_error(measured.logits, oracle) > tolerance:
        return measured
    prompt = ids[:1, :context]
    for _ in range(s.warmup - 1):
        model.prefill(prompt)
    calls = [_call_us(lambda: model.prefill(prompt), device) for _ in range(s.prefill_repeats)]
    measured.prefill_us = statistics.median(device_us for device_us, _ in calls)
    steps = [ids[:1, i : i + 1] for i in range(context, s.capacity(context))]
    measured.decode_us = _decode_us(model.decode, model, prompt, steps, s, device)
    if getattr(model, "decode_timing", "eager") == "cuda graph":
        # the prefill's launches in a graph; what the decode graph saves: the same steps eagerly
        measured.details.update(_graph_prefill(model, prompt, measured.logits[0], s, device))
        measured.details["eager_decode_us"] = _decode_us(model.decode_eager, model, prompt, steps, s, device)
        for key in _opt_ins(model):  # and the graphs of the opt-ins (PDL launches, a side stream)
            failed = _failed_part(key, measured.details)
            if failed is not None:  # a combination whose part failed alone is not captured
                measured.details[f"{key}_error"] = f"not run: {failed} failed alone"
                continue
            try:
                measured.details[f"{key}_decode_us"] = _opted_in_decode_us(key, model, prompt, steps, s, device)
            except Exception as exc:  # noqa: BLE001 - an opt-in that fails to capture is a finding, not the row's end
                torch.cuda.synchronize(device)
                measured.details[f"{key}_error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
    if device.type == "cuda" and hasattr(model, "decode_eager"):  # where a step's device time goes
        measured.details["prefill_host_us"] = statistics.median(host_us for _, host_us in calls)  # of the timed calls
        torch.cuda.synchronize(device)
        measured.details["prefill_host_profile"] = common.host_profile(lambda: model.prefill(prompt))
        measured.details["prefill_allocator"] = common.allocator_events(lambda: model.prefill(prompt))
        measured.details["prefill_kernels"] = common.kernel_breakdown(lambda: model.prefill(prompt), 25)
        _, cache = model.prefill(prompt)
        model.decode_eager(cache, steps[0])
        measured.details["decode_kernels"] = common.kernel_breakdown(lambda: model.decode_eager(cache, steps[1]), 25)
    return measured


# -- rows ----------------------------------------------------------------------------------------------
def _work(model: torch.nn.Module, tokens: int) -> tuple[float, float]:
    """(FLOPs, bytes) a perfect implementation spends on ``tokens`` new tokens of batch 1.

    FLOPs: ``2 (tokens (W + k/E W_routed) + W_head)`` over the dense matmul weights (the head runs
    on the last token only); attention and index scores are left out, so this is a lower bound.
    Bytes: every tensor of ``model`` read once, the routed experts by the share its tokens hit
    (``1 - (1 - k/E)^tokens``), the embedding by its rows; the cache is left out (< 0.1% here).
    """
    config = model.config
    share = config.n_activated_experts / config.n_routed_experts
    routed = head = other = 0
    for name, shape in official_shapes(config).items():
        if name == "head.weight":
            head = math.prod(shape)
        elif ROUTED_EXPERT.search(name):
            routed += math.prod(shape)
        elif len(shape) == 2 and name != "embed.weight" and not name.endswith((".ape", ".tid2eid")):
            other += math.prod(shape)
    flops = 2 * (tokens * (other + share * routed) + head)
    hit = 1 - (1 - share) ** tokens
    nbytes = 0.0
    for name, tensor in model.state_dict().items():
        size = tensor.numel() * tensor.element_size()
        if ".ffn.experts." in name:
            size *= hit
        elif name == "embed.weight":
            size *= min(tokens, config.vocab_size) / config.vocab_size
        nbytes += size
    return flops, nbytes


def _tokens(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


@dataclass(frozen=True)
class Layout:
    """How one seahal row loads the model."""

    folder: str
    """``dense`` or ``release`` (see :func:`write_checkpoints`)."""
    tolerance: float
    peak_tflops: float
    """Tensor-core rate of its GEMMs' operands (the roofline of the row)."""
    overrides: dict
    """Config fields replaced at load."""


LAYOUTS = {
    # The release layout runs as shipped, and first: it is the one served, and a GPU step cut at its
    # limit keeps the rows measured before the cut. Parity with transformers needs the dense weights
    # computed as transformers does: no FP8 rounding of the cached KV, no FP4 simulation in the indexer.
    "fp8+fp4": Layout("release", RELEASE_TOLERANCE, common.PEAK_FP8_TFLOPS, {}),
    "bf16": Layout("dense", DENSE_TOLERANCE, common.PEAK_BF16_TFLOPS,
                   {"simulate_fp8_kv": False, "simulate_fp4_indexer": False}),
}


def _row(phase: str, context: int, layout: str, model: torch.nn.Module, ours: _Measured, peer: _Measured | None,
         oracle: torch.Tensor | None) -> dict:
    """One ``model`` row: ``phase`` (prefill / decode) of seahal's ``layout`` at ``context`` beside
    transformers (``peer``, None when not installed), checked against ``oracle`` logits."""
    device = model.device
    tokens = context if phase == "prefill" else 1
    flops, nbytes = _work(model, tokens)
    us, peer_us = getattr(ours, f"{phase}_us"), None if peer is None else getattr(peer, f"{phase}_us")
    params = {"batch": 1, "context": context, "tokens": tokens, "layout": layout}
    if device.type == "cuda" and peer_us is not None:
        params.update(goal=f">= {GOALS[phase]:g}x transformers", goal_us=peer_us / GOALS[phase])
    shape = f"prefill {_tokens(context)}" if phase == "prefill" else f"decode @{_tokens(context)}"
    case = common.Case("model", shape, flops, nbytes, LAYOUTS[layout].peak_tflops, params=params)
    row = common.new_row(case, f"seahal {layout}")
    peers = {} if peer_us is None else {"transformers": peer_us}
    if phase == "decode" and "eager_decode_us" in ours.details:
        peers["seahal eager (no graph)"] = ours.details["eager_decode_us"]
    for key, (_, name) in OPT_IN_DECODES.items():
        if phase == "decode" and f"{key}_decode_us" in ours.details:
            peers[name] = ours.details[f"{key}_decode_us"]
        if phase == "decode" and f"{key}_error" in ours.details:
            row[f"{key}_error"] = ours.details[f"{key}_error"]
    if phase == "prefill" and "graph_prefill_us" in ours.details:
        peers["seahal graph, one captured step"] = ours.details["graph_prefill_us"]
        row["graph_prefill_err"] = ours.details["graph_prefill_err"]
    if phase == "prefill" and "graph_prefill_error" in ours.details:
        row["graph_prefill_error"] = ours.details["graph_prefill_error"]
    if f"{phase}_kernels" in ours.details:
        row[f"{phase}_kernels"] = ours.details[f"{phase}_kernels"]
    if phase == "prefill" and "prefill_host_us" in ours.details:  # the host's share of the call
        row["host_us"] = ours.details["prefill_host_us"]
        row["host_profile"] = ours.details["prefill_host_profile"]
        row["allocator"] = ours.details["prefill_allocator"]
    common.record(row, case, us, peers)
    row["tokens_per_s"] = None if us is None else tokens / us * 1e6
    row["plan"] = {"backend": model.plan.backend.name, "fallbacks": model.plan.fallbacks,
                   "weight_conversions": dict(model.plan.weight_conversions)}
    timing = "eager" if device.type == "cuda" else "host"
    row["timing"] = {"seahal": ours.details.get("decode_timing", timing) if phase == "decode" else timing}
    if peer is None:
        row["note"] = "transformers with DeepseekV4ForCausalLM (>= 5.23) is not installed: no oracle (unchecked), no peer"
        return row
    row["timing"]["transformers"] = timing
    row["peer"]["transformers"].update(tokens_per_s=tokens / peer_us * 1e6, **peer.details,
                                       err=check_error(peer.logits, oracle))
    err = check_error(ours.logits, oracle)
    tolerance = LAYOUTS[layout].tolerance
    row["check"] = {"err": err, "passed": err <= tolerance, "tolerance": tolerance, "prompts": len(oracle),
                    "oracle": "transformers fp32 full forward, last prefill position"}
    if us is None:
        row["note"] = "wrong result: not timed"
    return row


def has_deepseek_v4() -> bool:
    """Whether the installed transformers has the model (5.23 on; a GPU image may hold an older one)."""
    if importlib.util.find_spec("transformers") is None:
        return False
    import transformers

    return hasattr(transformers, "DeepseekV4ForCausalLM")


def _transformers(dense: Path, oracle_folder: Path | None, prompts: dict[int, torch.Tensor], s: Scale,
                  device: torch.device) -> tuple[dict[int, torch.Tensor], dict[int, _Measured]]:
    """transformers' bf16 figures and fp32 oracle logits by context (empty when transformers is not
    installed). The oracle is the peer's model made :meth:`_Transformers.as_oracle`, which saves a
    load of the 8 B model; or, with ``oracle_folder``, that folder's."""
    if not has_deepseek_v4():
        print("model: transformers with DeepseekV4ForCausalLM (>= 5.23) is not installed: no oracle, no peer",
              flush=True)
        return {}, {}
    start = time.perf_counter()
    model = _Transformers(dense, device)
    details = {"dtype": "bf16", "attention": "eager", "experts": model.experts}
    peer = {ctx: replace(_measure(model, ids, ctx, s, device), details=details) for ctx, ids in prompts.items()}
    _log(f"transformers bf16 peer (experts implementation {details['experts']!r})", start)
    start = time.perf_counter()
    if oracle_folder is not None:
        del model
        _free(device)
        model = _Transformers(oracle_folder, device)
    model.as_oracle()
    oracle = {ctx: _last_logits(model, ids, ctx) for ctx, ids in prompts.items()}
    del model
    _free(device)
    _log("transformers fp32 oracle", start)
    return oracle, peer


def _print_profile(label: str, profile: dict | None, lines: int = 12) -> None:
    """The longest kernels of a prefill or decode step (:func:`common.kernel_profile`), for the session log."""
    if not profile:
        return
    if "error" in profile:
        print(f"model: {label}: no kernel profile ({profile['error']})", flush=True)
        return
    print(f"model: {label}: {profile['kernels']} kernels, {profile['busy_us']:.0f} us busy", flush=True)
    for k in profile["top"][:lines]:
        print(f"    {k['us']:8.1f} us {k['calls']:4d}x  {k['name'][:100]}", flush=True)
    api = profile.get("host_api")
    if api:
        print(f"model: {label}: {api['calls']} CUDA API calls, {api['us']:.0f} us on the host: "
              + ", ".join(f"{c['name']} {c['us']:.0f} us {c['calls']}x" for c in api["top"][:5]), flush=True)


def _log(stage: str, start: float) -> None:
    print(f"model: {stage} done in {time.perf_counter() - start:.0f} s", flush=True)


def measure(
    dense: Path, release: Path, s: Scale, device: torch.device, oracle_folder: Path | None = None
) -> list[dict]:
    """The rows of ``s`` for the folders of :func:`write_checkpoints`; the oracle (transformers fp32)
    is the dense folder's model, or ``oracle_folder``'s (a test hands it a perturbed copy)."""
    vocab = ModelConfig.from_file(dense).vocab_size
    prompts = {ctx: _prompts(vocab, s, ctx, device) for ctx in s.contexts}
    oracle, peer = _transformers(dense, oracle_folder, prompts, s, device)
    capacity = max(s.capacity(ctx) for ctx in s.contexts)
    found = []
    for name, layout in LAYOUTS.items():
        start, ours = time.perf_counter(), None
        try:
            ours = _Seahal(dense if layout.folder == "dense" else release, device, capacity, **layout.overrides)
            plan = ours.model.plan
            print(f"model: seahal {name} on the {plan.backend.name} plan; ops on the portable reference: "
                  f"{', '.join(plan.fallbacks) or 'none'}", flush=True)
            for ctx, ids in prompts.items():
                measured = _measure(ours, ids, ctx, s, device, oracle.get(ctx), layout.tolerance)
                measured.details["decode_timing"] = ours.decode_timing if device.type == "cuda" else "host"
                found += [_row(phase, ctx, name, ours.model, measured, peer.get(ctx), oracle.get(ctx))
                          for phase in ("prefill", "decode")]
                for phase in ("prefill", "decode"):
                    _print_profile(f"seahal {name} {phase} @{_tokens(ctx)}", measured.details.get(f"{phase}_kernels"))
                if "prefill_host_us" in measured.details:
                    print(f"model: seahal {name} prefill @{_tokens(ctx)}: the host returns after "
                          f"{measured.details['prefill_host_us']:.0f} us of {measured.prefill_us:.0f} us; "
                          "its own time by function (cProfile):", flush=True)
                    for f in measured.details["prefill_host_profile"]["top"][:12]:
                        print(f"    {f['self_us']:8.0f} us {f['calls']:5d}x  {f['function'][:100]}", flush=True)
                    print(f"model: seahal {name} prefill: allocator {measured.details['prefill_allocator']}", flush=True)
        except torch.OutOfMemoryError:
            found.append(common.unavailable_row("model", f"seahal {name}: {common.SKIP_ON_OOM}"))
        except Exception as exc:  # noqa: BLE001 - a layout that fails to load or run is a finding, not the end
            found.append(common.unavailable_row("model", f"seahal {name}: {type(exc).__name__}: {str(exc)[:160]}"))
        finally:
            ours = None
            _free(device)
        _log(f"seahal {name}", start)
    return found


def rows(ops: list[str], device: torch.device, quick: bool, contexts: tuple[int, ...] | None = None) -> list[dict]:
    """``model`` rows on ``device`` (at :func:`scale`'s contexts, or ``contexts``); the checkpoints
    live in a temporary folder, removed at the end."""
    s = scale(device, quick, contexts)
    print(f"model: {s.name}, contexts {', '.join(map(_tokens, s.contexts))}, {s.decode_steps} decode steps", flush=True)
    with tempfile.TemporaryDirectory(prefix="seahal-bench-model-") as folder:
        start = time.perf_counter()
        dense, release = write_checkpoints(Path(folder), s, device)
        _free(device)
        _log("checkpoints", start)
        return measure(dense, release, s, device)
