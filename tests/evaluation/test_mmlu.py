"""Spoken MMLU: layout from metadata, the gold continuation found, continuation frames scored where they are."""

from __future__ import annotations

import pytest
import torch

from finetune.args import EvalArgs
from finetune.evaluation.layout import EvalSetError, read_mmlu_set
from finetune.evaluation.mmlu import score_mmlu
from finetune.evaluation.results import breakdown, totals
from finetune.evaluation.scoring import score_spec

from .conftest import CopyLM, OracleLM, write_set

CPU = torch.device("cpu")
CHOICE_CODES = (10, 11, 12, 13)


def mmlu_set(root, golds=(2, 0, 3, 1, 1, 2), subjects=(0, 1, 0, 1, 1, 0), shots=2, subject_of_shots=None):
    """Choices A-D (constant codes), prefix, unused item 5, `shots` per subject, then the questions.

    Each question ends on the code of its gold choice, so a model that expects a frame to repeat the previous
    one finds the gold continuation most likely.
    """
    items = {n: [c] * 6 for n, c in enumerate(CHOICE_CODES)}
    items[4], items[5] = [1, 2, 1], [1]
    extra = []
    shot_subjects = subject_of_shots or [s for s in sorted(set(subjects)) for _ in range(shots)]
    n = 6
    for s in shot_subjects:
        items[n] = [3, 4, 5]
        extra.append({"file_index": n, "number": n % 4, "subject_index": s})
        n += 1
    for gold, s in zip(golds, subjects):
        items[n] = [6, 7, 8, CHOICE_CODES[gold]]
        extra.append({"file_index": n, "number": gold, "subject_index": s})
        n += 1
    return write_set(root, items, extra)


def score(model, path, coder, **settings):
    settings = EvalArgs(mmlu_choice_frames=4, mmlu_shots=2, **settings)
    mmlu = read_mmlu_set(path, settings.mmlu_shots)
    spec = score_spec(model, settings, 1.0)
    return score_mmlu(model, mmlu, coder, spec, settings, CPU, max_frames=coder.max_frames)


def test_the_gold_continuation_made_most_likely_scores_every_question(tmp_path, coder):
    records = score(CopyLM(), mmlu_set(tmp_path / "mmlu"), coder)
    assert [r["item_id"] for r in records] == [str(n) for n in range(10, 16)]
    t = totals(records)
    for p in ("fork", "standard", "standard_mean"):
        assert t[p]["accuracy"] == 1.0 and t[p]["n"] == 6, p
    assert [r["standard"]["predicted"] for r in records] == [2, 0, 3, 1, 1, 2]
    b = breakdown(records)["subject"]
    assert b["0"]["fork"]["n"] == 3 and b["1"]["fork"]["n"] == 3
    # context = prefix (3) + 2 shots x (3 + 4-frame gold clip) + question (4)
    assert records[0]["context_frames"] == 3 + 2 * 7 + 4


def test_continuation_is_scored_on_its_own_frames(tmp_path, coder):
    """With logits at frame t peaked on frame t's code, every continuation has log-likelihood ~0.

    Reading the logits one frame early (the fork's off-by-one) scores each target with the previous frame's
    distribution: the first continuation frame then gets ~-1e4 against the question's last code.
    """
    records = score(OracleLM(), mmlu_set(tmp_path / "mmlu"), coder)
    for r in records:
        for letter, s in r["standard"]["scores"].items():
            assert s == pytest.approx(0.0, abs=1e-3), (r["item_id"], letter)
        assert r["standard"]["correct"] == pytest.approx(0.25)  # a four-way tie: a quarter of the credit


def test_long_contexts_are_refused_or_windowed(tmp_path, coder):
    path = mmlu_set(tmp_path / "mmlu")
    coder.max_frames = 20  # context 21 + 4 choice frames does not fit
    refused = score(CopyLM(), path, coder)
    assert all("exceeds the model's attention context of 20 frames" in r["error"] for r in refused)
    windowed = score(CopyLM(), path, coder, mmlu_long_context="window")
    assert all(r["windowed"] and r["context_frames"] == 16 and r["error"] is None for r in windowed)
    assert totals(windowed)["standard"]["accuracy"] == 1.0  # the question's end is kept


def test_layout_counts_come_from_the_metadata(tmp_path):
    path = mmlu_set(tmp_path / "mmlu", subject_of_shots=[0, 0, 0, 1])
    with pytest.raises(EvalSetError, match=r"extra.txt: subject 0 has 3 shot\(s\) in items 6..9, expected 2"):
        read_mmlu_set(path, 2)
    path = mmlu_set(tmp_path / "ok")
    with pytest.raises(EvalSetError, match=r"subject 0 has 2 shot\(s\) in items 6..7, expected 1"):
        read_mmlu_set(path, 1)


def test_reading_the_logits_one_frame_early_is_caught():
    """The fork's alignment (logits of frame P-1+j for continuation frame j) misses an oracle's every frame."""
    from finetune.evaluation.mmlu import continuation_log_likelihoods
    from finetune.evaluation.scoring import forward_logits, stream_log_likelihoods, token_log_likelihoods

    codes = torch.tensor([[[3, 3, 3, 3, 3, 3], [1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1], [0] * 6, [0] * 6]])
    logits = forward_logits(OracleLM(), codes, True)
    audio_ll, text_ll, _ = stream_log_likelihoods(logits, codes)
    P, C = 3, 3
    audio, text = continuation_log_likelihoods(audio_ll, text_ll, P, C)
    assert audio.abs().max() < 1e-3 and text.abs().max() < 1e-3
    early = token_log_likelihoods(logits.audio.roll(1, dims=2), codes[:, 1:3], logits.audio_mask)  # t read at t-1
    shifted, _ = continuation_log_likelihoods(early, text_ll, P, C)
    assert (shifted < -1e3).all()


def test_choice_scores_equal_an_independent_computation_on_the_small_lm(tmp_path, coder):
    """Each choice's `fork` and `standard` score from ``model(context + choice)`` logits, summed by hand."""
    import torch.nn.functional as F

    from tests.helpers.models import filled_small_lm

    model = filled_small_lm(context=64)
    path = mmlu_set(tmp_path / "mmlu", golds=(2, 0), subjects=(0, 1))
    records = score(model, path, coder, mmlu_text_weight=0.7, mmlu_audio_weight=0.3)
    mmlu = read_mmlu_set(path, 2)
    items = mmlu.files.items

    def codes(n, frames=None):
        c = coder.codes([items[n]], "transcript")[0]
        return c if frames is None else c[:, :frames]

    for rec, q in zip(records, mmlu.questions):
        parts = [codes(4)] + [x for n in mmlu.shots[q.subject] for x in (codes(n), codes(mmlu.files.extra[n].number, 4))]
        context = torch.cat(parts + [codes(q.index)], dim=-1)
        P = context.shape[-1]
        for c, letter in enumerate("ABCD"):
            x = torch.cat([context, codes(c, 4)], dim=-1)[None]
            out = model(x)
            text = audio_sum = 0.0
            per_codebook = []
            for t in range(P, P + 4):
                if out.text_mask[0, 0, t]:
                    text -= F.cross_entropy(out.text_logits[0, 0, t][None], x[0, 0, t][None]).item()
            for k in range(model.dep_q):
                s = 0.0
                for t in range(P, P + 4):
                    if out.mask[0, k, t]:
                        s -= F.cross_entropy(out.logits[0, k, t][None], x[0, 1 + k, t][None]).item()
                per_codebook.append(s)
                audio_sum += s
            # float32 log-softmax of 32..100 logits, 4 frames: rounding well below 1e-4
            assert rec["fork"]["scores"][letter] == pytest.approx(0.7 * text + 0.3 * audio_sum / model.dep_q, abs=1e-4)
            assert rec["standard"]["scores"][letter] == pytest.approx(text + audio_sum, abs=1e-4)
