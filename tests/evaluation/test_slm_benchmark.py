"""`scripts/slm_benchmark.py`: base Moshi, LoRA, merged, full and DSAA checkpoints through the same script."""

from __future__ import annotations

import json

import pytest

from tests.helpers import checkpoints as ck
from tests.helpers.scripts import load_script

from .conftest import noise_mmlu_set, noise_pair_set


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return ck.make_base_assets(tmp_path_factory.mktemp("assets"))


def write_config(path, **cfg) -> None:
    path.write_text(json.dumps({"data": {"train_data": "unused.jsonl", **cfg.pop("data")},
                                "run_dir": str(path.parent / "run"), **cfg}))


def test_every_checkpoint_kind_evaluates_through_the_script(tmp_path, assets, capsys):
    swuggy = noise_pair_set(tmp_path / "swuggy")
    run = tmp_path / "run"
    lora = ck.write_moshi_export(run, assets, ck.lora_lm(assets), "lora", step=1)
    merged = ck.write_moshi_export(run, assets, ck.lora_lm(assets), "merged", step=2)
    full = ck.write_moshi_export(run, assets, ck.full_lm(assets), "full", step=3)
    config = tmp_path / "moshi.yaml"
    write_config(config, data={"swuggy_data": str(swuggy)}, moshi_paths={"hf_repo_id": str(assets)},
                 lora={"enable": True, "rank": 4}, first_codebook_weight_multiplier=100.0)
    script = load_script("slm_benchmark")
    out = tmp_path / "out"
    argv = [str(config), "--checkpoint", "base", "--checkpoint", str(lora), "--checkpoint",
            str(merged / "consolidated"), "--checkpoint", str(full), "--out", str(out), "--device", "cpu",
            "--no-progress"]
    assert script.main(argv) == 0
    labels = ["base", "checkpoint_000001", "checkpoint_000002", "checkpoint_000003"]
    docs = {label: json.loads((out / f"{label}.json").read_text()) for label in labels}
    kinds = [d["checkpoint"]["model_kind"] for d in docs.values()]
    assert kinds[:2] == ["moshi", "lora"] and kinds[2] in ("merged", "full") and kinds[3] == "full"
    for d in docs.values():
        result = d["sets"]["swuggy"]
        assert result["n_items"] == 3 and result["n_errors"] == 0
        assert [r["item_id"] for r in result["items"]] == ["0", "1", "2"]
        assert d["protocols"]["fork"]["first_codebook_weight"] == 100.0
        assert d["provenance"]["dataset_digest"].startswith("sha256:")
        assert set(result["totals"]) == {"fork", "standard", "standard_mean"}
    # the LoRA export fused and the merged export hold the same weights: same scores up to the fusing's rounding
    a, b = (docs[k]["sets"]["swuggy"]["items"] for k in ("checkpoint_000001", "checkpoint_000002"))
    for ra, rb in zip(a, b):
        assert ra["standard"]["scores"]["positive"] == pytest.approx(rb["standard"]["scores"]["positive"], rel=1e-4)
    assert docs["base"]["sets"]["swuggy"]["items"] != docs["checkpoint_000003"]["sets"]["swuggy"]["items"]
    assert (out / "summary.csv").read_text().count("\n") == 1 + 4 * 3
    assert (out / "accuracy.png").stat().st_size > 0
    assert "items/s" in capsys.readouterr().out


def test_dsaa_checkpoint_evaluates_through_the_script(tmp_path, assets):
    from tests.dsaa.tiny_llm import tiny_dsaa, train_tokenizer

    model = tiny_dsaa(card=64, n_q=8, dep_q=4, delays=[0] + [0, 1, 1, 1] * 2, context=32)
    folder = ck.write_dsaa_checkpoint(tmp_path / "dsaa" / "consolidated", model, train_tokenizer())
    swuggy = noise_pair_set(tmp_path / "swuggy", n_pairs=2)
    config = tmp_path / "dsaa.yaml"
    write_config(config, data={"swuggy_data": str(swuggy)},
                 moshi_paths={"hf_repo_id": str(assets), "moshi_path": str(folder)},
                 full_finetuning=True, lora={"enable": False}, text_llm={"enable": True})
    out = tmp_path / "out"
    assert load_script("slm_benchmark").main([str(config), "--checkpoint", str(folder), "--out", str(out),
                                              "--device", "cpu", "--no-progress", "--set", "text_row=pad",
                                              "--set", "streams=audio+text"]) == 0
    doc = json.loads((out / "dsaa.json").read_text())  # label: the folder above consolidated/
    assert doc["checkpoint"]["model_kind"] == "dsaa"
    assert doc["settings"]["text_row"] == "pad" and doc["protocols"]["standard"]["streams"] == ["audio", "text"]
    assert doc["sets"]["swuggy"]["n_errors"] == 0


def test_mmlu_script_spoken_for_moshi_and_dsaa_and_text_for_the_llm_branch(tmp_path, assets):
    from tests.dsaa.tiny_llm import tiny_dsaa, train_tokenizer

    mmlu = noise_mmlu_set(tmp_path / "mmlu", subjects=2, questions=3)
    (mmlu / "data_text").mkdir()
    for n in range(11):
        (mmlu / "data_text" / f"{n}.txt").write_text(f"q{n}")  # short: the tiny LLM has 64 positions
    model = tiny_dsaa(card=64, n_q=8, dep_q=4, delays=[0] + [0, 1, 1, 1] * 2, context=64)
    folder = ck.write_dsaa_checkpoint(tmp_path / "dsaa" / "consolidated", model, train_tokenizer())
    script = load_script("mmlu_benchmark")
    common = ["--device", "cpu", "--no-progress", "--set", "mmlu_shots=1", "--set", "mmlu_choice_frames=3"]

    moshi = tmp_path / "moshi.yaml"
    write_config(moshi, data={"mmlu_data": str(mmlu)}, moshi_paths={"hf_repo_id": str(assets)},
                 lora={"enable": True, "rank": 4})
    assert script.main([str(moshi), "--out", str(tmp_path / "out_moshi"), *common]) == 0
    doc = json.loads((tmp_path / "out_moshi" / "base.json").read_text())
    result = doc["sets"]["mmlu"]
    assert [r["item_id"] for r in result["items"]] == ["8", "9", "10"] and result["n_errors"] == 0
    assert set(result["breakdown"]["subject"]) == {"0", "1"}
    assert set(result["items"][0]["fork"]["scores"]) == {"A", "B", "C", "D"}
    assert "mmlu_text" not in doc["sets"]

    dsaa = tmp_path / "dsaa.yaml"
    write_config(dsaa, data={"mmlu_data": str(mmlu)}, moshi_paths={"hf_repo_id": str(assets), "moshi_path": str(folder)},
                 full_finetuning=True, lora={"enable": False}, text_llm={"enable": True})
    assert script.main([str(dsaa), "--out", str(tmp_path / "out_dsaa"), *common]) == 0
    doc = json.loads((tmp_path / "out_dsaa" / "base.json").read_text())
    assert doc["checkpoint"]["model_kind"] == "dsaa"
    assert doc["sets"]["mmlu"]["n_errors"] == 0
    text = doc["sets"]["mmlu_text"]
    assert text["n_errors"] == 0, text["items"][0]["error"]
    assert list(text["totals"]) == ["llm"] and text["totals"]["llm"]["n"] == 3
    assert (tmp_path / "out_dsaa" / "subjects.csv").read_text().startswith("checkpoint,set,subject,protocol")
