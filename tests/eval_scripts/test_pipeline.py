"""Build -> benchmark -> compare: a set built by build_eval_set.py, scored by slm_benchmark.py for two
checkpoints, compared by compare_evals.py on the side map's pair ids."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from helpers import checkpoints as ck

from finetune.data.audio import write_wav
from tests.helpers.scripts import load_script


@pytest.mark.slow
def test_built_set_scores_and_compares(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    src = tmp_path / "pairs"
    for name in ("a", "b", "c"):
        for side in ("positive", "negative"):
            (src / side).mkdir(parents=True, exist_ok=True)
            write_wav(src / side / f"{name}.wav", 0.2 * rng.standard_normal((1, 6400)).astype(np.float32), 16_000)
    built = tmp_path / "cd_mine"
    assert load_script("build_eval_set").main(["pairs", str(src), "--out", str(built), "--no-progress"]) == 0

    assets = ck.make_base_assets(tmp_path / "assets")
    full = ck.write_moshi_export(tmp_path / "run", assets, ck.full_lm(assets), "full", step=3)
    config = tmp_path / "moshi.yaml"
    config.write_text(json.dumps({"data": {"train_data": "unused.jsonl", "swuggy_data": str(built)},
                                  "run_dir": str(tmp_path / "run"), "moshi_paths": {"hf_repo_id": str(assets)},
                                  "lora": {"enable": False}, "full_finetuning": True}))
    scored = tmp_path / "scored"
    assert load_script("slm_benchmark").main([str(config), "--checkpoint", "base", "--checkpoint", str(full),
                                              "--out", str(scored), "--device", "cpu", "--no-progress"]) == 0
    docs = {name: json.loads((scored / f"{name}.json").read_text()) for name in ("base", full.name)}
    (set_name,) = docs["base"]["sets"]
    assert [r["item_id"] for r in docs["base"]["sets"][set_name]["items"]] == ["a", "b", "c"]

    out = tmp_path / "compare"
    assert load_script("compare_evals").main([str(scored / "base.json"), str(scored / f"{full.name}.json"),
                                              "--out", str(out), "--resamples", "200"]) == 0
    with open(out / "comparison.csv", newline="") as f:
        rows = {r["protocol"]: r for r in csv.DictReader(f)}
    assert set(rows) == set(docs["base"]["sets"][set_name]["totals"])
    for protocol, row in rows.items():
        correct = {name: {r["item_id"]: r[protocol]["correct"] for r in d["sets"][set_name]["items"]}
                   for name, d in docs.items()}
        better = sum(correct[full.name][i] > correct["base"][i] for i in "abc")
        worse = sum(correct[full.name][i] < correct["base"][i] for i in "abc")
        assert (row["set"], row["n"], int(row["better"]), int(row["worse"])) == (set_name, "3", better, worse)
