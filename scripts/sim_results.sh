#!/usr/bin/env bash
# Regenerate the simulator results of docs/results.md (8 GPUs, A800 / Llama-2-7B profile).
# Usage: [POLICIES="..."] scripts/sim_results.sh [sweeps|sharegpt|capacity|shortlong|prefix|plots|all] [DATASET...]
# Outputs JSON and PNG under docs/results/. Each command line below is exactly what the
# doc's tables were made with. PYTHON defaults to the project's venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=docs/results
mkdir -p "$OUT"
what=${1:-all}; shift || true
ARGS="$*"
POLICIES=${POLICIES:-loongserve vllm chunked-prefill pd-disagg static-sp esp}
SIM="$PY -m esp_core.sim"

# `sweep`'s defaults are each dataset's paper protocol (esp_core/sim/cli.py: PAPER_PROTOCOL):
# ~rate x 1000 s of Poisson arrivals per rate; for ShareGPT the artifact's windows (at most
# 20,000 requests) after a 100-s prescan, because its 92 ms/token SLO is crossed only in
# overload, where the mean latency grows with the window (docs/results.md).
sweeps() {
  for ds in ${ARGS:-l-eval lv-eval mixed}; do
    for pol in $POLICIES; do
      $SIM sweep --workload "$ds" --policy "$pol" --quiet --json "$OUT/sweep-$ds-$pol.json"
    done
  done
}

sharegpt() {
  for pol in $POLICIES; do
    $SIM sweep --workload sharegpt --policy "$pol" --quiet --json "$OUT/sweep-sharegpt-$pol.json"
  done
}

capacity() {  # sustained throughput of an overloaded run (2x the paper's LoongServe max)
  declare -A RATE=([sharegpt]=60 [l-eval]=5 [lv-eval]=0.4 [mixed]=1.1)
  declare -A N=([sharegpt]=3000 [l-eval]=1000 [lv-eval]=150 [mixed]=600)
  for ds in ${ARGS:-sharegpt l-eval lv-eval mixed}; do
    for pol in $POLICIES; do
      $SIM run --workload "$ds" --policy "$pol" --rate "${RATE[$ds]}" \
        --num-requests "${N[$ds]}" --json "$OUT/capacity-$ds-$pol.json"
    done
  done
}

shortlong() {  # 5% LV-Eval-like requests among ShareGPT-like ones; esp at 1 req/s, 2000
  # requests; loongserve at 0.5 req/s, 1000 requests (at 1 req/s it does not keep up)
  $SIM short-long --policy loongserve --rate 0.5 --num-requests 1000 --json "$OUT/shortlong-loongserve.json"
  $SIM short-long --policy esp --rate 1 --num-requests 2000 --json "$OUT/shortlong-esp.json"
  $SIM short-long --policy esp --chunk-size 4096 --rate 1 --num-requests 2000 \
    --json "$OUT/shortlong-esp-chunk4096.json"
}

prefix() {  # shared prefixes (docs/results.md "Shared prefixes"): document QA, 4 questions
  # per L-Eval-length document, 256-token blocks; the paper protocol's ~rate x 1000 s per rate
  for pol in ${PREFIX_POLICIES:-vllm vllm-apc loongserve}; do
    $SIM sweep --workload docqa --policy "$pol" --quiet --json "$OUT/sweep-docqa-$pol.json"
  done
  $SIM sweep --workload docqa --policy esp --quiet --json "$OUT/sweep-docqa-esp-nocache.json"
  # esp with the scheduler's prefix cache, its blocks the workload's 256 tokens
  if $PY -c "from esp_core.sched.config import ESPSchedulerConfig as C; C(prefix_cache=True)" 2>/dev/null; then
    $SIM sweep --workload docqa --policy esp --esp-set prefix_cache=True --esp-set prefix_block_tokens=256 \
      --quiet --json "$OUT/sweep-docqa-esp.json"
  else
    echo "esp with a prefix cache skipped: this scheduler has none" >&2
  fi
}

plots() {
  for ds in sharegpt l-eval lv-eval mixed; do
    files=$(ls "$OUT"/sweep-"$ds"-*.json 2>/dev/null || true)
    [ -n "$files" ] && $SIM plot $files --out "$OUT/fig10-$ds.png" --title "$ds (8 GPUs, simulated)"
  done
}

case $what in
  sweeps) sweeps ;;
  sharegpt) sharegpt ;;
  capacity) capacity ;;
  shortlong) shortlong ;;
  plots) plots ;;
  prefix) prefix ;;
  all) sweeps; sharegpt; shortlong; plots ;;
  *) echo "unknown: $what" >&2; exit 2 ;;
esac
