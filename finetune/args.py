"""Training configuration: the YAML file, as nested dataclasses, validated once.

Keys and defaults are moshi-finetune's (an existing `moshi_7B.yaml` loads unchanged), plus
the trainer's resume/compile/cache keys and the DSAA keys. Loading is
our own small decoder, so that every problem (unknown key, bad type, illegal combination)
is collected with its dotted key and raised once, before anything touches the disk.
Scalars are coerced from YAML strings: `2e-6` becomes a float, `duration_sec: 100`
becomes `100.0`.

`max_steps` has two meanings that coexist:

* an int (or a one-element list): one stage of that many optimizer steps, drawing each
  sample from the `data.train_data` sources with probability proportional to their
  `path:weight` weights;
* a list of N > 1 ints: N stages run in order, stage i training on source i of
  `data.train_data` only (weights ignored); N must equal the number of sources. With
  `data.merge_group`, the named sources form one merged **first** stage whose length is
  the sum of their steps and which draws each batch from source j with probability
  proportional to its steps; the other sources follow, one stage each, in file order.

The OneCycle schedule always spans `total_steps` (the sum of the list).
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from moshi.models.dsaa_config import TextLLMSpec
from moshi.utils.atomic import atomic_write_text

logger = logging.getLogger(__name__)

SAFETENSORS_SUFFIXES = (".safetensors", ".sft", ".sfts")
SUPPORTED_PARAM_DTYPES = ("bfloat16", "float32")
# The spoken-LM evaluations (switched on under `do_eval`) and the data key each one reads.
BENCHMARK_SWITCHES: dict[str, tuple[str, ...]] = {
    "do_eval_loss": ("eval_loss_data",),
    "do_slm": ("swuggy_data", "sblimp_data", "ssc_data"),
    "do_cd": ("cd_data",),
    "do_mmlu": ("mmlu_data",),
}
EVAL_CHANNELS = ("moshi", "user")
EVAL_TEXT_ROWS = ("zero", "pad", "transcript")
EVAL_STREAMS = ("audio", "text", "audio+text")
MMLU_LONG_CONTEXT = ("refuse", "window")


class ConfigError(ValueError):
    """The configuration is invalid; the message lists every problem with its dotted key."""

    def __init__(self, errors: list[str], source: str | None = None):
        self.errors = list(errors)
        head = f"invalid configuration{f' {source}' if source else ''} ({len(errors)} problem(s)):"
        super().__init__("\n".join([head] + [f"  - {e}" for e in errors]))


# ----------------------------------------------------------------------------- sections


@dataclass
class ModelPaths:
    """`moshi_paths:` where the Moshi weights, Mimi, the tokenizer and the LM config come from.

    Paths follow moshi's convention: `hf://owner/repo/file` downloads from another repo,
    anything else is a local path; null → the file of `hf_repo_id`.
    """

    hf_repo_id: str | None = "kyutai/moshiko-pytorch-bf16"
    mimi_path: str | None = None
    moshi_path: str | None = None
    tokenizer_path: str | None = None
    config_path: str | None = None


@dataclass
class LoraArgs:
    """`lora:` low-rank adapters on every linear of the LM (rank r, output scaled by `scaling`)."""

    enable: bool = False
    rank: int = 64
    scaling: float = 2.0
    ft_embed: bool = False


@dataclass
class OptimArgs:
    """`optim:` AdamW + OneCycleLR.

    `lr`/`weight_decay` apply to plain Moshi; DSAA uses the `proj_*` group (text and
    depformer projectors) and the `finetune_*` group (heads, depformer) instead.

    `cycle_momentum` (default true): OneCycleLR also cycles AdamW's beta1,
    0.95 at the start, down to 0.85 at the end of warm-up and back to 0.95 at the end, so
    the beta1 of 0.9 the optimizer is built with is never used. Set false to keep beta1
    fixed at 0.9.
    """

    lr: float = 1e-4
    weight_decay: float = 0.1
    pct_start: float = 0.05
    cycle_momentum: bool = True
    proj_lr: float = 1e-4
    proj_wd: float = 0.05
    finetune_lr: float = 5e-6
    finetune_wd: float = 0.01


@dataclass
class WandbArgs:
    """`wandb:` Weights & Biases logging, enabled by setting `project`.

    The API key is read from the `WANDB_API_KEY` environment variable. A `key` in the
    YAML is still accepted for old configs (with a warning) but never saved nor printed.
    """

    project: str | None = None
    offline: bool = False
    key: str | None = None
    run_name: str | None = None


@dataclass
class AugArgs:
    """`data.aug:` data augmentation; every probability is 0 (off) by default.

    Each sample draws its own decisions from a generator seeded with (seed, rank, sample
    index), so a run (and a resumed run) sees the same augmentations.

    On the wave, before Mimi, applied to `channels` (`user`: the right channel only;
    `both`): additive white noise at an SNR drawn from `noise_snr_db`; gain in dB from
    `gain_db`; speed factor from `speed_factor` (>1 faster; the chunk is read longer or
    shorter so the result stays `duration_sec` long; with `both`, word times are scaled
    too); pitch shift in semitones from `pitch_semitones` (duration kept); one echo
    with a delay (s) from `echo_delay_sec` and a decay from `echo_decay`. A chunk with a
    wave augmentation is encoded by Mimi on its own and bypasses the codes cache.

    On the codes: `shift_prob` shifts the user's audio rows by up to `shift_max_frames`
    frames against the text and model rows (the gap is filled with -1); `text_mask_prob`
    replaces a `text_mask_fraction` of the text frames by -1 (no input, no loss: the
    model must not be taught to predict PAD where a word was); `audio_mask_prob` sets a
    `audio_mask_fraction` of the frames of the user's audio rows to -1.
    Ranges are `[low, high]` lists, drawn uniformly.
    """

    channels: str = "user"
    noise_prob: float = 0.0
    noise_snr_db: list[float] = field(default_factory=lambda: [10.0, 30.0])
    gain_prob: float = 0.0
    gain_db: list[float] = field(default_factory=lambda: [-6.0, 6.0])
    speed_prob: float = 0.0
    speed_factor: list[float] = field(default_factory=lambda: [0.9, 1.1])
    pitch_prob: float = 0.0
    pitch_semitones: list[float] = field(default_factory=lambda: [-2.0, 2.0])
    echo_prob: float = 0.0
    echo_delay_sec: list[float] = field(default_factory=lambda: [0.05, 0.3])
    echo_decay: list[float] = field(default_factory=lambda: [0.2, 0.5])
    shift_prob: float = 0.0
    shift_max_frames: int = 2
    text_mask_prob: float = 0.0
    text_mask_fraction: float = 0.1
    audio_mask_prob: float = 0.0
    audio_mask_fraction: float = 0.1

    @property
    def any_wave(self) -> bool:
        return any(p > 0 for p in (self.noise_prob, self.gain_prob, self.speed_prob, self.pitch_prob,
                                   self.echo_prob))

    @property
    def any_codes(self) -> bool:
        return any(p > 0 for p in (self.shift_prob, self.text_mask_prob, self.audio_mask_prob))


@dataclass
class DataArgs:
    """`data:` sources, caching, augmentation.

    `train_data`/`eval_data`: comma-separated `path` or `path:weight`; a path is a
    `.jsonl` manifest or a folder (every `*.jsonl` under it, recursively, sorted).
    `cache_dir`: folder of the Mimi codes cache (each file encoded once, whole, and kept
    as safetensors keyed by its content hash, the Mimi weights and the codebook count);
    null → no disk cache: codes are computed on first use and only kept in memory for
    the run. `python -m finetune.data.precompute CONFIG` fills the cache ahead of time.
    `merge_group`: sources (as written in `train_data`) forming the first, merged stage.
    `skip_bad_files`: files the up-front data scan finds unusable (unreadable, not stereo,
    empty, duration not matching the manifest, bad alignment file) are left out, and
    counted in the log, instead of stopping the run before its first step.
    `duration_tolerance_sec`: how far a manifest duration may be from the file's.
    The evaluation sets (see `docs/evaluation.md`): `eval_loss_data` (a conversation set for
    `do_eval_loss`, the DSAA name of `eval_data`; give one of the two), `swuggy_data`,
    `sblimp_data`, `ssc_data` (`do_slm`), `cd_data` (`do_cd`: comma-separated folders of
    pair sets, each named by its folder), `mmlu_data` (`do_mmlu`); each benchmark set is a
    folder with `data.jsonl`, `data_stereo/` and `extra.txt`.
    """

    train_data: str = ""
    shuffle: bool = False
    eval_data: str = ""
    cache_dir: str | None = None
    merge_group: list[str] = field(default_factory=list)
    skip_bad_files: bool = False
    duration_tolerance_sec: float = 0.1
    aug: AugArgs = field(default_factory=AugArgs)
    eval_loss_data: str = ""
    mmlu_data: str = ""
    swuggy_data: str = ""
    sblimp_data: str = ""
    ssc_data: str = ""
    cd_data: str = ""


@dataclass
class EvalArgs:
    """`evaluation:` how the spoken-LM benchmarks score an item (see `docs/evaluation.md`).

    The defaults give the fork's numbers under the `fork` protocol: the item on Moshi's channel,
    the text row fed as zero tokens (no text input, no text term), every codebook of that channel.
    `channel`: the stereo channel holding the spoken item (`moshi` = left, `user` = right, which
    needs a model that predicts the user's codebooks). `text_row`: `zero`, `pad` (PAD on every
    frame) or `transcript` (the words of `N.json`). `streams`: what `standard` sums (`audio`,
    `text`, `audio+text`). `codebooks`: the channel's codebooks `standard` scores (null: all).
    `pairs_per_batch`: pairs padded together into one forward. `max_pairs` / `mmlu_max_questions`:
    score only the first ones by id (null: all; same items at every evaluation). Spoken MMLU:
    `mmlu_text_weight`/`mmlu_audio_weight` mix the `fork` score, `mmlu_choice_frames` frames of
    each choice clip, `mmlu_shots` per subject, `mmlu_text_row` (default transcript), and
    `mmlu_long_context`: `refuse` a question whose context exceeds the model's attention context,
    or `window` (keep its most recent frames).
    """

    channel: str = "moshi"
    text_row: str = "zero"
    streams: str = "audio"
    codebooks: list[int] | None = None
    pairs_per_batch: int = 8
    max_pairs: int | None = None
    mmlu_text_weight: float = 0.9
    mmlu_audio_weight: float = 0.1
    mmlu_choice_frames: int = 33
    mmlu_shots: int = 5
    mmlu_text_row: str = "transcript"
    mmlu_long_context: str = "refuse"
    mmlu_max_questions: int | None = None


@dataclass
class TextLLMArgs(TextLLMSpec):
    """`text_llm:` the Hugging Face LLM of a DSAA model (see `docs/dsaa.md`).

    The LLM keys live in `moshi.models.dsaa_config.TextLLMSpec` (the loaders use them too);
    this section adds the switch that turns DSAA on.
    """

    enable: bool = False


@dataclass
class TrainArgs:
    """Top level of the YAML file. `data` and `run_dir` are required.

    Trainer keys beyond moshi-finetune's: `resume` (continue a killed run from its last
    resumable checkpoint in `run_dir`), `compile` (torch.compile where it pays),
    `tensorboard`, `eval_duration_sec`/`eval_batches` (eval chunk length and the number
    of eval batches over all ranks), `audio_loss_skip_every`, `only_text` (DSAA).
    """

    data: DataArgs
    run_dir: str
    moshi_paths: ModelPaths = field(default_factory=ModelPaths)
    first_codebook_weight_multiplier: float = 1.0
    text_padding_weight: float = 0.5
    optim: OptimArgs = field(default_factory=OptimArgs)
    seed: int = 0
    num_microbatches: int = 1
    duration_sec: float = 10.0
    batch_size: int = 1
    max_norm: float = 1.0
    max_steps: Union[int, list[int]] = 100
    log_freq: int = 1
    ckpt_freq: int = 0
    save_adapters: bool = True
    do_ckpt: bool = True
    num_ckpt_keep: int | None = 3
    eval_freq: int = 0
    do_eval: bool = False
    gradient_checkpointing: bool = True
    wandb: WandbArgs = field(default_factory=WandbArgs)
    lora: LoraArgs | None = field(default_factory=LoraArgs)
    full_finetuning: bool = False
    param_dtype: str = "bfloat16"
    overwrite_run_dir: bool = False
    # ours (trainer)
    resume: bool = False
    compile: bool = False
    tensorboard: bool = True
    eval_duration_sec: float = 30.0
    eval_batches: int = 50
    # DSAA
    text_llm: TextLLMArgs = field(default_factory=TextLLMArgs)
    only_text: bool = False
    audio_loss_skip_every: int = 4
    do_eval_loss: bool = False
    do_mmlu: bool = False
    do_slm: bool = False
    do_cd: bool = False
    evaluation: EvalArgs = field(default_factory=EvalArgs)
    world_size: int | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.world_size = int(os.environ.get("WORLD_SIZE", -1))

    # -- derived -------------------------------------------------------------------

    @property
    def stage_steps(self) -> list[int]:
        """`max_steps` as a list (an int is a one-stage list)."""
        return list(self.max_steps) if isinstance(self.max_steps, list) else [int(self.max_steps)]

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole run (OneCycleLR `total_steps`)."""
        return sum(self.stage_steps)

    @property
    def uses_stages(self) -> bool:
        """True when `max_steps` lists one stage per source (rather than weighted mixing)."""
        return len(self.stage_steps) > 1 or bool(self.data.merge_group)

    @property
    def wandb_api_key(self) -> str | None:
        """The key from `WANDB_API_KEY`, else the deprecated YAML `wandb.key`."""
        return os.environ.get("WANDB_API_KEY") or self.wandb.key

    # -- I/O -----------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike, validate: bool = True) -> TrainArgs:
        """Reads a YAML config, decodes and validates it; raises `ConfigError` listing every problem."""
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file not found: {p}")
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ConfigError([f"not valid YAML: {_yaml_problem(e)}"], source=str(p)) from None
        return cls.from_dict(raw if raw is not None else {}, validate=validate, source=str(p))

    @classmethod
    def from_dict(cls, raw: Any, validate: bool = True, source: str | None = None) -> TrainArgs:
        """Decodes and validates a mapping; every problem (type errors and rule violations) in one `ConfigError`.

        A key of the wrong type takes its default for the cross-key rules, so one bad value does
        not hide the other problems; rules that mention a badly typed key are left out.
        """
        errors: list[str] = []
        args = _decode_dataclass(cls, raw, "", errors)
        if errors or args is None:
            if args is not None and validate:
                bad = {m.split(" ", 1)[0].rstrip(":") for m in errors}
                errors += [m for m in _validate(args) if not any(_mentions(m, k) for k in bad)]
            raise ConfigError(_redact(errors or ["could not decode the configuration"], raw), source=source)
        if args.wandb.key:
            logger.warning(
                "wandb.key in the config file is deprecated: put the key in the WANDB_API_KEY "
                "environment variable; it is never written to args.yaml"
            )
        if validate:
            args.validate(source=source)
        return args

    def to_dict(self) -> dict[str, Any]:
        """All fields as plain data, secrets removed (`wandb.key` is never included)."""
        d = _encode(self)
        d["wandb"].pop("key", None)
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=True, default_flow_style=False, allow_unicode=True)

    def save(self, path: str | os.PathLike) -> None:
        """Writes the config as YAML (sorted keys, defaults included, no secrets), atomically."""
        atomic_write_text(path, self.to_yaml())

    def record_in(self, run_dir: str | os.PathLike) -> None:
        """Writes `run_dir/args.yaml`: the config this run runs with.

        A resumed run whose config differs from the recorded one (in keys a resume may change, such
        as `log_freq`, or in paths of moved files) keeps the old file as `args.previous.yaml`.
        """
        path = Path(run_dir) / "args.yaml"
        text = self.to_yaml()
        if path.is_file():
            if path.read_text(encoding="utf-8") == text:
                return
            os.replace(path, path.with_name("args.previous.yaml"))
        atomic_write_text(path, text)

    def __repr__(self) -> str:  # never print the key, even through a debugger or a log of `args`
        return f"TrainArgs({self.to_dict()!r})"

    # -- validation ----------------------------------------------------------------

    def validate(self, source: str | None = None) -> None:
        """Checks every cross-key rule; collects all problems and raises one `ConfigError`."""
        errors = _validate(self)
        if errors:
            raise ConfigError(_redact(errors, {"wandb": {"key": self.wandb.key}}), source=source)
        if self.lora is not None and self.lora.enable and not self.save_adapters and not self.full_finetuning:
            logger.warning("save_adapters: false merges LoRA into the full model at every checkpoint "
                           "(a full-size export; it may run out of memory on large models)")

    @staticmethod
    def resume_safe_keys() -> tuple[str, ...]:
        """Dotted keys (or whole sections) a resumed run may change: they cannot change what is computed.

        Everything else is part of the resume fingerprint, so a key added later is checked by default.
        """
        return RESUME_SAFE_KEYS

    def get_dotted(self, key: str) -> Any:
        """Value of a dotted key such as `lora.rank` (None when a section is null)."""
        obj: Any = self
        for part in key.split("."):
            if obj is None:
                return None
            obj = getattr(obj, part)
        return obj

    def resume_fingerprint(self) -> dict[str, Any]:
        """`{dotted key: value}` of every key outside `resume_safe_keys()`, JSON-serialisable."""
        return {k: v for k, v in _flatten(self.to_dict()).items() if not _is_resume_safe(k)}

    @classmethod
    def default_fingerprint(cls) -> dict[str, Any]:
        """The fingerprint of the defaults: the value a key had in a checkpoint written before it existed."""
        return cls.from_dict({"data": {}, "run_dir": "."}, validate=False).resume_fingerprint()


# Keys that only decide what is logged, evaluated or saved, where, and how fast: the trained weights
# and the logged training losses do not depend on them. `data.cache_dir` holds codes that equal the
# codes computed without it; `world_size` is checked on its own (the data position is per rank).
RESUME_SAFE_KEYS: tuple[str, ...] = (
    "run_dir", "resume", "overwrite_run_dir", "world_size", "compile", "gradient_checkpointing",
    "log_freq", "ckpt_freq", "do_ckpt", "num_ckpt_keep", "save_adapters",
    "eval_freq", "do_eval", "eval_duration_sec", "eval_batches", "data.eval_data",
    "do_eval_loss", "do_mmlu", "do_slm", "do_cd", "data.eval_loss_data", "data.mmlu_data", "data.swuggy_data",
    "data.sblimp_data", "data.ssc_data", "data.cd_data", "evaluation",
    "data.cache_dir", "wandb", "tensorboard",
)


def _is_resume_safe(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in RESUME_SAFE_KEYS)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _mentions(message: str, key: str) -> bool:
    """Whether a validation message is about `key` (a dotted key, or a section of it)."""
    return re.search(rf"(?<![\w.]){re.escape(key)}(?![\w])", message) is not None


# Secret values: never echoed in any message, whatever their type.
SECRET_KEYS = (("wandb", "key"),)
SECRET_DOTTED_KEYS = frozenset(".".join(k) for k in SECRET_KEYS)


def _redact(errors: list[str], raw: Any) -> list[str]:
    """Replaces every secret value of `raw` (a list's items too) found in `errors` by ``<hidden>``."""
    secrets: list[str] = []

    def collect(v: Any) -> None:
        if isinstance(v, dict):
            for x in v.values():
                collect(x)
        elif isinstance(v, (list, tuple)):
            secrets.append(repr(v))
            for x in v:
                collect(x)
        elif v is not None and not isinstance(v, bool) and str(v):
            secrets.extend({repr(v), str(v)})

    for section, key in SECRET_KEYS:
        node = raw.get(section) if isinstance(raw, dict) else None
        if isinstance(node, dict) and key in node:
            collect(node[key])
        elif node is not None and not isinstance(node, dict):
            collect(node)  # the whole section given as a scalar may be the secret itself
    out = []
    for m in errors:
        for secret in sorted(secrets, key=len, reverse=True):
            if len(secret) >= 3:
                m = m.replace(secret, "<hidden>")
        out.append(m)
    return out


def _yaml_problem(e: yaml.YAMLError) -> str:
    """The parser's problem and position, without the quoted source line (which may hold a secret)."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or type(e).__name__
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


# ----------------------------------------------------------------------------- validation


def _check_range(errors: list[str], key: str, value: list[float], low: float | None = None,
                 high: float | None = None) -> None:
    if len(value) != 2:
        errors.append(f"{key} must be a [low, high] pair, got {value!r}")
        return
    lo, hi = value
    if lo > hi:
        errors.append(f"{key} must be ordered (low <= high), got {value!r}")
    if low is not None and lo < low or high is not None and hi > high:
        errors.append(f"{key} must lie within [{low}, {high}], got {value!r}")


def _validate(a: TrainArgs) -> list[str]:
    e: list[str] = []
    lora_on = a.lora is not None and a.lora.enable
    if a.lora is None:
        e.append("lora must be a mapping (or omitted), got null")
    if lora_on:
        if a.lora.rank <= 0:
            e.append(f"lora.rank must be > 0 when lora.enable is true, got {a.lora.rank}")
        if a.lora.scaling <= 0:
            e.append(f"lora.scaling must be > 0 when lora.enable is true, got {a.lora.scaling}")
    if a.resume and a.overwrite_run_dir:
        e.append("resume: true and overwrite_run_dir: true contradict each other: resume continues the run "
                 "in run_dir, overwrite_run_dir deletes it; set one of them to false")
    if lora_on and a.full_finetuning:
        e.append("lora.enable: true and full_finetuning: true are exclusive: choose LoRA or full fine-tuning")
    if not lora_on and not a.full_finetuning:
        e.append("nothing to train: set lora.enable: true (adapters) or full_finetuning: true")
    if a.text_llm.enable:
        if lora_on:
            e.append("lora.enable: true is not supported with text_llm.enable: true (DSAA trains its own "
                     "parameter groups); set lora.enable: false")
        if not a.full_finetuning:
            e.append("text_llm.enable: true requires full_finetuning: true")
        if a.text_llm.proj_hidden is not None and a.text_llm.proj_hidden <= 0:
            e.append(f"text_llm.proj_hidden must be > 0 or null, got {a.text_llm.proj_hidden}")
        if not 0.0 <= a.text_llm.proj_dropout < 1.0:
            e.append(f"text_llm.proj_dropout must be in [0, 1), got {a.text_llm.proj_dropout}")
    elif a.only_text:
        e.append("only_text: true needs text_llm.enable: true")
    if a.param_dtype not in SUPPORTED_PARAM_DTYPES:
        hint = " (float16 needs a loss scaler, which this trainer does not have; use bfloat16)" \
            if a.param_dtype in ("float16", "half", "fp16") else ""
        e.append(f"param_dtype must be one of {list(SUPPORTED_PARAM_DTYPES)}, got {a.param_dtype!r}{hint}")
    for key in ("num_microbatches", "batch_size", "log_freq", "eval_batches"):
        if getattr(a, key) < 1:
            e.append(f"{key} must be >= 1, got {getattr(a, key)}")
    if a.num_ckpt_keep is not None and a.num_ckpt_keep < 1:
        e.append(f"num_ckpt_keep must be null (keep all) or >= 1, got {a.num_ckpt_keep}")
    for key in ("duration_sec", "eval_duration_sec", "max_norm"):
        if not getattr(a, key) > 0:
            e.append(f"{key} must be > 0, got {getattr(a, key)}")
    if a.audio_loss_skip_every < 0:
        e.append(f"audio_loss_skip_every must be >= 0 (0 = never skip), got {a.audio_loss_skip_every}")
    if not 0.0 <= a.optim.pct_start <= 1.0:
        e.append(f"optim.pct_start must be in [0, 1], got {a.optim.pct_start}")
    for key in ("lr", "proj_lr", "finetune_lr"):
        if getattr(a.optim, key) < 0:
            e.append(f"optim.{key} must be >= 0, got {getattr(a.optim, key)}")
    steps = a.stage_steps
    if not steps or any(s < 1 for s in steps):
        e.append(f"max_steps must be a positive int or a non-empty list of positive ints, got {a.max_steps!r}")
    if not a.run_dir:
        e.append("run_dir must be set (the folder for checkpoints and logs)")
    if a.moshi_paths.moshi_path is not None and not a.moshi_paths.moshi_path.endswith(SAFETENSORS_SUFFIXES):
        e.append(f"moshi_paths.moshi_path must be a safetensors file ({', '.join(SAFETENSORS_SUFFIXES)}), "
                 f"got {a.moshi_paths.moshi_path!r}")
    if a.wandb.project is not None and not a.wandb.project.strip():
        e.append("wandb.project must be a non-empty name or null")
    if not a.data.duration_tolerance_sec >= 0:
        e.append(f"data.duration_tolerance_sec must be >= 0, got {a.data.duration_tolerance_sec}")
    _validate_data(a, e)
    _validate_aug(a.data.aug, e)
    _validate_evaluation(a, e)
    return e


def _validate_data(a: TrainArgs, e: list[str]) -> None:
    from finetune.data.sources import SourceError, parse_sources

    sources = None
    if not a.data.train_data.strip():
        e.append("data.train_data is empty: give a .jsonl manifest or a folder of them")
    else:
        try:
            sources = parse_sources(a.data.train_data, key="data.train_data")
        except (SourceError, FileNotFoundError) as err:
            e.append(str(err))
    if a.do_eval:
        if not a.data.eval_data.strip():
            if not any(getattr(a, k) for k in BENCHMARK_SWITCHES):
                e.append("do_eval: true needs data.eval_data (no eval data provided) or one of "
                         f"{', '.join(BENCHMARK_SWITCHES)}")
        else:
            try:
                parse_sources(a.data.eval_data, key="data.eval_data")
            except (SourceError, FileNotFoundError) as err:
                e.append(str(err))
    steps = a.stage_steps
    if sources is not None and a.uses_stages:
        if len(steps) != len(sources):
            e.append(f"max_steps lists {len(steps)} stages but data.train_data has {len(sources)} sources: "
                     "a list gives one stage per source (use an int for one stage mixing all sources)")
        names = [s.spec for s in sources]
        for g in a.data.merge_group:
            if g not in names:
                close = difflib.get_close_matches(g, names, n=1)
                e.append(f"data.merge_group entry {g!r} is not a data.train_data source"
                         + (f" (did you mean {close[0]!r}?)" if close else f"; sources: {names}"))
        if len(set(a.data.merge_group)) != len(a.data.merge_group):
            e.append(f"data.merge_group has duplicates: {a.data.merge_group}")


def _validate_evaluation(a: TrainArgs, e: list[str]) -> None:
    """The benchmark switches, their data folders and the `evaluation:` keys."""
    for switch, keys in BENCHMARK_SWITCHES.items():
        if not getattr(a, switch):
            continue
        if not a.do_eval:
            e.append(f"{switch}: true needs do_eval: true (the switch of every evaluation)")
        given = [k for k in keys if getattr(a.data, k).strip()]
        if not given:
            e.append(f"{switch}: true needs data.{' or data.'.join(keys)} (no data given)")
        for k in given:
            for part in getattr(a.data, k).split(","):
                path = Path(part.strip())
                if switch == "do_eval_loss":
                    if not path.exists():
                        e.append(f"data.{k}: {path} does not exist")
                elif not (path / "data.jsonl").is_file():
                    e.append(f"data.{k}: {path} is not an evaluation set folder (no {path / 'data.jsonl'})")
    if a.do_eval_loss and a.data.eval_data.strip() and a.data.eval_loss_data.strip():
        e.append("data.eval_data and data.eval_loss_data are two names of the eval-loss set: give one")
    e += evaluation_key_errors(a.evaluation)


def evaluation_key_errors(g: EvalArgs) -> list[str]:
    """Problems of the `evaluation:` section alone (the benchmark scripts check only these)."""
    e: list[str] = []
    for key, value, allowed in (("channel", g.channel, EVAL_CHANNELS), ("text_row", g.text_row, EVAL_TEXT_ROWS),
                                ("streams", g.streams, EVAL_STREAMS), ("mmlu_text_row", g.mmlu_text_row,
                                                                       EVAL_TEXT_ROWS),
                                ("mmlu_long_context", g.mmlu_long_context, MMLU_LONG_CONTEXT)):
        if value not in allowed:
            e.append(f"evaluation.{key} must be one of {list(allowed)}, got {value!r}")
    if "text" in g.streams and g.text_row == "zero":
        e.append(f"evaluation.streams: {g.streams!r} scores the text row, which evaluation.text_row: 'zero' "
                 "leaves empty; use text_row: pad or transcript")
    if g.codebooks is not None and (not g.codebooks or min(g.codebooks) < 0 or len(set(g.codebooks))
                                    != len(g.codebooks)):
        e.append(f"evaluation.codebooks must be null or distinct indices >= 0, got {g.codebooks!r}")
    for key in ("pairs_per_batch", "mmlu_choice_frames", "mmlu_shots"):
        if getattr(g, key) < 1:
            e.append(f"evaluation.{key} must be >= 1, got {getattr(g, key)}")
    for key in ("max_pairs", "mmlu_max_questions"):
        if getattr(g, key) is not None and getattr(g, key) < 1:
            e.append(f"evaluation.{key} must be null (all) or >= 1, got {getattr(g, key)}")
    if g.mmlu_text_weight < 0 or g.mmlu_audio_weight < 0:
        e.append("evaluation.mmlu_text_weight and mmlu_audio_weight must be >= 0, got "
                 f"{g.mmlu_text_weight} and {g.mmlu_audio_weight}")
    return e


def _validate_aug(g: AugArgs, e: list[str]) -> None:
    if g.channels not in ("user", "both"):
        e.append(f"data.aug.channels must be 'user' or 'both', got {g.channels!r}")
    for f in dataclasses.fields(g):
        v = getattr(g, f.name)
        if f.name.endswith(("_prob", "_fraction")) and not 0.0 <= v <= 1.0:
            e.append(f"data.aug.{f.name} must be in [0, 1], got {v}")
    _check_range(e, "data.aug.noise_snr_db", g.noise_snr_db)
    _check_range(e, "data.aug.gain_db", g.gain_db)
    _check_range(e, "data.aug.speed_factor", g.speed_factor, low=0.5, high=2.0)
    _check_range(e, "data.aug.pitch_semitones", g.pitch_semitones, low=-12.0, high=12.0)
    _check_range(e, "data.aug.echo_delay_sec", g.echo_delay_sec, low=0.0, high=2.0)
    _check_range(e, "data.aug.echo_decay", g.echo_decay, low=0.0, high=1.0)
    if g.shift_max_frames < 0:
        e.append(f"data.aug.shift_max_frames must be >= 0, got {g.shift_max_frames}")


# ----------------------------------------------------------------------------- decoding


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _decode_value(tp: Any, value: Any, key: str, errors: list[str]) -> Any:
    """Coerces `value` to the annotated type `tp`; appends a message naming `key` on failure."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            errors.append(f"{key} must not be null")
            return None
        real = [o for o in options if o is not type(None)]
        if len(real) == 1:  # Optional[X]: X's own messages are the most precise
            return _decode_value(real[0], value, key, errors)
        for opt in real:
            trial: list[str] = []
            out = _decode_value(opt, value, key, trial)
            if not trial:
                return out
        names = " or ".join(_type_name(o) for o in real)
        errors.append(f"{key} must be {names}, got {value!r}")
        return None
    if dataclasses.is_dataclass(tp):
        return _decode_dataclass(tp, value, key, errors)
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, list):
            errors.append(f"{key} must be a list, got {value!r}")
            return None
        return [_decode_value(item_tp, v, f"{key}[{i}]", errors) for i, v in enumerate(value)]
    if value is None:
        errors.append(f"{key} must not be null")
        return None
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        errors.append(f"{key} must be true or false, got {value!r}")
        return None
    if tp is int:
        if isinstance(value, bool):
            errors.append(f"{key} must be an int, got {value!r}")
            return None
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        errors.append(f"{key} must be an int, got {value!r}")
        return None
    if tp is float:
        if isinstance(value, bool):
            errors.append(f"{key} must be a number, got {value!r}")
            return None
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # PyYAML reads `2e-6` (no dot) as a string
            except ValueError:
                pass
        errors.append(f"{key} must be a number, got {value!r}")
        return None
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        errors.append(f"{key} must be a string, got {value!r}")
        return None
    if tp is Any:
        return value
    raise TypeError(f"unsupported config type {tp!r} for {key}")  # a bug in this file, not user input


def _decode_dataclass(cls: type, raw: Any, prefix: str, errors: list[str]) -> Any:
    where = prefix or "the top level"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        errors.append(f"{where} must be a mapping, got {raw!r}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    derived = {f.name for f in dataclasses.fields(cls) if not f.init}  # e.g. world_size, in saved args.yaml
    kwargs: dict[str, Any] = {}
    for name, value in raw.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name in derived:
            continue
        if name not in fields:
            close = difflib.get_close_matches(str(name), list(fields), n=1)
            hint = f" (did you mean {(prefix + '.' if prefix else '') + close[0]!r}?)" if close else ""
            errors.append(f"unknown key {key!r}{hint}")
            continue
        if key in SECRET_DOTTED_KEYS:  # a wrong type is reported without the value
            trial: list[str] = []
            decoded = _decode_value(hints[name], value, key, trial)
            if trial:
                errors.append(f"{key} must be a string (the value is a secret and is not shown)")
            else:
                kwargs[name] = decoded
            continue
        n_before = len(errors)
        decoded = _decode_value(hints[name], value, key, errors)
        if len(errors) == n_before:
            kwargs[name] = decoded
    for name, f in fields.items():
        if name not in raw and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            errors.append(f"missing required key {(prefix + '.' if prefix else '') + name!r}")
    if any(n not in kwargs and fields[n].default is dataclasses.MISSING
           and fields[n].default_factory is dataclasses.MISSING for n in fields):
        return None
    return cls(**kwargs)


def _encode(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _encode(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list):
        return [_encode(v) for v in obj]
    return obj
