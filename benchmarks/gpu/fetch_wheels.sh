#!/usr/bin/env bash
# Download the wheels of requirements.txt for Python 3.12 (run where PyPI is reachable; ~0.7 MB in all).
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p wheels
grep -v '^#' requirements.txt | grep -v '^$' | xargs "${PYTHON:-python3}" -m pip download --no-deps \
  --python-version 3.12 --only-binary=:all: --platform manylinux2014_x86_64 --platform any -d wheels
ls -la wheels
