"""`--set` on the benchmark scripts: evaluation keys and set folders, and the errors for anything else."""

from __future__ import annotations

from pathlib import Path

import pytest

from finetune.evaluation.runner import load_config

REPO = Path(__file__).resolve().parents[2]


def test_set_overrides_an_evaluation_key_and_a_set_folder() -> None:
    args = load_config(REPO / "example" / "tiny.yaml", ["data.cd_data=/sets/cd_a,/sets/cd_b", "text_row=pad"])
    assert args.data.cd_data == "/sets/cd_a,/sets/cd_b"
    assert args.evaluation.text_row == "pad"


def test_set_refuses_a_data_key_that_is_not_an_evaluation_set() -> None:
    with pytest.raises(ValueError, match=r"--set data\.train_data: only the evaluation set folders"):
        load_config(REPO / "example" / "tiny.yaml", ["data.train_data=/elsewhere"])


def test_set_without_equals_is_refused() -> None:
    with pytest.raises(ValueError, match="--set expects KEY=VALUE"):
        load_config(REPO / "example" / "tiny.yaml", ["text_row"])
