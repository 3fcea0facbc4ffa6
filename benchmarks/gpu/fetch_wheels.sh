#!/usr/bin/env bash
# Download the wheels of requirements.txt for Python 3.12 (run where PyPI is reachable; ~0.7 MB in all).
# PYTHON (default python3) may be a path relative to the repository root, e.g. PYTHON=.venv/bin/python.
set -euo pipefail
cd "$(dirname "$0")/../.."
here=benchmarks/gpu
mkdir -p "$here/wheels"
grep -v '^#' "$here/requirements.txt" | grep -v '^$' | xargs "${PYTHON:-python3}" -m pip download --no-deps \
  --python-version 3.12 --only-binary=:all: --platform manylinux2014_x86_64 --platform any -d "$here/wheels"
ls -la "$here/wheels"
