"""Fixtures for the data-preparation tools: a valid small dataset and a tiny random Whisper."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from data_tools.synth import make_stereo, words, write_manifest_lines

from finetune.data.alignments import write_alignments


@pytest.fixture
def good_dataset(tmp_path: Path) -> Path:
    """Three valid stereo 24 kHz conversations with sorted alignments, and their manifest."""
    lines = []
    for i in range(3):
        wav = make_stereo(tmp_path / "audio" / f"conv{i}.wav", duration=3.0 + i)
        write_alignments(
            wav.with_suffix(".json"),
            words(("hi", 0.2, 0.6), speaker="SPEAKER_OTHER") + words(("hello", 0.5, 0.9), ("there", 1.0, 1.6)),
        )
        lines.append({"path": f"audio/conv{i}.wav", "duration": 3.0 + i})
    return write_manifest_lines(tmp_path / "data.jsonl", lines)


@pytest.fixture(scope="session")
def tiny_whisper(tmp_path_factory) -> Path:
    """A randomly initialised one-layer Whisper with the multilingual vocabulary, saved as whisper saves models.

    51865 tokens is the size `whisper.tokenizer` expects for a multilingual model with
    99 languages; the audio context must stay 1500 (30 s windows of mel frames).
    """
    from whisper.model import ModelDimensions, Whisper

    dims = ModelDimensions(
        n_mels=80, n_audio_ctx=1500, n_audio_state=16, n_audio_head=2, n_audio_layer=1,
        n_vocab=51865, n_text_ctx=448, n_text_state=16, n_text_head=2, n_text_layer=1,
    )
    gen = torch.Generator().manual_seed(1234)
    model = Whisper(dims)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    path = tmp_path_factory.mktemp("whisper") / "tiny.pt"
    torch.save({"dims": dims.__dict__, "model_state_dict": model.state_dict()}, path)
    return path
