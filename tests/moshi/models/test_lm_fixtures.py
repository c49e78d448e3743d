"""Numeric fixtures: numbers computed with Kyutai's package on the same deterministic weights."""

import pytest
import torch

from moshi.models.lm_gen import LMGen
from tests.helpers.fill import fill_value, hash_uniform
from tests.helpers.models import filled_small_lm, fixture_codes, fixture_user_codes

ATOL = 1e-4


def test_fill_self_checks():
    expected_u = [-1.0, -0.6160550531931221, -0.19801108911633492, 0.7477667653001845, 0.6039778222329915]
    assert hash_uniform(0, 5).tolist() == expected_u
    expected = torch.tensor([[-0.704645, 0.175840, -0.335194], [0.099428, -0.652087, 0.379138]])
    torch.testing.assert_close(fill_value("emb.0.weight", (2, 3)), expected, atol=1e-6, rtol=0)


def test_fill_rules_by_key_and_shape():
    u = torch.from_numpy(hash_uniform(sum(b"x.alpha"), 4)).float()
    torch.testing.assert_close(fill_value("x.alpha", (1, 1, 4)).flatten(), 1 + 0.1 * u)
    assert torch.equal(fill_value("q._initialized", (1,)), torch.ones(1))
    u = torch.from_numpy(hash_uniform(sum(b"c.bias"), 3)).float()
    torch.testing.assert_close(fill_value("c.bias", (3,)), 0.1 * u)


@pytest.fixture(scope="module")
def outputs():
    with torch.no_grad():
        return filled_small_lm()(fixture_codes())


def test_fixture_codes_match_the_reference():
    assert fixture_codes()[0].tolist() == [
        [0, 13, 26, 39, 52, 65], [3, 8, 13, 18, 23, 28], [6, 11, 16, 21, 26, 31], [9, 14, 19, 24, 29, 2],
        [12, 17, 22, 27, 0, 5],
    ]


def test_teacher_forcing_shapes_and_masks(outputs):
    assert outputs.text_logits.shape == (2, 1, 6, 100) and outputs.logits.shape == (2, 2, 6, 32)
    assert outputs.mask.tolist() == [[[True] * 6, [True] * 5 + [False]]] * 2
    assert outputs.text_mask.all() and outputs.text_mask.shape == (2, 1, 6)
    assert torch.isnan(outputs.logits[:, 1, 5]).all() and not torch.isnan(outputs.logits[:, 1, :5]).any()
    assert not torch.isnan(outputs.logits[:, 0]).any()


def test_teacher_forcing_logits(outputs):
    expected_text = torch.tensor([
        [-2.003080, -0.700445, 0.740035, -0.961858],
        [-1.451935, 0.227296, 1.954648, -1.326120],
        [0.195631, -0.359692, 0.277979, -1.420086],
        [-1.022509, -0.387377, 1.578055, -0.249421],
        [-1.281873, 0.455485, 0.675618, 0.112498],
        [-1.687739, -0.053893, -0.939671, 0.421834],
    ])
    torch.testing.assert_close(outputs.text_logits[0, 0, :, :4], expected_text, atol=ATOL, rtol=0)
    expected_audio = torch.tensor([[-1.211261, -1.053157, 1.310002, 0.116097], [-1.245637, 0.025405, -2.543726, 0.024475]])
    torch.testing.assert_close(outputs.logits[1, :, 0, :4], expected_audio, atol=ATOL, rtol=0)


def test_teacher_forcing_sums(outputs):
    text = outputs.text_logits.double()
    audio = torch.where(outputs.mask.unsqueeze(-1), outputs.logits, 0).double()
    assert text.sum().item() == pytest.approx(-136.755387, abs=1e-3)
    assert text.abs().sum().item() == pytest.approx(964.678607, abs=1e-3)
    assert audio.sum().item() == pytest.approx(6.366799, abs=1e-3)
    assert audio.abs().sum().item() == pytest.approx(998.820697, abs=1e-3)


def test_teacher_forcing_argmaxes(outputs):
    assert outputs.text_logits.argmax(-1)[:, 0].tolist() == [[88, 88, 90, 88, 65, 65], [88, 88, 88, 85, 77, 33]]
    audio = outputs.logits.argmax(-1)
    assert audio[0, 0].tolist() == [11, 11, 17, 6, 0, 26] and audio[0, 1, :5].tolist() == [27, 27, 27, 14, 20]
    assert audio[1, 0].tolist() == [11, 13, 13, 13, 21, 6] and audio[1, 1, :5].tolist() == [27, 27, 24, 25, 12]


def test_zero_tokens_are_masked():
    codes = fixture_codes()
    codes[:, 2, 2] = -1
    codes[0, 0, 4] = -1
    with torch.no_grad():
        out = filled_small_lm()(codes)
    assert out.mask[:, 1].tolist() == [[True, True, False, True, True, False]] * 2
    assert out.text_mask[0, 0].tolist() == [True, True, True, True, False, True]
    assert out.text_mask[1].all()


GREEDY = {
    1: ([88, 11, 11], [88, 11, 3]),
    2: ([77, 13, 11], [88, 27, 11]),
    3: ([46, 30, 12], [75, 10, 25]),
    4: ([14, 13, 11], [88, 6, 9]),
    5: ([46, 24, 3], [27, 24, 18]),
    6: ([77, 24, 23], [20, 8, 9]),
    7: ([14, 21, 3], [31, 30, 26]),
}


def _greedy_outputs():
    lm_gen = LMGen(filled_small_lm(), use_sampling=False)
    outs = []
    with lm_gen.streaming(2):
        for step in range(8):
            outs.append(lm_gen.step(fixture_user_codes(step)))
    return outs


def test_greedy_generation_matches_reference():
    outs = _greedy_outputs()
    assert outs[0] is None
    for step, (b0, b1) in GREEDY.items():
        assert outs[step].shape == (2, 3, 1)
        assert outs[step][:, :, 0].tolist() == [b0, b1], f"step {step}"


def test_teacher_forcing_reproduces_greedy_generation():
    outs = _greedy_outputs()
    frames = []
    for j in range(7):
        frames.append(torch.cat([outs[j + 1], fixture_user_codes(j + 1)], dim=1))
    codes = torch.cat(frames, dim=2)  # [2, 5, 7]
    with torch.no_grad():
        out = filled_small_lm()(codes)
    assert torch.equal(out.text_logits.argmax(-1)[:, 0], codes[:, 0])
    audio = out.logits.argmax(-1)
    assert torch.equal(audio[out.mask], codes[:, 1:3][out.mask])
