#!/usr/bin/env bash
# Unattended on a fresh GPU machine without network, in at most 6 minutes: the GPU-only tests, then the
# Llama-3.2-1B-shape table (ftjax default config vs HF + PEFT eager / torch.compile). Results: stdout and
# $OUT (run.log, table_1b.json, ftjax_*.json) when OUT is set.
#   bash benchmarks/gpu/run.sh                 # on the GPU (after benchmarks/gpu/fetch_wheels.sh here)
#   FTJAX_GPU_TINY=1 bash benchmarks/gpu/run.sh  # CPU dry run of the same path on a tiny shape
set -uo pipefail
cd "$(dirname "$0")/../.."
START=$(date +%s)
LOG=run.log source benchmarks/gpu/env.sh
echo "== GPU-only tests (pytest -m gpu)"
XLA_FLAGS= timeout 150 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_attention_backends.py
echo "== 1B table"
LEFT=$((${FTJAX_GPU_BUDGET_S:-345} - $(date +%s) + START))
"$PY" benchmarks/gpu/bench.py table $TINY --budget_s "$LEFT" --variants "${FTJAX_GPU_VARIANTS:-}"
echo "run.sh wall time: $(( $(date +%s) - START )) s"
