#!/usr/bin/env bash
# Reproduces the README's results table: trains and evaluates the SPA settings on XSum and
# PersonaChat with the embedded SmolLM2 backbone, writing one JSON report per run to $OUT.
#   bash benchmarks/results.sh [DATA_DIR] [OUT]      (≈ 1.5 h on 2 CPU cores)
# Resumable: a run whose report exists is skipped (delete it to redo it); the default tap
# encoding is used (personalization.config.DEFAULT_TAP_ENCODING).
# then: python benchmarks/results_table.py $OUT
set -euo pipefail
DATA=${1:-../shared/data}
OUT=${2:-benchmarks/results/settings}
SETTINGS=${SETTINGS:-"spa full lst choice"}
mkdir -p "$OUT"
common=(--max-prompt-tokens 384 --valid-size 50 --test-size 100)
todo() { [ -f "$1" ] && echo "done: $1" && return 1; echo "run: $1"; }
for ds in xsum personachat; do
  if todo "$OUT/$ds-base.json"; then
    spa eval "$DATA/$ds.jsonl" --setting base "${common[@]}" --json "$OUT/$ds-base.json"
  fi
  for s in $SETTINGS; do
    todo "$OUT/$ds-$s.json" || continue
    spa train "$DATA/$ds.jsonl" --setting "$s" --train-size 500 --epochs 5 "${common[@]}" \
      --resume -o "$OUT/$ds-$s.safetensors" | tee "$OUT/$ds-$s.train.log"
    spa eval "$DATA/$ds.jsonl" --checkpoint "$OUT/$ds-$s.safetensors" "${common[@]}" \
      --json "$OUT/$ds-$s.json"
  done
done
# the communication budget: one trained gate, re-calibrated to other usage targets
if todo "$OUT/xsum-spa-usage-0.4.json"; then
  spa eval "$DATA/xsum.jsonl" --checkpoint "$OUT/xsum-spa.safetensors" "${common[@]}" \
    --target-usage 0.4 --json "$OUT/xsum-spa-usage-0.4.json"
fi
for u in 0.3 0.5 0.7; do
  todo "$OUT/personachat-spa-usage-$u.json" || continue
  spa eval "$DATA/personachat.jsonl" --checkpoint "$OUT/personachat-spa.safetensors" \
    "${common[@]}" --target-usage "$u" --json "$OUT/personachat-spa-usage-$u.json"
done
