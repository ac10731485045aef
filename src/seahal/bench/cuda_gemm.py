"""GPU benchmark of the cuda backend's block-scaled GEMMs beside cuBLAS and bf16 matmul.

Per (weight shape, M) row: our Triton kernel; ``torch._scaled_mm`` with DeepSeek blockwise scales
(1x128 activation, 128x128 weight; checked against a float64 dequantised product before timing);
``torch._scaled_mm`` rowwise; bf16 ``torch.matmul``; for ``fp8_gemm`` at M >= 512 the Gluon
ping-pong kernel (``GemmConfig.pingpong``, 128x128 tiles, 4 slots); for ``fp4_gemm`` the chosen config in the
other FP4 form (``tl.dot_scaled`` or bf16 decode, ``GemmConfig.fp4_mx``). Times are medians of
CUDA-graph replays timed with CUDA events, L2 flushed before every call (``common.time_cuda``). TFLOP/s = 2MNK/t,
GB/s = bytes(A + B + scales + C)/t, against 1979 FP8 TFLOP/s and the GPU's copy bandwidth
(``common.peak_tbps``).

    python -m seahal.bench.cuda_gemm [--ops fp8_gemm,fp4_gemm] [--quick] [--tune] [--json PATH]
    seahal bench --backend cuda --ops fp8_gemm
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, replace

import torch

from seahal.bench.common import PEAK_FP8_TFLOPS, peak_tbps
from seahal.bench.common import time_cuda as _bench

FP8_SHAPES = {  # V4-Flash FP8 linears, name -> (N, K)
    "q_a": (1024, 4096),
    "q_b": (32768, 1024),
    "wkv": (512, 4096),
    "q_a+wkv": (1536, 4096),  # what the model runs: the two stacked (model.layers.StackedLinears)
    "q_b+idx_wq_b": (40960, 1024),  # a CSA layer's two query projections, stacked likewise
    "wo_b": (4096, 8192),
    "idx_wq_b": (8192, 1024),
    "shexp_up": (2048, 4096),
    "shexp_down": (4096, 2048),
}
FP4_SHAPES = {"exp_up": (2048, 4096), "exp_down": (4096, 2048)}  # V4-Flash routed expert w1/w3, w2
M_VALUES = (1, 16, 64, 512, 4096, 16384)
QUICK_M_VALUES = (1, 64, 4096)
MAX_REL_ERR = 1e-2
"""bf16 output of a product accumulated in fp32: ~2^-9 relative per element; 1e-2 flags real bugs."""


# -- inputs ---------------------------------------------------------------------------------------
def fp8_weight(n: int, k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random weight quantised in 128x128 blocks: e4m3 [N, K] and fp32 power-of-two scales [N/128, K/128]."""
    from seahal.hal.formats import FP8_MAX, ue8m0_ceil

    w = torch.randn(n, k, device=device) * 0.02
    blocks = w.reshape(n // 128, 128, k // 128, 128)
    scale = ue8m0_ceil(blocks.abs().amax(dim=(1, 3)).clamp(min=1e-4) / FP8_MAX)
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.reshape(n, k), scale


def fp8_activation(m: int, k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    from seahal.hal.formats import fp8_quantize

    return fp8_quantize(torch.randn(m, k, device=device), 128)


def fp4_weight(n: int, k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random e2m1 weight [N, K/2] packed with e8m0 1x32 scales [N, K/32]."""
    from seahal.hal.formats import fp4_quantize, ue8m0_encode

    packed, scale = fp4_quantize(torch.randn(n, k, device=device) * 0.02)
    return packed, ue8m0_encode(scale).view(torch.float8_e8m0fnu)


def dequantised_product(op: str, a, a_scale, b, b_scale) -> torch.Tensor:
    """float64 ``(A sA) @ (B sB)^T`` from the reference codecs: the figure errors are measured against."""
    from seahal.hal.formats import decode_scale, fp4_dequantize, fp8_dequantize

    a64 = fp8_dequantize(a, a_scale, 128, torch.float64)
    if op == "fp8_gemm":
        rows = decode_scale(b_scale).double().repeat_interleave(128, dim=0)[: b.shape[0]]
        b64 = fp8_dequantize(b, rows, 128, torch.float64)
    else:
        b64 = fp4_dequantize(b, b_scale, 32, torch.float64)
    return a64 @ b64.T


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error; inf when ``out`` holds a NaN (e.g. an unwritten poisoned element)."""
    diff = torch.linalg.vector_norm(out.double() - ref) / torch.linalg.vector_norm(ref)
    return float(diff) if torch.isfinite(diff) else float("inf")


# -- kernels under test -----------------------------------------------------------------------
def _launcher(op: str) -> Callable:
    if op == "fp8_gemm":
        from seahal.backends.cuda.fp8_gemm import launch_fp8_gemm

        return launch_fp8_gemm
    from seahal.backends.cuda.fp4_gemm import launch_fp4_gemm

    return launch_fp4_gemm


def _tables(op: str):
    if op == "fp8_gemm":
        from seahal.backends.cuda.fp8_gemm import CONFIGS
    else:
        from seahal.backends.cuda.fp4_gemm import CONFIGS
    return CONFIGS


def tune_candidates(op: str, m: int):
    """Configs tried by ``--tune`` for one M class (see TUNING.md for what was learnt)."""
    from seahal.backends.cuda._gemm import GemmConfig as C

    if m <= 16:
        configs = [C(16, bn, 4, st, sk) for bn, st in ((32, 6), (64, 5), (128, 4)) for sk in (1, 2, 4, 8)]
        tma = [C(16, bn, 4, st, sk, tma=True) for bn, st in ((64, 5), (128, 4)) for sk in (1, 2, 4, 8)]
    elif m <= 64:
        configs = [C(64, bn, 4, st, sk) for bn, st in ((32, 6), (64, 5), (128, 4)) for sk in (1, 2, 4)]
        tma = [C(64, 64, 4, 5, sk, tma=True) for sk in (1, 2, 4)] + [C(64, 128, 4, 4, 1, tma=True)]
    elif m <= 512:
        configs = [C(64, 64, 4, 5), C(64, 128, 4, 4), C(128, 64, 4, 4), C(128, 128, 8, 3), C(128, 128, 4, 3),
                   C(64, 256, 8, 3), C(128, 256, 8, 3), C(64, 128, 4, 4, 2), C(128, 128, 8, 2)]
        tma = [C(64, 64, 4, 5, tma=True), C(64, 128, 4, 4, tma=True), C(128, 128, 8, 3, tma=True)]
    else:
        configs = [C(128, 128, 8, 2), C(128, 128, 8, 3), C(128, 128, 8, 4), C(128, 128, 4, 3), C(128, 256, 8, 3),
                   C(256, 128, 8, 3), C(128, 64, 4, 4), C(64, 128, 4, 4), C(64, 256, 8, 3), C(128, 128, 8, 3, 1, 16)]
        tma = [C(128, 128, 8, 3, tma=True), C(128, 128, 8, 4, tma=True), C(64, 128, 4, 4, tma=True),
               C(128, 256, 8, 3, tma=True), C(128, 128, 8, 3, 1, 16, tma=True)]
    if m >= 512:  # persistent grids of the tile shapes that won these rows (not yet measured); programs
        # per SM: 2 where two fit by shared memory and registers (64x128 w4 s4: 96 KB), else 1
        persistent = [C(64, 128, 4, 4, persistent=2), C(128, 128, 8, 3, persistent=1), C(128, 128, 8, 4, persistent=1)]
        configs += persistent
        tma += [replace(c, tma=True) for c in persistent]
    if op == "fp8_gemm":
        pingpong = [C(128, 128, 4, 4, pingpong=True), C(128, 128, 4, 5, pingpong=True), C(128, 64, 4, 6, pingpong=True)]
        return configs + tma + (pingpong if m >= 512 else [])
    return configs + [replace(c, fp4_mx=True) for c in configs]  # the tl.dot_scaled form of each


def _checked(op: str, config, a, a_scale, b, b_scale, ref) -> float:
    """Relative error of one launch into a NaN-poisoned output (unwritten elements show as inf)."""
    out = torch.full((a.shape[0], b.shape[0]), float("nan"), dtype=torch.bfloat16, device=a.device)
    _launcher(op)(a, a_scale, b, b_scale, out, config)
    torch.cuda.synchronize()
    return rel_err(out, ref)


def _trial(op: str, config, a, a_scale, b, b_scale, out, ref, quick: bool) -> dict:
    """One tuning candidate: its error on a poisoned output, then its time if correct."""
    trial: dict = {"config": asdict(config)}
    try:
        trial["err"] = _checked(op, config, a, a_scale, b, b_scale, ref)
    except Exception as exc:  # a config the compiler rejects (e.g. out of shared memory)
        trial["error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
        return trial
    if trial["err"] <= MAX_REL_ERR:
        trial["us"] = _bench(lambda: _launcher(op)(a, a_scale, b, b_scale, out, config), quick)
    return trial


def _compile(op: str, config: dict, n: int, k: int) -> str:
    """Compile one config into Triton's disk cache (run in a worker process); returns an error or ''."""
    from seahal.backends.cuda._gemm import GemmConfig

    try:
        device = torch.device("cuda")
        a, a_scale = fp8_activation(16, k, device)
        b, b_scale = fp8_weight(n, k, device) if op == "fp8_gemm" else fp4_weight(n, k, device)
        out = torch.empty((16, n), dtype=torch.bfloat16, device=device)
        _launcher(op)(a, a_scale, b, b_scale, out, GemmConfig(**config))
        if op == "fp8_gemm" and config["block_m"] <= _fused_quant_rows():  # a decode row's quantising variant
            _launcher(op)(a.to(torch.bfloat16), None, b, b_scale, out, GemmConfig(**config))
        torch.cuda.synchronize()
        return ""
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc)[:160]}"


def precompile(op: str, configs, n: int, k: int) -> None:
    """Fill Triton's cache for ``configs`` in parallel processes (M is not a specialised argument,
    and N, K, strides only by divisibility, so one compile per config serves every shape)."""
    import concurrent.futures
    import multiprocessing

    unique = [asdict(c) for c in dict.fromkeys(configs)]
    workers = min(len(unique), os.cpu_count() or 1, 16)
    if workers <= 1:
        return
    t0 = time.time()
    from seahal.bench import (
        cuda_gemm,  # by its import name, so spawned workers can find _compile
    )

    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        errors = list(pool.map(cuda_gemm._compile, [op] * len(unique), unique, [n] * len(unique), [k] * len(unique)))
    failed = [f"{c}: {e}" for c, e in zip(unique, errors) if e]
    print(f"precompiled {len(unique)} {op} configs in {time.time() - t0:.1f} s; failed: {failed or 'none'}", flush=True)


# -- peers ------------------------------------------------------------------------------------
def cublas_blockwise(a, a_scale, b, b_scale) -> Callable[[], torch.Tensor]:
    """``torch._scaled_mm`` with DeepSeek scales: sA [M, K/128] M-major, sB^T of the row-major blocks."""
    scale_a = a_scale.t().contiguous().t()
    scale_b = b_scale.t()
    return lambda: torch._scaled_mm(a, b.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16)


def cublas_rowwise(a, b) -> Callable[[], torch.Tensor]:
    """``torch._scaled_mm`` with one fp32 scale per row of A and per row of B (timing peer)."""
    scale_a = torch.rand(a.shape[0], 1, device=a.device) + 0.5
    scale_b = torch.rand(1, b.shape[0], device=a.device) + 0.5
    return lambda: torch._scaled_mm(a, b.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16)


def _reference(op: str, a, a_scale, b, b_scale) -> Callable[[], torch.Tensor]:
    """The CPU reference's code on the GPU tensors: the spec's semantics ported naively (per-block
    dequantise, then matmul), the peer that shows what a plain-torch port would get."""
    from seahal.backends.cpu.reference import gemm

    kernel = getattr(gemm, op)
    return lambda: kernel(a, a_scale, b, b_scale)


def _peer(name: str, make: Callable, ref, quick: bool, check: bool, row: dict) -> None:
    """Time one peer into ``row[name + '_us']``, after checking its error when ``check``."""
    try:
        fn = make()
        if check:
            row[name + "_err"] = rel_err(fn(), ref)
            if row[name + "_err"] > MAX_REL_ERR:
                row[name + "_note"] = "wrong result: not timed"
                return
        row[name + "_us"] = _bench(fn, quick)
    except (RuntimeError, ValueError, NotImplementedError) as exc:
        row[name + "_note"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"


def _fused_quant_rows() -> int:
    from seahal.backends.cuda.fp8_gemm import FUSED_QUANT_ROWS

    return FUSED_QUANT_ROWS


QUANTISING_VARIANTS = {"quantising": "x quantised in the GEMM (act_quant_gemm)",
                       "quant_then_gemm": "fp8_act_quant then the GEMM (two launches)"}
"""Row keys -> names of the two forms of ``act_quant_gemm`` an fp8_gemm decode row also times."""


def _quantising_variants(a, a_scale, b, b_scale, config, ref, quick: bool, row: dict) -> None:
    """Time ``act_quant_gemm``'s two forms on bf16 rows x whose FP8 tiles carry A's values (codes
    times power-of-two scales, exact in bf16), under the row's config: its one launch (the GEMM
    quantising x's blocks as it loads them) and ``fp8_act_quant``'s launch then the GEMM's. Both
    are checked against the row's reference; what the fusion saves is their difference."""
    from seahal.backends.cuda import fp8_gemm
    from seahal.backends.cuda.quant import fp8_act_quant
    from seahal.hal.formats import fp8_dequantize

    x = fp8_dequantize(a, a_scale, 128, torch.bfloat16)
    out_q, out_2 = (torch.empty((a.shape[0], b.shape[0]), dtype=torch.bfloat16, device=a.device) for _ in range(2))
    _peer("quantising", lambda: (lambda: fp8_gemm.launch_fp8_gemm(x, None, b, b_scale, out_q, config)), ref, quick,
          True, row)
    _peer("quant_then_gemm", lambda: (lambda: fp8_gemm.launch_fp8_gemm(*fp8_act_quant(x), b, b_scale, out_2, config)),
          ref, quick, True, row)


# -- one row ----------------------------------------------------------------------------------
def bench_row(op: str, name: str, n: int, k: int, m: int, quick: bool, tune: bool) -> dict:
    from seahal.backends.cuda._gemm import GemmConfig, select_config

    device = torch.device("cuda")
    a, a_scale = fp8_activation(m, k, device)
    b, b_scale = fp8_weight(n, k, device) if op == "fp8_gemm" else fp4_weight(n, k, device)
    ref = dequantised_product(op, a, a_scale, b, b_scale)
    weight_bytes = b.numel() + b_scale.numel() * b_scale.element_size()
    total_bytes = a.numel() + a_scale.numel() * 4 + weight_bytes + m * n * 2
    row: dict = {"op": op, "shape": name, "N": n, "K": k, "M": m, "weight_MB": weight_bytes / 1e6, "bytes": total_bytes}

    out = torch.empty((m, n), dtype=torch.bfloat16, device=device)
    if tune:
        row["trials"] = [_trial(op, config, a, a_scale, b, b_scale, out, ref, quick) for config in tune_candidates(op, m)]
        best = min((t for t in row["trials"] if t.get("us")), key=lambda t: t["us"])
        config = GemmConfig(**best["config"])
    else:
        config = select_config(_tables(op), m, n, k, device)
    row["config"] = asdict(config)
    row["err"] = _checked(op, config, a, a_scale, b, b_scale, ref)
    row["us"] = _bench(lambda: _launcher(op)(a, a_scale, b, b_scale, out, config), quick)
    row["tflops"] = 2 * m * n * k / row["us"] / 1e6
    row["gbps"] = total_bytes / row["us"] / 1e3
    row["frac_fp8_peak"] = row["tflops"] / PEAK_FP8_TFLOPS
    row["frac_hbm"] = row["gbps"] / 1e3 / peak_tbps()

    if op == "fp8_gemm":
        if m >= 512 and not config.pingpong:  # the Gluon ping-pong kernel (fp8_gemm_pingpong) beside a Triton config
            out_pingpong, pingpong = torch.empty_like(out), GemmConfig(128, 128, 4, 4, pingpong=True)
            _peer("pingpong", lambda: (lambda: _launcher(op)(a, a_scale, b, b_scale, out_pingpong, pingpong)), ref,
                  quick, True, row)
        _peer("cublas_block", lambda: cublas_blockwise(a, a_scale, b, b_scale), ref, quick, True, row)
        _peer("cublas_row", lambda: cublas_rowwise(a, b), ref, quick, False, row)
        if m <= _fused_quant_rows():
            _quantising_variants(a, a_scale, b, b_scale, config, ref, quick, row)
    else:  # the chosen config in the other FP4 form (tl.dot_scaled <-> bf16 decode; fp4_mx in GemmConfig)
        other = replace(config, fp4_mx=not config.fp4_mx)
        out_other = torch.empty_like(out)
        _peer("other_form", lambda: (lambda: _launcher(op)(a, a_scale, b, b_scale, out_other, other)), ref, quick, True, row)
    a16 = a.to(torch.bfloat16)
    b16 = (b if op == "fp8_gemm" else torch.randn(n, k, device=device)).to(torch.bfloat16)
    _peer("bf16", lambda: (lambda: torch.matmul(a16, b16.t())), ref, quick, False, row)
    _peer("reference", lambda: _reference(op, a, a_scale, b, b_scale), ref, quick, True, row)
    if row.get("cublas_block_us"):
        row["speedup_vs_cublas_block"] = row["cublas_block_us"] / row["us"]
    del a, b, ref
    torch.cuda.empty_cache()
    return row


# -- driver -----------------------------------------------------------------------------------
def _fmt(value, spec: str) -> str:
    """``value`` formatted by ``spec``, or a dash of the same width when it is missing."""
    return format(value, spec) if isinstance(value, (int, float)) else format("-", ">" + spec.split(".")[0])


def format_table(rows: list[dict]) -> str:
    head = (f"{'op':8} {'shape':10} {'M':>5} {'us':>8} {'TFLOP/s':>8} {'GB/s':>6} {'%1979':>5} {'%3TB':>5} "
            f"{'blk_us':>8} {'row_us':>8} {'bf16_us':>8} {'ref_us':>8} {'x_blk':>5} {'err':>7} {'blk_err':>7}  config")
    lines = [head]
    for r in rows:
        c = r["config"]
        cfg = f"{c['block_m']}x{c['block_n']} w{c['num_warps']} s{c['num_stages']} k{c['split_k']} g{c['group_m']}"
        cfg += " tma" * bool(c.get("tma")) + (f" p{c['persistent']}" if c.get("persistent") else "")
        cfg += " mx" * bool(c.get("fp4_mx"))
        cfg += " pingpong" * bool(c.get("pingpong"))
        if r.get("other_form_us"):
            cfg += f" (other FP4 form: {r['other_form_us']:.1f} us)"
        if r.get("pingpong_us"):
            cfg += f" (pingpong 128x128: {r['pingpong_us']:.1f} us)"
        if r.get("quantising_us"):
            cfg += f" (x quantised in the GEMM: {r['quantising_us']:.1f} us; two launches: {_fmt(r.get('quant_then_gemm_us'), '.1f')} us)"
        lines.append(
            f"{r['op'][:8]:8} {r['shape']:10} {r['M']:>5} {_fmt(r['us'], '8.1f')} {_fmt(r['tflops'], '8.1f')} "
            f"{_fmt(r['gbps'], '6.0f')} {_fmt(100 * r['frac_fp8_peak'], '5.1f')} {_fmt(100 * r['frac_hbm'], '5.1f')} "
            f"{_fmt(r.get('cublas_block_us'), '8.1f')} {_fmt(r.get('cublas_row_us'), '8.1f')} "
            f"{_fmt(r.get('bf16_us'), '8.1f')} {_fmt(r.get('reference_us'), '8.1f')} "
            f"{_fmt(r.get('speedup_vs_cublas_block'), '5.2f')} "
            f"{_fmt(r['err'], '7.1e')} {_fmt(r.get('cublas_block_err'), '7.1e')}  {cfg}"
        )
    return "\n".join(lines)


def config_table_source(rows: list[dict]) -> str:
    """The tuned configs of one op's rows as the body of its committed ``SM90_CONFIGS`` literal."""
    from seahal.backends.cuda._gemm import m_class

    lines = []
    for r in rows:
        c = r["config"]
        flag = ", tma=True" if c.get("tma") else ""
        flag += f", persistent={c['persistent']}" if c.get("persistent") else ""
        flag += ", fp4_mx=True" if c.get("fp4_mx") else ""
        flag += ", pingpong=True" if c.get("pingpong") else ""
        lines.append(f"    ({m_class(r['M'])}, {r['N']}, {r['K']}): GemmConfig({c['block_m']}, {c['block_n']}, "
                     f"{c['num_warps']}, {c['num_stages']}, {c['split_k']}, {c['group_m']}{flag}),  "
                     f"# {r['shape']} {r['us']:.1f} us")
    return "\n".join(lines)


def write_table(op: str, rows: list[dict]) -> str:
    """Replace the ``SM90_CONFIGS`` literal in the op's kernel module with the tuned rows; returns its path."""
    from seahal.bench.common import write_config_table

    return write_config_table(op, "ConfigTable", config_table_source(rows))


def _cases(op: str, quick: bool, shapes: list[str] | None) -> list[tuple[str, int, int, int]]:
    """(shape name, N, K, M) rows of one op: FP8 linears up to M 16384, FP4 experts up to 4096."""
    table = FP8_SHAPES if op == "fp8_gemm" else FP4_SHAPES
    m_values = QUICK_M_VALUES if quick else M_VALUES
    return [(name, n, k, m) for name, (n, k) in table.items() if not shapes or name in shapes
            for m in m_values if op == "fp8_gemm" or m <= 4096]


def _configs_for(op: str, cases, tune: bool) -> list:
    from seahal.backends.cuda._gemm import select_config

    if tune:
        return [c for m in sorted({case[3] for case in cases}) for c in tune_candidates(op, m)]
    return [select_config(_tables(op), m, n, k, torch.device("cuda")) for _, n, k, m in cases]


def run(ops: list[str], quick: bool = False, tune: bool = False, json_path: str | None = None,
        shapes: list[str] | None = None, write_tables: bool = False,
        on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """Benchmark ``ops``; print the table last; write JSON to ``json_path`` (or $OUT) when given,
    rewritten after every row; hand each row to ``on_row`` as soon as it is measured."""
    if not torch.cuda.is_available():
        raise SystemExit("seahal bench --backend cuda needs a CUDA device")
    import triton

    env = {"torch": torch.__version__, "triton": triton.__version__, "gpu": torch.cuda.get_device_name(),
           "sms": torch.cuda.get_device_properties(0).multi_processor_count, "tune": tune, "quick": quick}
    rows: list[dict] = []
    path = json_path or (os.path.join(os.environ["OUT"], "cuda_gemm.json") if os.environ.get("OUT") else None)
    for op in ops:
        cases = _cases(op, quick, shapes)
        precompile(op, _configs_for(op, cases, tune), *cases[0][1:3])
        for name, n, k, m in cases:
            t0 = time.time()
            row = bench_row(op, name, n, k, m, quick, tune)
            rows.append(row)
            print(f"{op} {name} M={m}: {row['us']:.1f} us, err {row['err']:.1e}, "
                  f"cublas_block {row.get('cublas_block_us', row.get('cublas_block_note'))} "
                  f"({time.time() - t0:.1f} s)", flush=True)
            if path:  # after every row: a run cut at its time limit keeps what it measured
                with open(path, "w") as f:
                    json.dump({"env": env, "rows": rows}, f, indent=1)
            if on_row is not None:
                on_row(row)
    if tune and write_tables:
        for op in ops:
            print(f"tuned table written to {write_table(op, [r for r in rows if r['op'] == op])}")
    print(json.dumps(env))
    print(format_table(rows))
    return rows


_PEERS = {
    "cublas_blockwise": "cublas_block_us",
    "cublas_rowwise": "cublas_row_us",
    "bf16_matmul": "bf16_us",
    "reference": "reference_us",
}
"""Peer name in the common schema -> its key in this module's rows."""


def common_row(r: dict) -> dict:
    """One of :func:`run`'s rows in the common schema of ``seahal bench``."""
    from seahal.bench.common import Case, figures, new_row, record

    case = Case(r["op"], f"{r['shape']} M={r['M']} N={r['N']} K={r['K']}", 2 * r["M"] * r["N"] * r["K"], r["bytes"],
                PEAK_FP8_TFLOPS, params={"M": r["M"], "N": r["N"], "K": r["K"], "config": r["config"]})
    row = new_row(case, "triton")
    row["check"] = {"err": r["err"], "passed": r["err"] <= MAX_REL_ERR}
    for key, name in QUANTISING_VARIANTS.items():
        if r.get(key + "_us"):
            err = r[key + "_err"]  # timed only when within MAX_REL_ERR (_peer)
            row.setdefault("variant", {})[name] = {"check": {"err": err, "passed": err <= MAX_REL_ERR},
                                                   **figures(case, r[key + "_us"])}
    return record(row, case, r["us"], {name: r[key] for name, key in _PEERS.items() if r.get(key)})


def rows(ops: list[str], device: torch.device, quick: bool) -> list[dict]:
    """:func:`run`'s rows (its own table printed too) in the common schema of ``seahal bench``, each
    handed on as it is measured (``common.on_each_row``: a run cut short keeps its rows)."""
    from seahal.bench.common import row_measured

    out: list[dict] = []

    def measured(r: dict) -> None:
        out.append(common_row(r))
        row_measured(out[-1])

    run(ops, quick=quick, on_row=measured)
    return out


def main(args: argparse.Namespace) -> int:
    """``seahal bench --backend cuda``: args.ops (comma-separated), args.quick, args.json."""
    ops = (getattr(args, "ops", None) or "fp8_gemm").split(",")
    unknown = sorted(set(ops) - {"fp8_gemm", "fp4_gemm"})
    if unknown:
        print(f"cuda bench covers fp8_gemm and fp4_gemm, not {', '.join(unknown)}", file=sys.stderr)
        return 2
    run(ops, quick=getattr(args, "quick", False), tune=getattr(args, "tune", False), json_path=getattr(args, "json", None),
        shapes=getattr(args, "shapes", None), write_tables=getattr(args, "write_tables", False))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", default="fp8_gemm")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tune", action="store_true", help="time every candidate config; print the best as a table")
    parser.add_argument("--json", help="write rows as JSON here (default $OUT/cuda_gemm.json when $OUT is set)")
    parser.add_argument("--write-tables", action="store_true", help="with --tune: rewrite the kernel modules' SM90_CONFIGS")
    parser.add_argument("--shapes", type=lambda s: s.split(","), help="only these shape names")
    sys.exit(main(parser.parse_args()))
