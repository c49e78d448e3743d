"""Config loading, saving and validation (`finetune.args`)."""

from __future__ import annotations

import textwrap

import pytest
import yaml

from finetune.args import ConfigError, TrainArgs

UPSTREAM_EXAMPLE = """\
data:
  eval_data: ''
  shuffle: true
  train_data: '{train}'
moshi_paths:
  hf_repo_id: "kyutai/moshiko-pytorch-bf16"
full_finetuning: false
lora:
  enable: true
  rank: 128
  scaling: 2.
  ft_embed: false
first_codebook_weight_multiplier: 100.
text_padding_weight: .5
duration_sec: 100
batch_size: 16
max_steps: 2000
gradient_checkpointing: true
optim:
  lr: 2e-6
  weight_decay: 0.1
  pct_start: 0.05
seed: 0
log_freq: 1
eval_freq: 100
do_eval: false
do_ckpt: true
ckpt_freq: 100
save_adapters: true
run_dir: "{run}"
"""


@pytest.fixture
def manifest(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("")
    return p


def load_text(tmp_path, text: str) -> TrainArgs:
    p = tmp_path / "cfg.yaml"
    p.write_text(textwrap.dedent(text))
    return TrainArgs.load(p)


def errors_of(tmp_path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text)
    return info.value.errors


def test_upstream_example_loads_with_coercion(tmp_path, manifest):
    a = load_text(tmp_path, UPSTREAM_EXAMPLE.format(train=manifest, run=tmp_path / "run"))
    assert a.optim.lr == 2e-6 and isinstance(a.optim.lr, float)
    assert a.duration_sec == 100.0 and isinstance(a.duration_sec, float)
    assert a.lora.rank == 128 and a.lora.scaling == 2.0 and a.first_codebook_weight_multiplier == 100.0
    assert a.stage_steps == [2000] and a.total_steps == 2000 and not a.uses_stages
    assert a.text_llm.hf_repo_id == "Qwen/Qwen2.5-3B-Instruct" and a.audio_loss_skip_every == 4
    assert a.optim.cycle_momentum is True and a.data.cache_dir is None and a.data.aug.noise_prob == 0.0


def test_save_sorted_round_trip_without_secret(tmp_path, manifest, monkeypatch, caplog):
    monkeypatch.setenv("WANDB_API_KEY", "from-env")
    text = UPSTREAM_EXAMPLE.format(train=manifest, run=tmp_path / "run") + "wandb:\n  project: p\n  key: SECRET\n"
    a = load_text(tmp_path, text)
    assert "deprecated" in caplog.text
    assert a.wandb_api_key == "from-env"
    out = tmp_path / "args.yaml"
    a.save(out)
    saved = out.read_text()
    assert "SECRET" not in saved and yaml.safe_load(saved)["wandb"] == {"offline": False, "project": "p",
                                                                        "run_name": None}
    assert "SECRET" not in repr(a) and "SECRET" not in str(a)
    keys = list(yaml.safe_load(saved))
    assert keys == sorted(keys) and "world_size" in keys
    b = TrainArgs.load(out)
    assert b.to_dict() == a.to_dict()


def test_unknown_keys_get_suggestions_and_all_errors_reported_at_once(tmp_path, manifest):
    errs = errors_of(tmp_path, f"""
        data: {{train_data: '{manifest}', shufle: true}}
        run_dir: r
        lora: {{enable: true, rnak: 3}}
        batch_sise: 2
    """)
    text = "\n".join(errs)
    assert "unknown key 'data.shufle' (did you mean 'data.shuffle'?)" in text
    assert "unknown key 'lora.rnak' (did you mean 'lora.rank'?)" in text
    assert "unknown key 'batch_sise' (did you mean 'batch_size'?)" in text
    assert len(errs) == 3
    # cross-key rules are collected the same way
    errs = errors_of(tmp_path, f"data: {{train_data: '{manifest}'}}\nrun_dir: r\nlora: {{enable: true}}\n"
                               "num_microbatches: 0\nbatch_size: 0\nparam_dtype: fp8\n")
    assert len(errs) == 3 and any(e.startswith("num_microbatches") for e in errs)


@pytest.mark.parametrize(
    "extra, needle",
    [
        ("lora: {enable: true}\nfull_finetuning: true", "lora.enable: true and full_finetuning: true"),
        ("lora: {enable: false}\nfull_finetuning: false", "set lora.enable: true (adapters) or full_finetuning: true"),
        ("lora: {enable: true, rank: 0}", "lora.rank must be > 0"),
        ("lora: {enable: true, scaling: -1}", "lora.scaling must be > 0"),
        ("lora: {enable: true}\ntext_llm: {enable: true}", "lora.enable: true is not supported with text_llm.enable"),
        ("full_finetuning: true\nlora: {enable: false}\ntext_llm: {enable: true, proj_dropout: 1.5}",
         "text_llm.proj_dropout must be in [0, 1)"),
        ("lora: {enable: false}\ntext_llm: {enable: true}", "text_llm.enable: true requires full_finetuning: true"),
        ("lora: {enable: true}\nparam_dtype: float16", "param_dtype must be one of ['bfloat16', 'float32'], got 'float16' (float16 needs a loss scaler"),
        ("lora: {enable: true}\nnum_ckpt_keep: 0", "num_ckpt_keep must be null (keep all) or >= 1, got 0"),
        ("lora: {enable: true}\ndo_eval: true", "do_eval: true needs data.eval_data"),
        ("lora: {enable: true}\nmoshi_paths: {moshi_path: model.bin}", "moshi_paths.moshi_path must be a safetensors file"),
        ("lora: {enable: true}\nmax_steps: [10, 20]", "max_steps lists 2 stages but data.train_data has 1 sources"),
        ("lora: {enable: true}\nmax_steps: 0", "max_steps must be a positive int"),
        ("lora: {enable: true}\nmax_steps: ten", "max_steps must be int or list, got 'ten'"),
        ("lora: {enable: true}\nduration_sec: abc", "duration_sec must be a number, got 'abc'"),
        ("lora: {enable: true}\nonly_text: true", "only_text: true needs text_llm.enable: true"),
    ],
)
def test_validation_errors_name_the_key(tmp_path, manifest, extra, needle):
    errs = errors_of(tmp_path, f"data: {{train_data: '{manifest}'}}\nrun_dir: r\n{extra}\n")
    assert any(needle in e for e in errs), errs


@pytest.mark.parametrize(
    "aug, needle",
    [
        ("{noise_prob: 1.5}", "data.aug.noise_prob must be in [0, 1], got 1.5"),
        ("{gain_db: [6, -6]}", "data.aug.gain_db must be ordered (low <= high), got [6.0, -6.0]"),
        ("{speed_factor: [0.1, 1.0]}", "data.aug.speed_factor must lie within [0.5, 2.0]"),
        ("{channels: left}", "data.aug.channels must be 'user' or 'both', got 'left'"),
        ("{echo_decay: [0.1]}", "data.aug.echo_decay must be a [low, high] pair"),
    ],
)
def test_aug_validation(tmp_path, manifest, aug, needle):
    errs = errors_of(tmp_path, f"data: {{train_data: '{manifest}', aug: {aug}}}\nrun_dir: r\nlora: {{enable: true}}\n")
    assert any(needle in e for e in errs), errs


def test_data_source_errors(tmp_path, manifest):
    errs = errors_of(tmp_path, f"data: {{train_data: '{tmp_path}/nope.jsonl'}}\nrun_dir: r\nlora: {{enable: true}}\n")
    assert any("data.train_data" in e and "nope.jsonl" in e and "neither a file nor a folder" in e for e in errs)
    errs = errors_of(tmp_path, f"data: {{train_data: '{manifest}:0'}}\nrun_dir: r\nlora: {{enable: true}}\n")
    assert any("weight of" in e and "must be > 0" in e for e in errs)
    errs = errors_of(tmp_path, f"data: {{train_data: '{manifest},{manifest}'}}\nrun_dir: r\nlora: {{enable: true}}\n")
    assert any("listed twice" in e for e in errs)
    errs = errors_of(tmp_path, "run_dir: r\nlora: {enable: true}\n")
    assert "missing required key 'data'" in errs


def test_stages_and_merge_group(tmp_path, manifest):
    m2 = tmp_path / "e.jsonl"
    m2.write_text("")
    a = load_text(tmp_path, f"""
        data: {{train_data: '{manifest},{m2}', merge_group: ['{m2}']}}
        run_dir: r
        full_finetuning: true
        max_steps: [10, 30]
    """)
    assert a.uses_stages and a.total_steps == 40
    errs = errors_of(tmp_path, f"""
        data: {{train_data: '{manifest},{m2}', merge_group: ['{tmp_path}/e.jsonx']}}
        run_dir: r
        full_finetuning: true
        max_steps: [10, 30]
    """)
    assert any(f"did you mean '{m2}'" in e for e in errs), errs


def test_resume_fingerprint_lists_existing_keys(tmp_path, manifest):
    a = load_text(tmp_path, UPSTREAM_EXAMPLE.format(train=manifest, run=tmp_path / "run"))
    fp = a.resume_fingerprint()
    assert fp["lora.rank"] == 128 and fp["duration_sec"] == 100.0 and fp["max_steps"] == 2000
    # every key but the harmless ones (logging, eval, checkpoint frequencies, ...) is fingerprinted
    assert not any(k == s or k.startswith(s + ".") for k in fp for s in TrainArgs.resume_safe_keys())
    assert {"text_padding_weight", "first_codebook_weight_multiplier", "max_norm", "data.aug.noise_prob",
            "optim.lr", "moshi_paths.hf_repo_id"} <= set(fp)
