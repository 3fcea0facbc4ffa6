# Sourced by run.sh / run_8b.sh (with LOG set): log into $OUT, pick the platform (FTJAX_GPU_TINY=1: the CPU
# dry run on a tiny shape), make ftjax and the wheels of requirements.txt importable, offline.
OUT=${OUT:-/tmp/ftjax_gpu_out}; mkdir -p "$OUT"; export OUT
exec > >(tee -a "$OUT/$LOG") 2>&1
if [ -n "${FTJAX_GPU_TINY:-}" ]; then export JAX_PLATFORMS=cpu; TINY=--tiny; else export JAX_PLATFORMS=cuda; TINY=; fi
PY=${PYTHON:-python3}
ROOT=$(pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false
WHEELS=benchmarks/gpu/wheels
# module to import : wheel name prefix
for pair in ml_collections:ml_collections absl:absl_py pytest:pytest pluggy:pluggy iniconfig:iniconfig; do
  mod=${pair%%:*}; whl=${pair##*:}
  "$PY" -c "import $mod" 2>/dev/null && continue
  "$PY" -m pip install -q --no-index --no-deps --find-links "$WHEELS" "$whl" 2>/dev/null \
    || PIP_BREAK_SYSTEM_PACKAGES=1 "$PY" -m pip install -q --no-index --no-deps --find-links "$WHEELS" "$whl" 2>/dev/null
  if ! "$PY" -c "import $mod" 2>/dev/null; then  # no pip: a pure-Python wheel imports from its zip
    f=$(ls "$WHEELS"/"$whl"-*.whl 2>/dev/null | head -1)
    [ -n "$f" ] && export PYTHONPATH="$PYTHONPATH:$ROOT/$f"
  fi
  "$PY" -c "import $mod" 2>/dev/null || echo "WARNING: $mod is not importable (wheel missing from $WHEELS?)"
done
"$PY" -c "import jax, flax, torch, transformers, peft; print('jax', jax.__version__, jax.default_backend(), jax.devices()[0].device_kind, '| flax', flax.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__)"
git log -1 --format='commit %h %cI' 2>/dev/null || true
