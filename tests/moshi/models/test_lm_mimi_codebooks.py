"""The number of Mimi codebooks an LM reads, derived in one place."""

from __future__ import annotations

import pytest

from moshi.models.loaders import default_lm_kwargs, mimi_codebooks_for_lm
from tests.helpers.configs import small_lm_kwargs


@pytest.mark.parametrize(
    "config,expected",
    [
        (None, 8),
        ({}, 8),  # moshiko's n_q = 16, dep_q = 8
        ({"n_q": 16, "dep_q": 8}, 8),
        ({"n_q": 32, "dep_q": 16}, 16),
        ({"n_q": 8, "dep_q": 0}, 8),  # no depformer: every stream is the other speaker's
        ({"n_q": 16, "dep_q": 16}, 16),  # single stream
        ({"n_q": 12, "dep_q": 8}, 8),
    ],
)
def test_mimi_codebooks_is_the_larger_stream_group(config, expected):
    assert mimi_codebooks_for_lm(config) == expected


@pytest.mark.parametrize("config", [default_lm_kwargs(), small_lm_kwargs()], ids=["moshiko", "small"])
def test_two_speaker_configs_read_half_their_streams(config):
    assert mimi_codebooks_for_lm(config) == config["n_q"] // 2
