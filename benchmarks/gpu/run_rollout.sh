#!/usr/bin/env bash
# Unattended, in about 3 minutes: rollout throughput on the GPU (benchmarks/rollout_speed.py): random weights of
# SmolLM2-135M's shape (no download), P x G completions of 64 tokens, ftjax's KV-cache generation beside
# transformers' generate on the same GPU and prompts, the decode step against one read of the weights at the
# device's measured copy bandwidth. Results: stdout and $OUT (run_rollout.log, rollout_speed.json, records.jsonl).
#   bash benchmarks/gpu/run_rollout.sh                  # FTJAX_GPU_TINY=1 for the CPU dry run (tiny shape)
set -uo pipefail
cd "$(dirname "$0")/../.."
START=$(date +%s)
LOG=run_rollout.log source benchmarks/gpu/env.sh
if [ -n "$TINY" ]; then ARGS="--model=tiny --device=cpu --prompts=4 --group=2 --new=8 --repeats=1 --copy_mb=64"
else ARGS="--model=smollm2-shape --device=gpu --prompts=${ROLLOUT_P:-32} --group=${ROLLOUT_G:-8} --new=64 --repeats=3"; fi
timeout "${FTJAX_GPU_BUDGET_S:-280}" "$PY" benchmarks/rollout_speed.py $ARGS --out="$OUT/rollout_speed.json" \
  && "$PY" -c "import json,sys; r=json.load(open(sys.argv[1])); open(sys.argv[2],'a').write(json.dumps({'kind':'rollout_speed',**r})+'\n')" \
     "$OUT/rollout_speed.json" "$OUT/records.jsonl"
echo "run_rollout.sh wall time: $(( $(date +%s) - START )) s"
