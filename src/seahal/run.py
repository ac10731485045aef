"""The model commands: ``seahal run`` (load, plan, generate, measure) and ``seahal convert``.

``seahal run`` without ``--model`` uses the built-in tiny DeepSeek-V4 checkpoint (random
weights in the release's FP8/FP4 layout), built and cached on first use under
``$SEAHAL_CACHE`` (default ``~/.cache/seahal``). This module imports torch only when a
command runs, so registering the commands costs nothing.

Split over processes, ``torchrun --nproc-per-node N -m seahal run --tp T --ep E`` (N = T x E) runs
the same command on every rank; rank 0 prints (the plan, a per-rank placement table, the figures).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import time
from pathlib import Path

DEFAULT_PROMPT_IDS = [0] + list(range(100, 115))
"""16 tokens: BOS, then fixed ids every vocabulary (tiny included) has."""
DEFAULT_MAX_NEW_TOKENS = 8


def add_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Register ``run`` and ``convert`` on the ``seahal`` command line."""
    p = subparsers.add_parser("run", help="load a model, show its plan, generate, report tok/s and cache size")
    p.add_argument("--model", metavar="PATH", help="checkpoint folder (default: the built-in tiny V4, cached)")
    p.add_argument("--device", default="auto", help="cpu, cuda, npu, mlu, cuda:1, ... (default: auto)")
    p.add_argument("--policy", choices=("fallback", "strict"), default="fallback")
    p.add_argument("--prompt", help="text (needs the checkpoint's tokenizer.json) or comma-separated token ids")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    p.add_argument(
        "--warmup", type=int, default=2, metavar="N",
        help="generate N untimed tokens first (kernel compilation, caches); 0 to skip (default 2)",
    )
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--compare-reference", action="store_true",
        help="rerun with every op on the CPU reference kernels and print the max logit difference",
    )
    p.add_argument("--tp", type=int, metavar="T", help="tensor-parallel ranks (launch with torchrun; see docs/scale-out.md)")
    p.add_argument("--ep", type=int, metavar="E", help="expert-parallel ranks (torchrun --nproc-per-node T*E)")
    p.add_argument("--dp-attention", action="store_true", help="each TP group runs attention on its share of the batch")
    p.add_argument(
        "--moe-comm", choices=("auto", "all_to_all", "gather"), default="auto",
        help="how tokens reach the experts' ranks (default: all-to-all for large batches, gather for small)",
    )
    p.set_defaults(func=run)

    p = subparsers.add_parser("convert", help="quantise a bf16/fp32 checkpoint into the release's FP8/FP4 layout")
    p.add_argument("--src", required=True, metavar="PATH", help="source checkpoint folder")
    p.add_argument("--dst", required=True, metavar="PATH", help="new folder for the converted checkpoint")
    p.add_argument("--experts", choices=("fp4", "fp8"), default="fp4", help="routed-expert format (default fp4)")
    p.add_argument("--linears", choices=("fp8", "bf16"), default="fp8", help="attention/shared-expert linears")
    p.add_argument("--max-shard-gb", type=float, default=4.0, help="shard size bound (default 4 GB)")
    p.set_defaults(func=convert)


def convert(args: argparse.Namespace) -> int:
    from seahal.model.convert import convert as convert_checkpoint

    start = time.perf_counter()
    dst = convert_checkpoint(args.src, args.dst, args.experts, args.linears, int(args.max_shard_gb * 2**30))
    print(f"wrote {dst} (experts {args.experts}, linears {args.linears}) in {time.perf_counter() - start:.1f} s")
    return 0


def _prompt_ids(text: str | None, tokenizer) -> list[int]:
    if text is None:
        return list(DEFAULT_PROMPT_IDS)
    if all(part.strip().isdigit() for part in text.split(",")):
        return [int(part) for part in text.split(",")]
    if tokenizer is None:
        raise SystemExit("--prompt text needs a tokenizer.json in the checkpoint; pass token ids like 0,17,42")
    return tokenizer.encode(text)


def _checkpoint(path: str | None) -> Path:
    from seahal.model.tiny import default_checkpoint

    if path is not None:
        return Path(path)
    start = time.perf_counter()
    folder, built = default_checkpoint()
    how = f"built in {time.perf_counter() - start:.1f} s" if built else "cached"
    print(f"checkpoint: built-in tiny DeepSeek-V4 at {folder} ({how})")
    return folder


def _parallel(args: argparse.Namespace):
    """This rank's placement when the run is split (--tp/--ep given or launched by torchrun), else None."""
    if args.tp is None and args.ep is None and not args.dp_attention and "WORLD_SIZE" not in os.environ:
        return None
    from seahal.model.parallel import ParallelConfig, init_parallel

    config = ParallelConfig(args.tp or 1, args.ep or 1, args.dp_attention, args.moe_comm)
    return init_parallel(config, args.device)


def run(args: argparse.Namespace) -> int:
    parallel = _parallel(args)
    if parallel is None:
        return _run(args, None)
    from seahal.model.parallel import shutdown_parallel

    try:
        if parallel.rank == 0:
            return _run(args, parallel)
        with contextlib.redirect_stdout(io.StringIO()):  # every rank computes, rank 0 reports
            return _run(args, parallel)
    finally:
        shutdown_parallel()


def _run(args: argparse.Namespace, parallel) -> int:
    from seahal.model import load
    from seahal.model.generate import generate
    from seahal.model.tokenizer import load_tokenizer

    if parallel is None:
        path = _checkpoint(args.model)
    else:  # rank 0 builds the default checkpoint (if needed) before the others read it
        import torch.distributed as dist

        path = _checkpoint(args.model) if parallel.rank == 0 else None
        dist.barrier()
        path = path or _checkpoint(args.model)
    start = time.perf_counter()
    model = load(path, device=args.device, policy=args.policy, announce=False, parallel=parallel)
    print(f"loaded {path} on {model.device} in {time.perf_counter() - start:.1f} s")
    print(model.plan)
    if parallel is not None:
        from seahal.model.parallel import placement_table

        print(placement_table(model, parallel))

    tokenizer = load_tokenizer(path)
    prompt = _prompt_ids(args.prompt, tokenizer)
    sampling = dict(
        temperature=args.temperature, top_p=args.top_p, greedy=args.temperature <= 0, seed=args.seed,
        eos_token_id=model.config.eos_token_id,
    )
    if args.warmup > 0:
        generate(model, [prompt], args.warmup, **sampling)
    out = generate(model, [prompt], args.max_new_tokens, **sampling)
    tokens, s = out[0], out.stats
    print(f"prompt: {len(prompt)} tokens {prompt}")
    print(f"generated: {len(tokens)} tokens {tokens}")
    if tokenizer is not None:
        print(f"text: {tokenizer.decode(prompt + tokens)!r}")
    print(f"prefill: {s.prompt_tokens} tokens in {s.prefill_seconds:.3f} s = {s.prefill_tokens_per_second:.1f} tok/s")
    print(f"decode: {s.decoded_tokens} tokens in {s.decode_seconds:.3f} s = {s.decode_tokens_per_second:.1f} tok/s "
          f"({s.decode_mode})")
    if s.cached_tokens:
        print(
            f"cache: {s.cache_bytes / s.cached_tokens:.0f} bytes/token ({s.cache_bytes} bytes allocated for "
            f"{s.cached_tokens} tokens; growing part {s.cache_bytes_per_token:.0f} bytes/token)"
        )
    if args.compare_reference:
        _compare_reference(model, path, args, prompt, tokens if sampling["greedy"] else [])
    return 0


def _compare_reference(model, path: Path, args: argparse.Namespace, prompt: list[int], greedy_tokens: list[int]):
    """Load the checkpoint again with every op forced to ``cpu.reference`` (on the same device)
    and print how far the two models' logits over prompt + generated tokens are apart."""
    import torch

    from seahal.model import load
    from seahal.model.transformer import MODEL_OPS

    every_op_on_reference = {"SEAHAL_OPS": ",".join(f"{op}=cpu.reference" for op in MODEL_OPS)}
    reference = load(path, device=args.device, policy=args.policy, announce=False, environ=every_op_on_reference)
    ids = torch.tensor([prompt + greedy_tokens], device=model.device)
    logits, expected = model(ids), reference(ids)
    diff = (logits - expected).abs().max().item()
    relative = ((logits - expected).norm() / expected.norm()).item()
    print(
        f"reference ({reference.plan.summary()}): max |logit diff| {diff:.3e} over {ids.shape[1]} positions "
        f"(max |logit| {expected.abs().max().item():.3g}; relative RMS diff {relative:.3e})"
    )
    if greedy_tokens:
        picks = expected[0, len(prompt) - 1 : -1].argmax(dim=-1).tolist()
        agree = sum(a == b for a, b in zip(picks, greedy_tokens))
        print(f"reference greedy picks agree with the generated tokens at {agree}/{len(greedy_tokens)} positions")
