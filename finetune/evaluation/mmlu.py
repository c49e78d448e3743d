"""Spoken MMLU: each question's four continuations scored after a five-shot spoken context.

Context = the instruction prefix, then each shot of the question's subject followed by its gold choice clip,
then the question (all rows: audio and the text row). Each continuation is the first `mmlu_choice_frames`
frames of a choice clip; the four sequences (context + choice) form one batch, one forward. The logits at
frame t score the codes of frame t, so the continuation is scored on frames P..P+C-1 of the sequence
(P context frames, C continuation frames), with the model's masks.

Scores per choice (higher is better):
* `fork`: ``text_weight * text_ll + audio_weight * mean_k(audio_ll_k)`` (0.9 / 0.1 by default), with
  ``text_ll`` the summed text log-likelihood and ``audio_ll_k`` the summed log-likelihood of codebook k of
  the item's channel;
* `standard`: the summed log-likelihood over the text row and the chosen codebooks; `standard_mean` the
  same per continuation frame.

A context longer than the model's attention context minus C is refused (the question is reported with its
error) or, with `mmlu_long_context: window`, cut to its most recent frames.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from finetune.args import EvalArgs
from finetune.evaluation.items import ItemCoder, ItemError
from finetune.evaluation.layout import CHOICE_LETTERS, MmluQuestion, MmluSet, relative_name
from finetune.evaluation.results import choice_correct
from finetune.evaluation.scoring import (
    FORK,
    STANDARD,
    STANDARD_MEAN,
    ScoreSpec,
    forward_logits,
    token_log_likelihoods,
)


class MmluSetError(ValueError):
    """A part every question needs (a choice clip, the prefix, a shot) cannot be read."""


def continuation_log_likelihoods(
    audio_ll: torch.Tensor, text_ll: torch.Tensor, start: int, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-likelihoods of frames ``start .. start + length - 1``: per codebook ``[B, dep_q]`` and text ``[B]``."""
    return audio_ll[:, :, start : start + length].sum(-1), text_ll[:, start : start + length].sum(-1)


def choice_scores(audio_sums: torch.Tensor, text_sums: torch.Tensor, spec: ScoreSpec, settings: EvalArgs,
                  frames: int) -> dict[str, list[float]]:
    """Each protocol's score of each continuation (``audio_sums [C, dep_q]``, ``text_sums [C]``)."""
    audio_sums, text_sums = audio_sums.double().cpu(), text_sums.double().cpu()
    fork = (settings.mmlu_text_weight * text_sums
            + settings.mmlu_audio_weight * audio_sums[:, list(spec.fork_codebooks)].mean(1))
    standard = text_sums + audio_sums[:, list(spec.standard_codebooks)].sum(1)
    return {FORK: fork.tolist(), STANDARD: standard.tolist(), STANDARD_MEAN: (standard / frames).tolist()}


class MmluContexts:
    """The codes every question shares: choice clips, prefix, each subject's shots with their gold clips."""

    def __init__(self, mmlu: MmluSet, coder: ItemCoder, settings: EvalArgs) -> None:
        self.mmlu, self.coder, self.settings = mmlu, coder, settings
        files = mmlu.files
        fixed = [*mmlu.choices, mmlu.prefix]
        codes = coder.codes([files.items[n] for n in fixed], settings.mmlu_text_row)
        for n, c in zip(fixed, codes):
            if isinstance(c, ItemError):
                raise MmluSetError(f"spoken MMLU cannot be scored without item {n}: {c}")
        C = settings.mmlu_choice_frames
        self.clips: list[torch.Tensor] = [c[:, :C] for c in codes[: len(mmlu.choices)]]  # type: ignore[index]
        for letter, clip in zip(CHOICE_LETTERS, self.clips):
            if clip.shape[-1] < C:
                raise MmluSetError(f"choice clip {letter} ({files.items[CHOICE_LETTERS.index(letter)].path}) has "
                                   f"{clip.shape[-1]} frames, fewer than evaluation.mmlu_choice_frames = {C}")
        self.prefix: torch.Tensor = codes[-1]  # type: ignore[assignment]
        self._shots: dict[int, torch.Tensor] = {}

    def shots(self, subject: int) -> torch.Tensor:
        got = self._shots.get(subject)
        if got is None:
            files = self.mmlu.files
            items = self.mmlu.shots[subject]
            codes = self.coder.codes([files.items[n] for n in items], self.settings.mmlu_text_row)
            parts = []
            for n, c in zip(items, codes):
                if isinstance(c, ItemError):
                    raise MmluSetError(f"subject {subject}: shot {n} cannot be read: {c}")
                parts += [c, self.clips[files.extra[n].number]]
            got = torch.cat(parts, dim=-1)
            self._shots[subject] = got
        return got


@torch.no_grad()
def score_mmlu(
    model: nn.Module,
    mmlu: MmluSet,
    coder: ItemCoder,
    spec: ScoreSpec,
    settings: EvalArgs,
    device: torch.device,
    questions: Sequence[MmluQuestion] | None = None,
    max_frames: int | None = None,
    num_forwards: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """Records (see `docs/evaluation.md`) of ``questions`` (default: all), one forward of four sequences each."""
    questions = list(mmlu.questions if questions is None else questions)
    contexts = MmluContexts(mmlu, coder, settings)
    C = settings.mmlu_choice_frames
    files = mmlu.files
    was_training = model.training
    model.eval()
    records: list[dict[str, Any]] = []
    forwards = 0
    try:
        for q in questions:
            e = files.items[q.index]
            rec: dict[str, Any] = {"item_id": str(q.index), "file": relative_name(e.path, files.root),
                                   "subject_index": q.subject, "gold": q.gold,
                                   "groups": {"subject": str(q.subject)}}
            (question,) = coder.codes([e], settings.mmlu_text_row)
            error = None
            if isinstance(question, ItemError):
                error = str(question)
            else:
                context = torch.cat([contexts.prefix, contexts.shots(q.subject), question], dim=-1)
                rec["windowed"] = False
                if max_frames is not None and context.shape[-1] + C > max_frames:
                    if settings.mmlu_long_context == "refuse":
                        error = (f"{e.path}: context of {context.shape[-1]} frames + {C} choice frames exceeds the "
                                 f"model's attention context of {max_frames} frames (evaluation.mmlu_long_context: "
                                 "window keeps the most recent frames)")
                    else:
                        context = context[:, context.shape[-1] + C - max_frames :]
                        rec["windowed"] = True
                rec["context_frames"] = int(context.shape[-1])
            if error is not None:
                rec["error"] = error
                records.append(rec)
                if progress:
                    progress(1)
                continue
            P = context.shape[-1]
            x = torch.stack([torch.cat([context, clip], dim=-1) for clip in contexts.clips]).to(device)
            logits = forward_logits(model, x, True, text_frames=slice(P, P + C))
            forwards += 1
            dep_q = logits.audio.shape[1]
            audio_ll = token_log_likelihoods(logits.audio, x[:, 1 : 1 + dep_q], logits.audio_mask)
            text_ll = torch.zeros(x.shape[0], x.shape[-1], device=x.device)
            text_ll[:, P : P + C] = token_log_likelihoods(logits.text[:, 0], x[:, 0, P : P + C],  # type: ignore[index]
                                                          logits.text_mask[:, 0])
            audio_sums, text_sums = continuation_log_likelihoods(audio_ll, text_ll, P, C)
            for p, scores in choice_scores(audio_sums, text_sums, spec, settings, C).items():
                credit, predicted = choice_correct(scores, q.gold)
                rec[p] = {"correct": credit, "predicted": predicted, "scores": dict(zip(CHOICE_LETTERS, scores))}
            rec["error"] = None
            records.append(rec)
            if progress:
                progress(1)
        if num_forwards is not None:  # keep the collective forwards of all ranks in step
            K = 1 + int(model.n_q)
            for _ in range(num_forwards - forwards):
                forward_logits(model, torch.full((1, K, 1), -1, dtype=torch.long, device=device), False)
    finally:
        model.train(was_training)
    return records
