"""Loss landscapes: the eval loss on a 1-D or 2-D grid of perturbations of the trained tensors, and along the
straight line between two checkpoints.

Only the tensors training changes move (``requires_grad`` after the model family marks them): the LoRA factors
of a LoRA run, the projectors, text head and depformer of a DSAA run, everything in full fine-tuning. A frozen
tensor never trained, so a direction through it says nothing about the trained solution.

A filter-normalised direction ``d`` starts as ``N(0, I)`` (drawn on the CPU from a seeded generator, so every
device and every rank gets the same one); in each tensor of two or more dimensions each slice along dim 0 (a
Linear's output row, an embedding's token row, a LoRA factor's row) is rescaled to the norm of the matching
weight slice, ``d_i ← d_i · ‖θ_i‖ / (‖d_i‖ + 1e-10)``; one-dimensional and scalar tensors (norm weights,
biases, DSAA's gate ``alpha``) get 0, or a copy of ``θ`` when asked. The grid then evaluates
``L(θ* + α d₁ (+ β d₂))``, and the line ``L((1 − α) θ_A + α θ_B)``.

The parameters are cloned once before a sweep and copied back afterwards (also on error), so the model ends
bit-identical to how it started. The batches are loaded once and reused at every grid point, and the loss is
:func:`finetune.eval.evaluate` (the training loss, token-weighted over torchrun ranks).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from finetune.analysis.weight_stats import find_checkpoint
from finetune.args import TrainArgs
from finetune.eval import EvalResult, evaluate
from finetune.loss import LossTerms
from finetune.model_family import ModelFamily, model_family

LossFn = Callable[[nn.Module, torch.Tensor], LossTerms]
State = dict[str, torch.Tensor]


# ----------------------------------------------------------------------------- the model and its checkpoints


def build_analysis_model(args: TrainArgs, device: torch.device, dtype: torch.dtype
                         ) -> tuple[nn.Module, ModelFamily]:
    """The base model of ``args`` as training builds it (LoRA layers unfused, the trained tensors marked
    ``requires_grad``), unsharded on ``device`` in ``dtype``, in eval mode; and its family.

    Every rank holds a full copy: a sweep only evaluates, so the work is split by batch, not by tensor.
    """
    family = model_family(args)
    model, _ = family.source(dtype)
    family.prepare(model, dtype)
    return model.to(device).eval(), family


def trainable_state(model: nn.Module) -> State:
    """Detached clones of the trained tensors, by name."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def checkpoint_state(model: nn.Module, checkpoint: str | Path) -> State:
    """The trained tensors of ``checkpoint`` (a run's ``checkpoint_N/``, its ``consolidated/`` or a weights
    file) in the dtype and on the device of ``model``'s.

    Raises:
        ValueError: the file lacks a trained tensor of the model or has one of another shape (a checkpoint of
            another configuration: LoRA rank, DSAA projector width, ``only_text``...).
    """
    path = find_checkpoint(checkpoint).weights
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    state = {}
    with safe_open(str(path), framework="pt") as f:  # only the trained tensors: a DSAA file may embed the LLM
        names = set(f.keys())
        missing = sorted(n for n in params if n not in names)
        if missing:
            raise ValueError(f"{path}: {len(missing)} trained tensor(s) of the config's model are not in the file, "
                             f"e.g. {', '.join(missing[:3])} (a checkpoint of another configuration?)")
        for name, p in params.items():
            t = f.get_tensor(name)
            if t.numel() != p.numel():  # a 0-dim scalar may be stored as a 1-element vector and back
                raise ValueError(f"{path}: {name} has shape {tuple(t.shape)}, the model's is {tuple(p.shape)}")
            state[name] = t.reshape(p.shape).to(device=p.device, dtype=p.dtype)
    return state


@torch.no_grad()
def load_state(model: nn.Module, state: State) -> None:
    """Copies ``state`` into the model's parameters of the same names."""
    params = dict(model.named_parameters())
    for name, value in state.items():
        params[name].copy_(value)


@contextmanager
def restored_parameters(model: nn.Module) -> Iterator[State]:
    """Yields clones of the trained tensors and copies them back on exit, whatever happened inside."""
    saved = trainable_state(model)
    try:
        yield saved
    finally:
        load_state(model, saved)


def eval_batches(args: TrainArgs, family: ModelFamily, model: nn.Module, device: torch.device, rank: int = 0,
                 world_size: int = 1) -> tuple[list[Any], list[Any]]:
    """This rank's eval batches of the config (``data.eval_data``, ``eval_duration_sec``, ``eval_batches``), all
    loaded at once: Mimi runs once per file (or reads the codes cache), never once per grid point.

    Returns the loader's ``Batch`` objects (codes on ``device``; ``source``/``chunk`` index each sample's source
    and chunk) and the sources (their ``entries`` and ``chunks`` name the file and offset).
    """
    from finetune.data.dataset import build_codes_store, build_eval_loader
    from moshi.models import loaders

    info = family.info
    codebooks = loaders.mimi_codebooks_for_lm({"n_q": model.n_q, "dep_q": model.dep_q})
    mimi = loaders.get_mimi(info.mimi_weights, mimi_config=info.mimi_config, device=device, num_codebooks=codebooks)
    mimi.eval()
    loader = build_eval_loader(args, family.text_tokenizer(model), build_codes_store(args, mimi, device=device),
                               rank, world_size)
    batches = [b.to(device) for b in tqdm(loader, desc="eval batches", disable=rank != 0)]
    return batches, loader.sources


# ----------------------------------------------------------------------------- directions


def filter_normalized_direction(state: State, generator: torch.Generator, one_d: str = "zero") -> State:
    """A random direction over ``state``'s tensors, each dim-0 slice scaled to its weight slice's norm.

    Args:
        state: the centre ``θ*`` (names → tensors).
        generator: a CPU generator; names are visited in sorted order, so a seed fixes the direction.
        one_d: ``"zero"`` (0 for tensors of fewer than 2 dimensions) or ``"copy"`` (θ itself there).
    """
    if one_d not in ("zero", "copy"):
        raise ValueError(f"one_d must be 'zero' or 'copy', got {one_d!r}")
    out = {}
    for name in sorted(state):
        theta = state[name]
        d = torch.randn(theta.shape, generator=generator, dtype=torch.float32)
        if theta.dim() < 2:
            out[name] = theta.clone() if one_d == "copy" else torch.zeros_like(theta)
            continue
        w = theta.detach().float().cpu().reshape(theta.shape[0], -1)
        flat = d.reshape(d.shape[0], -1)
        flat.mul_(w.norm(dim=1, keepdim=True) / (flat.norm(dim=1, keepdim=True) + 1e-10))
        out[name] = d.to(device=theta.device, dtype=theta.dtype)
    return out


# ----------------------------------------------------------------------------- sweeps


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    """Sums of perturbations are formed in float32 at least (float64 tensors stay float64)."""
    return torch.promote_types(t.dtype, torch.float32)


def _row(coords: dict[str, float], r: EvalResult) -> dict[str, Any]:
    return {**coords, "loss": r.loss, "text_loss": r.text_loss, "audio_loss": r.audio_loss}


@torch.no_grad()
def landscape(
    model: nn.Module, batches: Sequence[torch.Tensor], loss_fn: LossFn, device: torch.device,
    directions: Sequence[State], alphas: Sequence[float], betas: Sequence[float] | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """``L(θ* + α d₁ (+ β d₂))`` over the grid, one row per point (``alpha`` [, ``beta``], losses).

    With one direction ``betas`` must be None; with two, the grid is ``alphas × betas``. The model's trained
    tensors are back at ``θ*`` bit for bit afterwards.
    """
    if len(directions) not in (1, 2) or (len(directions) == 2) != (betas is not None):
        raise ValueError("give one direction and no betas (1-D) or two directions and betas (2-D)")
    points = [(a,) for a in alphas] if betas is None else [(a, b) for b in betas for a in alphas]
    rows = []
    with restored_parameters(model) as centre:
        params = {n: p for n, p in model.named_parameters() if n in centre}
        for point in tqdm(points, desc="landscape", disable=not progress):
            for name, p in params.items():
                value = centre[name].to(_work_dtype(centre[name]))
                for coeff, d in zip(point, directions):
                    value = value + coeff * d[name].to(value.dtype)
                p.copy_(value)
            coords = {"alpha": point[0]} if betas is None else {"alpha": point[0], "beta": point[1]}
            rows.append(_row(coords, evaluate(model, batches, loss_fn, device)))
    return rows


@torch.no_grad()
def interpolation(
    model: nn.Module, batches: Sequence[torch.Tensor], loss_fn: LossFn, device: torch.device,
    state_a: State, state_b: State, alphas: Sequence[float], progress: bool = True,
) -> list[dict[str, Any]]:
    """``L((1 − α) θ_A + α θ_B)`` for each ``α`` over the trained tensors; the trained tensors are restored
    afterwards.

    ``torch.lerp`` forms ``θ_A + α Δ`` below α = 0.5 and ``θ_B − (1 − α) Δ`` above, so α = 0 is exactly θ_A,
    α = 1 exactly θ_B, and equal checkpoints give the same tensors at every α.
    """
    if set(state_a) != set(state_b):
        raise ValueError("the two states hold different tensors")
    rows = []
    with restored_parameters(model):
        params = {n: p for n, p in model.named_parameters() if n in state_a}
        for alpha in tqdm(list(alphas), desc="interpolation", disable=not progress):
            for name, p in params.items():
                dtype = _work_dtype(p)
                p.copy_(torch.lerp(state_a[name].to(dtype), state_b[name].to(dtype), alpha))
            rows.append(_row({"alpha": alpha}, evaluate(model, batches, loss_fn, device)))
    return rows
