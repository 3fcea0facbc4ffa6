#!/usr/bin/env bash
# Unattended, in at most 5 minutes: Llama-3-8B shape, LoRA, 2048-token rows, the largest batch that fits,
# ftjax's default config beside HF + PEFT eager (random weights made on the device; no folder).
# Results: stdout and $OUT (run_8b.log, records.jsonl as each run ends, table_8b_lora.json).
#   bash benchmarks/gpu/run_8b.sh                  # FTJAX_GPU_TINY=1 for the CPU dry run
set -uo pipefail
cd "$(dirname "$0")/../.."
START=$(date +%s)
LOG=run_8b.log source benchmarks/gpu/env.sh
BUDGET=${FTJAX_GPU_BUDGET_S:-$([ -n "$TINY" ] && echo 1200 || echo 280)}
LEFT=$((BUDGET - $(date +%s) + START))
"$PY" benchmarks/gpu/bench.py table8b $TINY --budget_s "$LEFT"
echo "run_8b.sh wall time: $(( $(date +%s) - START )) s"
