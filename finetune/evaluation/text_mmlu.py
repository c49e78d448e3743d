"""Text-only MMLU of a DSAA model's LLM branch, on the spoken MMLU set's own text: a reference for the spoken score.

Each item's text is `data_text/N.txt` when the set has it, else the transcript of `data_stereo/N.json`. The
prompt is the prefix, the subject's shots each followed by ``Answer: <gold letter>``, then the question and
``Answer:``; the prediction is the letter whose tokens (" A".." D") the LLM finds most likely after it. A prompt longer than the LLM's positions is refused, or cut to its end with `mmlu_long_context: window`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from finetune.args import EvalArgs
from finetune.data.alignments import alignment_path_for, load_alignments
from finetune.evaluation.layout import CHOICE_LETTERS, MmluSet
from finetune.evaluation.results import choice_correct

LLM = "llm"


def item_text(mmlu: MmluSet, n: int) -> str:
    entry = mmlu.files.items[n]
    text_file = mmlu.files.root / "data_text" / f"{entry.path.stem}.txt"
    if text_file.is_file():
        return text_file.read_text(encoding="utf-8").strip()
    return " ".join(w.text for w in load_alignments(alignment_path_for(entry.path))).strip()


def letter_tokens(tokenizer: Any) -> list[list[int]]:
    """The tokens of " A".." D" (the form an answer takes after "Answer:"); four distinct non-empty sequences."""
    ids = [list(tokenizer.encode(f" {letter}", add_special_tokens=False)) for letter in CHOICE_LETTERS]
    if any(not x for x in ids) or len({tuple(x) for x in ids}) != len(ids):
        raise ValueError(f"the tokenizer does not give four distinct token sequences for ' A'..' D': {ids}")
    return ids


def answer_log_likelihoods(llm: nn.Module, prompt: list[int], answers: list[list[int]], device: torch.device
                           ) -> list[float]:
    """Summed log-probabilities of each answer's tokens after ``prompt``: one forward of the four sequences.

    Shorter sequences are padded at the end, which a causal LLM never looks at from earlier positions.
    """
    T = len(prompt) + max(len(a) for a in answers)
    batch = torch.tensor([(prompt + a + [a[-1]] * T)[:T] for a in answers], device=device)
    logp = torch.log_softmax(llm.lm_logits(llm(ids=batch)).float(), dim=-1)
    P = len(prompt)
    return [float(sum(logp[i, P + j - 1, t] for j, t in enumerate(a))) for i, a in enumerate(answers)]


@torch.no_grad()
def score_text_mmlu(llm: nn.Module, tokenizer: Any, mmlu: MmluSet, settings: EvalArgs, device: torch.device,
                    progress: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
    """Records (protocol `llm`) of the first `mmlu_max_questions` questions; ``llm`` is the DSAA `text_llm`."""
    answers = letter_tokens(tokenizer)
    prefix = item_text(mmlu, mmlu.prefix)
    shots = {s: "".join(f"{item_text(mmlu, n)}\nAnswer: {CHOICE_LETTERS[mmlu.files.extra[n].number]}\n\n"
                        for n in items) for s, items in mmlu.shots.items()}
    limit = getattr(llm, "max_positions", None)
    records = []
    for q in mmlu.questions[: settings.mmlu_max_questions]:
        prompt = f"{prefix}\n\n{shots[q.subject]}{item_text(mmlu, q.index)}\nAnswer:"
        ids = tokenizer.encode(prompt, add_special_tokens=False)
        rec: dict[str, Any] = {"item_id": str(q.index), "subject_index": q.subject, "gold": q.gold,
                               "groups": {"subject": str(q.subject)}, "prompt_tokens": len(ids), "error": None}
        longest = max(len(a) for a in answers)
        if limit is not None and len(ids) + longest > limit:
            if settings.mmlu_long_context == "refuse":
                rec["error"] = f"prompt of question {q.index} has {len(ids)} tokens, more than the LLM's {limit}"
                records.append(rec)
                if progress:
                    progress(1)
                continue
            ids = ids[len(ids) + longest - limit :]
        scores = answer_log_likelihoods(llm, ids, answers, device)
        credit, predicted = choice_correct(scores, q.gold)
        rec[LLM] = {"correct": credit, "predicted": predicted, "scores": dict(zip(CHOICE_LETTERS, scores))}
        records.append(rec)
        if progress:
            progress(1)
    return records
