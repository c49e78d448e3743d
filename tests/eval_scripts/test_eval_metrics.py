"""finetune.eval_metrics: every number equals an independent computation from the model(codes) logits."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.models import filled_small_lm

from finetune.eval_metrics import evaluate_metrics
from finetune.loss import MoshiLoss

PAD, EPAD = 3, 0  # the small LM's text PAD and Moshi's end-of-padding id


def random_codes(seed: int, batch: int = 2, steps: int = 9) -> torch.Tensor:
    """Codes ``[B, 5, T]``: text row with about half PAD/EPAD, random audio, a few -1 (zero token) entries."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 32, (batch, 5, steps), generator=g)
    text = torch.randint(4, 100, (batch, steps), generator=g)
    pads = torch.rand(batch, steps, generator=g)
    text[pads < 0.4] = PAD
    text[(pads >= 0.4) & (pads < 0.5)] = EPAD
    codes[:, 0] = text
    codes[0, 2, 4] = -1
    codes[-1, 0, 2] = -1
    return codes


def reference(model: torch.nn.Module, batches: list[torch.Tensor], alpha: float, beta: float) -> dict:
    """The metrics written out position by position in float64 from ``model(codes)``."""
    dep_q = model.dep_q
    ce_k = [[] for _ in range(dep_q)]
    hit_k = [[] for _ in range(dep_q)]
    text = {"all": [], "no_pad": []}
    num_t = den_t = num_a = den_a = 0.0
    with torch.no_grad():
        for codes in batches:
            out = model(codes)
            for b in range(codes.shape[0]):
                for t in range(codes.shape[-1]):
                    if out.text_mask[b, 0, t]:
                        z = out.text_logits[b, 0, t].double()
                        y = int(codes[b, 0, t])
                        ce = float(torch.logsumexp(z, 0) - z[y])
                        hit = float(int(z.argmax()) == y)
                        text["all"].append((ce, hit))
                        w = alpha if y in (PAD, EPAD) else 1.0
                        if y not in (PAD, EPAD):
                            text["no_pad"].append((ce, hit))
                        num_t += w * ce
                        den_t += w
                    for k in range(dep_q):
                        if out.mask[b, k, t]:
                            z = out.logits[b, k, t].double()
                            y = int(codes[b, 1 + k, t])
                            ce = float(torch.logsumexp(z, 0) - z[y])
                            ce_k[k].append(ce)
                            hit_k[k].append(float(int(z.argmax()) == y))
                            w = beta if k == 0 else 1.0
                            num_a += w * ce
                            den_a += w

    def mean(xs: list[float]) -> float:
        return sum(xs) / len(xs)

    return {
        "text_loss": num_t / den_t, "audio_loss": num_a / den_a,
        "text_ce": mean([c for c, _ in text["all"]]), "text_accuracy": mean([h for _, h in text["all"]]),
        "text_ce_no_pad": mean([c for c, _ in text["no_pad"]]),
        "text_accuracy_no_pad": mean([h for _, h in text["no_pad"]]),
        "text_positions": len(text["all"]), "text_positions_no_pad": len(text["no_pad"]),
        "ce": [mean(c) for c in ce_k], "accuracy": [mean(h) for h in hit_k], "positions": [len(c) for c in ce_k],
    }


@pytest.mark.parametrize("alpha,beta", [(0.5, 1.0), (0.1, 100.0)])
def test_metrics_equal_the_per_position_definition(alpha: float, beta: float) -> None:
    model = filled_small_lm()
    batches = [random_codes(1), random_codes(2, batch=1, steps=7)]
    loss = MoshiLoss.for_model(model, beta, alpha)
    m = evaluate_metrics(model, batches, loss, torch.device("cpu"), progress=False)
    ref = reference(model, batches, alpha, beta)
    # float32 logits and CE against a float64 loop over ~40 positions: agreement to ~1e-6 relative.
    tol = {"rtol": 1e-5, "atol": 1e-6}
    for key in ("text_loss", "audio_loss", "text_ce", "text_ce_no_pad", "text_accuracy", "text_accuracy_no_pad"):
        torch.testing.assert_close(m[key], ref[key], **tol, msg=key)
    assert (m["text_positions"], m["text_positions_no_pad"]) == (ref["text_positions"], ref["text_positions_no_pad"])
    assert 0 < m["text_positions_no_pad"] < m["text_positions"]
    torch.testing.assert_close(m["eval_loss"], ref["text_loss"] + ref["audio_loss"], **tol)
    assert m["perplexity"] == pytest.approx(math.exp(m["eval_loss"]))
    assert [c["codebook"] for c in m["codebooks"]] == [0, 1]
    torch.testing.assert_close([c["ce"] for c in m["codebooks"]], ref["ce"], **tol)
    assert [c["accuracy"] for c in m["codebooks"]] == pytest.approx(ref["accuracy"])
    assert [c["positions"] for c in m["codebooks"]] == ref["positions"]
    assert m["batches"] == 2

    # The eval loss is the training loss: MoshiLoss on the fused forward_train path gives the same value.
    with torch.no_grad():
        terms = sum((loss(model, codes) for codes in batches[1:]), loss(model, batches[0]))
    torch.testing.assert_close(m["eval_loss"], float(terms.total()), **tol)


def test_no_batches_is_an_error() -> None:
    model = filled_small_lm()
    with pytest.raises(ValueError, match="no eval batch"):
        evaluate_metrics(model, [], MoshiLoss.for_model(model, 1.0, 0.5), torch.device("cpu"), progress=False)
