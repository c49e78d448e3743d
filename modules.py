"""DSAA building blocks for users of the DSAA fork, plus experimental modules.

The DSAA blocks live in :mod:`moshi.modules.dsaa_blocks` and are re-exported here under the names the fork's
code imports. This file also re-exports modules no model in the repo uses:

- :class:`TopKSparseAutoencoder` (:mod:`moshi.modules.sparse_autoencoder`): a top-k sparse autoencoder for
  inspecting the vectors a DSAA model feeds its projectors (``moshi.models.dsaa.dsaa_vectors``); checkpoints
  written by ``scripts/ae_train.py`` load with ``TopKSparseAutoencoder.load(path)``.
"""

from __future__ import annotations

from moshi.modules.dsaa_blocks import (
    MaskedEmbedding,
    ResidualDepformerProjector,
    StreamingLLM,
    TextPreservingProjector,
    masked_lookup,
)
from moshi.modules.sparse_autoencoder import SAEOutput, TopKSparseAutoencoder

__all__ = [
    "MaskedEmbedding",
    "ResidualDepformerProjector",
    "SAEOutput",
    "StreamingLLM",
    "TextPreservingProjector",
    "TopKSparseAutoencoder",
    "masked_lookup",
]
