#!/usr/bin/env bash
# A short CLI demo on the embedded model: check a dataset, train LoRA briefly, compare answers.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
DATA=${DATA:-tests/data/alpaca.json}
[ -f ../shared/data/identity_nova.json ] && DATA=${DATA_DEMO:-../shared/data/identity_nova.json}
RUN=${RUN:-runs/demo}
echo "== prepare $DATA"
$PY -m backend prepare "$DATA"
echo "== train LoRA into $RUN (a few minutes on a CPU)"
$PY -m backend train --data "$DATA" --out "$RUN" --method lora
echo "== base vs tuned"
$PY -m backend generate --run "$RUN" --prompt "Who are you?" --max-new-tokens 48
$PY -m backend eval --run "$RUN"
