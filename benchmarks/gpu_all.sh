#!/usr/bin/env bash
# The GPU benchmarks of issues 4 and 5 in one device call, each part under its own time limit
# so that one failure or overrun does not lose the others. Every part writes its JSON as it goes.
#
#   source benchmarks/device_setup.sh && bash benchmarks/gpu_all.sh bs ga layers sea
#
# Parts: bs (bench_block_sparse.py), ga (bench_gathered.py), layers (bench_layers.py),
# sea (bench_sea.py), bsx (extra forward tuning of the block-sparse kernel), sktests (the GPU-only
# kernel tests), skgqa (the SparseK layer at 32k with GQA 4: block 64 vs 128), keydkv (the selected
# keys' dK/dV: key-major kernel variants vs the per-slot path, bench_key_dkv.py). Output: $OUT/<part>.json (+ layers_bench.png) and $OUT/run.log;
# without $OUT, benchmarks/results/. Part limits (seconds) can be overridden with
# BS_S, GA_S, LAYERS_S, SEA_S, BSX_S, SKT_S (sktests: 26 tests, ~6.5 min on an H200), SKG_S, KEY_S; BS_OPTIONS / GA_OPTIONS (JSON kernel_options) skip tuning;
# GA_SECTIONS, SEA_VARIANTS (space-separated), BSX_GRID (JSON list of forward options) for bsx.
set -u
export PYTHONUNBUFFERED=1
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
LOG="$OUT/run.log"
PY="${PY:-python3}"
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw --format=csv 2>&1 | tee -a "$LOG"

part() {  # name limit_s command...
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s) $(date +%T)" | tee -a "$LOG"
  timeout --signal=TERM --kill-after=10 "$limit" "$@" 2>&1 | grep -v "^WARNING" | tee -a "$LOG"
  echo "=== $name rc=${PIPESTATUS[0]} $(date +%T)" | tee -a "$LOG"
}

for p in "$@"; do
  case $p in
    bs)
      if [ -n "${BS_OPTIONS:-}" ]; then
        part bs "${BS_S:-220}" $PY benchmarks/bench_block_sparse.py --out "$OUT/block_sparse_bench.json" \
          --sections check,bench --options "$BS_OPTIONS" --reps 5
      else
        part bs "${BS_S:-220}" $PY benchmarks/bench_block_sparse.py --out "$OUT/block_sparse_bench.json" \
          --budget_s "$(( ${BS_S:-220} * 6 / 10 ))" --reps 5
      fi ;;
    ga)
      if [ -n "${GA_OPTIONS:-}" ]; then
        part ga "${GA_S:-130}" $PY benchmarks/bench_gathered.py --out "$OUT/gathered_bench.json" \
          --sections check,bench --options "$GA_OPTIONS" --reps 5
      else
        part ga "${GA_S:-130}" $PY benchmarks/bench_gathered.py --out "$OUT/gathered_bench.json" \
          --sections "${GA_SECTIONS:-check,bench}" --budget_s "$(( ${GA_S:-130} - 10 ))" --reps 5
      fi ;;
    bsx)  # extra forward tuning at S = 32k, d = 12.5 % (BSX_GRID: JSON list; BS_OPTIONS: backward knobs)
      part bsx "${BSX_S:-60}" $PY benchmarks/bench_block_sparse.py --out "$OUT/block_sparse_extra.json" \
        --sections tune,bench --seqs 32768 --densities 0.125 --options "${BS_OPTIONS:-{\}}" \
        --fwd_grid "$BSX_GRID" --reps 5 --budget_s "$(( ${BSX_S:-60} * 6 / 10 ))" ;;
    layers)
      XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 part layers "${LAYERS_S:-300}" $PY benchmarks/bench_layers.py \
        --out "$OUT/layers_bench.json" --deadline "$(( ${LAYERS_S:-300} * 75 / 100 ))" ;;
    sea)
      part sea "${SEA_S:-180}" $PY benchmarks/bench_sea.py --out "$OUT/sea_bench.json" \
        --lengths 2048 8192 32768 --reps-fwd 10 --reps-bwd 6 --variants ${SEA_VARIANTS:-sea_token_xla sea_block_pallas sea_block_pallas_am} --deadline "$(( ${SEA_S:-180} * 7 / 10 ))" ;;
    sktests)  # the GPU-only kernel tests: SparseK / gathered / threshold / block-sparse (whole output in $OUT/run.log)
      part sktests "${SKT_S:-480}" env JAX_PLATFORMS=cuda $PY -m pytest -q -rf tests/kernels/test_gpu_sparsek_threshold.py \
        tests/kernels/test_gpu_gathered.py tests/kernels/test_gpu_block_sparse.py tests/attention/test_sparsek_attention.py \
        -k "compiled or on_gpu" ;;
    skgqa)  # SparseK layer at 32k with GQA (4 KV heads): block 64 (the default there) vs 128-query blocks
      for o in '{}' '{"block_q": 128}'; do
        part skgqa "${SKG_S:-90}" $PY benchmarks/profile_layer.py --seq 32768 --kv_heads 4 --top 8 --options "$o" \
          --out "$OUT/profile_gqa4_$(echo "$o" | tr -dc '0-9').json"
      done
      part skgqa "${SKG_S:-90}" $PY benchmarks/profile_layer.py --seq 32768 --kv_heads 4 --top 8 --layers sparsek \
        --options '{"block_q": 128}' --kernel_options '{"slot_tq": 128, "num_warps": [4, 4, 4, 8, 4]}' \
        --out "$OUT/profile_gqa4_128_slot128.json"
      # (with GQA the slot kernel's head loop pipelines the [128, D] q / dO loads: 2 stages may
      # be what fits in shared memory)
      part skgqa "${SKG_S:-90}" $PY benchmarks/profile_layer.py --seq 32768 --kv_heads 4 --top 8 --layers sparsek \
        --options '{"block_q": 128}' --kernel_options '{"slot_tq": 128, "num_warps": [4, 4, 4, 8, 4], "num_stages": [3, 3, 3, 2, 2]}' \
        --out "$OUT/profile_gqa4_128_slot128_s2.json" ;;
    keydkv)  # the selected keys' dK/dV on the layer's own selection at 32k (KEY_VARIANTS: ';'-separated JSON)
      part keydkv "${KEY_S:-240}" $PY benchmarks/bench_key_dkv.py --seq 32768 --out "$OUT/key_dkv.json" \
        ${KEY_VARIANTS:+--variants "$KEY_VARIANTS"} ;;
    *) echo "unknown part $p" | tee -a "$LOG" ;;
  esac
done
