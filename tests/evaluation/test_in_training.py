"""The benchmarks in a training run, and the config keys that switch them on."""

from __future__ import annotations

import json

import pytest

from finetune.args import ConfigError, TrainArgs
from tests.helpers.tiny_run import make_tiny_assets, run_trainer, tiny_config

from .conftest import noise_mmlu_set, noise_pair_set


def test_tiny_run_logs_eval_loss_and_benchmarks_with_the_protocol_in_the_name(tmp_path):
    assets = make_tiny_assets(tmp_path / "assets")
    swuggy = noise_pair_set(tmp_path / "swuggy", n_pairs=3)
    cd = noise_pair_set(tmp_path / "cd_qa_m", n_pairs=2)
    mmlu = noise_mmlu_set(tmp_path / "mmlu")
    cfg = tiny_config(assets, tmp_path / "run", max_steps=4, do_eval=True, eval_freq=2, do_ckpt=False,
                      do_eval_loss=True, do_slm=True, do_cd=True, do_mmlu=True,
                      **{"data.eval_data": "", "data.eval_loss_data": str(assets / "data" / "eval.jsonl"),
                         "data.swuggy_data": str(swuggy), "data.cd_data": str(cd), "data.mmlu_data": str(mmlu),
                         "evaluation.mmlu_shots": 1, "evaluation.mmlu_choice_frames": 3,
                         "evaluation.pairs_per_batch": 2})
    run_trainer(TrainArgs.from_dict(cfg))
    run = tmp_path / "run"
    evals = [json.loads(x) for x in (run / "metrics.eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [2, 4]
    for e in evals:
        for key in ("eval_loss", "slm/swuggy/fork_acc", "slm/swuggy/standard_acc", "cd/cd_qa_m/standard_mean_acc",
                    "mmlu/fork_acc", "mmlu/standard_acc"):
            assert key in e, key
        assert e["slm/swuggy/n"] == 3 and e["cd/cd_qa_m/n"] == 2 and e["mmlu/n"] == 2
    docs = [json.loads((run / "evals" / f"step_{s}.json").read_text()) for s in (2, 4)]
    for name in ("swuggy", "cd_qa_m", "mmlu"):
        ids = [[r["item_id"] for r in d["sets"][name]["items"]] for d in docs]
        assert ids[0] == ids[1] and len(ids[0]) == docs[0]["sets"][name]["n_items"]  # the same items each time


def _errors(tmp_path, **cfg) -> list[str]:
    (tmp_path / "train.jsonl").write_text("")
    base = {"data": {"train_data": str(tmp_path / "train.jsonl")}, "run_dir": str(tmp_path / "r"),
            "lora": {"enable": True}}
    for k, v in cfg.items():
        if k == "data":
            base["data"].update(v)
        else:
            base[k] = v
    with pytest.raises(ConfigError) as e:
        TrainArgs.from_dict(base)
    return e.value.errors


def test_switches_need_do_eval_and_their_data(tmp_path):
    errs = _errors(tmp_path, do_slm=True)
    assert "do_slm: true needs do_eval: true (the switch of every evaluation)" in errs
    assert "do_slm: true needs data.swuggy_data or data.sblimp_data or data.ssc_data (no data given)" in errs
    errs = _errors(tmp_path, do_eval=True, do_mmlu=True, data={"mmlu_data": str(tmp_path / "nowhere")})
    assert errs == [f"data.mmlu_data: {tmp_path / 'nowhere'} is not an evaluation set folder "
                    f"(no {tmp_path / 'nowhere' / 'data.jsonl'})"]
    errs = _errors(tmp_path, evaluation={"text_row": "words", "streams": "text"})
    assert "evaluation.text_row must be one of ['zero', 'pad', 'transcript'], got 'words'" in errs
    errs = _errors(tmp_path, evaluation={"streams": "audio+text"})
    assert errs == ["evaluation.streams: 'audio+text' scores the text row, which evaluation.text_row: 'zero' "
                    "leaves empty; use text_row: pad or transcript"]
