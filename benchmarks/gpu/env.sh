# Sourced by run.sh / run_8b.sh (with LOG set): log into $OUT, pick the platform (FTJAX_GPU_TINY=1: the CPU
# dry run on a tiny shape), make ftjax and the wheels of requirements.txt importable, offline; stop in one line
# when ftjax's own requirements (ml_collections, absl) do not import.
OUT=${OUT:-/tmp/ftjax_gpu_out}; mkdir -p "$OUT"; export OUT
exec > >(tee -a "$OUT/$LOG") 2>&1
if [ -n "${FTJAX_GPU_TINY:-}" ]; then export JAX_PLATFORMS=cpu; TINY=--tiny; else export JAX_PLATFORMS=cuda; TINY=; fi
PY=${PYTHON:-python3}
ROOT=$(pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false
# Both stacks fit an 80 GB H100 as well as a 141 GB H200: each measurement is a process of its own; JAX takes 90%
# of the GPU (not all of it: cuDNN and XLA's autotuner allocate outside the pool), PyTorch grows segments instead
# of fragmenting (the HF runs near the memory limit of the 8B table).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
WHEELS=benchmarks/gpu/wheels  # git-ignored: whatever copies the tree to the GPU machine must copy it too
# module to import : wheel name prefix : required (ftjax's scripts cannot run without it)
for triple in ml_collections:ml_collections:1 absl:absl_py:1 pytest:pytest:0 pluggy:pluggy:0 iniconfig:iniconfig:0; do
  mod=${triple%%:*}; rest=${triple#*:}; whl=${rest%%:*}; required=${rest##*:}
  "$PY" -c "import $mod" 2>/dev/null && continue
  "$PY" -m pip install -q --no-index --no-deps --find-links "$WHEELS" "$whl" >/dev/null 2>&1 \
    || PIP_BREAK_SYSTEM_PACKAGES=1 "$PY" -m pip install -q --no-index --no-deps --find-links "$WHEELS" "$whl" \
      >/dev/null 2>&1
  if ! "$PY" -c "import $mod" 2>/dev/null; then  # no pip: a pure-Python wheel imports from its zip
    f=$(ls "$WHEELS"/"$whl"-*.whl 2>/dev/null | head -1)
    [ -n "$f" ] && export PYTHONPATH="$PYTHONPATH:$ROOT/$f"
  fi
  "$PY" -c "import $mod" 2>/dev/null && continue
  if [ "$required" = 1 ]; then
    echo "STOP: $mod does not import and $WHEELS/ has no $whl wheel (that folder is git-ignored: run benchmarks/gpu/fetch_wheels.sh where PyPI is reachable and copy it with the tree, e.g. the device tool's carry=[\"$WHEELS\"])"
    exit 2
  fi
  echo "WARNING: $mod is not importable (wheel missing from $WHEELS?): the GPU-only tests are skipped"
done
"$PY" -c "import jax, flax, torch, transformers, peft; print('jax', jax.__version__, jax.default_backend(), jax.devices()[0].device_kind, '| flax', flax.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__)"
GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | sort -u | paste -sd, -)
echo "commit ${FTJAX_COMMIT:-$(git rev-parse --short=12 HEAD 2>/dev/null || echo 'unknown (no .git and FTJAX_COMMIT unset)')}" \
  "| GPU ${GPU_NAME:-none (no nvidia-smi)} | $(date -u +%Y-%m-%dT%H:%M:%SZ)"
