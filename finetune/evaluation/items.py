"""An item's whole-file codes, `[1 + 2 n_q, T]`: the text row chosen for evaluation, then the audio rows.

Codes come from the run's codes store (Mimi once per file, cached like training data); the text row is
zero tokens (no text input), PAD on every frame, or the transcript placed by the training interleaver.
A file that cannot be read is returned as its error, so the caller reports that item and scores the rest.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from finetune.data.alignments import alignment_path_for, load_alignments
from finetune.data.codes_cache import CodesStore, FileCodes
from finetune.data.interleaver import ZERO_TOKEN, Interleaver
from finetune.data.manifest import ManifestEntry


class ItemError(ValueError):
    """One item cannot be scored (unreadable file, longer than the model's context); others can."""


def model_max_frames(model: nn.Module) -> int | None:
    """Frames one forward can score whole: the attention context, and a DSAA model's LLM positions."""
    limits = [getattr(model, "context", None), getattr(getattr(model, "text_llm", None), "max_positions", None)]
    limits = [int(x) for x in limits if x is not None]
    return min(limits) if limits else None


class ItemCoder:
    """Builds item codes; `max_frames` (the model's attention context) bounds what can be scored whole."""

    def __init__(self, store: CodesStore, interleaver: Interleaver, max_frames: int | None = None) -> None:
        self.store = store
        self.interleaver = interleaver
        self.frame_rate = store.codec.frame_rate
        self.max_frames = max_frames

    def _file_codes(self, entries: Sequence[ManifestEntry]) -> list[FileCodes | Exception]:
        try:
            return list(self.store.get_many(entries))
        except Exception:  # find the files at fault; the others still get their codes
            out: list[FileCodes | Exception] = []
            for e in entries:
                try:
                    out.append(self.store.get(e))
                except Exception as err:
                    out.append(ItemError(f"{e.path} ({e.where}): {err}"))
            return out

    def text_row(self, entry: ManifestEntry, frames: int, mode: str) -> torch.Tensor:
        if mode == "zero":
            return torch.full((frames,), ZERO_TOKEN, dtype=torch.long)
        if mode == "pad":
            return torch.full((frames,), self.interleaver.pad_id, dtype=torch.long)
        if mode != "transcript":
            raise ValueError(f"text row must be zero, pad or transcript, got {mode!r}")
        words = load_alignments(alignment_path_for(entry.path))
        row = self.interleaver.build(words, 0.0, frames / self.frame_rate, frames, frames)
        return torch.from_numpy(row).long()

    def codes(self, entries: Sequence[ManifestEntry], text_row: str) -> list[torch.Tensor | ItemError]:
        """Codes ``[1 + 2 n_q, T_i]`` of each entry, or the `ItemError` saying why it has none."""
        out: list[torch.Tensor | ItemError] = []
        for e, fc in zip(entries, self._file_codes(entries)):
            if isinstance(fc, Exception):
                out.append(fc if isinstance(fc, ItemError) else ItemError(str(fc)))
                continue
            frames = fc.num_frames
            if self.max_frames is not None and frames > self.max_frames:
                out.append(ItemError(
                    f"{e.path} ({e.where}) has {frames} frames ({frames / self.frame_rate:.1f}s), more than the "
                    f"model's attention context of {self.max_frames} frames: it cannot be scored whole"))
                continue
            try:
                text = self.text_row(e, frames, text_row)
            except Exception as err:
                out.append(ItemError(f"{e.path} ({e.where}): text row: {err}"))
                continue
            audio = fc.codes.reshape(-1, frames).long()
            out.append(torch.cat([text[None], audio], dim=0))
        return out


def pad_batch(items: Sequence[torch.Tensor], frames: int | None = None) -> torch.Tensor:
    """Stacks ``[K, T_i]`` codes into ``[B, K, T]``, padding each end with zero tokens (no input, no score).

    The model is causal, so padding after an item leaves its own logits unchanged.
    """
    T = max(x.shape[-1] for x in items) if frames is None else frames
    out = torch.full((len(items), items[0].shape[0], T), ZERO_TOKEN, dtype=torch.long)
    for i, x in enumerate(items):
        out[i, :, : x.shape[-1]] = x
    return out
