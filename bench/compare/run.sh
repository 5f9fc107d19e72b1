#!/usr/bin/env bash
# bench/compare/run.sh: the ViT on the CPU, dino against PyTorch (eager fp32), in one run on
# the same cores with the same thread count.
#
#   bash bench/compare/run.sh [--threads N] [--reps R] [--warmup W] [--no-wait] [--precision fp32|bf16]
#
# --precision bf16: dino with bf16 GEMM operands (cpu_policy::bf16), PyTorch under CPU autocast
# to bfloat16 (the official code's autocast block); the workload names get "_bf16".
#
# 1. A venv at bench/compare/.venv with torch from PyPI, made on the first run (about 5 GiB:
#    PyPI's Linux wheel pulls the CUDA runtime wheels, unused here). If that install fails,
#    torch alone (--no-deps) plus its pure-Python dependencies is tried, then checked on the
#    CPU (untested here: the full install worked, 62 s and 5.3 GiB). The tests never use it.
# 2. Builds build/compare/bench/bench_vit with the default preset's flags (Release, -O3
#    -DNDEBUG, nothing machine-specific), in a build folder of its own without the tests.
# 3. Runs both sides with OMP_NUM_THREADS = MKL_NUM_THREADS = N (dino: cpu_policy{N};
#    PyTorch: torch.set_num_threads(N)), one workload at a time, and prints one line per
#    workload: images/s and ms/step for dino and PyTorch, and dino / PyTorch.
# The machine is shared (2 cores): before each run the script waits, up to 10 minutes, for
# both cores to be at least 90 % idle over 3 s (/proc/stat), prints `uptime` before and
# after, and flags a run whose slowest timed call exceeds its fastest by more than 25 %
# ("noisy": another process took a core; rerun). --no-wait skips the waiting.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

threads=2 reps=7 warmup=2 wait=1 precision=fp32
while [[ $# -gt 0 ]]; do
  case "$1" in
    --threads) threads="$2"; shift 2 ;;
    --reps) reps="$2"; shift 2 ;;
    --warmup) warmup="$2"; shift 2 ;;
    --no-wait) wait=0; shift ;;
    --precision) precision="$2"; shift 2 ;;
    *) echo "usage: $0 [--threads N] [--reps R] [--warmup W] [--no-wait] [--precision fp32|bf16]" >&2; exit 2 ;;
  esac
done
[[ $precision == fp32 || $precision == bf16 ]] || { echo "$0: --precision must be fp32 or bf16, got '$precision'" >&2; exit 2; }

# Waits until both cores are >= 90 % idle over 3 s (at most 10 minutes).
wait_quiet() {
  [[ $wait == 1 ]] || return 0
  local t0 i0 t1 i1 pct
  cpu_times() { awk '/^cpu /{ print $2+$3+$4+$5+$6+$7+$8+$9, $5+$6 }' /proc/stat; }
  for _ in $(seq 1 200); do
    read -r t0 i0 < <(cpu_times); sleep 3; read -r t1 i1 < <(cpu_times)
    pct=$(( 100 * (i1 - i0) / (t1 - t0 > 0 ? t1 - t0 : 1) ))
    (( pct >= 90 )) && return 0
  done
  echo "== the machine stayed busy for 10 minutes; measuring anyway" >&2
}
# Prints a result line, with a note when max > 1.25 min (a disturbed run).
flag() {
  awk '{ mn = mx = 0; for (i = 1; i <= NF; ++i) { split($i, a, "="); if (a[1] == "min_ms") mn = a[2]; if (a[1] == "max_ms") mx = a[2] }
         if (mn > 0 && mx > 1.25 * mn) printf "%s  NOISY (max/min %.2f: rerun on a quiet machine)\n", $0, mx / mn; else print }'
}

venv=bench/compare/.venv
py="$venv/bin/python"
torch_ok() { "$py" -c 'import torch; assert float(torch.ones(2) @ torch.ones(2)) == 2.0' >/dev/null 2>&1; }

# ---------------------------------------------------------------- 1. PyTorch
if [[ ! -x "$py" ]] || ! torch_ok; then
  echo "== creating $venv with torch from PyPI"
  python3 -m venv "$venv"
  "$py" -m pip install -q --upgrade pip
  if ! "$py" -m pip install torch --index-url https://pypi.org/simple; then
    echo "== full install failed; trying torch without its CUDA dependency wheels"
    "$py" -m pip install --no-deps torch --index-url https://pypi.org/simple
    "$py" -m pip install filelock typing-extensions sympy networkx jinja2 fsspec mpmath MarkupSafe \
      --index-url https://pypi.org/simple
  fi
  torch_ok || { echo "run.sh: torch does not work on the CPU in $venv" >&2; exit 1; }
fi

# ---------------------------------------------------------------- 2. dino
cmake -S . -B build/compare -DCMAKE_BUILD_TYPE=Release -DDINO_BUILD_BENCH=ON -DDINO_BUILD_TESTS=OFF \
  -DDINO_BUILD_EXAMPLES=OFF >/dev/null
cmake --build build/compare --target bench_vit -j "${JOBS:-2}"
bin=build/compare/bench/bench_vit

# ---------------------------------------------------------------- 3. run
export OMP_NUM_THREADS="$threads" MKL_NUM_THREADS="$threads"
out=build/compare/bench-results
mkdir -p "$out"
log="$out/compare_vit_t${threads}_$precision.txt"
: >"$log"

echo "== $(date -u '+%Y-%m-%d %H:%M UTC'); uptime: $(uptime)" | tee -a "$log"
echo "== torch $("$py" -c 'import torch; print(torch.__version__, "cpu capability", torch.backends.cpu.get_cpu_capability())' 2>/dev/null)" | tee -a "$log"
echo "== threads $threads, reps $reps (median), warm-up $warmup" | tee -a "$log"
common=(--threads "$threads" --reps "$reps" --warmup "$warmup" --precision "$precision")
for w in infer train; do
  wait_quiet
  "$bin" --only "$w" "${common[@]}" | flag | tee -a "$log"
  wait_quiet
  "$py" bench/compare/torch_bench.py --only "$w" "${common[@]}" | flag | tee -a "$log"
done
"$bin" --only allocs "${common[@]}" | tee -a "$log"
echo "== uptime after: $(uptime)" | tee -a "$log"

# One line per workload: images/s, ms/step and the ratio.
echo
echo "workload                  threads  dino img/s  dino ms/step  torch img/s  torch ms/step  dino/torch"
awk '
  function val(k,   i, a) { for (i = 4; i <= NF; ++i) { split($i, a, "="); if (a[1] == k) return a[2] } return "" }
  ($1 == "dino" || $1 == "torch") && ($2 == "infer" || $2 == "train") {
    ips[$1, $3] = val("images_per_s"); ms[$1, $3] = val("ms_per_step"); thr[$3] = val("threads"); seen[$3] = 1
    if ($0 ~ /NOISY/) noisy[$3] = noisy[$3] " " $1 "-noisy"
  }
  END {
    n = split("vit_s16_224_b8 small28_b64 vit_s16_224_b8_bf16 small28_b64_bf16", order, " ")
    for (i = 1; i <= n; ++i) { w = order[i]; if (!(w in seen)) continue
      printf "%-25s %7s  %10s  %12s  %11s  %13s  %9.2fx%s\n", w, thr[w], ips["dino", w], ms["dino", w], \
             ips["torch", w], ms["torch", w], (ips["torch", w] > 0 ? ips["dino", w] / ips["torch", w] : 0), noisy[w] }
  }' "$log" | tee -a "$log"
grep '^dino allocs' "$log" | sed 's/^dino allocs /allocations per step: /'
echo "(log: $log)"
