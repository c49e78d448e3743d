from pathlib import Path

import pytest

from moshi.models.model_loading import load_model
from tests.helpers import checkpoints as ck


@pytest.fixture(scope="session")
def server_assets(tmp_path_factory) -> Path:
    """The tiny demo model's hub-layout folder (random LM, fitted tiny Mimi, tokenizer)."""
    return ck.make_base_assets(tmp_path_factory.mktemp("server_assets"))


@pytest.fixture(scope="session")
def tiny_model(server_assets):
    return load_model(server_assets, device="cpu")
