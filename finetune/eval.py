"""Evaluation: one finite pass over a freshly built eval iterator, token-weighted over ranks.

The iterator is rebuilt for every evaluation so each sees the same data; losses are weighted means over
all ranks' tokens; perplexity is `exp` of the natural-log CE; text and audio losses are reported. Every rank runs the same number of batches (a rank that runs out stops all of them), because
under FSDP every forward is a collective.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import torch
from torch import nn

from finetune.args import TrainArgs
from finetune.distributed import all_reduce_sum, any_rank
from finetune.loss import LossTerms


def eval_loss_args(args: TrainArgs) -> TrainArgs | None:
    """The config whose `data.eval_data` is the eval-loss set: `data.eval_data`, else `data.eval_loss_data` when
    `do_eval_loss` is on (the DSAA name of the same set); None when there is no eval loss to compute."""
    if not args.do_eval:
        return None
    if args.data.eval_data.strip():
        return args
    if args.do_eval_loss and args.data.eval_loss_data.strip():
        return replace(args, data=replace(args.data, eval_data=args.data.eval_loss_data))
    return None


@dataclass
class EvalResult:
    text_loss: float
    audio_loss: float
    loss: float  # text_loss + audio_loss, as the training loss
    perplexity: float  # exp(loss)
    text_perplexity: float
    audio_perplexity: float
    batches: int  # over all ranks

    def as_metrics(self, train_loss: float | None = None) -> dict[str, float]:
        m = {
            "eval_loss": self.loss, "text_eval_loss": self.text_loss, "audio_eval_loss": self.audio_loss,
            "perplexity": self.perplexity, "text_perplexity": self.text_perplexity,
            "audio_perplexity": self.audio_perplexity, "eval_batches": self.batches,
        }
        if train_loss is not None:
            m["train_loss"] = train_loss
        return m


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else float("inf")


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    loss_fn: Callable[[nn.Module, torch.Tensor], LossTerms],
    device: torch.device,
    max_batches_per_rank: int | None = None,
) -> EvalResult:
    """Runs `loss_fn` on every batch (codes ``[B, K, T]``) and reduces the terms over ranks.

    Args:
        model (nn.Module): put in eval mode for the pass, restored to its previous mode after.
        batches (Iterable[Tensor]): a finite iterable of code batches (build a new one per call).
        loss_fn: ``(model, codes) -> LossTerms`` (the training loss function).
        device (torch.device): where batches go.
        max_batches_per_rank (int | None): cap per rank (None: the whole iterable).
    """
    was_training = model.training
    model.eval()
    acc = torch.zeros(5, dtype=torch.float32, device=device)  # 4 loss terms + batch count
    it = iter(batches)
    n = 0
    try:
        while max_batches_per_rank is None or n < max_batches_per_rank:
            codes = next(it, None)
            if any_rank(codes is None):
                break
            terms = loss_fn(model, codes.to(device, non_blocking=True))
            acc[:4] += terms.detach().as_vector().to(device)
            acc[4] += 1
            n += 1
    finally:
        model.train(was_training)
    all_reduce_sum(acc)
    terms = LossTerms.from_vector(acc[:4])
    text, audio = float(terms.text_loss), float(terms.audio_loss)
    return EvalResult(
        text_loss=text, audio_loss=audio, loss=text + audio, perplexity=_exp(text + audio),
        text_perplexity=_exp(text), audio_perplexity=_exp(audio), batches=int(acc[4].item()),
    )
