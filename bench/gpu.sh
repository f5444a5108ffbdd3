#!/usr/bin/env bash
# GPU benchmark: our trainer against a plain transformers+peft loop, on randomly initialised
# Llama-3.2-1B and Llama-3.1-8B shapes built straight on the GPU (no download), synthetic rows of
# 1024-2048 tokens: qlora and lora on both, full on the 1B; 10 variants, each in its own process.
# Under 8 minutes on one H100/H200. Without bitsandbytes the qlora rows are skipped with a note.
#
#   bash bench/gpu.sh [OUT.json]            # default: bench/gpu-results.json
#
# Environment: PYTHON (default .venv/bin/python, else python3), STEPS (6; the first is warm-up),
# BATCH (4 rows per step), SEQ_LEN (2048), CONFIGS (llama-1b,llama-8b), METHODS (qlora,lora,full).
# The table is printed row by row; the JSON is rewritten after every row, so a cut-off run keeps
# what it measured. Definitions (tokens, FLOPs, MFU, memory): backend/bench.py.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
OUT=${1:-bench/gpu-results.json}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
"$PYTHON" -c "import bitsandbytes" 2>/dev/null || echo "note: bitsandbytes is not importable: qlora rows will be skipped"
# 470 s for the whole run (timeout kills the process group), 240 s for any one variant.
exec timeout 470 "$PYTHON" -m backend bench --gpu-configs --device cuda \
    --configs "${CONFIGS:-llama-1b,llama-8b}" --methods "${METHODS:-qlora,lora,full}" \
    --steps "${STEPS:-6}" --batch "${BATCH:-4}" --seq-len "${SEQ_LEN:-2048}" --timeout 240 --json "$OUT" \
    --rounds "${ROUNDS:-1}"  # a GPU lent whole has no neighbour's load to alternate against; 3 rounds would not fit
