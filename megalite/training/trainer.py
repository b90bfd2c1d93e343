"""The loop every stage shares (`megalite pretrain`, `sft`, ...): one step, end to end.

    batches = stage.batches(...)                         this DP rank's micro-batches (stage.py)
    sums    = forward_backward(chunks, batches, stage)   (forward_backward.py or a pipeline schedule)
    finalize_grads (TP-partial, tied embeddings, DP)     (parallel/finalize.py)
    optimizer.step(lr) -> grad norm, clipped             (optimizer.py)
    loss and stage metrics reduced over DP, sent from the last pipeline stage
    log / eval / checkpoint / preemption check
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from megalite.checkpoint.dist import save_checkpoint, wait_for_pending_save
from megalite.config import Config, ConfigError
from megalite.data.tokenizer import build_tokenizer
from megalite.model.flops import flops_per_token, param_count
from megalite.model.lora import check_lora_config, lora_param_count
from megalite.model.spec import check_impls
from megalite.parallel.comm import all_reduce, broadcast, group_size
from megalite.parallel.finalize import finalize_grads
from megalite.parallel.rng import seed_everything
from megalite.parallel.state import (
    ParallelState,
    build_parallel_state,
    check_layout,
    init_distributed,
    resolve_device,
)
from megalite.training.build import build_model, check_step_schedule
from megalite.training.forward_backward import get_forward_backward
from megalite.training.guards import DivergenceGuard, check_train_split
from megalite.training.loggers import build_sinks, check_logging
from megalite.training.lr_schedule import lr_at
from megalite.training.metrics import MetricsLogger, peak_flops
from megalite.training.optimizer import build_optimizer
from megalite.training.precision import LossScaler, make_autocast, resolve_precision
from megalite.training.preemption import PreemptionGuard
from megalite.training.resume import finished_message, resume_or_initialize
from megalite.training.run_dir import drop_rows_after, lock_run_dir
from megalite.training.stage import PretrainStage, Stage


@dataclass
class TrainState:
    step: int = 0
    consumed_samples: int = 0


class Trainer:
    def __init__(self, cfg: Config, stage: Stage | None = None, datasets: tuple | None = None) -> None:
        """`datasets` (train, valid) replaces the stage's data (benchmarks use synthetic tokens)."""
        self.cfg = cfg
        self.stage = stage if stage is not None else PretrainStage()
        t, m = cfg.train, cfg.model
        if t.train_steps == 0 and not self.stage.evaluates_checkpoint:
            raise ConfigError(f"train.train_steps must be > 0 for megalite {self.stage.name} (0 only evaluates a "
                              f"checkpoint, with megalite rm)")
        # Validate everything cheap before any process group or data work: bad input fails fast.
        self.device = resolve_device(t.device)
        world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
        self.dp = check_layout(m, cfg.parallel, t, world)
        self.num_micro = check_step_schedule(cfg, self.dp)  # micro-batches per step on each DP rank
        if t.precision == "fp8" and t.fp8_backend == "te" and m.linear_impl == m.mlp_impl == "torch":
            # FP8 runs only inside Transformer Engine modules: fp8 selects them in the layer spec.
            m.linear_impl = m.mlp_impl = "te"
        self.precision = resolve_precision(t, self.device, m)
        check_impls(m, self.device)
        check_lora_config(cfg.lora, m, cfg.checkpoint.pretrained)
        lr_at(0, t.train_steps, cfg.optim)  # rejects an unknown decay now, not at step 1
        check_logging(cfg)  # a requested TensorBoard / W&B that is not installed: one line, before any work
        self.tokenizer = build_tokenizer(cfg.data.tokenizer_type, cfg.data.tokenizer_model)
        if m.vocab_size == 0:
            m.vocab_size = self.tokenizer.vocab_size
        if self.tokenizer.vocab_size > m.vocab_size:
            raise ConfigError(f"model.vocab_size {m.vocab_size} is smaller than the tokenizer's "
                              f"{self.tokenizer.vocab_size}")
        init_distributed(self.device)
        self.ps: ParallelState = build_parallel_state(cfg.parallel, self.device)
        self.run_lock = lock_run_dir(t.run_dir, self.ps.rank, self.ps.world_size, self.device)  # one run per dir
        self.autocast = make_autocast(self.precision, self.device, t.fp8_recipe, self.ps.tp_dp_group, t.fp8_backend)
        self.rng = seed_everything(t.seed, self.ps.tp_rank, self.ps.pp_rank, self.device)
        self.train_ds, self.valid_ds = datasets if datasets is not None else self.stage.build_datasets(self)
        check_train_split(self.train_ds, cfg)
        self.chunks = build_model(cfg, self.ps, self.rng, schedule_checked=True)
        self.optimizer = build_optimizer(self.chunks, cfg, self.ps)
        self.forward_backward = get_forward_backward(self.ps, cfg.parallel)
        self.scaler = LossScaler(self.precision, t.loss_scale)
        # What the scaler unscales and checks (nothing when it is off); parameters are never replaced.
        self.scaled_params = [p for c in self.chunks for p in c.parameters()] if self.scaler.enabled else []
        self.state = TrainState()
        self.ckpt_dir = Path(cfg.checkpoint.dir or Path(t.run_dir) / "checkpoints")
        self.divergence = DivergenceGuard(self.precision, self.ckpt_dir)
        self.flops_per_token = flops_per_token(m, t.seq_len)
        self.peak = peak_flops(self.device, "fp8" if self.precision == "fp8" else self.precision)
        self.is_logger = self.ps.rank == 0
        self.metrics = MetricsLogger(t.run_dir, t.train_steps, self.is_logger, t.progress_bar,
                                     sinks=build_sinks(cfg, self.is_logger, self.stage.name))
        self.lora_base: dict | None = None  # LoRA: the frozen base's checkpoint, recorded in ours
        self._maybe_resume()
        if self.is_logger:
            total = param_count(m)
            lora = lora_param_count(m, cfg.lora) if cfg.lora.rank else 0  # the only trainable ones
            trainable = f", trainable (LoRA) {lora:,} ({100 * lora / total:.2f}%)" if lora else ""
            print(f"megalite {self.stage.name} | {self.ps.describe()} | params {total / 1e6:.1f}M{trainable} | "
                  f"optimizer state/rank "
                  f"{self.optimizer.memory_report()['measured_optimizer'] / 2**20:.2f} MiB | "
                  f"precision {self.precision} | micro-batches/step {self.num_micro} | "
                  f"start step {self.state.step}{self.stage.describe(self)}", flush=True)

    # -- data ---------------------------------------------------------------------------------
    def _batches(self, dataset, consumed: int) -> list[dict]:
        return self.stage.batches(self, dataset, consumed)

    def _global_sum(self, value: torch.Tensor | float) -> torch.Tensor:
        t = torch.as_tensor(value, dtype=torch.float64, device=self.device).clone()
        all_reduce(t, self.ps.dp_group)
        return t

    def _global_units(self, batches: list[dict]) -> float:
        """The step's loss units (e.g. loss tokens) over all DP ranks; host-only when DP is 1."""
        n = sum(self.stage.loss_units(mb) for mb in batches)
        return float(n) if group_size(self.ps.dp_group) == 1 else float(self._global_sum(n))

    def _reduce_sums(self, sums: dict[str, torch.Tensor]) -> dict[str, float]:
        """The step's sums over DP, sent from the last pipeline stage (where the loss lives), so
        every rank logs the same values: one all-reduce and one broadcast for all of them."""
        names = list(sums)
        t = self._global_sum(torch.stack([sums[k].double() for k in names]))
        broadcast(t, src=self.ps.pp_ranks[-1], group=self.ps.pp_group)
        return dict(zip(names, t.tolist()))

    # -- one step -----------------------------------------------------------------------------
    def train_step(self, batches: list[dict]) -> tuple[float, float, float, dict[str, float]]:
        """One optimizer step: (global loss, grad norm (inf: skipped on fp16 overflow), its lr,
        the stage's metrics)."""
        lr = lr_at(self.state.step, self.cfg.train.train_steps, self.cfg.optim)
        for c in self.chunks:
            c.train()
        num_units = self._global_units(batches)
        self.optimizer.zero_grad()
        with self.autocast():
            sums = self.forward_backward(self.chunks, batches, self.ps, num_units=num_units, step=self.stage,
                                         loss_scale=self.scaler.scale,
                                         no_sync=getattr(self.optimizer, "no_sync", None))
        finalize_grads(self.chunks, self.ps)
        if self.scaler.unscale_and_check(self.scaled_params, None if self.ps.world_size == 1 else dist.group.WORLD):
            grad_norm = self.optimizer.step(lr)
        else:
            grad_norm = float("inf")  # fp16 overflow: skip this update, the scaler has backed off
        reduced = self._reduce_sums(sums)
        return reduced["loss"] / num_units, grad_norm, lr, self.stage.reduce_metrics(reduced, num_units)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out loss and the stage's metrics over `eval_steps` steps of the valid split
        (`eval_loss`, `eval_<metric>`); empty without a valid split."""
        if self.valid_ds is None:
            return {}
        for c in self.chunks:
            c.eval()
        t = self.cfg.train
        totals: dict[str, float] = {}
        count = 0.0
        for k in range(t.eval_steps):
            batches = self._batches(self.valid_ds, k * t.global_batch_size)
            n = self._global_units(batches)
            with self.autocast():
                sums = self.forward_backward(self.chunks, batches, self.ps, num_units=n, step=self.stage,
                                             forward_only=True)
            for key, v in self._reduce_sums(sums).items():
                totals[key] = totals.get(key, 0.0) + v
            count += n
        out = {"eval_loss": totals["loss"] / count}
        out.update({f"eval_{k}": v for k, v in self.stage.reduce_metrics(totals, count).items()})
        return out

    # -- checkpoints --------------------------------------------------------------------------
    def _maybe_resume(self) -> None:
        meta, where = resume_or_initialize(self)  # own latest > checkpoint.load > pretrained > scratch
        if meta is not None:
            self.state = TrainState(step=meta["step"], consumed_samples=meta["consumed_samples"])
            self.lora_base = meta.get("base")
            if self.scaler.enabled and self.scaler.dynamic and "loss_scaler" in meta:
                self.scaler.load_state_dict(meta["loss_scaler"])  # a static loss_scale keeps the configured value
        if self.is_logger:
            print(where, flush=True)
            drop_rows_after(self.metrics.path, self.state.step)  # rows of steps this run will redo

    def save(self) -> Path:
        extra = {"consumed_samples": self.state.consumed_samples}
        if self.scaler.enabled:  # the same on every rank (overflows are reduced over all of them)
            extra["loss_scaler"] = self.scaler.state_dict()
        path = save_checkpoint(self.ckpt_dir, self.state.step, self.chunks, self.optimizer, self.ps,
                               self.cfg, extra, self.rng, base=self.lora_base)
        self.stage.on_save(self)  # state the stage owns (PPO's critic), saved at the same step
        return path

    # -- the loop -----------------------------------------------------------------------------
    def train(self) -> list[dict]:
        t, ck = self.cfg.train, self.cfg.checkpoint
        guard = PreemptionGuard()
        history: list[dict] = []
        tokens_per_step = t.global_batch_size * t.seq_len
        start_step = self.state.step
        if start_step >= t.train_steps and self.is_logger:
            print(finished_message(start_step, t.train_steps, self.ckpt_dir), flush=True)
        try:
            while self.state.step < t.train_steps:
                start = time.time()
                batches = self._batches(self.train_ds, self.state.consumed_samples)
                loss, grad_norm, lr, stage_metrics = self.train_step(batches)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                elapsed = time.time() - start
                self.state.step += 1
                self.state.consumed_samples += t.global_batch_size
                tps = tokens_per_step / elapsed
                mfu = (self.flops_per_token * tps / (self.peak * self.ps.world_size)) if self.peak else None
                rec = {"step": self.state.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                       "tokens_per_sec": tps, "mfu": mfu, "step_time": elapsed,
                       "consumed_samples": self.state.consumed_samples, **stage_metrics}
                if t.eval_interval and self.state.step % t.eval_interval == 0 and self.valid_ds is not None:
                    rec.update(self.evaluate())
                    if self.stage.perplexity:
                        rec["eval_ppl"] = math.exp(min(rec["eval_loss"], 50.0))
                history.append(rec)
                if self.state.step % t.log_interval == 0 or self.state.step == t.train_steps or "eval_loss" in rec:
                    self.metrics.log(rec)
                    self.metrics.console(self.state.step, rec)
                self.divergence.check(self.state.step, loss, grad_norm)  # raises: nothing new is saved
                if self.metrics.failed:  # e.g. disk full: save what still fits, then stop with the reason
                    guard.fail(self.metrics.failed)
                stop = guard.should_stop(self.device) or bool(t.exit_interval and self.state.step % t.exit_interval == 0)
                if stop or (ck.save_interval and self.state.step % ck.save_interval == 0):
                    path = self.save()
                    if self.is_logger:  # an async save's failure is raised by the next save or at the end
                        print(f"{'saving' if ck.async_save else 'saved'} checkpoint {path}", flush=True)
                if stop:
                    line = guard.stop_line(self.state.step)  # raises after a fault
                    if self.is_logger:
                        print(line, flush=True)
                    break
            else:
                # Only if this run trained: a finished run launched again must not rewrite its checkpoint.
                ran = self.state.step > start_step
                if ck.save_on_exit and ran and not (ck.save_interval and self.state.step % ck.save_interval == 0):
                    path = self.save()
                    if self.is_logger:
                        print(f"{'saving' if ck.async_save else 'saved'} checkpoint {path}", flush=True)
        finally:
            try:
                wait_for_pending_save()  # an async save must be committed (or its failure raised) first
            finally:
                guard.restore()
                self.metrics.close()
                if self.run_lock is not None:
                    self.run_lock.release()
        return history


def run_stage(cfg: Config, stage: Stage | None = None) -> list[dict]:
    """Builds the trainer for `stage` (pretraining by default), trains, and tears down."""
    trainer = Trainer(cfg, stage)
    try:
        return trainer.train()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def pretrain(cfg: Config) -> list[dict]:
    return run_stage(cfg, PretrainStage())
