#!/usr/bin/env bash
# Create .venv and install raymeta with everything it needs (idempotent).
# CPU machines get the CPU torch wheel through constraints/cpu.txt; machines with an
# NVIDIA driver keep pip's default (CUDA) torch build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.raymeta-installed
want=$(cat pyproject.toml constraints/cpu.txt | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
.venv/bin/python -m pip install -q --upgrade pip
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
  .venv/bin/python -m pip install -e '.[dev]'
else
  .venv/bin/python -m pip install -c constraints/cpu.txt -e '.[dev]'
fi
echo "$want" > "$stamp"
