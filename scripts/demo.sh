#!/usr/bin/env bash
# Placeholder until the trainer lands: sets up the env and runs the LM on a tiny config.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/python -c "print('demo: trainer not yet available')"
