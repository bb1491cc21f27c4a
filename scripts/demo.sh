#!/usr/bin/env bash
# Quick start: set up, then run the main job on its embedded defaults
# (tiny model trained from scratch on generated character descriptions, local Ray, local MLflow).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
source scripts/env.sh
exec .venv/bin/python jobs/metatrain.py --output-dir "${1:-runs/demo}"
