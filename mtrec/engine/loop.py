"""The training loop: epochs of steps, each epoch ended by validation, model selection, early
stopping and checkpoints; resume from any step.

A config goes one way: ``build_run`` (engine/build.py) makes the run, ``load_splits`` (feed.py) its
data, ``Run.stepper`` the step (step.py), and ``Trainer`` loops; the run directory and checkpoints
are a ``RunDir`` (rundir.py).
"""

from __future__ import annotations

import dataclasses
import math
import signal
from dataclasses import dataclass, field

import torch

from mtrec.core.config import TrainConfig
from mtrec.core.console import console, err_console
from mtrec.core.errors import TrainingInterrupted, UserError
from mtrec.engine.build import build_run, resolved_paths
from mtrec.engine.diagnostics import DiagnosticsLog
from mtrec.engine.events import EventLog
from mtrec.engine.feed import epoch_batches, load_splits
from mtrec.engine.progress import TrainProgress
from mtrec.engine.rundir import RunDir
from mtrec.engine.schedule import improves, lr_factor, set_lr
from mtrec.metrics.split import split_metrics


@dataclass
class LoopState:
    epoch: int = 0
    step: int = 0  # batches done in the current epoch
    global_step: int = 0
    best_score: float | None = None  # the best validation value of cfg.select on the target task
    best_epoch: int = -1
    since_best: int = 0
    bad_streak: int = 0
    bad_total: int = 0
    clipped_total: int = 0  # steps whose gradients --clip-grad scaled down
    schedule_steps: int = 0  # the lr schedule's horizon: the first run's planned updates, fixed on resume
    finished: bool = False
    history: list[dict] = field(default_factory=list)


@dataclass
class Window:
    """What the loop accumulates between two progress reports (losses stay on the device)."""

    loss_sum: torch.Tensor
    good: int = 0
    steps: int = 0
    samples: int = 0


class Trainer:
    """Built once, before the first step (config -> run -> data -> stepper, the run directory
    opened or restored), then ``run()`` loops over epochs."""

    def __init__(self, cfg: TrainConfig, resume: bool = False, force: bool = False, quiet: bool = False):
        cfg = resolved_paths(cfg)
        self.run_dir = RunDir(cfg.out)
        if resume:
            self.run_dir.check_resumable()
        else:
            self.run_dir.check_new(cfg.data, force)
        run = self.built = build_run(cfg)
        self.cfg, self.tasks, self.model, self.optimizer = run.cfg, run.tasks, run.model, run.optimizer
        self.placement, self.on_device = run.placement, run.placement == "device"
        self.train_split, self.valid_split = load_splits(run)
        self.stepper = run.stepper()
        self.run_dir.main, self.quiet = run.main, quiet or not run.main
        self.state = LoopState()
        self.stop_requested = False
        self.window: Window | None = None
        # TensorBoard events of the same scalars as metrics.jsonl / diagnostics.jsonl (rank 0).
        self.events = EventLog(cfg.tensorboard, self.tasks) if cfg.tensorboard and run.main else None
        self.diagnostics = DiagnosticsLog(self.run_dir.diagnostics, self.cfg.scope, self.events)
        if run.group:
            run.group.barrier()  # every rank has checked the run directory before rank 0 touches it
        if resume:
            self._restore()
        else:
            self.run_dir.create(run.schema, cfg.data)
        self.run_dir.write_config(self.cfg)  # on resume too: --epochs, --patience ... may have changed

    # --- the loop ---------------------------------------------------------------------------
    def run(self) -> dict:
        cfg, s = self.cfg, self.state
        previous = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            with TrainProgress(self.tasks, quiet=self.quiet) as progress:
                while not s.finished and s.epoch < cfg.epochs:
                    self._epoch(progress)
        finally:
            signal.signal(signal.SIGINT, previous)
            if self.events:
                self.events.close()
        return {"best_epoch": s.best_epoch, "select": cfg.select, "best_score": s.best_score, "history": s.history,
                "skipped_steps": s.bad_total, "clipped_steps": s.clipped_total, "run_dir": str(self.run_dir.path)}

    def _epoch(self, progress: TrainProgress) -> None:
        cfg, s, run = self.cfg, self.state, self.built
        steps = self._steps_per_epoch()
        s.schedule_steps = s.schedule_steps or cfg.epochs * steps
        progress.epoch(s.epoch, steps, s.step)
        self.window = Window(torch.zeros(len(self.tasks), device=run.device))
        for codes, numeric, labels in epoch_batches(run, self.train_split, s.epoch, start=s.step):
            set_lr(self.optimizer, lr_factor(cfg.lr_schedule, cfg.warmup_steps, s.global_step, s.schedule_steps))
            diagnose = run.main and cfg.diagnostics_every > 0 and s.global_step % cfg.diagnostics_every == 0
            losses = self.stepper.step(codes, numeric, labels, self._share(labels), diagnose)
            s.step, s.global_step = s.step + 1, s.global_step + 1
            self._count(losses, labels.shape[0])
            if self.stepper.diagnostics is not None:
                self.diagnostics.write(s.global_step, self.stepper.diagnostics)
                self.stepper.diagnostics = None
            if self.window.steps >= 20 or s.step == steps:
                self._report(progress)  # the loop's host sync, every 20 steps
            if self.stop_requested and (run.group is None or self.window.steps == 0):
                self.save("last.pt")
                raise TrainingInterrupted(self.run_dir.path)
            if cfg.checkpoint_every and s.global_step % cfg.checkpoint_every == 0 and s.step < steps:
                self.save("last.pt")
        self._end_epoch(progress.samples_per_second)

    def _steps_per_epoch(self) -> int:
        return math.ceil(len(self.train_split) / self.cfg.batch_size)

    def _on_sigint(self, signum, frame) -> None:
        self.stop_requested = True

    def _share(self, labels) -> float:
        """This rank's fraction of the global batch (the last batch of an epoch may be short)."""
        if not self.built.group:
            return 1.0
        return labels.shape[0] / min(self.cfg.batch_size, len(self.train_split) - self.state.step * self.cfg.batch_size)

    def _count(self, losses, samples: int) -> None:
        """Account one step: a skipped one extends the streak (too long a streak stops the run)."""
        s, w = self.state, self.window
        w.steps, w.samples = w.steps + 1, w.samples + samples
        if losses is not None:
            s.bad_streak, w.good = 0, w.good + 1
            w.loss_sum += losses
            return
        s.bad_streak, s.bad_total = s.bad_streak + 1, s.bad_total + 1
        if s.bad_streak >= self.cfg.max_bad_steps:
            raise UserError(f"{s.bad_streak} steps in a row had a non-finite loss or gradient: training "
                            f"stopped, the last good checkpoint is {self.run_dir.path / 'last.pt'} (check the "
                            "data for NaN/inf features, or lower --lr or set --clip-grad)")

    def _report(self, progress: TrainProgress) -> None:
        w = self.window
        means = (w.loss_sum / max(w.good, 1)).tolist()
        self._count_clipped()
        progress.update(w.steps, w.samples, means, self.state.bad_total, self.state.clipped_total)
        w.steps, w.samples = 0, 0
        if self.built.group:  # ranks agree on Ctrl-C here, so none waits in an all-reduce alone
            flag = torch.tensor([float(self.stop_requested)], device=self.built.device)
            self.built.group.sum_([flag])
            self.stop_requested = bool(flag.item() > 0)

    def _count_clipped(self) -> None:
        """Move the stepper's device-side count of clipped steps into the loop state (a host sync)."""
        if self.cfg.clip_grad:
            self.state.clipped_total += int(self.stepper.clipped.item())
            self.stepper.clipped.zero_()

    # --- checkpoints --------------------------------------------------------------------------
    def save(self, name: str) -> None:
        self._count_clipped()
        position = dataclasses.asdict(self.state)
        del position["bad_streak"]  # a resumed run starts a new streak
        self.run_dir.save(name, self.built, position)

    def _restore(self) -> None:
        meta = self.run_dir.restore(self.built)
        fields = LoopState.__dataclass_fields__
        self.state = LoopState(**{k: meta[k] for k in fields if k in meta and k != "bad_streak"})
        steps = self._steps_per_epoch()
        if not self.state.schedule_steps:  # a checkpoint from before the horizon was saved: its run's plan
            self.state.schedule_steps = meta.get("config", {}).get("epochs", self.cfg.epochs) * steps
        if self.cfg.lr_schedule != "constant" and self.cfg.epochs * steps > self.state.schedule_steps:
            factor = lr_factor(self.cfg.lr_schedule, self.cfg.warmup_steps, self.state.schedule_steps,
                               self.state.schedule_steps)
            err_console.print(f"warning: the {self.cfg.lr_schedule} learning-rate schedule was planned over "
                              f"{self.state.schedule_steps:,} steps by the first run; the steps after it train at its "
                              f"final rate ({factor:.3g} x --lr). To decay over more epochs, start a new run with "
                              "more --epochs", markup=False, highlight=False, soft_wrap=True)
        # More --epochs or a larger --patience on resume can reopen a finished run.
        self.state.finished = self.state.since_best >= self.cfg.patience or self.state.epoch >= self.cfg.epochs

    # --- validation and model selection -------------------------------------------------------
    def _end_epoch(self, samples_per_second: float) -> None:
        cfg, s = self.cfg, self.state
        metrics = split_metrics(self.model, self.valid_split, self.built.objective, cfg.eval_batch_size, cfg.ndcg_k)
        self._count_clipped()
        target_auc = metrics[self.tasks[0]]["auc"]
        score = metrics[self.tasks[0]][cfg.select]
        w = self.window
        # The mean training loss per task over the epoch's accepted steps (since the resume point
        # when the epoch was resumed mid-way).
        train_loss = dict(zip(self.tasks, (w.loss_sum / max(w.good, 1)).tolist())) if w and w.good else None
        record = {"epoch": s.epoch + 1, "step": s.global_step, "samples_per_second": samples_per_second,
                  "skipped_steps": s.bad_total, "clipped_steps": s.clipped_total, "train_loss": train_loss,
                  "valid": metrics}
        s.history.append(record)
        s.epoch += 1
        s.step = 0
        improved = improves(cfg.select, score, s.best_score)
        if improved:
            s.best_score, s.best_epoch, s.since_best = score, s.epoch, 0
        else:
            s.since_best += 1
        if s.since_best >= cfg.patience or s.epoch >= cfg.epochs:
            s.finished = True
        if improved:
            self.save("best.pt")
        self.save("last.pt")
        self.run_dir.write_metrics(s.history)
        if self.events:
            self.events.epoch(record)
        if not self.quiet:
            aux = "  ".join(f"{t} {metrics[t]['auc']:.4f}" for t in self.tasks[1:])
            mark = " *" if improved else ""
            selected = "" if cfg.select == "auc" or score is None else f" ({cfg.select} {score:.4f})"
            counts = ", ".join(f"{what} steps: {n}" for what, n in (("skipped", s.bad_total),
                                                                    ("clipped", s.clipped_total)) if n)
            console.print(f"epoch {s.epoch}: {samples_per_second:,.0f} samples/s, valid AUC {self.tasks[0]} "
                          f"{target_auc:.4f}{selected}{mark}  {aux}" + (f"  ({counts})" if counts else ""))


def train(cfg: TrainConfig, resume: bool = False, force: bool = False, quiet: bool = False) -> dict:
    trainer = Trainer(cfg, resume=resume, force=force, quiet=quiet)
    try:
        return trainer.run()
    finally:
        if trainer.built.tables is not None:
            trainer.built.tables.close()  # the one-process group it made without torchrun
        if trainer.built.group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
