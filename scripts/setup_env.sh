#!/usr/bin/env bash
# Creates (or refreshes) the project's virtual env in .venv and installs the
# project with every extra the tests and the demo need. Idempotent: a second run
# with nothing changed only re-checks the install.
#
# PyTorch: on a machine without an NVIDIA GPU we pin the CPU build first, so pip
# does not pull the multi-GB CUDA wheels; on a GPU machine the wide range in
# pyproject.toml lets pip pick the CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
stamp="$VENV/.installed-$(cat pyproject.toml | sha1sum | cut -c1-12)"
if [ -f "$stamp" ]; then
    exit 0
fi
# pip on some machines warns about unreadable local index folders; keep its real messages only.
pip_install() {
    local out
    if ! out=$("$VENV/bin/python" -m pip install -q "$@" 2>&1); then
        printf '%s\n' "$out" | grep -v "is ignored" >&2
        return 1
    fi
    printf '%s\n' "$out" | grep -v "is ignored" | grep -v '^$' || true
}
if ! command -v nvidia-smi >/dev/null 2>&1; then
    pip_install "torch==${CPU_TORCH_VERSION:-2.13.0}"
fi
pip_install -e ".[dev,annotate,analysis,tensorboard]"
"$VENV/bin/python" -c "import torch, moshi, finetune" # fails loudly if the install did not work
rm -f "$VENV"/.installed-*
touch "$stamp"
