"""The fine-tuning recipe: components from a `TrainArgs`, the loop, checkpoints, resume.

`train.py` is a thin entry point over :class:`Trainer` (`setup()`, `train()`, `close()`). Everything that
depends on the model (the build, the parameter groups, the loss, the text tokenizer, the export format) comes
from the run's :class:`finetune.model_family.ModelFamily`, so the loop is the same for Moshi and DSAA.

Loss normalisation: each optimizer step's loss is ``Σ text CE·w / Σ w_text + Σ audio CE·w / Σ w_audio``
where the sums run over **all** micro-batches and ranks of the step. The weight totals depend only on the
codes, so they are counted (one all-reduce) before the first forward, and every micro-batch's backward
contributes its exact share; the result does not depend on how the global batch is split over
micro-batches or processes.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
from finetune.eval import eval_loss_args, evaluate
from finetune.evaluation.training import TrainingBenchmarks, format_benchmark_line
from finetune.loss import LossFn, LossTerms
from finetune.model_build import dtype_policy
from finetune.model_family import ModelFamily, model_family
from finetune.monitoring import MetricsLogger, ThroughputMeter, format_eval_line, format_train_line
from finetune.monitoring.flops import peak_flops
from finetune.monitoring.utils import (
    StepTimer,
    StepTiming,
    allocated_memory_gib,
    eta_seconds,
    peak_memory_gib,
)
from finetune.preflight import preflight

logger = logging.getLogger("train")


class NonFiniteError(FloatingPointError):
    """Loss or gradient norm became NaN/inf; training stops before the optimizer applies it."""


# ----------------------------------------------------------------------------- one step


@dataclass
class StepResult:
    loss: float
    text_loss: float
    audio_loss: float
    grad_norm: float
    real_tokens: float  # predicted positions with a target, summed over micro-batches and ranks
    all_tokens: float  # all predicted positions (padding included), summed over micro-batches and ranks

    @property
    def real_token_fraction(self) -> float:
        return self.real_tokens / max(self.all_tokens, 1.0)


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
    return StepResult(loss_f, float(terms.text_loss), float(terms.audio_loss), norm_f, float(acc[4]), float(acc[5]))


# ----------------------------------------------------------------------------- optimizer


def build_optimizer(param_groups: list[dict[str, Any]], device: torch.device) -> torch.optim.AdamW:
    """AdamW, betas (0.9, 0.95), eps 1e-8; fused kernels on CUDA."""
    kwargs: dict[str, Any] = {"betas": (0.9, 0.95), "eps": 1e-8}
    if device.type == "cuda":
        kwargs["fused"] = True
    groups = [{k: v for k, v in g.items() if k != "name"} | {"name": g.get("name", f"group{i}")}
              for i, g in enumerate(param_groups)]
    return torch.optim.AdamW(groups, **kwargs)


def build_scheduler(optimizer: torch.optim.Optimizer, args: TrainArgs) -> torch.optim.lr_scheduler.OneCycleLR:
    """One OneCycleLR over `total_steps` (all stages); per-group `max_lr` = the group's lr.

    With `optim.cycle_momentum: true` (the default) beta1 cycles 0.95 → 0.85 → 0.95.
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
    `make_eval` builds a fresh finite iterable of eval batches (None: no eval loss);
    `benchmarks` scores the spoken-LM benchmarks, ``(model, step) -> metrics`` (None: none).
    """

    train: Any
    make_eval: Callable[[], Any] | None
    benchmarks: Callable[[nn.Module, int], dict[str, float]] | None = None


DataFactory = Callable[[TrainArgs, ModelFamily, torch.device, nn.Module], DataComponents]


def default_data_factory(args: TrainArgs, family: ModelFamily, device: torch.device, model: nn.Module
                         ) -> DataComponents:
    """Mimi (frozen, eval, float32) + the family's text tokenizer + codes store → train loader, eval builder."""
    from finetune.data.dataset import build_codes_store, build_eval_loader, build_train_loader
    from moshi.models import loaders

    info = family.info
    codebooks = loaders.mimi_codebooks_for_lm({"n_q": model.n_q, "dep_q": model.dep_q})
    mimi = loaders.get_mimi(info.mimi_weights, mimi_config=info.mimi_config, device=device, num_codebooks=codebooks)
    mimi.eval()
    for p in mimi.parameters():
        p.requires_grad_(False)
    tokenizer = family.text_tokenizer(model)
    store = build_codes_store(args, mimi, device=device)
    rank, world = get_rank(), get_world_size()
    train = build_train_loader(args, tokenizer, store, rank, world)
    make_eval = benchmarks = None
    loss_args = eval_loss_args(args)
    if loss_args is not None:
        def make_eval() -> Any:
            return build_eval_loader(loss_args, tokenizer, store, rank, world)
    if args.do_eval and (args.do_slm or args.do_cd or args.do_mmlu):
        benchmarks = TrainingBenchmarks(args, store, tokenizer, model, device)
    return DataComponents(train, make_eval, benchmarks)


def batch_codes(batch: Any) -> torch.Tensor:
    """Codes ``[B, K, T]`` of a batch object (`Batch.codes`) or a tensor."""
    return batch if isinstance(batch, torch.Tensor) else batch.codes


# ----------------------------------------------------------------------------- the recipe


FaultHook = Callable[[str, int], None]


class Trainer:
    """Config → components → loop → close. Every rank builds one.

    Args:
        args (TrainArgs): validated configuration.
        data_factory: builds the data iterators (tests inject synthetic data).
        family (ModelFamily | None): the model family; None: the one `args` selects.
        device (str | None): "cpu"/"cuda"/None (auto).
        fault_hook: called as ``hook(point, step)`` at ``"after_checkpoint"`` and inside each checkpoint
            write (see `Checkpointer`); the crash-and-resume tests use it to kill the process there.
    """

    def __init__(
        self,
        args: TrainArgs,
        data_factory: DataFactory = default_data_factory,
        family: ModelFamily | None = None,
        device: str | None = None,
        fault_hook: FaultHook | None = None,
    ) -> None:
        self.args = args
        self.data_factory = data_factory
        self._family = family
        self.fault_hook = fault_hook
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
        info = preflight(a)  # model files and data checked before run_dir is touched
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
        self.family = self._family if self._family is not None else model_family(a, info)
        self.info = self.family.info
        self.model = self.family.build(self.device)
        self.loss_fn = self.family.loss(self.model)
        self.data = self.data_factory(a, self.family, self.device, self.model)
        self.train_iter: Iterator[Any] = iter(self.data.train)
        self.optimizer = build_optimizer(self.family.param_groups(self.model), self.device)
        self.peak_flops = peak_flops(self.device)
        self.scheduler = build_scheduler(self.optimizer, a)
        lora = a.lora is not None and a.lora.enable and not a.full_finetuning
        self.checkpointer = Checkpointer(
            self.run_dir, self.model, self.optimizer, self.family.base_config(), lora=lora,
            lora_rank=a.lora.rank if a.lora else 0, lora_scaling=a.lora.scaling if a.lora else 0.0,
            save_adapters=a.save_adapters, export_dtype=dtype_policy(a.param_dtype, self.device).export,
            num_ckpt_keep=a.num_ckpt_keep, fingerprint=a.resume_fingerprint(),
            export_writer=self.family.export_writer(self.model), fault_hook=self.fault_hook,
        )
        if want_resume:
            self._resume()
        self.model.train()

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
        last: StepResult | None = None
        timer = StepTimer()
        while self.step < total:
            self.step += 1
            timer.start()
            batches = [batch_codes(next(self.train_iter)).to(self.device, non_blocking=True)
                       for _ in range(a.num_microbatches)]
            timer.data_ready()
            lr = self.optimizer.param_groups[0]["lr"]
            last = train_step(self.model, self.optimizer, batches, self.loss_fn, a.max_norm, self.step)
            self.scheduler.step()
            timing = timer.stop()  # train_step synced (loss to host); eval and checkpoints come after
            frames = sum(b.shape[0] * b.shape[-1] for b in batches)
            world = get_world_size()
            self.meter.add(timing, round(last.all_tokens / world), last.real_tokens / world)
            if self.step % a.log_freq == 0 or self.step == total:
                self._log_train(last, lr, timing, frames, batches[0].shape[-1])
            if a.do_eval and self._is_due(a.eval_freq):
                eval_metrics: dict[str, float] = {}
                if self.data.make_eval is not None:
                    eval_metrics = self._evaluate(last.loss)
                    logger.info(format_eval_line(eval_metrics | {"step": self.step}))
                if self.data.benchmarks is not None:
                    scores = self.data.benchmarks(self.model, self.step)
                    logger.info(format_benchmark_line(self.step, scores))
                    eval_metrics |= scores
                if eval_metrics and self.eval_metrics is not None:
                    self.eval_metrics.log(eval_metrics, self.step)
            if a.do_ckpt and self._is_due(a.ckpt_freq):
                assert self.checkpointer is not None
                for m in (self.train_metrics, self.eval_metrics):
                    if m is not None:
                        m.flush()
                self.checkpointer.save(self.step, self._rank_state())
                if self.fault_hook is not None:
                    self.fault_hook("after_checkpoint", self.step)
        if last is not None:
            logger.info("done: %d steps, final loss %.4f", self.step, last.loss)

    def _evaluate(self, train_loss: float) -> dict[str, float]:
        a = self.args
        assert self.data.make_eval is not None
        per_rank = max(1, a.eval_batches // get_world_size())
        batches = (batch_codes(b) for b in self.data.make_eval())
        result = evaluate(self.model, batches, self.loss_fn, self.device, max_batches_per_rank=per_rank)
        return result.as_metrics(train_loss)

    def _log_train(self, r: StepResult, lr: float, timing: StepTiming, frames: int, seq_len: int) -> None:
        a = self.args
        world = get_world_size()
        mfu = None
        if self.peak_flops:
            mfu = self.family.flops_per_frame(seq_len) * frames / timing.seconds / self.peak_flops
        m = {
            "lr": lr, "loss": r.loss, "text_loss": r.text_loss, "audio_loss": r.audio_loss,
            "grad_norm": r.grad_norm, "prob_real_tokens": r.real_token_fraction,
            "percent_done": 100.0 * self.step / a.total_steps,
            "peak_allocated_mem": peak_memory_gib(self.device), "allocated_mem": allocated_memory_gib(self.device),
            "wps": r.all_tokens / world / timing.seconds, "real_wps": r.real_tokens / world / timing.seconds,
            "avg_wps": self.meter.avg_wps, "avg_real_wps": self.meter.avg_real_wps, "mfu": mfu,
            "step_seconds": timing.seconds, "data_share": timing.data_seconds / timing.seconds,
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
