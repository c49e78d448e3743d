"""Training curves from metrics files: torn last lines, damaged lines, repeated steps, plots and summary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune.analysis.run_metrics import read_metrics, read_runs
from finetune.monitoring.metrics_logger import MetricsFileError
from tests.helpers.scripts import run_script


def _train_record(step: int) -> dict:
    return {"lr": 1e-3 * step, "loss": 5.0 - 0.1 * step, "text_loss": 2.0 - 0.05 * step, "audio_loss": 3.0 - 0.05 * step,
            "grad_norm": 1.0 + step, "wps": 100.0 * step, "real_wps": 80.0 * step, "mfu": None, "step": step,
            "at": "2026-01-01T00:00:00+00:00"}


def _eval_record(step: int) -> dict:
    return {"eval_loss": 4.0 - 0.1 * step, "text_eval_loss": 1.5, "audio_eval_loss": 2.5 - 0.1 * step,
            "perplexity": 50.0, "text_perplexity": 4.5, "audio_perplexity": 12.0, "eval_batches": 2, "step": step}


def _run(folder: Path, steps: int = 10, torn: bool = True) -> Path:
    folder.mkdir(parents=True)
    lines = [json.dumps(_train_record(s)) for s in range(1, steps + 1)]
    text = "\n".join(lines) + "\n" + ('{"lr": 0.01, "loss": 4.' if torn else "")
    (folder / "metrics.train.jsonl").write_text(text)
    (folder / "metrics.eval.jsonl").write_text("".join(json.dumps(_eval_record(s)) + "\n" for s in (5, 10)))
    return folder


def test_plot_metrics_writes_every_curve_and_a_summary(tmp_path, capsys):
    run = _run(tmp_path / "run")
    out = tmp_path / "plots"
    assert run_script("plot_metrics", str(run), "--out", str(out)) == 0
    summary = json.loads((out / "summary.json").read_text())
    expected = ["loss.png", "lr.png", "grad_norm.png", "throughput.png", "eval_loss.png", "perplexity.png"]
    assert summary["plots"] == expected
    for name in expected:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    train = summary["runs"]["run"]["train"]
    assert train["records"] == 10 and train["dropped_lines"] == 1
    assert train["metrics"]["loss"]["min"] == pytest.approx(4.0) and train["metrics"]["loss"]["min_step"] == 10
    assert train["metrics"]["grad_norm"]["first"] == 2.0 and "mfu" not in train["metrics"]  # null is no value
    assert summary["runs"]["run"]["eval"]["metrics"]["eval_loss"]["last_step"] == 10
    assert "dropped 1 partly written last line" in capsys.readouterr().err


def test_two_runs_with_one_folder_name_are_told_apart(tmp_path):
    a, b = _run(tmp_path / "a" / "run", torn=False), _run(tmp_path / "b" / "run", steps=4, torn=False)
    out = tmp_path / "plots"
    assert run_script("plot_metrics", str(a), str(b), "--out", str(out), "--smooth", "0.5") == 0
    runs = json.loads((out / "summary.json").read_text())["runs"]
    assert sorted(runs) == sorted([str(a), str(b)])
    assert runs[str(b)]["train"]["records"] == 4


def test_a_damaged_line_before_the_last_names_the_file_and_line(tmp_path):
    run = _run(tmp_path / "run", torn=False)
    lines = (run / "metrics.train.jsonl").read_text().splitlines()
    lines[2] = "not json"
    (run / "metrics.train.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(MetricsFileError, match=r"metrics.train.jsonl:3: not a metrics record"):
        read_metrics(run / "metrics.train.jsonl")


def test_a_repeated_step_keeps_its_last_record(tmp_path):
    path = tmp_path / "metrics.train.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": v}) + "\n" for s, v in [(1, 3.0), (2, 2.0), (2, 1.5), (3, 1.0)]))
    assert read_metrics(path).series("loss") == ([1, 2, 3], [3.0, 1.5, 1.0])


def test_a_folder_without_metrics_is_refused(tmp_path):
    (tmp_path / "nothing").mkdir()
    with pytest.raises(FileNotFoundError, match="nothing: no metrics.train.jsonl"):
        read_runs([tmp_path / "nothing"])
