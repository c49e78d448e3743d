import os

import pytest
import torch

# Two cores on CI: keep every test single-threaded so parallel torch work does
# not oversubscribe the machine, and make the runs deterministic.
torch.set_num_threads(int(os.environ.get("TEST_TORCH_THREADS", "1")))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
