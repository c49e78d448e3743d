"""The fine-tuning recipe: components from a `TrainArgs`, the loop, checkpoints, resume.

`train.py` is a thin entry point over :class:`Trainer` (torchtune's recipe shape: `setup()`, `train()`,
`close()`). The pieces a DSAA trainer replaces are small functions passed in or overridden: the model
builder, the parameter groups and the loss (:class:`MoshiLoss`).

Loss normalisation (why it differs from upstream): each optimizer step's loss is
``Σ text CE·w / Σ w_text + Σ audio CE·w / Σ w_audio`` where the sums run over **all** micro-batches and
ranks of the step. The weight totals depend only on the codes, so they are counted (one all-reduce)
before the first forward, and every micro-batch's backward contributes its exact share. The result does
not depend on how the global batch is split over micro-batches or processes; upstream's mean of
per-micro-batch means equals it when all micro-batches carry the same weight.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from finetune.args import TrainArgs
from finetune.checkpointing import Checkpointer, latest_resumable
from finetune.distributed import (
    all_reduce_sum,
    barrier,
    clip_grad_norm,
    get_rank,
    get_world_size,
    init_distributed,
    is_main,
    select_device,
)
from finetune.eval import evaluate
from finetune.loss import LossTerms, loss_weight_sums_from_codes, train_output_loss_terms
from finetune.monitoring import MetricsLogger, ThroughputMeter, format_eval_line, format_train_line
from finetune.monitoring.utils import allocated_memory_gib, eta_seconds, peak_memory_gib
from finetune.preflight import preflight
from finetune.wrapped_model import build_model, default_param_groups, dtype_policy

logger = logging.getLogger("train")


class NonFiniteError(FloatingPointError):
    """Loss or gradient norm became NaN/inf; training stops before the optimizer applies it."""


# ----------------------------------------------------------------------------- loss


class LossFn(Protocol):
    def weight_sums(self, codes: torch.Tensor) -> torch.Tensor: ...  # [2]: text, audio weight sums

    def token_counts(self, codes: torch.Tensor) -> torch.Tensor: ...  # [2]: positions with a target, all

    def __call__(self, model: nn.Module, codes: torch.Tensor) -> LossTerms: ...

    def begin_step(self, step: int) -> None: ...  # before the step's first `weight_sums` (1-based step)


class MoshiLoss:
    """Reference 5.4 on an `LMModel`: forward, then the masked weighted CE of text and audio."""

    def __init__(self, delays: Sequence[int], dep_q: int, first_codebook_weight_multiplier: float,
                 text_padding_weight: float, text_padding_ids: Sequence[int] = (3, 0)) -> None:
        self.delays = list(delays)
        self.dep_q = dep_q
        self.beta = first_codebook_weight_multiplier
        self.alpha = text_padding_weight
        self.pad_ids = tuple(text_padding_ids)

    @classmethod
    def for_model(cls, model: nn.Module, args: TrainArgs) -> MoshiLoss:
        return cls(model.delays, model.dep_q, args.first_codebook_weight_multiplier, args.text_padding_weight,
                   (model.existing_text_padding_id, model.existing_text_end_padding_id))

    def weight_sums(self, codes: torch.Tensor) -> torch.Tensor:
        wt, wa = loss_weight_sums_from_codes(codes, self.delays, self.dep_q, self.beta, self.alpha, self.pad_ids)
        return torch.stack([wt, wa])

    def token_counts(self, codes: torch.Tensor) -> torch.Tensor:
        """``[real, all]`` predicted positions (upstream's `prob_real_tokens` = real / all)."""
        wt, wa = loss_weight_sums_from_codes(codes, self.delays, self.dep_q, 1.0, 1.0, ())
        total = codes.shape[0] * codes.shape[-1] * (1 + self.dep_q)
        return torch.stack([wt + wa, wt.new_tensor(float(total))])

    def begin_step(self, step: int) -> None:
        """Moshi's loss is the same on every step (DSAA's skips the audio part on some)."""

    def __call__(self, model: nn.Module, codes: torch.Tensor) -> LossTerms:
        # forward_train leaves the text head to the fused chunked CE: no [B, T, V] float32 logits.
        return train_output_loss_terms(model.forward_train(codes), codes, self.beta, self.alpha, self.pad_ids)


# ----------------------------------------------------------------------------- one step


@dataclass
class StepResult:
    loss: float
    text_loss: float
    audio_loss: float
    grad_norm: float
    real_token_fraction: float  # positions with a target / all predicted positions, over ranks


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Sequence[torch.Tensor],
    loss_fn: LossFn,
    max_norm: float,
    step: int = 0,
) -> StepResult:
    """Forward/backward over the micro-batches, global-norm clipping, one optimizer step.

    Raises:
        NonFiniteError: the step's loss or gradient norm is not finite (nothing is applied).
    """
    device = batches[0].device
    loss_fn.begin_step(step)
    totals = torch.zeros(2, dtype=torch.float32, device=device)
    for codes in batches:
        totals += loss_fn.weight_sums(codes).to(device)
    all_reduce_sum(totals)
    world = get_world_size()
    acc = torch.zeros(6, dtype=torch.float32, device=device)  # 4 loss terms, real positions, all positions
    for codes in batches:
        terms = loss_fn(model, codes)
        # FSDP2 averages gradients over ranks; `world ·` turns that into the sum the global mean needs.
        (terms.total(totals[0], totals[1]) * world).backward()
        acc[:4] += terms.detach().as_vector()
        acc[4:] += loss_fn.token_counts(codes).to(device)
    all_reduce_sum(acc)
    terms = LossTerms.from_vector(acc[:4])
    loss = terms.total()
    grad_norm = clip_grad_norm([p for p in model.parameters() if p.requires_grad], max_norm)
    loss_f, norm_f = float(loss), float(grad_norm)  # the step's one host sync
    if not (math.isfinite(loss_f) and math.isfinite(norm_f)):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteError(f"non-finite values at step {step}: loss {loss_f}, grad norm {norm_f}; stopping "
                             "before the optimizer step (lower optim.lr, check the data, or resume from the "
                             "last checkpoint)")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss_f, float(terms.text_loss), float(terms.audio_loss), norm_f,
                      float(acc[4] / acc[5].clamp_min(1)))


# ----------------------------------------------------------------------------- optimizer


def build_optimizer(param_groups: list[dict[str, Any]], device: torch.device) -> torch.optim.AdamW:
    """AdamW, betas (0.9, 0.95), eps 1e-8, as upstream; fused kernels on CUDA."""
    kwargs: dict[str, Any] = {"betas": (0.9, 0.95), "eps": 1e-8}
    if device.type == "cuda":
        kwargs["fused"] = True
    groups = [{k: v for k, v in g.items() if k != "name"} | {"name": g.get("name", f"group{i}")}
              for i, g in enumerate(param_groups)]
    return torch.optim.AdamW(groups, **kwargs)


def build_scheduler(optimizer: torch.optim.Optimizer, args: TrainArgs) -> torch.optim.lr_scheduler.OneCycleLR:
    """One OneCycleLR over `total_steps` (all stages); per-group `max_lr` = the group's lr.

    With `optim.cycle_momentum: true` (upstream's behaviour) beta1 cycles 0.95 → 0.85 → 0.95.
    """
    pct = args.optim.pct_start
    if abs(pct * args.total_steps - 1.0) < 1e-9:
        # torch's warm-up phase would end at step 0 and divide by zero (e.g. 20 steps × 0.05): one warm-up
        # step either way, so nudge the fraction.
        pct *= 1.0 + 1e-6
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=[g["lr"] for g in optimizer.param_groups],
        total_steps=args.total_steps,
        pct_start=pct,
        cycle_momentum=args.optim.cycle_momentum,
    )


# ----------------------------------------------------------------------------- run dir


def prepare_run_dir(args: TrainArgs) -> bool:
    """Applies the run-dir rules; returns whether a resume should be attempted.

    * exists, neither `resume` nor `overwrite_run_dir` → error (nothing touched);
    * `overwrite_run_dir` → rank 0 deletes it, the others wait;
    * `resume` → kept (a run dir without a complete checkpoint starts from step 0).
    Every rank evaluates the rules on the same filesystem state before anyone changes it.
    """
    run_dir = Path(args.run_dir)
    exists = run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir()))
    if run_dir.exists() and not run_dir.is_dir():
        raise FileExistsError(f"run_dir {run_dir} exists and is not a folder")
    if exists and not (args.resume or args.overwrite_run_dir):
        raise FileExistsError(
            f"run_dir {run_dir} already exists: set resume: true to continue that run, "
            "overwrite_run_dir: true to delete it, or choose another run_dir"
        )
    barrier()  # nobody deletes before every rank has looked
    if exists and args.overwrite_run_dir and is_main():
        logger.info("overwrite_run_dir: deleting %s", run_dir)
        shutil.rmtree(run_dir)
    barrier()
    if is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        args.record_in(run_dir)
    barrier()
    return args.resume


# ----------------------------------------------------------------------------- data


@dataclass
class DataComponents:
    """What the loop needs from the data pipeline.

    `train` yields code batches ``[B, K, T]`` forever and has `state_dict`/`load_state_dict`;
    `make_eval` builds a fresh finite iterable of eval batches (None: no eval).
    """

    train: Any
    make_eval: Callable[[], Any] | None


DataFactory = Callable[[TrainArgs, Any, torch.device, nn.Module], DataComponents]


def default_data_factory(args: TrainArgs, info: Any, device: torch.device, model: nn.Module) -> DataComponents:
    """Mimi (frozen, eval, float32) + text tokenizer + codes store → the train loader and an eval builder."""
    from finetune.data.dataset import build_codes_store, build_eval_loader, build_train_loader
    from finetune.data.text_tokenizer import load_text_tokenizer
    from moshi.models import loaders

    n_q = int(getattr(model, "n_q", 16))
    mimi = loaders.get_mimi(info.mimi_weights, mimi_config=info.mimi_config, device=device, num_codebooks=n_q // 2)
    mimi.eval()
    for p in mimi.parameters():
        p.requires_grad_(False)
    if args.text_llm.enable:
        from finetune.dsaa_training import dsaa_text_tokenizer

        tokenizer = dsaa_text_tokenizer(args, info, model)  # the checkpoint's tokenizer/, ids checked
    else:
        tokenizer = load_text_tokenizer(args, spm_path=info.tokenizer)
    store = build_codes_store(args, mimi, device=device)
    rank, world = get_rank(), get_world_size()
    train = build_train_loader(args, tokenizer, store, rank, world)
    make_eval = None
    if args.do_eval:
        def make_eval() -> Any:
            return build_eval_loader(args, tokenizer, store, rank, world)
    return DataComponents(train, make_eval)


def batch_codes(batch: Any) -> torch.Tensor:
    """Codes ``[B, K, T]`` of a batch object (`Batch.codes`) or a tensor."""
    return batch if isinstance(batch, torch.Tensor) else batch.codes


# ----------------------------------------------------------------------------- the recipe


class Trainer:
    """Config → components → loop → close. Every rank builds one.

    Args:
        args (TrainArgs): validated configuration.
        data_factory: builds the data iterators (tests inject synthetic data).
        build_model_fn, param_groups_fn, loss_factory: replaceable components; None: Moshi's, or the DSAA
            ones of `finetune.dsaa_training` when `text_llm.enable` (which also writes DSAA exports).
        device (str | None): "cpu"/"cuda"/None (auto).
    """

    def __init__(
        self,
        args: TrainArgs,
        data_factory: DataFactory = default_data_factory,
        build_model_fn: Callable[..., nn.Module] | None = None,
        param_groups_fn: Callable[[nn.Module, TrainArgs], list[dict[str, Any]]] | None = None,
        loss_factory: Callable[[nn.Module, TrainArgs], LossFn] | None = None,
        device: str | None = None,
    ) -> None:
        self.args = args
        self.data_factory = data_factory
        self.dsaa = args.text_llm.enable
        if self.dsaa:
            from finetune import dsaa_training as dsaa

            defaults = (dsaa.build_dsaa_for_training, dsaa.dsaa_param_groups, dsaa.DSAALoss.for_model)
        else:
            defaults = (build_model, default_param_groups, MoshiLoss.for_model)
        self.build_model_fn = build_model_fn or defaults[0]
        self.param_groups_fn = param_groups_fn or defaults[1]
        self.loss_factory = loss_factory or defaults[2]
        self.device = select_device(device or os.environ.get("MOSHI_FT_DEVICE"))
        init_distributed(self.device)
        self.run_dir = Path(args.run_dir)
        self.step = 0
        self.meter = ThroughputMeter()
        self.train_metrics: MetricsLogger | None = None
        self.eval_metrics: MetricsLogger | None = None
        self.checkpointer: Checkpointer | None = None

    # -- setup -----------------------------------------------------------------------------------------------

    def setup(self) -> None:
        a = self.args
        torch.manual_seed(a.seed)
        if torch.cuda.is_available():
            torch.cuda.manual_seed(a.seed)
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        self.info = preflight(a)  # model files and data checked before run_dir is touched
        want_resume = prepare_run_dir(a)
        logger.info("run dir %s; rank %d / %d on %s", self.run_dir, get_rank(), get_world_size(), self.device)
        logger.info("config:\n%s", a.to_yaml())
        self.train_metrics = MetricsLogger(
            self.run_dir, "train", is_main(), tensorboard=a.tensorboard, wandb_project=a.wandb.project,
            wandb_run_name=a.wandb.run_name, wandb_offline=a.wandb.offline, wandb_api_key=a.wandb_api_key,
            config=a.to_dict(),
        )
        self.eval_metrics = MetricsLogger(self.run_dir, "eval", is_main(), tensorboard=a.tensorboard,
                                          wandb_project=a.wandb.project)
        self.model = self.build_model_fn(a, self.info, self.device)
        self.loss_fn = self.loss_factory(self.model, a)
        self.data = self.data_factory(a, self.info, self.device, self.model)
        self.train_iter: Iterator[Any] = iter(self.data.train)
        self.optimizer = build_optimizer(self.param_groups_fn(self.model, a), self.device)
        self.scheduler = build_scheduler(self.optimizer, a)
        lora = a.lora is not None and a.lora.enable and not a.full_finetuning
        base_config = self.info.raw_config if self.info.raw_config is not None else _default_raw_config()
        self.checkpointer = Checkpointer(
            self.run_dir, self.model, self.optimizer, base_config, lora=lora,
            lora_rank=a.lora.rank if a.lora else 0, lora_scaling=a.lora.scaling if a.lora else 0.0,
            save_adapters=a.save_adapters, export_dtype=dtype_policy(a.param_dtype, self.device).export,
            num_ckpt_keep=a.num_ckpt_keep, fingerprint=a.resume_fingerprint(),
            export_writer=self._dsaa_export_writer() if self.dsaa else None,
        )
        if want_resume:
            self._resume()
        self.model.train()

    def _dsaa_export_writer(self) -> Any:
        from finetune.dsaa_training import dsaa_export_writer

        return dsaa_export_writer(self.args, self.info, self.model)

    def _resume(self) -> None:
        folder = latest_resumable(self.run_dir)
        if folder is None:
            logger.warning("resume: true but %s has no complete checkpoint: starting at step 0", self.run_dir)
            return
        assert self.checkpointer is not None
        self.step, state = self.checkpointer.load(folder)
        self.scheduler.load_state_dict(state["scheduler"])
        self.meter.load_state_dict(state["meter"])
        if hasattr(self.data.train, "load_state_dict"):
            self.data.train.load_state_dict(state["data"])
            self.train_iter = iter(self.data.train)
        for m in (self.train_metrics, self.eval_metrics):
            if m is not None:
                m.truncate_after(self.step)

    def _rank_state(self) -> dict[str, Any]:
        data_state = self.data.train.state_dict() if hasattr(self.data.train, "state_dict") else {}
        return {"scheduler": self.scheduler.state_dict(), "meter": self.meter.state_dict(), "data": data_state}

    # -- loop ------------------------------------------------------------------------------------------------

    def _is_due(self, freq: int) -> bool:
        return self.step == self.args.total_steps or (freq > 0 and self.step % freq == 0)

    def train(self) -> None:
        a = self.args
        total = a.total_steps
        tokens_per_micro = None
        last: StepResult | None = None
        while self.step < total:
            self.step += 1
            batches = [batch_codes(next(self.train_iter)).to(self.device, non_blocking=True)
                       for _ in range(a.num_microbatches)]
            self.meter.start()  # data loading is reported separately, not in tokens/s
            lr = self.optimizer.param_groups[0]["lr"]
            last = train_step(self.model, self.optimizer, batches, self.loss_fn, a.max_norm, self.step)
            self.scheduler.step()
            eval_metrics = None
            if a.do_eval and self.data.make_eval is not None and self._is_due(a.eval_freq):
                eval_metrics = self._evaluate(last.loss)
            tokens_per_micro = sum(b.shape[0] * b.shape[-1] for b in batches) * (1 + self.model_dep_q)
            dt, wps = self.meter.stop(tokens_per_micro)
            if self.step % a.log_freq == 0 or self.step == total:
                self._log_train(last, lr, wps)
            if eval_metrics is not None and self.eval_metrics is not None:
                self.eval_metrics.log(eval_metrics, self.step)
                logger.info(format_eval_line(eval_metrics | {"step": self.step}))
            if a.do_ckpt and self._is_due(a.ckpt_freq):
                assert self.checkpointer is not None
                for m in (self.train_metrics, self.eval_metrics):
                    if m is not None:
                        m.flush()
                self.checkpointer.save(self.step, self._rank_state())
                _maybe_kill_after_checkpoint(self.step)
        if last is not None:
            logger.info("done: %d steps, final loss %.4f", self.step, last.loss)

    @property
    def model_dep_q(self) -> int:
        return int(getattr(self.loss_fn, "dep_q", 8))

    def _evaluate(self, train_loss: float) -> dict[str, float]:
        a = self.args
        assert self.data.make_eval is not None
        per_rank = max(1, a.eval_batches // get_world_size())
        batches = (batch_codes(b) for b in self.data.make_eval())
        result = evaluate(self.model, batches, self.loss_fn, self.device, max_batches_per_rank=per_rank)
        return result.as_metrics(train_loss)

    def _log_train(self, r: StepResult, lr: float, wps: float) -> None:
        a = self.args
        m = {
            "lr": lr, "loss": r.loss, "text_loss": r.text_loss, "audio_loss": r.audio_loss,
            "grad_norm": r.grad_norm, "prob_real_tokens": r.real_token_fraction,
            "percent_done": 100.0 * self.step / a.total_steps,
            "peak_allocated_mem": peak_memory_gib(self.device), "allocated_mem": allocated_memory_gib(self.device),
            "wps": wps, "avg_wps": self.meter.avg_wps,
            "eta_in_seconds": eta_seconds(self.step, a.total_steps, self.meter),
        }
        if self.train_metrics is not None:
            self.train_metrics.log(m, self.step)
        logger.info(format_train_line(m | {"step": self.step}))

    # -- close -----------------------------------------------------------------------------------------------

    def close(self) -> None:
        for m in (self.train_metrics, self.eval_metrics):
            if m is not None:
                m.close()
        close = getattr(getattr(self, "data", None), "close", None)
        if callable(close):
            close()


def _maybe_kill_after_checkpoint(step: int) -> None:
    """Test hook: `MOSHI_FT_KILL_AFTER_CHECKPOINT=N` SIGKILLs the process right after checkpoint N."""
    if os.environ.get("MOSHI_FT_KILL_AFTER_CHECKPOINT") == str(step):
        import signal

        logger.warning("test hook: SIGKILL after checkpoint %d", step)
        os.kill(os.getpid(), signal.SIGKILL)


def _default_raw_config() -> dict[str, Any]:
    from moshi.models.loaders import default_lm_kwargs

    return default_lm_kwargs()
