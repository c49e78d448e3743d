"""Per-frame losses: their weighted sums are the training loss, masked positions are empty, frame kinds."""

from __future__ import annotations

import pytest
import torch

from finetune.analysis.frame_loss import (
    NONE,
    PAD,
    SPEECH,
    TRANSITION,
    category_means,
    frame_losses,
    text_categories,
)
from finetune.loss import MoshiLoss
from tests.helpers.models import filled_small_lm, fixture_codes, small_lora_lm

PAD_ID, EPAD_ID = 3, 0  # the small config's PAD, and LMModel's default EPAD


def _codes() -> torch.Tensor:
    codes = fixture_codes(batch=2, steps=12)
    codes[0, 0, :] = torch.tensor([PAD_ID, PAD_ID, EPAD_ID, 17, 18, PAD_ID, 19, PAD_ID, EPAD_ID, 20, 21, 22])
    codes[1, 0, 4:7] = PAD_ID
    codes[1, 0, 9] = -1  # a zero token: no text target there
    codes[0, 2, 5] = -1  # and no audio target for codebook 1 of sample 0 at frame 5
    return codes


@pytest.mark.parametrize("make", [filled_small_lm, small_lora_lm])
def test_weighted_frame_losses_sum_to_the_training_loss_terms(make):
    model = make().eval()
    loss = MoshiLoss.for_model(model, first_codebook_weight_multiplier=3.0, text_padding_weight=0.25)
    codes = _codes()
    losses = frame_losses(model, codes, loss, chunk_rows=5)  # several chunks, the last one partial
    with torch.no_grad():
        terms = loss(model, codes)
    ts, tw, aus, aw = losses.weighted_sums()
    # The fused chunked CE and F.cross_entropy on the head's logits agree to float32 rounding over ~24 rows.
    torch.testing.assert_close(ts.float(), terms.text_sum, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(aus.float(), terms.audio_sum, rtol=1e-5, atol=1e-5)
    assert float(tw) == pytest.approx(float(terms.text_weight)) and float(aw) == pytest.approx(float(terms.audio_weight))


def test_masked_positions_are_empty_and_the_others_finite():
    model = filled_small_lm()
    codes = _codes()
    losses = frame_losses(model, codes, MoshiLoss.for_model(model, 1.0, 0.5))
    b, t = codes.shape[0], codes.shape[-1]
    assert losses.text_ce.shape == (b, t) and losses.audio_ce.shape == (b, model.dep_q, t)
    text_valid = losses.category != NONE
    assert torch.isfinite(losses.text_ce[text_valid]).all() and torch.isnan(losses.text_ce[~text_valid]).all()
    assert not text_valid[1, 9]  # the -1 text token
    audio_valid = losses.audio_weight > 0
    assert torch.isfinite(losses.audio_ce[audio_valid]).all() and torch.isnan(losses.audio_ce[~audio_valid]).all()
    assert not audio_valid[0, 1, 5]
    # Codebook 1 has delay 1 in the small config: its last frame has no target.
    assert not audio_valid[:, 1, -1].any() and audio_valid[:, 0, -1].all()
    means = category_means(losses)
    assert sum(m["frames"] for m in means.values()) == int(text_valid.sum())
    rows = losses.rows(["a.wav", "b.wav"], [0.0, 2.0], frame_rate=12.5)
    assert len(rows) == b * t
    row = next(r for r in rows if r["file"] == "b.wav" and r["frame"] == 9)
    assert row["time_s"] == 2.72 and row["text_ce"] is None and row["kind"] == "" and row["text_weight"] == 0.0
    assert next(r for r in rows if r["file"] == "a.wav" and r["frame"] == 5)["audio_ce_1"] is None
    # Sample 0's text: PAD PAD EPAD 17 18 PAD 19 ...: transitions at frames 3 and 6 after 3 and 1 padding frames.
    assert [(r["frame"], r["padding_before"]) for r in rows if r["file"] == "a.wav" and r["kind"] == "transition"
            ][:2] == [(3, 3), (6, 1)]


def test_frame_kinds():
    targets = torch.tensor([[PAD_ID, PAD_ID, EPAD_ID, 17, 18, PAD_ID, 19, -1],
                            [17, 18, PAD_ID, 19, 20, EPAD_ID, EPAD_ID, 21]])
    valid = targets != -1
    got = text_categories(targets, valid, (PAD_ID, EPAD_ID))
    want = torch.tensor([[PAD, PAD, PAD, TRANSITION, SPEECH, PAD, TRANSITION, NONE],
                         [SPEECH, SPEECH, PAD, TRANSITION, SPEECH, PAD, PAD, TRANSITION]], dtype=torch.int8)
    assert torch.equal(got, want)
