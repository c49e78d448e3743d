"""Training and measuring top-k sparse autoencoders (:class:`modules.TopKSparseAutoencoder`) on stored vectors.

Two objectives:

- ``topk`` (ReLU top-k SAE): loss = normalised MSE ``Σ‖x - x̂‖² / Σ‖x - x̄‖²`` (``x̄`` the batch mean, so
  predicting the mean scores 1) plus ``aux_coef`` times AuxK: the normalised MSE with which the
  ``aux_k`` largest pre-activations of the *dead* latents (no activation above ``1e-3`` for
  ``dead_tokens`` training rows) reconstruct the residual ``x - x̂``. AuxK gives dead latents a gradient
  towards what the live ones miss. The decoder atoms are kept at unit norm: the gradient component
  parallel to each atom is removed before the step and the atoms renormalised after it, so sparsity cannot
  be bought by shrinking codes and growing atoms. The pre-bias starts at the geometric median of the data.
- ``compressae`` (signed top-k): inputs scaled to unit norm, signed top-k codes, no decoder bias; loss
  ``(1 - cos(x, x̂_k)) + (1 - cos(x, x̂_4k)) / 8``, which is scale-free (norms are never reconstructed).

Held-out metrics (on files never trained on), in the space the code reconstructs (the unit-norm input for
``compressae``): normalised MSE, mean cosine, L0 (mean non-zeros per row), dead fraction (latents never
active on the ``M`` held-out rows, with ``M`` reported), explained variance
``1 - Σ_j Var(x_j - x̂_j) / Σ_j Var(x_j)``.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.nn import functional as F

from moshi.modules.sparse_autoencoder import TopKSparseAutoencoder

OBJECTIVES = ("topk", "compressae")
ACTIVE_THRESHOLD = 1e-3


@dataclass
class SAEConfig:
    latents: int = 32768
    k: int = 32
    objective: str = "topk"
    lr: float = 1e-4
    adam_eps: float = 6.25e-10
    batch_size: int = 4096
    epochs: int = 10
    aux_k: int = 256
    aux_coef: float = 1.0 / 32.0
    dead_tokens: int = 10_000_000
    eval_every: int = 100
    seed: int = 0

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"--objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if not 1 <= self.k <= self.latents:
            raise ValueError(f"--k must be in [1, --latents={self.latents}], got {self.k}")


def split_files(files: Sequence[str], heldout_fraction: float, seed: int = 0) -> set[str]:
    """The held-out files: those whose seeded hash ranks in the lowest ``heldout_fraction`` (at least one file
    on each side when there are two or more). The hash reads each path relative to the files' common folder,
    so the split depends neither on the order of the files nor on where the dataset lies."""
    if not 0 <= heldout_fraction < 1:
        raise ValueError(f"--heldout-fraction must be in [0, 1), got {heldout_fraction}")
    names = sorted(set(files))
    if heldout_fraction == 0 or len(names) < 2:
        return set()
    root = os.path.commonpath([os.path.dirname(f) for f in names])

    def rank(f: str) -> str:
        return hashlib.sha256(f"{seed}:{os.path.relpath(f, root)}".encode()).hexdigest()

    ranked = sorted(names, key=rank)
    n = min(len(names) - 1, max(1, round(heldout_fraction * len(names))))
    return set(ranked[:n])


def geometric_median(x: torch.Tensor, iters: int = 50, eps: float = 1e-8) -> torch.Tensor:
    """Weiszfeld's iterations from the mean: the point minimising the sum of distances to the rows."""
    y = x.mean(dim=0)
    for _ in range(iters):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(eps)
        y_new = (w[:, None] * x).sum(dim=0) / w.sum()
        if (y_new - y).norm() <= eps * max(1.0, float(y.norm())):
            return y_new
        y = y_new
    return y


def normalised_mse(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """``Σ‖x - x̂‖² / Σ‖x - x̄‖²``: 1 for the mean predictor, 0 for a perfect reconstruction."""
    return (x - x_hat).pow(2).sum() / (x - x.mean(dim=0)).pow(2).sum().clamp_min(1e-12)


def cosine_loss(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    return (1.0 - F.cosine_similarity(x, x_hat, dim=-1)).mean()


def make_sae(input_dim: int, cfg: SAEConfig, device: torch.device | str | None = None) -> TopKSparseAutoencoder:
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(cfg.seed)
    try:
        return TopKSparseAutoencoder(input_dim, cfg.latents, cfg.k, device=device,
                                     signed=cfg.objective == "compressae")
    finally:
        torch.random.set_rng_state(gen_state)


@torch.no_grad()
def normalise_atoms_(sae: TopKSparseAutoencoder) -> None:
    """Unit-norm decoder atoms (the columns of ``decoder.weight``)."""
    w = sae.decoder.weight
    w.div_(w.norm(dim=0, keepdim=True).clamp_min(1e-12))


@torch.no_grad()
def remove_parallel_gradient_(sae: TopKSparseAutoencoder) -> None:
    """Removes from each atom's gradient its component along the (unit) atom."""
    w, g = sae.decoder.weight, sae.decoder.weight.grad
    if g is not None:
        g.sub_(w * (w * g).sum(dim=0, keepdim=True))


def topk_loss(
    sae: TopKSparseAutoencoder, x: torch.Tensor, dead: torch.Tensor | None, cfg: SAEConfig
) -> tuple[torch.Tensor, dict[str, float], torch.Tensor]:
    """``(loss, parts, codes)`` of the ReLU top-k objective with AuxK over the ``dead`` latents."""
    pre = sae.preactivations(x)
    codes = sae.select(pre)
    x_hat = sae.decode(codes)
    main = normalised_mse(x, x_hat)
    aux = x.new_zeros(())
    if dead is not None and bool(dead.any()) and cfg.aux_coef > 0:
        k_aux = min(cfg.aux_k, int(dead.sum()))
        dead_pre = torch.where(dead, pre, torch.full_like(pre, -torch.inf))
        top = torch.topk(dead_pre, k_aux, dim=-1)
        aux_codes = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
        residual = (x - x_hat).detach()
        aux = normalised_mse(residual, aux_codes @ sae.decoder.weight.T)
        aux = torch.nan_to_num(aux)
    loss = main + cfg.aux_coef * aux
    return loss, {"nmse": float(main), "auxk": float(aux)}, codes


def compressae_loss(sae: TopKSparseAutoencoder, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, float], torch.Tensor]:
    """``(loss, parts, codes)`` of the signed top-k cosine objective."""
    target = sae.prepare_input(x)
    pre = sae.preactivations(x)
    codes = sae.select(pre)
    wide = sae.select(pre, min(4 * sae.k, sae.latent_dim))
    loss_k = cosine_loss(target, sae.decode(codes))
    loss = loss_k + cosine_loss(target, sae.decode(wide)) / 8.0
    return loss, {"cosine_loss": float(loss_k)}, codes


@torch.no_grad()
def evaluate_sae(sae: TopKSparseAutoencoder, x: torch.Tensor, batch_size: int = 8192) -> dict[str, float]:
    """Held-out metrics of ``sae`` on rows ``x`` (see the module docstring)."""
    if x.shape[0] < 2:
        raise ValueError(f"evaluation needs at least 2 rows, got {x.shape[0]}")
    device = sae.encoder.weight.device
    fired = torch.zeros(sae.latent_dim, dtype=torch.bool, device=device)
    err2 = 0.0
    cos = 0.0
    nonzero = 0
    n = x.shape[0]
    s1 = torch.zeros(x.shape[1], dtype=torch.float64, device=device)
    s2 = torch.zeros((), dtype=torch.float64, device=device)
    r1 = torch.zeros(x.shape[1], dtype=torch.float64, device=device)
    r2 = torch.zeros((), dtype=torch.float64, device=device)
    for i in range(0, n, batch_size):
        xb = x[i : i + batch_size].to(device, torch.float32)
        target = sae.prepare_input(xb)
        codes = sae.encode(xb)
        x_hat = sae.decode(codes)
        fired |= (codes.abs() > 0).any(dim=0)
        nonzero += int((codes != 0).sum())
        r = (target - x_hat).double()
        t = target.double()
        err2 += float(r.pow(2).sum())
        cos += float(F.cosine_similarity(target, x_hat, dim=-1).sum())
        s1 += t.sum(dim=0)
        s2 += t.pow(2).sum()
        r1 += r.sum(dim=0)
        r2 += r.pow(2).sum()
    total_var = float(s2 - s1.pow(2).sum() / n)
    resid_var = float(r2 - r1.pow(2).sum() / n)
    return {
        "nmse": err2 / total_var if total_var > 0 else float("nan"),
        "cosine": cos / n,
        "l0": nonzero / n,
        "dead_fraction": float((~fired).float().mean()),
        "explained_variance": 1.0 - resid_var / total_var if total_var > 0 else float("nan"),
        "heldout_rows": n,
    }


@dataclass
class SAEResult:
    sae: TopKSparseAutoencoder
    history: list[dict[str, float]]
    final: dict[str, float]
    config: dict[str, Any]


def train_sae(
    train: torch.Tensor,
    heldout: torch.Tensor,
    cfg: SAEConfig,
    device: torch.device | str = "cpu",
    progress: Callable[[int], Any] | None = None,
) -> SAEResult:
    """Trains one SAE on rows ``train [n, d]`` and measures it on ``heldout`` every ``eval_every`` steps.

    ``progress(steps)`` wraps the step range (a progress bar). Training rows are shuffled each epoch with a
    generator seeded by ``cfg.seed``; float32 on ``device``.
    """
    if train.shape[0] < 1:
        raise ValueError("no training rows")
    train = train.to(device, torch.float32)
    heldout = heldout.to(device, torch.float32)
    sae = make_sae(train.shape[1], cfg, device)
    if cfg.objective == "topk":
        with torch.no_grad():
            sample = train[torch.randperm(train.shape[0], generator=torch.Generator().manual_seed(cfg.seed))[:8192]
                           .to(device)]
            sae.decoder.bias.copy_(geometric_median(sample))
    params = [p for p in sae.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr, eps=cfg.adam_eps)
    gen = torch.Generator().manual_seed(cfg.seed)
    n = train.shape[0]
    per_epoch = math.ceil(n / cfg.batch_size)
    steps = per_epoch * cfg.epochs
    since_fired = torch.zeros(sae.latent_dim, dtype=torch.long, device=device)
    history: list[dict[str, float]] = []
    order = torch.randperm(n, generator=gen).to(device)
    step_iter = progress(steps) if progress is not None else range(steps)
    for step in step_iter:
        if step and step % per_epoch == 0:
            order = torch.randperm(n, generator=gen).to(device)
        i = step % per_epoch
        xb = train[order[i * cfg.batch_size : (i + 1) * cfg.batch_size]]
        if cfg.objective == "topk":
            dead = since_fired >= cfg.dead_tokens
            loss, parts, codes = topk_loss(sae, xb, dead, cfg)
        else:
            loss, parts, codes = compressae_loss(sae, xb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        remove_parallel_gradient_(sae)
        opt.step()
        normalise_atoms_(sae)
        with torch.no_grad():
            active = (codes.abs() > ACTIVE_THRESHOLD).any(dim=0)
            since_fired = torch.where(active, torch.zeros_like(since_fired), since_fired + xb.shape[0])
        if (step + 1) % cfg.eval_every == 0 or step + 1 == steps:
            record = {"step": step + 1, "train_loss": float(loss), **{f"train_{k}": v for k, v in parts.items()},
                      "train_dead_fraction": float((since_fired >= cfg.dead_tokens).float().mean())}
            if heldout.shape[0] >= 2:
                record.update({f"heldout_{k}": v for k, v in evaluate_sae(sae, heldout).items()})
            history.append(record)
    final = evaluate_sae(sae, heldout) if heldout.shape[0] >= 2 else {}
    return SAEResult(sae.eval(), history, final, asdict(cfg))
