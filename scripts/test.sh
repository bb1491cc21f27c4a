#!/usr/bin/env bash
# Set up, lint, then run every test (unit and integration). Extra arguments go to pytest,
# e.g.  bash scripts/test.sh -m "not integration"
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
.venv/bin/ruff check raymeta jobs tests bench
.venv/bin/ruff format --check raymeta jobs tests bench
exec .venv/bin/python -m pytest -q "$@"
