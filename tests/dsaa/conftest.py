"""Tiny Hugging Face LLMs and tokenizers for the DSAA tests, built in code and saved with ``save_pretrained``.

Nothing comes from the hub: a byte-level BPE tokenizer is trained on a few sentences, and tiny Qwen2/Llama
models are built from configs, saved to a session temp dir and loaded back through ``from_pretrained``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.dsaa.tiny_llm import make_tiny_llm, train_tokenizer


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return train_tokenizer()


@pytest.fixture(scope="session")
def make_llm_dir(tmp_path_factory, tiny_tokenizer) -> Callable[..., Path]:
    """``make_llm_dir(hidden=32, arch="qwen2", tie=True, vocab=320, max_pos=64)`` -> a local HF model folder
    (model + tokenizer), built once per distinct argument set."""
    cache: dict[tuple, Path] = {}

    def make(
        hidden: int = 32, arch: str = "qwen2", tie: bool = True, vocab: int = 320, max_pos: int = 64
    ) -> Path:
        key = (hidden, arch, tie, vocab, max_pos)
        if key not in cache:
            path = tmp_path_factory.mktemp(
                f"llm_{arch}_{hidden}_{'tied' if tie else 'untied'}_{vocab}_{max_pos}"
            )
            make_tiny_llm(path, hidden, arch, tie, vocab, max_pos, seed=1234 + hidden, tokenizer=tiny_tokenizer)
            cache[key] = path
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_llm_dir(make_llm_dir) -> Path:
    return make_llm_dir()


@pytest.fixture(scope="session")
def moshi_source(tmp_path_factory) -> Path:
    """A plain Moshi checkpoint (small config, seeded init): ``model.safetensors`` + ``config.json``."""
    import json

    from safetensors.torch import save_file

    from moshi.models.lm import LMModel
    from tests.helpers.configs import small_lm_kwargs

    path = tmp_path_factory.mktemp("moshi_source")
    with torch.random.fork_rng():
        torch.manual_seed(7)
        model = LMModel(**small_lm_kwargs())
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(small_lm_kwargs()))
    return path / "model.safetensors"


@pytest.fixture
def write_config(tmp_path) -> Callable[..., Path]:
    """``write_config(moshi_path, llm_dir, **text_llm_keys)`` -> a training YAML for setup_new_model."""
    import yaml

    def write(
        moshi_path: Path, llm_dir: Path, seed: int = 3, param_dtype: str = "float32", **text_llm
    ) -> Path:
        config = {
            "data": {"train_data": str(tmp_path / "unused.jsonl")},
            "run_dir": str(tmp_path / "run"),
            "moshi_paths": {"hf_repo_id": None, "moshi_path": str(moshi_path)},
            "full_finetuning": True,
            "lora": {"enable": False},
            "seed": seed,
            "param_dtype": param_dtype,
            "text_llm": {"enable": True, "hf_repo_id": str(llm_dir), "proj_hidden": 48, **text_llm},
        }
        path = tmp_path / f"setup_{len(list(tmp_path.glob('setup_*.yaml')))}.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    return write
