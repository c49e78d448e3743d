"""Config problems in one report (type errors included); secrets never echoed; the resume fingerprint."""

from __future__ import annotations

import json

import pytest

from finetune.args import ConfigError, TrainArgs
from finetune.checkpointing import ResumeMismatchError, check_resume_compatible


@pytest.fixture
def manifest(tmp_path):
    m = tmp_path / "d.jsonl"
    m.write_text('{"path": "a.wav", "duration": 1.0}\n')
    return m


def _cfg(manifest, tmp_path, **top):
    return {"data": {"train_data": str(manifest)}, "run_dir": str(tmp_path / "run"), "lora": {"enable": True},
            **top}


def _errors(raw) -> list[str]:
    with pytest.raises(ConfigError) as info:
        TrainArgs.from_dict(raw)
    return info.value.errors


def test_a_type_error_does_not_hide_the_other_problems(manifest, tmp_path):
    errs = _errors(_cfg(manifest, tmp_path, batch_size="four", max_norm=-1.0, lora={"enable": True, "rank": 0},
                        optim={"pct_start": 2.0}))
    assert any(e.startswith("batch_size must be an int, got 'four'") for e in errs), errs
    assert "max_norm must be > 0, got -1.0" in errs
    assert "lora.rank must be > 0 when lora.enable is true, got 0" in errs
    assert "optim.pct_start must be in [0, 1], got 2.0" in errs
    assert len(errs) == 4, errs


def test_rules_about_a_badly_typed_key_are_not_reported_twice(manifest, tmp_path):
    errs = _errors(_cfg(manifest, tmp_path, num_microbatches="x", duration_sec="long"))
    assert sorted(errs) == ["duration_sec must be a number, got 'long'", "num_microbatches must be an int, got 'x'"]


@pytest.mark.parametrize("secret", [["sk-123456789", "other-part"], {"token": "sk-123456789"}, 123456789,
                                    "sk-123456789"])
def test_a_secret_of_any_type_never_appears_in_a_message(manifest, tmp_path, secret):
    raw = _cfg(manifest, tmp_path, wandb={"key": secret, "project": ""}, batch_size="four")
    errs = [] if isinstance(secret, str) else None
    try:
        TrainArgs.from_dict(raw)
    except ConfigError as e:
        errs = str(e)
    assert errs is not None
    assert "123456789" not in errs and "other-part" not in errs
    assert "batch_size must be an int" in errs


def test_a_secret_given_as_the_whole_section_is_hidden(manifest, tmp_path):
    errs = "\n".join(_errors(_cfg(manifest, tmp_path, wandb="sk-abcdef123")))
    assert "sk-abcdef123" not in errs and "wandb must be a mapping" in errs


def test_yaml_syntax_errors_do_not_quote_the_line(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("run_dir: r\nwandb:\n  key: 'sk-zzz999\n  project: [x\n")
    with pytest.raises(ConfigError) as info:
        TrainArgs.load(p)
    assert "sk-zzz999" not in str(info.value) and "line" in str(info.value)


def _checkpoint(tmp_path, args: TrainArgs, fingerprint=None):
    folder = tmp_path / "ckpt"
    (folder / "resume").mkdir(parents=True)
    (folder / "resume" / "trainer.json").write_text(json.dumps(
        {"step": 1, "world_size": 1, "fingerprint": fingerprint or args.resume_fingerprint()}))
    return folder


MATH_KEYS = [("text_padding_weight", 0.1), ("first_codebook_weight_multiplier", 100.0), ("max_norm", 0.3),
             ("data.aug.noise_prob", 0.5), ("data.aug.channels", "both"), ("optim.pct_start", 0.5),
             ("data.skip_bad_files", True), ("moshi_paths.mimi_path", "m.safetensors"), ("param_dtype", "float32")]
HARMLESS_KEYS = [("log_freq", 5), ("eval_freq", 5), ("ckpt_freq", 5), ("num_ckpt_keep", 1), ("do_eval", True),
                 ("tensorboard", False), ("wandb.project", "p"), ("wandb.run_name", "r"), ("data.cache_dir", "c"),
                 ("eval_batches", 3), ("compile", True)]


def _with(raw, key, value):
    raw = json.loads(json.dumps(raw))
    node = raw
    *parents, leaf = key.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value
    return raw


@pytest.mark.parametrize("key,value", MATH_KEYS)
def test_a_key_that_changes_the_math_is_refused_by_name(manifest, tmp_path, monkeypatch, key, value):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    raw = _cfg(manifest, tmp_path)
    folder = _checkpoint(tmp_path, TrainArgs.from_dict(raw))
    changed = TrainArgs.from_dict(_with(raw, key, value), validate=False)
    with pytest.raises(ResumeMismatchError, match=rf"  - {key}: .* in the checkpoint, .* now"):
        check_resume_compatible(folder, changed.resume_fingerprint())


@pytest.mark.parametrize("key,value", HARMLESS_KEYS)
def test_a_key_that_cannot_change_the_result_may_change(manifest, tmp_path, key, value):
    raw = _cfg(manifest, tmp_path)
    folder = _checkpoint(tmp_path, TrainArgs.from_dict(raw))
    check_resume_compatible(folder, TrainArgs.from_dict(_with(raw, key, value), validate=False).resume_fingerprint())


def test_a_key_the_checkpoint_predates_counts_as_its_default(manifest, tmp_path):
    args = TrainArgs.from_dict(_cfg(manifest, tmp_path))
    old = {k: v for k, v in args.resume_fingerprint().items() if not k.startswith("data.aug.")}
    folder = _checkpoint(tmp_path, args, fingerprint=old)
    check_resume_compatible(folder, args.resume_fingerprint())
    noisy = TrainArgs.from_dict(_with(_cfg(manifest, tmp_path), "data.aug.noise_prob", 0.2))
    with pytest.raises(ResumeMismatchError, match=r"data\.aug\.noise_prob: 0\.0 in the checkpoint, 0\.2 now"):
        check_resume_compatible(folder, noisy.resume_fingerprint())
