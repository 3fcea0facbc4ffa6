#!/usr/bin/env bash
# Unattended on a fresh GPU machine without network, in at most 5 minutes: the GPU-only tests (cuDNN and the
# Pallas kernels against the fp32 reference, the default step lowered with cuDNN's custom calls), then the
# Llama-3.2-1B-shape table (ftjax default config vs HF + PEFT eager / torch.compile, then the variants).
# Results: stdout and $OUT (run.log, records.jsonl as each run ends, table_1b.json, ftjax_*.json).
#   bash benchmarks/gpu/run.sh                   # on the GPU (wheels/ from benchmarks/gpu/fetch_wheels.sh)
#   FTJAX_GPU_TINY=1 bash benchmarks/gpu/run.sh  # CPU dry run of the same path on a tiny shape
# FTJAX_GPU_BUDGET_S: the whole script's seconds (GPU default 290); FTJAX_GPU_VARIANTS: extra ftjax LoRA runs.
set -uo pipefail
cd "$(dirname "$0")/../.."
START=$(date +%s)
LOG=run.log source benchmarks/gpu/env.sh
BUDGET=${FTJAX_GPU_BUDGET_S:-$([ -n "$TINY" ] && echo 1800 || echo 290)}
echo "== GPU-only tests"
XLA_FLAGS= timeout 75 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_attention_backends.py
XLA_FLAGS= timeout 60 "$PY" -m pytest -q -p no:cacheprovider tests/test_cudnn_attention.py
echo "== 1B table"
LEFT=$((BUDGET - $(date +%s) + START))
# variants: one example a row (cuDNN without segment ids), packed rows without a bound (the Pallas kernel)
"$PY" benchmarks/gpu/bench.py table $TINY --budget_s "$LEFT" \
  --variants="${FTJAX_GPU_VARIANTS---config.data.packing=False,--config.data.max_segments=0}"
echo "run.sh wall time: $(( $(date +%s) - START )) s"
