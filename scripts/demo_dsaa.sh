#!/usr/bin/env bash
# The DSAA demo on CPU, from a fresh clone, offline:
#   1. creates .venv (scripts/setup_env.sh),
#   2. generates the tiny synthetic dataset, tiny random Moshi and Mimi (demo_run/dsaa/assets) and a tiny random
#      Hugging Face LLM + tokenizer (demo_run/dsaa/tiny_llm),
#   3. builds the DSAA checkpoint with setup_new_model (demo_run/dsaa/weights),
#   4. trains with example/tiny_dsaa.yaml and loads the last checkpoint back with HF_HUB_OFFLINE=1.
# Re-running starts the training over (overwrite_run_dir: true). Everything lands in demo_run/dsaa/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
PY=.venv/bin/python
OUT=demo_run/dsaa
export MOSHI_FT_DEVICE=cpu HF_HUB_OFFLINE=1

if [ ! -f "$OUT/assets/config.json" ]; then
    "$PY" scripts/make_tiny_assets.py --out "$OUT/assets"
fi
if [ ! -f "$OUT/tiny_llm/config.json" ]; then
    "$PY" scripts/make_tiny_llm.py --out "$OUT/tiny_llm" --hidden 48 --max-pos 512
fi
# setup_new_model reads its *source* from moshi_paths: the training YAML names the DSAA checkpoint it writes,
# so the set-up config is the same file without moshi_paths.moshi_path (source = the plain tiny Moshi).
"$PY" - example/tiny_dsaa.yaml "$OUT/setup.yaml" <<'PYEOF'
import sys

import yaml

cfg = yaml.safe_load(open(sys.argv[1]))
cfg["moshi_paths"].pop("moshi_path", None)
open(sys.argv[2], "w").write(yaml.safe_dump(cfg))
PYEOF
"$PY" -m setup_new_model "$OUT/setup.yaml" --out "$OUT/weights" --force
"$PY" -m train example/tiny_dsaa.yaml

CKPT=$(ls -d "$OUT"/run/checkpoints/checkpoint_* | sort | tail -n 1)/consolidated
"$PY" - "$CKPT" <<'PYEOF'
import json
import sys
from pathlib import Path

import torch

from moshi.models.dsaa_loading import load_dsaa_model

ckpt = Path(sys.argv[1])
run = ckpt.parents[2]
train = [json.loads(line) for line in (run / "metrics.train.jsonl").read_text().splitlines()]
evals = [json.loads(line) for line in (run / "metrics.eval.jsonl").read_text().splitlines()]
# The text loss is comparable on every step (the audio loss is left out on every audio_loss_skip_every-th).
print(f"\ntext loss: {train[0]['text_loss']:.3f} at step {train[0]['step']} -> {train[-1]['text_loss']:.3f} at step "
      f"{train[-1]['step']}; eval loss (text + audio): " + " -> ".join(f"{e['eval_loss']:.3f}" for e in evals))
model, tokenizer = load_dsaa_model(ckpt, {}, device="cpu", dtype=torch.float32)
print(f"checkpoint: {ckpt}/ (consolidated.safetensors, config.json, tokenizer/); loaded back offline: "
      f"{sum(p.numel() for p in model.parameters()):,} parameters, LLM vocabulary {model.text_card}")
print(f"""
Load it in Python (no hub access: the LLM is embedded):
    import torch
    from moshi.models.dsaa_loading import load_dsaa_model
    model, tokenizer = load_dsaa_model("{ckpt}", {{}}, device="cpu", dtype=torch.float32)""")
PYEOF
