"""Ordinary user errors of the data tools: one `error: ...` line, exit 1, no traceback; duplicates; empty
manifests; precompute caches the good files and reports the bad; annotate offline and on mono files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from data_tools.synth import REPO, SR, make_stereo, tone, words, write_manifest_lines

import annotate
from finetune.cli import run_main
from finetune.data import check
from finetune.data.alignments import write_alignments
from finetune.data.audio import write_wav
from finetune.data.manifest import read_manifest
from tests.helpers.scripts import load_script

shuf = load_script("shuffle_dataset")


def _run(*cmd: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("MOSHI_FT_TRACEBACK", None)
    return subprocess.run([sys.executable, *cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _one_error_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.startswith("error: ")]
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_create_jsonl_on_an_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    line = _one_error_line(_run("scripts/create_jsonl.py", str(tmp_path / "empty"), "-o", str(tmp_path / "m.jsonl")))
    assert "no wav file under" in line and str(tmp_path / "empty") in line
    assert not (tmp_path / "m.jsonl").exists()


def test_shuffle_dataset_refuses_an_impossible_fraction(tmp_path):
    m = write_manifest_lines(tmp_path / "all.jsonl", [{"path": f"{i}.wav", "duration": 1.0} for i in range(4)])
    line = _one_error_line(_run("scripts/shuffle_dataset.py", str(m), "--eval-fraction=1.5"))
    assert "--eval-fraction must be in [0, 1), got 1.5" in line


@pytest.mark.parametrize("fraction", ["-0.1", "nan", "inf", "1.0"])
def test_every_impossible_fraction_is_one_error_line(tmp_path, fraction, capsys):
    m = write_manifest_lines(tmp_path / "all.jsonl", [{"path": f"{i}.wav", "duration": 1.0} for i in range(4)])
    assert run_main(lambda: shuf.main([str(m), f"--eval-fraction={fraction}"])) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --eval-fraction must be in [0, 1), got ") and err.count("\n") == 1
    assert not (tmp_path / "train.jsonl").exists()


def test_shuffle_dataset_splits_by_file_and_reports_duplicates(tmp_path, capsys):
    lines = [{"path": f"{i}.wav", "duration": 1.0 + i} for i in range(6)]
    lines += [{"path": "2.wav", "duration": 3.0}, {"path": "4.wav", "duration": 5.0}]
    m = write_manifest_lines(tmp_path / "all.jsonl", lines)
    for seed in range(8):
        assert shuf.main([str(m), "--eval-count", "2", "--seed", str(seed), "--out-dir", str(tmp_path / "o")]) == 0
        train = {e.path.name for e in read_manifest(tmp_path / "o" / "train.jsonl")}
        evals = [e.path.name for e in read_manifest(tmp_path / "o" / "eval.jsonl")]
        assert not train & set(evals)  # never the same recording on both sides
        assert len(set(evals)) == 2 and len(train) == 4
    err = capsys.readouterr().err
    assert f"2.wav is listed 2 times ({m} lines 3, 7)" in err and "lines 5, 8" in err


def test_check_fails_an_empty_manifest(tmp_path, capsys):
    m = tmp_path / "empty.jsonl"
    m.write_text("\n\n")
    assert check.main([str(m), "--no-progress"]) == 1
    out = capsys.readouterr()
    assert "has no entry" in out.out + out.err and "FAIL" in out.out


def test_check_lists_every_bad_line_and_duplicates(good_dataset, capsys):
    with open(good_dataset, "a") as f:
        f.write('{"path": "audio/conv0.wav"}\nnot json\n{"path": "audio/conv1.wav", "duration": 4.0}\n'
                '{"path": "", "duration": 1}\n')
    assert check.main([str(good_dataset), "--no-progress"]) == 2
    out = capsys.readouterr()
    for lineno, why in ((4, "'duration' must be a number"), (5, "not valid JSON"), (7, "missing or empty 'path'")):
        assert f"{good_dataset}:{lineno}: {why}" in out.err
    assert "duplicate_line" in out.out and f"({good_dataset} lines 2, 6)" in out.out


def test_check_names_a_short_manifest_duration_as_the_manifest_mismatch(good_dataset):
    lines = good_dataset.read_text().splitlines()
    first = json.loads(lines[0])
    first["duration"] = 1.0  # the file lasts 3 s; its words run to 1.6 s
    good_dataset.write_text("\n".join([json.dumps(first)] + lines[1:]) + "\n")
    report = check.check_manifest(good_dataset, progress=False)
    assert [i.code for i in report.files[0].issues] == ["duration_mismatch"]
    assert report.files[0].where.endswith(":1")
    assert "manifest says 1.000s, the file lasts 3.000s" in report.files[0].issues[0].message


def _precompute_config(tmp_path: Path, manifest: Path, assets: Path) -> Path:
    cfg = {"data": {"train_data": str(manifest), "cache_dir": str(tmp_path / "cache")},
           "moshi_paths": {"hf_repo_id": str(assets)}, "run_dir": str(tmp_path / "run"),
           "lora": {"enable": True}, "duration_sec": 2.0}
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_precompute_missing_config(tmp_path):
    line = _one_error_line(_run("-m", "finetune.data.precompute", str(tmp_path / "nope.yaml"), "--device", "cpu"))
    assert "config file not found" in line and "nope.yaml" in line


@pytest.mark.slow
def test_precompute_caches_the_good_files_and_reports_the_bad(tmp_path):
    from tests.helpers.tiny_run import make_tiny_assets

    assets = make_tiny_assets(tmp_path / "assets", files=2, eval_files=1)
    data = tmp_path / "data"
    for i in range(3):
        make_stereo(data / f"s{i}.wav", duration=2.0, left_freq=200.0 + 50 * i)  # distinct contents
        write_alignments(data / f"s{i}.json", words(("hi", 0.2, 0.6)))
    write_wav(data / "mono.wav", tone(2.0, [(0.1, 1.0)])[None], SR)
    write_alignments(data / "mono.json", words(("hi", 0.2, 0.6)))
    manifest = write_manifest_lines(data / "m.jsonl", [
        {"path": "s0.wav", "duration": 2.0}, {"path": "mono.wav", "duration": 2.0},
        {"path": "missing.wav", "duration": 2.0}, {"path": "s1.wav", "duration": 2.0},
        {"path": "s2.wav", "duration": 2.0},
    ])
    r = _run("-m", "finetune.data.precompute", str(_precompute_config(tmp_path, manifest, assets)), "--device", "cpu")
    line = _one_error_line(r)
    assert "2 manifest line(s) could not be cached (the others were)" in line
    assert f"{manifest}:2: " in r.stderr and "1 channel(s)" in r.stderr
    assert f"{manifest}:3: audio file not found" in r.stderr
    entries = list((tmp_path / "cache").glob("mimi-*/*/*.safetensors"))
    assert len(entries) == 3


def test_annotate_offline_with_a_model_name_that_is_not_cached(tmp_path, monkeypatch, capsys):
    make_stereo(tmp_path / "a.wav", duration=1.0)
    manifest = write_manifest_lines(tmp_path / "m.jsonl", [{"path": "a.wav", "duration": 1.0}])
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # no whisper model cached here

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    rc = run_main(lambda: annotate.main([str(manifest), "--local", "--device", "cpu", "--vad", "none",
                                         "--no-progress"]))
    assert rc == 1
    err = capsys.readouterr().err
    assert "error: whisper model 'medium': model not found locally; pass a path or a cached model name" in err
    assert "Traceback" not in err
    assert not (tmp_path / "a.json").exists()


def test_annotate_mono_file_warns_and_says_which_channel(tmp_path, tiny_whisper, capsys, caplog):
    write_wav(tmp_path / "mono.wav", tone(1.0, [(0.1, 0.9)])[None], SR)
    make_stereo(tmp_path / "st.wav", duration=1.0)
    manifest = write_manifest_lines(tmp_path / "m.jsonl", [{"path": "mono.wav", "duration": 1.0},
                                                           {"path": "st.wav", "duration": 1.0}])
    fast = ["--device", "cpu", "--beam_size", "1", "--best_of", "1", "--temperature", "0", "--max_tokens", "8",
            "--vad", "none", "--no-progress", "--local"]
    summary = tmp_path / "s.json"
    assert annotate.main([str(manifest), "--whisper_model", str(tiny_whisper), "--summary-json", str(summary),
                          *fast]) == 0
    out = capsys.readouterr().out
    assert "2 done (1 mono: channel 0, their only one, transcribed as SPEAKER_MAIN" in out
    assert f"{tmp_path / 'mono.wav'} is mono" in caplog.text
    assert json.loads(summary.read_text())["mono_files"] == [str(tmp_path / "mono.wav")]
