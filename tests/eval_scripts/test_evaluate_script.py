"""scripts/evaluate.py end to end on the tiny assets: base and LoRA checkpoint in one call, the training's eval loss."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers import checkpoints as ck
from helpers.checkpoints import lora_lm, write_moshi_export
from helpers.tiny_run import make_tiny_assets, tiny_config

from finetune.args import TrainArgs
from finetune.data.dataset import build_codes_store, build_eval_loader
from finetune.eval import evaluate
from finetune.model_family import model_family
from finetune.model_loading import load_from_config
from tests.helpers.scripts import load_script


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_assets(tmp_path_factory.mktemp("assets"), files=1, eval_files=2)


@pytest.mark.slow
def test_evaluate_base_and_lora_checkpoint(tmp_path: Path, assets: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_config(assets, tmp_path / "run", eval_batches=2)))
    ckpt = write_moshi_export(tmp_path / "run", assets, lora_lm(assets), "lora")
    out = tmp_path / "out"
    main = load_script("evaluate").main
    assert main([str(config), "--checkpoint", "base", "--checkpoint", str(ckpt), "--out", str(out),
                 "--device", "cpu", "--no-progress"]) == 0

    report = json.loads((out / "metrics.json").read_text())
    metrics = report["metrics"]
    assert list(metrics) == ["base", ckpt.name]
    base, lora = metrics["base"], metrics[ckpt.name]
    assert base["batches"] == lora["batches"] == 2
    assert base["eval_loss"] != lora["eval_loss"]  # the adapters were applied
    assert report["provenance"]["checkpoints"][str(ckpt)].startswith("sha256:")

    # The eval loss is the training's evaluation of the same model on the same batches.
    args = TrainArgs.load(config)
    loaded = load_from_config(args, None, device="cpu")
    family = model_family(args)
    loader = build_eval_loader(args, family.text_tokenizer(loaded.lm), build_codes_store(args, loaded.mimi, "cpu"))
    ref = evaluate(loaded.lm, (b.codes for b in loader), family.loss(loaded.lm), torch.device("cpu"))
    # Same model, same batches; the fused text CE and the plain one round differently in float32.
    torch.testing.assert_close(base["eval_loss"], ref.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(base["text_loss"], ref.text_loss, rtol=1e-5, atol=1e-6)

    with open(out / "codebooks.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["checkpoint"], int(r["codebook"])) for r in rows] == [
        (label, k) for label in ("base", ckpt.name) for k in range(loaded.lm.dep_q)]
    with open(out / "metrics.csv", newline="") as f:
        assert [r["checkpoint"] for r in csv.DictReader(f)] == ["base", ckpt.name]
    assert (out / "codebooks.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_evaluate_dsaa_checkpoint(tmp_path: Path, assets: Path) -> None:
    from tests.dsaa.tiny_llm import tiny_dsaa, train_tokenizer

    model = tiny_dsaa(card=64, n_q=8, dep_q=4, delays=[0] + [0, 1, 1, 1] * 2, context=32)
    folder = ck.write_dsaa_checkpoint(tmp_path / "dsaa" / "consolidated", model, train_tokenizer())
    cfg = tiny_config(assets, tmp_path / "run", eval_batches=1, full_finetuning=True)
    cfg.update(lora={"enable": False},
               text_llm={"enable": True, "pad_token": " ", "epad_token": "<|im_end|>", "bos_token": "<|im_start|>"},
               moshi_paths={"hf_repo_id": str(assets), "moshi_path": str(folder)})
    config = tmp_path / "dsaa.yaml"
    config.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "out"
    assert load_script("evaluate").main([str(config), "--out", str(out), "--device", "cpu", "--no-progress"]) == 0
    m = json.loads((out / "metrics.json").read_text())["metrics"]["base"]
    assert m["batches"] == 1 and len(m["codebooks"]) == 4
    assert m["text_positions"] > m["text_positions_no_pad"] > 0  # the transcript's words went through the LLM's tokenizer
