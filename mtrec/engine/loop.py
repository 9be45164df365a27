"""The training loop: data on the device, steps, validation, early stopping, checkpoints, resume.

Run directory: ``config.json`` (resolved config), ``schema.json`` (copy of the data's schema),
``metrics.jsonl`` (one line per epoch), ``diagnostics.jsonl`` (per-task gradient norms and
cosines per shared tensor, every ``diagnostics_every`` steps), ``best.pt`` and ``last.pt``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mtrec.core.config import TrainConfig
from mtrec.core.console import console
from mtrec.core.errors import TrainingInterrupted, UserError
from mtrec.data.schema import Schema
from mtrec.data.stream import ParquetSplit, stream_batches
from mtrec.data.tensors import batches, epoch_permutation, host_batches, load_split
from mtrec.engine import checkpoint, distributed
from mtrec.engine.build import (
    autocast_dtype,
    build_for,
    data_placement,
    feature_names,
    make_optimizer,
    objective_for,
    resolve_device,
    resolve_tasks,
)
from mtrec.engine.events import EventLog
from mtrec.engine.progress import TrainProgress
from mtrec.engine.schedule import improves, lr_factor, set_lr
from mtrec.engine.step import SCOPES, Stepper
from mtrec.metrics.split import split_metrics
from mtrec.models import SingleTask


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
    """Wiring, then the loop: the run directory, data, model, balancer, optimizer and stepper are
    built and checked once, before the first step."""

    def __init__(self, cfg: TrainConfig, resume: bool = False, force: bool = False, quiet: bool = False):
        cfg = self.cfg = resolved_paths(cfg)
        self.run_dir = Path(cfg.out)
        if resume and not (self.run_dir / "last.pt").exists():
            raise UserError(f"nothing to resume in {self.run_dir}: no last.pt (start a new run without --resume)")
        if not resume:
            check_run_dir(self.run_dir, Path(cfg.data), force)
        self.schema = Schema.load(cfg.data)
        self.tasks = resolve_tasks(self.schema, cfg.target, cfg.tasks)
        check_task_settings(cfg, self.schema, self.tasks)
        self.objective = objective_for(cfg, self.tasks)
        self.device, self.group = run_device(cfg)
        self.main = self.group is None or self.group.main
        self.quiet = quiet or not self.main
        torch.manual_seed(cfg.seed)
        self.model, self.balancer = build_for(cfg, self.schema, self.tasks)
        self.scope = balance_scope(cfg, self.model, self.balancer, self.group)
        self.model.to(self.device)
        self.balancer.to(self.device)
        self._load_data()
        self.optimizer = make_optimizer(self.model, self.balancer, cfg, self.device)
        self.stepper = Stepper(self.model, self.balancer, self.optimizer, self.scope, self.device,
                               autocast_dtype(cfg, self.device), self.objective, clip_grad=cfg.clip_grad,
                               groups=cfg.balance_groups or None, group=self.group)
        self.state = LoopState()
        self.stop_requested = False
        self.window: Window | None = None
        # TensorBoard events of the same scalars as metrics.jsonl / diagnostics.jsonl (rank 0).
        self.events = EventLog(cfg.tensorboard, self.tasks) if cfg.tensorboard and self.main else None
        # The resolved settings (task order, the balancer's scope and groups) are the config: one
        # source of truth in config.json and in every checkpoint, for evaluate and --resume.
        self.cfg = dataclasses.replace(cfg, tasks=self.tasks, scope=self.scope, balance_groups=self.stepper.groups)
        self._open_run_dir(resume)

    def _load_data(self) -> None:
        """Train and valid splits where ``data_placement`` puts them: on the device, in host
        memory (batches copied one ahead), or streamed from disk."""
        cfg = self.cfg
        categorical, numeric = feature_names(self.schema)
        on_disk = [ParquetSplit(Path(cfg.data) / f"{name}.parquet", categorical, numeric, self.tasks)
                   for name in ("train", "valid")]
        self.placement = data_placement(cfg, on_disk[0], self.device)
        self.on_device = self.placement == "device"
        if self.placement == "stream":
            self.train_split, self.valid_split = on_disk
            return
        self.train_split, self.valid_split = (load_split(cfg.data, name, categorical, numeric, self.tasks)
                                              for name in ("train", "valid"))
        if self.on_device:
            self.train_split = self.train_split.to(self.device)
            self.valid_split = self.valid_split.to(self.device)

    def _open_run_dir(self, resume: bool) -> None:
        if self.group:
            self.group.barrier()  # every rank has checked the run directory before rank 0 touches it
        if resume:
            self._restore(self.run_dir / "last.pt")
        elif self.main:
            if self.run_dir.exists():
                shutil.rmtree(self.run_dir)
            self.run_dir.mkdir(parents=True)
            checkpoint.atomic_write_text(self.run_dir / "schema.json", json.dumps(self.schema.to_dict(), indent=2))
        if self.main:  # on resume too: --epochs, --patience ... may have changed
            config = {**self.cfg.to_dict(), "mtrec_version": 1}
            checkpoint.atomic_write_text(self.run_dir / "config.json", json.dumps(config, indent=2))

    # --- checkpoints ------------------------------------------------------------------------
    def _state(self) -> dict:
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "balancer": self.balancer.state_dict(), "rng_cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def _meta(self) -> dict:
        s = self.state
        return {"format": "mtrec-checkpoint", "version": 1, "tasks": self.tasks, "epoch": s.epoch,
                "step": s.step, "global_step": s.global_step, "best_score": s.best_score, "best_epoch": s.best_epoch,
                "since_best": s.since_best, "bad_total": s.bad_total, "clipped_total": s.clipped_total,
                "finished": s.finished,
                "history": s.history, "config": self.cfg.to_dict(), "scope": self.scope}

    def save(self, name: str) -> None:
        self._count_clipped()
        if not self.main:
            return
        if not _all_finite(self.model.parameters()):
            raise UserError(f"the model's parameters are no longer finite: {name} was not overwritten, the last good "
                            f"checkpoint is {self.run_dir / 'last.pt'} (lower --lr or set --clip-grad)")
        checkpoint.save(self.run_dir / name, self._state(), self._meta())

    def _count_clipped(self) -> None:
        """Move the stepper's device-side count of clipped steps into the loop state (a host sync)."""
        if self.cfg.clip_grad:
            self.state.clipped_total += int(self.stepper.clipped.item())
            self.stepper.clipped.zero_()

    def _restore(self, path: Path) -> None:
        state, meta = checkpoint.load(path, map_location=self.device)
        if meta.get("tasks") != self.tasks:
            raise UserError(f"cannot resume: the run trained tasks {meta.get('tasks')}, this config gives {self.tasks}")
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.balancer.load_state_dict(state["balancer"])
        except (RuntimeError, KeyError, ValueError) as err:
            raise UserError(f"cannot resume from {path}: it does not match this model/balancer ({err})") from err
        torch.set_rng_state(state["rng_cpu"].cpu())
        if "rng_cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng_cuda"].cpu(), self.device)
        fields = LoopState.__dataclass_fields__
        self.state = LoopState(**{k: meta[k] for k in fields if k in meta and k not in ("bad_streak",)})
        # More --epochs or a larger --patience on resume can reopen a finished run.
        self.state.finished = self.state.since_best >= self.cfg.patience or self.state.epoch >= self.cfg.epochs

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
                "skipped_steps": s.bad_total, "clipped_steps": s.clipped_total, "run_dir": str(self.run_dir)}

    def _on_sigint(self, signum, frame) -> None:
        self.stop_requested = True

    def _epoch(self, progress: TrainProgress) -> None:
        cfg, s = self.cfg, self.state
        steps = math.ceil(len(self.train_split) / cfg.batch_size)
        progress.epoch(s.epoch, steps, s.step)
        self.window = Window(torch.zeros(len(self.tasks), device=self.device))
        for codes, numeric, labels in self._batches():
            set_lr(self.optimizer, lr_factor(cfg.lr_schedule, cfg.warmup_steps, s.global_step, cfg.epochs * steps))
            diagnose = self.main and cfg.diagnostics_every > 0 and s.global_step % cfg.diagnostics_every == 0
            losses = self.stepper.step(codes, numeric, labels, self._share(labels), diagnose)
            s.step, s.global_step = s.step + 1, s.global_step + 1
            self._count(losses, labels.shape[0])
            if self.stepper.diagnostics is not None:
                self._log_diagnostics(self.run_dir / "diagnostics.jsonl")
            if self.window.steps >= 20 or s.step == steps:
                self._report(progress)  # the loop's host sync, every 20 steps
            if self.stop_requested and (self.group is None or self.window.steps == 0):
                self.save("last.pt")
                raise TrainingInterrupted(self.run_dir)
            if cfg.checkpoint_every and s.global_step % cfg.checkpoint_every == 0 and s.step < steps:
                self.save("last.pt")
        self._end_epoch(progress.samples_per_second)

    def _batches(self):
        """The epoch's batches from its current step on, for the split's placement."""
        cfg, s = self.cfg, self.state
        shard = (self.group.rank, self.group.world) if self.group else None
        if self.placement == "stream":
            return stream_batches(self.train_split, cfg.batch_size, cfg.seed, s.epoch, cfg.shuffle_buffer,
                                  self.device, start=s.step, shard=shard)
        perm = epoch_permutation(len(self.train_split), cfg.seed, s.epoch, self.device if self.on_device else "cpu")
        feed = batches if self.on_device else functools.partial(host_batches, device=self.device)
        return feed(self.train_split, perm, cfg.batch_size, start=s.step, shard=shard)

    def _share(self, labels) -> float:
        """This rank's fraction of the global batch (the last batch of an epoch may be short)."""
        if not self.group:
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
                            f"stopped, the last good checkpoint is {self.run_dir / 'last.pt'} (check the "
                            "data for NaN/inf features, or lower --lr or set --clip-grad)")

    def _report(self, progress: TrainProgress) -> None:
        w = self.window
        means = (w.loss_sum / max(w.good, 1)).tolist()
        self._count_clipped()
        progress.update(w.steps, w.samples, means, self.state.bad_total, self.state.clipped_total)
        w.steps, w.samples = 0, 0
        if self.group:  # ranks agree on Ctrl-C here, so none waits in an all-reduce alone
            flag = torch.tensor([float(self.stop_requested)], device=self.device)
            self.group.sum_([flag])
            self.stop_requested = bool(flag.item() > 0)

    def _log_diagnostics(self, path: Path) -> None:
        d = self.stepper.diagnostics
        self.stepper.diagnostics = None
        record = {"step": self.state.global_step, "scope": self.scope,
                  "norms": d["norms"].tolist(), "cosines": d["cosines"].tolist()}
        if "weights" in d:  # the balancer's task weights on this step, where it has them
            record["weights"] = d["weights"].tolist()
        with open(path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.events:
            self.events.diagnostics(record)

    def _end_epoch(self, samples_per_second: float) -> None:
        cfg, s = self.cfg, self.state
        metrics = split_metrics(self.model, self.valid_split, self.objective, cfg.eval_batch_size, cfg.ndcg_k)
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
        lines = "".join(json.dumps(r) + "\n" for r in s.history)
        if self.main:
            checkpoint.atomic_write_text(self.run_dir / "metrics.jsonl", lines)
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


def _all_finite(params) -> bool:
    """Whether every parameter is finite, from each one's min and max (NaN propagates through
    both): ``isfinite(p).all()`` built an abs and masks of the whole table (+400 MiB for a 60M-value
    table, the run's peak)."""
    bounds = [torch.stack(torch.aminmax(p.detach())) for p in params if p.numel()]
    return bool(torch.isfinite(torch.cat(bounds)).all()) if bounds else True


def resolved_paths(cfg: TrainConfig) -> TrainConfig:
    """The validated config with absolute paths: evaluate, predict and --resume must not depend on
    the working directory."""
    if not cfg.out:
        raise UserError("--out is required: the run directory to create")
    return dataclasses.replace(cfg.validate(), data=str(Path(cfg.data).resolve()), out=str(Path(cfg.out).resolve()),
                               tensorboard=str(Path(cfg.tensorboard).resolve()) if cfg.tensorboard else "")


def check_task_settings(cfg: TrainConfig, schema: Schema, tasks: list[str]) -> None:
    if cfg.select == "gauc" and not schema.user:
        raise UserError("--select gauc needs a user column: preprocess with --user, or select auc or logloss")
    if schema.positive_rate.get(tasks[0], 1.0) <= 0.0:
        raise UserError(f"the target task {tasks[0]!r} has no positive in the train split: "
                        "choose another --target or split the data differently")


def run_device(cfg: TrainConfig) -> tuple[torch.device, distributed.Group | None]:
    """The training device and, under torchrun, the process group (one GPU per local rank)."""
    device = resolve_device(cfg.device)
    group = distributed.from_env(device.type)
    if group and device.type == "cuda":
        device = torch.device("cuda", distributed.local_rank())
        torch.cuda.set_device(device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device, group


def balance_scope(cfg: TrainConfig, model, balancer, group) -> str:
    """The scope the balancer runs in (its default unless given), checked against the model and
    the number of processes."""
    if cfg.scope and cfg.scope not in SCOPES:
        raise UserError(f"--balance-scope must be one of {', '.join(SCOPES)}, not {cfg.scope!r}")
    if isinstance(model, SingleTask) and balancer.kind == "grad":
        raise UserError("--model single shares no parameters, so there is nothing to balance: "
                        "use --balancer ew (or a loss-weighting balancer)")
    scope = cfg.scope or balancer.default_scope
    if balancer.kind == "grad" and scope not in balancer.scopes:
        raise UserError(f"{cfg.balancer} cannot run with --balance-scope {scope}: use {' or '.join(balancer.scopes)}")
    if group and balancer.kind == "grad" and scope != "shared":
        # Touched rows and representation gradients are per-rank rows; balancing them across
        # ranks would need a gather of variable-size tensors (not built yet).
        default = "" if cfg.scope else f", {cfg.balancer}'s default"
        raise UserError(f"with several processes, gradient balancers run in --balance-scope shared only "
                        f"(not {scope}{default}): pass --balance-scope shared")
    return scope


def check_run_dir(out: Path, data: Path, force: bool) -> None:
    """A new run may only replace (with --force) what mtrec train made: never the data, a parent of
    it, a file, or a non-empty folder without a config.json."""
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"--out {out} is a file, not a run directory: choose another --out")
    if not any(out.iterdir()):
        return
    if not force:
        raise UserError(f"run directory {out} exists: pass --force to overwrite or --resume to continue")
    data = data.resolve()
    if out.resolve() == data or out.resolve() in data.parents:
        raise UserError(f"--out {out} is the data directory or holds it: --force would delete the data; "
                        "choose another --out")
    if not (out / "config.json").exists():
        raise UserError(f"--out {out} is not an mtrec run directory (no config.json) and not empty: --force only "
                        "replaces runs of mtrec train; choose another --out")


def train(cfg: TrainConfig, resume: bool = False, force: bool = False, quiet: bool = False) -> dict:
    trainer = Trainer(cfg, resume=resume, force=force, quiet=quiet)
    try:
        return trainer.run()
    finally:
        if trainer.group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
