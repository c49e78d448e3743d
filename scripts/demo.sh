#!/usr/bin/env bash
# The README's first command: a complete LoRA fine-tuning on CPU in a few minutes, from a fresh clone.
#   1. creates .venv (scripts/setup_env.sh),
#   2. generates a tiny synthetic stereo dataset, a tiny random Moshi, Mimi and tokenizer (demo_run/assets),
#   3. fine-tunes with example/tiny.yaml (LoRA, CPU) and prints where the checkpoint is and how to load it.
# Re-running starts the run over (overwrite_run_dir: true in example/tiny.yaml). Everything lands in demo_run/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
PY=.venv/bin/python

if [ ! -f demo_run/assets/config.json ]; then
    "$PY" scripts/make_tiny_assets.py --out demo_run/assets
fi
"$PY" -m train example/tiny.yaml

CKPT=$(ls -d demo_run/run/checkpoints/checkpoint_* | sort | tail -n 1)
"$PY" - "$CKPT" <<'PYEOF'
import json
import sys
from pathlib import Path

import torch

from moshi.models.loaders import CheckpointInfo

ckpt = Path(sys.argv[1]) / "consolidated"
lines = [json.loads(line) for line in (ckpt.parents[2] / "metrics.train.jsonl").read_text().splitlines()]
print(f"\nloss: {lines[0]['loss']:.3f} at step {lines[0]['step']} -> {lines[-1]['loss']:.3f} at step {lines[-1]['step']}")
info = CheckpointInfo.from_hf_repo("demo_run/assets", config_path=ckpt / "config.json",
                                   lora_weights=ckpt / "lora.safetensors")
model = info.get_moshi(device="cpu", dtype=torch.float32, fuse_lora=True)
print(f"checkpoint: {ckpt}/lora.safetensors + config.json (loaded back: {sum(p.numel() for p in model.parameters()):,} parameters)")
print(f"""
Load it in Python (base weights from the assets folder, LoRA fused into them):
    import torch
    from moshi.models.loaders import CheckpointInfo
    info = CheckpointInfo.from_hf_repo("demo_run/assets", config_path="{ckpt}/config.json",
                                       lora_weights="{ckpt}/lora.safetensors")
    model = info.get_moshi(device="cpu", dtype=torch.float32, fuse_lora=True)
With Kyutai's server (a 7B run): python -m moshi.server --lora-weight=CKPT/consolidated/lora.safetensors --config-path=CKPT/consolidated/config.json
Continue a run: set resume: true and overwrite_run_dir: false in the YAML.""")
PYEOF
