#!/usr/bin/env bash
# The documented federated run: 8 PersonaChat users, 3 rounds, SmolLM2, each strategy in turn.
#   bash benchmarks/federated.sh [WORK_DIR] [DATA]
# Each run starts its own cloud (`spa federate`), writes <work>/<strategy>/<strategy>.md and .png.
set -euo pipefail
WORK=${1:-.spa-federated/personachat}
DATA=${2:-../shared/data/personachat.jsonl}
SPA=${SPA:-.venv/bin/spa}
for strategy in local fedavg fedper; do
  "$SPA" federate --strategy "$strategy" --users 8 --rounds 3 --local-epochs 5 \
    --data "$DATA" --work-dir "$WORK/$strategy" --backbone smollm2 --run-name "$strategy"
done
python3 - "$WORK" <<'PY'
import sys, pathlib
for s in ("local", "fedavg", "fedper"):
    print(f"## {s}\n" + (pathlib.Path(sys.argv[1]) / s / f"{s}.md").read_text())
PY
