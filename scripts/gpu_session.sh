#!/usr/bin/env bash
# One prepared GPU session for the cuda backend: the end-to-end model, full-shape
# conformance, the experts' rows, the GPU tests, then the GEMMs', mHC's and the decode
# kernels' rows, in priority order, each step under its own time limit and all of them under one
# budget (default 540 s: one device command may run 600 s). A failing or timed-out step does not
# stop the next; steps that no longer fit the budget are reported as skipped. Results go to
# $OUT (default ./out), at most 8 files (what the device tool brings back):
#
#   summary.txt         the steps' status, seconds and last line, then a digest of every result file
#   session.log         every step's full output
#   conformance.json    SEAHAL_CUDA_UNVERIFIED=1 seahal conformance --backend cuda
#   bench-model.json    the end-to-end model at 1k context against transformers (wheels in .whl/)
#                       (--only bench-model-4k: bench-model-4k.json, the same at 4k context)
#   bench-gemm.json     fp4_gemm and fp8_gemm (with the Gluon ping-pong kernel beside M >= 512)
#   bench-experts.json  moe_experts and its routing alone
#   bench-decode.json   sparse_attention and the indexer
#   bench-mhc-compress.json   mHC, rms_norm_rope, the compressors, the indexer's rotation
#
# Usage (on the device, from the repository root):
#   bash scripts/gpu_session.sh [--dry-run] [--budget SECONDS] [--only STEP,STEP]
# --dry-run prints the steps and their limits and runs nothing; --only runs the named steps (to
# finish in a second device call what the first had no budget for; `--only bench-gate` and
# `--only bench-model` run the steps no default run includes). The measured time of each step is
# in backends/cuda/TUNING.md.
set -uo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
RESULTS="${OUT:-$ROOT/out}"
BUDGET=540
ONLY=""
DRY_RUN=0
MIN_STEP=20  # a step gets at least this many seconds, or is skipped

while (($#)); do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --budget) BUDGET="$2"; shift ;;
    --only) ONLY=",$2,"; shift ;;
    -h | --help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "gpu_session.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

# name | cap in seconds | command (run from the repository root with bash -c), in priority order:
# the conformance suite, the end-to-end model, the experts' rows (FP4 defaults changed after
# 14a3a20), the decode kernels', mHC's and compressors' rows (last measured at 567d97d and
# 1e4356c), then the GPU tests and the GEMMs' rows (both run at 14a3a20). Measured on the H100 at
# 14a3a20: setup 7 s, conformance 50 s cold (its kernels compiled ahead in 34 s by 16 processes),
# bench-model-quick 209 s, bench-experts over 284 s for 21 of its rows, pytest-gpu 178 s,
# bench-gemm 50 s; bench-decode 94 s at 567d97d; bench-mhc-compress 28 s at 1e4356c.
# The bench files are rewritten after every row, so a step cut at its limit keeps what it measured.
# Running the conformance suite beside the GPU tests timed out (the compiles of both share 16
# cores), so the steps run one after another.
STEPS=(
  "setup|30|print_environment"
  "conformance|300|SEAHAL_CUDA_UNVERIFIED=1 \$PYTHON -m seahal conformance --backend cuda --jobs \$(nproc) --json \$RESULTS/conformance.json"
  "bench-model-quick|300|install_carried_wheels && \$PYTHON -m seahal.testing.triton_precompile model --quick && SEAHAL_CUDA_UNVERIFIED=1 \$PYTHON -m seahal bench --backend cuda --quick --ops model --json \$RESULTS/bench-model.json"
  "bench-experts|300|\$PYTHON -m seahal.testing.triton_precompile bench --ops moe_experts && SEAHAL_CUDA_UNVERIFIED=1 \$PYTHON -m seahal bench --backend cuda --ops moe_experts --json \$RESULTS/bench-experts.json"
  "bench-decode|200|\$PYTHON -m seahal.testing.triton_precompile bench --ops sparse_attention,indexer,grouped_linear && \$PYTHON -m seahal bench --backend cuda --ops sparse_attention,indexer,grouped_linear --json \$RESULTS/bench-decode.json"
  "bench-mhc-compress|90|\$PYTHON -m seahal.testing.triton_precompile bench --ops mhc,rms_norm_rope,kv_compress && \$PYTHON -m seahal bench --backend cuda --ops mhc,rms_norm_rope,kv_compress,hadamard_rotate --json \$RESULTS/bench-mhc-compress.json"
  "pytest-gpu|200|SEAHAL_CUDA_UNVERIFIED=1 \$PYTHON -m pytest -q -rfE -p no:cacheprovider \$(xdist_args) \$(timeout_args) -k 'not test_under_interpreter and (not test_decode_graph or on_a_gpu)' --deselect tests/test_cuda_compile.py tests/test_cuda_*.py tests/test_decode_graph.py"
  "bench-gemm|120|\$PYTHON -m seahal bench --backend cuda --ops fp4_gemm,fp8_gemm --json \$RESULTS/bench-gemm.json"
)
# Run only when --only names them: every new kernel's rows once at quick shapes (the fallback when
# the full steps fail); the router's rows (measured on the H200 on 2026-11-26; its bf16 path is
# unchanged since, its fp32-weight path, the model's gate, takes the tensor cores since 2026-11-27);
# the end-to-end model against transformers at 1k and 4k context (minutes, 32 GB of GPU
# memory, 22 GB of temporary disk; wheels carried in .whl/, transformers >= 5.23, go first), or at
# 4k alone with the quick run's 16 decode steps (bench-model-4k.json: a device call of its own); and
# the experts' launch-config sweep (V4-Flash, quick: first the end-to-end bench's prefill calls at 1k
# and 4k tokens, its routed FP4 experts of 64 and its FP8 shared expert, then the one-token rows,
# the routed FP4 and the shared FP8 experts, and the 8192-token FP4 prefill), for moe_experts' table.
OPT_IN_STEPS=(
  "bench-quick|150|\$PYTHON -m seahal bench --backend cuda --quick --ops moe_experts,sparse_attention,indexer,kv_compress,mhc,rope,rms_norm_rope,kv_cache_unpack,fp32_linear,grouped_linear --json \$RESULTS/bench-quick.json"
  "bench-gate|60|\$PYTHON -m seahal bench --backend cuda --ops moe_gate --json \$RESULTS/bench-gate.json"
  "bench-model|580|install_carried_wheels && \$PYTHON -m seahal.testing.triton_precompile model && SEAHAL_CUDA_UNVERIFIED=1 \$PYTHON -m seahal bench --backend cuda --ops model --json \$RESULTS/bench-model.json"
  "bench-model-4k|420|install_carried_wheels && \$PYTHON -m seahal.testing.triton_precompile model --quick --contexts 4096 && SEAHAL_CUDA_UNVERIFIED=1 \$PYTHON -m seahal bench --backend cuda --quick --ops model --contexts 4096 --json \$RESULTS/bench-model-4k.json"
  "tune-experts|300|\$PYTHON -m seahal.testing.triton_precompile tune-experts --quick --tokens 1,1024,4096,8192 --model V4-Flash && \$PYTHON -m seahal.bench.cuda_moe_experts --tune --quick --tokens 1,1024,4096,8192 --model V4-Flash --json \$RESULTS/tune-experts.json"
)

xdist_args() {  # a worker per 16 GiB of GPU memory, 2 to 8 (H100: 4, H200: 8), one file each at a time
  # (kernel compiles overlap; the 64k tests need ~12 GB each)
  "$PYTHON" -c "import xdist" 2>/dev/null || return 0
  "$PYTHON" -c "import torch; gib = torch.cuda.get_device_properties(0).total_memory / 2**30; print(f'-n {max(2, min(8, int(gib // 16)))} --dist loadfile')" 2>/dev/null \
    || echo "-n 2 --dist loadfile"
}

timeout_args() {  # a hung kernel fails its test instead of the step
  "$PYTHON" -c "import pytest_timeout" 2>/dev/null && echo "--timeout 150"
}

print_environment() {
  nvidia-smi -L || true
  "$PYTHON" -c "import sys, torch, triton, seahal; print(sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(), 'seahal from', seahal.__file__)"
}

make_importable() {
  # The device machine starts bare. Rather than build seahal there (scikit-build, the C++ module),
  # lay out its packages as installed (src/seahal, hal, backends, model -> seahal.*) with symlinks
  # and the entry points of pyproject.toml (backends register through them). The optional native
  # CPU module is absent; nothing here needs it.
  "$PYTHON" -c "import seahal.backends.cuda" 2>/dev/null && return 0
  local site="$SCRATCH/site"
  mkdir -p "$site/seahal" "$site/seahal-0.1.0.dist-info"
  for entry in "$ROOT"/src/seahal/*; do ln -sfn "$entry" "$site/seahal/"; done
  for package in hal backends model; do ln -sfn "$ROOT/$package" "$site/seahal/$package"; done
  printf 'Metadata-Version: 2.1\nName: seahal\nVersion: 0.1.0\n' >"$site/seahal-0.1.0.dist-info/METADATA"
  "$PYTHON" - "$ROOT/pyproject.toml" >"$site/seahal-0.1.0.dist-info/entry_points.txt" <<'EOF'
import sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
for group, entries in {"console_scripts": project.get("scripts", {}), **project.get("entry-points", {})}.items():
    print(f"[{group}]", *(f"{name} = {target}" for name, target in entries.items()), "", sep="\n")
EOF
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
}

install_carried_wheels() {  # wheels the device image lacks, carried in .whl/ (TUNING.md)
  compgen -G "$ROOT/.whl/*.whl" >/dev/null || return 0
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SCRATCH/wheels" "$ROOT"/.whl/*.whl \
    && export PYTHONPATH="$SCRATCH/wheels:$PYTHONPATH"
}

selected() { [[ -z "$ONLY" || "$ONLY" == *",$1,"* ]]; }
named() { [[ "$ONLY" == *",$1,"* ]]; }

cd "$ROOT" || exit 2
if ((DRY_RUN)); then
  printf 'budget %ss, results in %s\n' "$BUDGET" "$RESULTS"
  for step in "${STEPS[@]}"; do
    IFS='|' read -r name cap command <<<"$step"
    selected "$name" && printf '%-16s <= %4ss  %s\n' "$name" "$cap" "$command"
  done
  for step in "${OPT_IN_STEPS[@]}"; do
    IFS='|' read -r name cap command <<<"$step"
    named "$name" && printf '%-16s <= %4ss  %s\n' "$name" "$cap" "$command"
  done
  exit 0
fi

mkdir -p "$RESULTS"
SCRATCH="$(mktemp -d)"
LOG="$RESULTS/session.log"
SUMMARY="$RESULTS/summary.txt"
: >"$LOG"
export PYTHON RESULTS ROOT SCRATCH PYTHONUNBUFFERED=1
export OUT="$SCRATCH"  # bench modules that write $OUT/<module>.json on their own write there, not into the 8 files
export -f print_environment xdist_args timeout_args install_carried_wheels
make_importable
DEADLINE=$((SECONDS + BUDGET))
printf '%-16s %-10s %7s %6s  %s\n' step status seconds limit "last line" >"$SUMMARY"
not_ok=0

RUN=("${STEPS[@]}")
for step in "${OPT_IN_STEPS[@]}"; do
  named "${step%%|*}" && RUN+=("$step")
done
for step in "${RUN[@]}"; do
  IFS='|' read -r name cap command <<<"$step"
  selected "$name" || continue
  left=$((DEADLINE - SECONDS))
  if ((left < MIN_STEP)); then
    printf '%-16s %-10s %7s %6s  %s\n' "$name" skipped - - "out of budget" | tee -a "$SUMMARY"
    not_ok=$((not_ok + 1))
    continue
  fi
  limit=$((cap < left ? cap : left))
  echo "=== $name (limit ${limit}s): $command" | tee -a "$LOG"
  start=$SECONDS
  timeout -k 10 "$limit" bash -c "$command" >"$SCRATCH/$name.log" 2>&1
  rc=$?
  cat "$SCRATCH/$name.log" >>"$LOG"
  case $rc in
    0) status=ok ;;
    124 | 137) status=timeout ;;
    *) status="failed($rc)" ;;
  esac
  ((rc == 0)) || not_ok=$((not_ok + 1))
  last="$(grep -v '^\s*$' "$SCRATCH/$name.log" | tail -n 1 | cut -c1-160)"
  printf '%-16s %-10s %7s %6s  %s\n' "$name" "$status" $((SECONDS - start)) "$limit" "$last" | tee -a "$SUMMARY"
done

shopt -s nullglob
benches=("$RESULTS"/bench-*.json)
{
  echo
  grep -E '^(total:|Triton cache entries|  [a-z_0-9]+ \[)' "$SCRATCH/conformance.log" 2>/dev/null
  (cd "$SCRATCH" && grep '^precompile:' ./*.log)  # each step's compiling ahead (conformance and the benches)
  ((${#benches[@]})) && "$PYTHON" "$ROOT/scripts/bench_digest.py" "${benches[@]}"
} >>"$SUMMARY" 2>&1
echo
cat "$SUMMARY"
rm -rf "$SCRATCH"
exit $((not_ok > 0))
