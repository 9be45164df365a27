"""``mtrec compare``: a grid of ordinary training runs (model x balancer x seed) and its summary.

Each cell is a run directory ``DIR/<model>-<balancer>-s<seed>/`` made by ``python -m mtrec train``
in a subprocess, so a cell is trained exactly as ``mtrec train`` trains, and can be evaluated,
resumed and plotted on its own. A cell is then evaluated once (``mtrec evaluate CELL --split test
--json``) into ``CELL/eval.json``; the summary is computed from the cells' files only, so
``mtrec compare --summarize DIR`` recomputes it at any time. Statistics: docs/compare.md.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mtrec.core.errors import UserError
from mtrec.core.files import atomic_write_text, read_json_object, read_jsonl

METRICS = ("auc", "gauc", "logloss")
LOWER_IS_BETTER = {"auc": False, "gauc": False, "logloss": True}
# Flags compare sets per cell (or that would break the grid), and what to use instead.
OWN_FLAGS = {"--model": "--models", "--balancer": "--balancers", "--seed": "--seeds", "--out": "--out",
             "--resume": "a re-run of the same compare command", "--force": "a new --out directory",
             "--quiet": "nothing (cells always run quietly)"}
ACTIVITY = {"train": "training", "resume": "resuming", "evaluate": "evaluating"}
SETTINGS_FILE = "compare.json"
LOG_DIR = "logs"


@dataclass(frozen=True)
class Cell:
    model: str
    balancer: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.model}-{self.balancer}-s{self.seed}"


@dataclass
class Grid:
    """What a compare directory holds: its data, train flags and the cells asked for so far."""

    data: str
    train_args: list[str]
    models: list[str]
    balancers: list[str]
    seeds: list[int]
    baseline: str

    @property
    def cells(self) -> list[Cell]:
        return [Cell(m, b, s) for m in self.models for b in self.balancers for s in self.seeds]


# --- the grid on disk ----------------------------------------------------------------------------
def make_grid(data: str, models: list[str], balancer_names: list[str], seeds: list[int], baseline: str | None,
              train_args: list[str], train_options: dict[str, bool]) -> Grid:
    """The requested grid, checked before anything runs: known models and balancers, no repeats,
    a baseline among the balancers (default: ew when compared, else the first), valid train flags."""
    from mtrec import balancers as registry
    from mtrec.models import names as model_names

    if not (Path(data) / "schema.json").exists():
        raise UserError(f"{data} is not a directory made by mtrec preprocess (no schema.json); "
                        "DATA comes first, then the flags")
    for what, items, known in (("model", models, model_names()), ("balancer", balancer_names, registry.names())):
        if not items:
            raise UserError(f"no {what}s to compare: pass --{what}s a,b")
        for item in items:
            if item not in known:
                raise UserError(f"unknown {what} {item!r}: choose from {', '.join(known)}")
        if len(set(items)) != len(items):
            raise UserError(f"--{what}s lists a {what} twice")
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError("--seeds must list distinct seeds, e.g. 1,2,3")
    baseline = baseline or ("ew" if "ew" in balancer_names else balancer_names[0])
    if baseline not in balancer_names:
        raise UserError(f"--baseline {baseline} must be one of the compared balancers ({', '.join(balancer_names)})")
    check_train_args(train_args, train_options)
    # Absolute, so that a re-run from another directory trains new cells on the same data.
    return Grid(str(Path(data).resolve()), list(train_args), list(models), list(balancer_names), list(seeds),
                baseline)


def load_grid(out: Path) -> Grid:
    path = Path(out) / SETTINGS_FILE
    if not path.exists():
        raise UserError(f"{out} is not a compare directory (no {SETTINGS_FILE}): pass the --out of mtrec compare")
    values = read_json_object(path, f"remove {SETTINGS_FILE} and re-run mtrec compare with the grid's flags")
    fields = {f.name: f.type for f in dataclasses.fields(Grid)}
    kinds = {"str": str, "list[str]": (list, str), "list[int]": (list, int)}
    for name, kind in fields.items():
        value, want = values.get(name), kinds[kind]
        ok = (isinstance(value, list) and all(isinstance(v, want[1]) and not isinstance(v, bool) for v in value)
              if isinstance(want, tuple) else isinstance(value, want))
        if not ok:
            raise UserError(f"{path} is corrupt: {name} should be {kind}, got {value!r}: remove {SETTINGS_FILE} "
                            "and re-run mtrec compare with the grid's flags")
    return Grid(**{name: values[name] for name in fields})


def merge_grid(out: Path, requested: Grid) -> Grid:
    """The requested grid, extended by the cells an earlier compare into ``out`` asked for. The data
    and the train flags must be the same, or the cells would not be comparable."""
    if not (Path(out) / SETTINGS_FILE).exists():
        return requested
    saved = load_grid(out)
    pairs = (("data", saved.data, requested.data), ("train flags", saved.train_args, requested.train_args))
    for what, old, new in pairs:
        if old != new:
            raise UserError(f"{out} holds cells trained with other {what} ({old!r}, now {new!r}): "
                            "use another --out, or repeat the earlier flags")

    def union(a, b):
        return list(a) + [x for x in b if x not in a]

    return Grid(requested.data, requested.train_args, union(saved.models, requested.models),
                union(saved.balancers, requested.balancers), union(saved.seeds, requested.seeds),
                requested.baseline)


def check_train_args(train_args: list[str], train_options: dict[str, bool]) -> None:
    """Every ``--flag`` passed through must be a flag of ``mtrec train`` that compare does not own,
    and every other token the value of the flag before it. ``train_options``: {flag: takes a value}."""
    expect_value = False
    for token in train_args:
        if expect_value:
            expect_value = False
            continue
        if not token.startswith("--"):
            raise UserError(f"unexpected argument {token!r}: DATA comes first, then the flags, each with its value")
        flag = token.split("=", 1)[0]
        if flag in OWN_FLAGS:
            raise UserError(f"{flag} is set by compare for each cell: use {OWN_FLAGS[flag]} instead")
        if flag not in train_options:
            raise UserError(f"unknown flag {flag}: compare passes only flags of mtrec train to the cells "
                            "(see mtrec train --help)")
        expect_value = train_options[flag] and "=" not in token
    if expect_value:
        raise UserError(f"{train_args[-1]} needs a value")


def threads_per_job(jobs: int, cores: int | None = None, limit: int | None = None) -> int:
    """Torch threads for each of ``jobs`` concurrent cells: the cores divided between them, at least
    one, and never more than an OMP_NUM_THREADS the user already set (``limit``)."""
    if not cores:
        affinity = getattr(os, "sched_getaffinity", None)  # Linux: the CPUs this process may use
        cores = len(affinity(0)) if affinity else os.cpu_count() or 1
    threads = max(1, cores // jobs)
    return min(threads, limit) if limit else threads


def cell_state(cell_dir: Path) -> str:
    """``evaluated`` (eval.json), ``trained`` (last.pt says finished), ``interrupted`` (last.pt, not
    finished), ``partial`` (a directory without last.pt: killed before its first checkpoint) or
    ``new``."""
    from mtrec.engine import checkpoint

    if (cell_dir / "eval.json").exists():
        return "evaluated"
    if (cell_dir / "last.pt").exists():
        try:
            _, meta = checkpoint.load(cell_dir / "last.pt")
        except UserError:
            return "partial"  # a truncated last.pt cannot be continued: train the cell again
        return "trained" if meta.get("finished") else "interrupted"
    return "partial" if cell_dir.exists() else "new"


# --- running the cells ---------------------------------------------------------------------------
class CompareInterrupted(Exception):
    """Ctrl-C: running cells saved their checkpoints; the same command continues them."""


@dataclass
class _Job:
    cell: Cell
    phase: str  # train, resume or evaluate
    stdout: Path | None


def _mtrec(*args) -> list[str]:
    return [sys.executable, "-m", "mtrec", *map(str, args)]


def _command(cell: Cell, phase: str, grid: Grid, out: Path, state: str) -> list[str]:
    cell_dir = out / cell.name
    if phase == "resume":
        return _mtrec("train", "--resume", cell_dir, "--quiet")
    if phase == "evaluate":
        device = _flag_value(grid.train_args, "--device")
        return _mtrec("evaluate", cell_dir, "--split", "test", "--json", *(["--device", device] if device else []))
    force = ["--force"] if state == "partial" else []  # only ever a directory without a checkpoint
    return _mtrec("train", grid.data, "--model", cell.model, "--balancer", cell.balancer, "--seed", cell.seed,
                  "--out", cell_dir, *grid.train_args, *force, "--quiet")


def _flag_value(args: list[str], flag: str) -> str | None:
    for i, token in enumerate(args):
        if token == flag and i + 1 < len(args):
            return args[i + 1]
        if token.startswith(flag + "="):
            return token.split("=", 1)[1]
    return None


def _failure_path(out: Path, cell: Cell) -> Path:
    return out / LOG_DIR / f"{cell.name}.failed.json"


def _last_line(path: Path) -> str:
    lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "(no output on stderr)"


def job_env(jobs: int) -> dict[str, str]:
    """The environment of ``jobs`` mtrec subprocesses run at once: the cores (or the caller's
    OMP_NUM_THREADS) divided between them."""
    env = dict(os.environ)
    limit = int(env["OMP_NUM_THREADS"]) if env.get("OMP_NUM_THREADS", "").isdigit() else None
    threads = str(threads_per_job(jobs, limit=limit))
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    return env


def run_jobs(queue: list, jobs: int, start, finish, say, what: str) -> bool:
    """Run ``queue``'s items as subprocesses, at most ``jobs`` at once (compare's cells, a race's
    runs): ``start(item) -> (process, handle)`` launches one, ``finish(handle, exit_code, stopping)``
    handles its end and returns follow-up items, which run first. Ctrl-C sends SIGINT to every
    running process (each saves its checkpoint) and waits for them. Returns whether it was
    interrupted."""
    queue, running, stopping = list(queue), [], False
    while queue or running:
        try:
            while queue and len(running) < jobs and not stopping:
                running.append(start(queue.pop(0)))
            for entry in list(running):
                code = entry[0].poll()
                if code is not None:
                    running.remove(entry)
                    queue[:0] = finish(entry[1], code, stopping)
            if stopping and not running:
                break
            time.sleep(0.05)
        except KeyboardInterrupt:
            if not stopping:
                say(f"interrupted: waiting for the running {what} to save their checkpoints")
            stopping = True
            queue.clear()
            for proc, _ in running:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGINT)
    return stopping


def run_grid(grid: Grid, out: Path, jobs: int = 1, say=print) -> dict[str, int]:
    """Train and evaluate every cell of ``grid`` that is not evaluated yet, ``jobs`` subprocesses at
    a time. Returns how many cells were {evaluated already, done now, failed}. A failed cell is
    recorded in ``logs/<cell>.failed.json`` (and retried by the next run); the others go on."""
    out = Path(out)
    (out / LOG_DIR).mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / SETTINGS_FILE, json.dumps(grid.__dict__, indent=2))
    env = job_env(jobs)

    todo: list[tuple[Cell, str, str, bool]] = []  # (cell, first phase, state, announce it)
    counts = {"skipped": 0, "done": 0, "failed": 0}
    for cell in grid.cells:
        state = cell_state(out / cell.name)
        if state == "evaluated":
            counts["skipped"] += 1
            continue
        todo.append((cell, {"trained": "evaluate", "interrupted": "resume"}.get(state, "train"), state, True))
    if counts["skipped"]:
        say(f"{counts['skipped']} of {len(grid.cells)} cells already evaluated: skipped")

    total, finished = len(todo), 0
    began: dict[Cell, float] = {}

    def start(item: tuple[Cell, str, str, bool]) -> tuple[subprocess.Popen, _Job]:
        cell, phase, state, announce = item
        if announce:
            say(f"{cell.name}: {ACTIVITY[phase]}")
        _failure_path(out, cell).unlink(missing_ok=True)
        stderr = open(out / LOG_DIR / f"{cell.name}.{phase}.log", "w")
        stdout_path = out / LOG_DIR / f".{cell.name}.eval.json.tmp" if phase == "evaluate" else None
        stdout = open(stdout_path, "w") if stdout_path else subprocess.DEVNULL
        try:
            proc = subprocess.Popen(_command(cell, phase, grid, out, state), env=env, stdout=stdout, stderr=stderr)
        finally:
            stderr.close()
            if stdout_path:
                stdout.close()
        began.setdefault(cell, time.perf_counter())
        return proc, _Job(cell, phase, stdout_path)

    def finish(job: _Job, code: int, stopping: bool) -> list:
        nonlocal finished
        log = out / LOG_DIR / f"{job.cell.name}.{job.phase}.log"
        if code == 0 and job.phase != "evaluate":
            # trained: evaluate it next (the next run does when Ctrl-C came first)
            return [] if stopping else [(job.cell, "evaluate", "trained", False)]
        if code == 0:
            try:
                result = json.loads(job.stdout.read_text())
            except json.JSONDecodeError:
                code, error = 1, "mtrec evaluate printed no JSON"
            else:
                atomic_write_text(out / job.cell.name / "eval.json", json.dumps(result, indent=2))
                job.stdout.unlink()
                finished += 1
                counts["done"] += 1
                say(f"[{finished}/{total}] {job.cell.name}: done ({time.perf_counter() - began[job.cell]:.0f} s)")
                return []
        else:
            error = _last_line(log)
        if job.stdout:
            job.stdout.unlink(missing_ok=True)
        if stopping:
            return []  # interrupted by Ctrl-C, not failed: the next run continues it
        finished += 1
        counts["failed"] += 1
        record = {"phase": job.phase, "exit_code": code, "error": error, "log": str(log)}
        atomic_write_text(_failure_path(out, job.cell), json.dumps(record, indent=2))
        say(f"[{finished}/{total}] {job.cell.name}: FAILED in {job.phase} (exit {code}): {error}")
        return []

    if run_jobs(todo, jobs, start, finish, say, "cells"):
        raise CompareInterrupted()
    return counts


# --- statistics ----------------------------------------------------------------------------------
# t_{0.975, df} for df = 1..30 (two-sided 95%), used when scipy is not installed.
T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788,
        2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639,
        2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423)


def t_quantile(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (scipy when present; else
    the table for df <= 30 and the Cornish-Fisher expansion in 1/df beyond)."""
    try:
        from scipy import stats
    except ImportError:
        return t_quantile_fallback(df)
    return float(stats.t.ppf(0.975, df))


def t_quantile_fallback(df: int) -> float:
    if df <= len(T975):
        return T975[df - 1]
    z = 1.959963984540054
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def mean_std(values) -> dict:
    """Mean and sample standard deviation (ddof 1; None for one value) of the finite values."""
    x = np.asarray([v for v in values if _finite(v)], dtype=np.float64)
    if len(x) == 0:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(x.mean()), "std": float(x.std(ddof=1)) if len(x) > 1 else None, "n": len(x)}


def paired_interval(diffs) -> dict:
    """Mean paired difference with its 95% t interval: mean ± t_{0.975, n-1} · sd / sqrt(n)."""
    d = np.asarray(diffs, dtype=np.float64)
    if len(d) == 0:
        return {"mean": None, "lo": None, "hi": None, "n": 0, "excludes_zero": False}
    mean = float(d.mean())
    if len(d) < 2:
        return {"mean": mean, "lo": None, "hi": None, "n": 1, "excludes_zero": False}
    half = t_quantile(len(d) - 1) * float(d.std(ddof=1)) / math.sqrt(len(d))
    lo, hi = mean - half, mean + half
    return {"mean": mean, "lo": lo, "hi": hi, "n": len(d), "excludes_zero": bool(lo > 0 or hi < 0)}


def _finite(v) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v))


# --- the summary ---------------------------------------------------------------------------------
def read_cell(cell_dir: Path) -> dict | None:
    """What the summary needs from one evaluated cell: test metrics, mean samples/s over epochs and
    skipped steps from metrics.jsonl. None when the cell is not evaluated."""
    path = cell_dir / "eval.json"
    if not path.exists():
        return None
    result = read_json_object(path, "remove it and re-run the compare to evaluate the cell again")
    log = cell_dir / "metrics.jsonl"
    records = read_jsonl(log) if log.exists() else []
    speeds = [r["samples_per_second"] for r in records]
    return {"tasks": result["tasks"], "target": result["target"], "metrics": result["metrics"],
            "samples_per_second": float(np.mean(speeds)) if speeds else None,
            "skipped_steps": int(records[-1].get("skipped_steps", 0)) if records else 0}


def summarize(out: Path, baseline: str | None = None) -> dict:
    """The summary of a compare directory, from its cells' eval.json and metrics.jsonl alone."""
    out = Path(out)
    grid = load_grid(out)
    baseline = baseline or grid.baseline
    if baseline not in grid.balancers:
        raise UserError(f"--baseline {baseline} is not among the balancers of {out}: {', '.join(grid.balancers)}")
    cells, statuses = {}, []
    for cell in grid.cells:
        data = read_cell(out / cell.name)
        failure = _failure_path(out, cell)
        status = {"cell": cell.name, "model": cell.model, "balancer": cell.balancer, "seed": cell.seed,
                  "status": "done" if data else ("failed" if failure.exists() else "not run")}
        if status["status"] == "failed":
            status.update(json.loads(failure.read_text()))
        statuses.append(status)
        if data:
            cells[cell] = data
    tasks = next(iter(cells.values()))["tasks"] if cells else []
    groups = []
    for model in grid.models:
        base = {c.seed: d for c, d in cells.items() if c.model == model and c.balancer == baseline}
        for balancer in grid.balancers:
            runs = {c.seed: d for c, d in cells.items() if c.model == model and c.balancer == balancer}
            groups.append(_group(model, balancer, runs, base, tasks, balancer == baseline, statuses))
    target = tasks[0] if tasks else None
    return {"dir": str(out), "data": grid.data, "train_args": grid.train_args, "baseline": baseline,
            "target": target, "tasks": tasks, "groups": groups, "cells": statuses}


def _group(model, balancer, runs: dict, base: dict, tasks, is_baseline, statuses) -> dict:
    paired = sorted(set(runs) & set(base))
    per_task = {}
    for task in tasks:
        per_task[task] = {}
        for metric in METRICS:
            values = {seed: runs[seed]["metrics"][task].get(metric) for seed in sorted(runs)}
            stats = {**mean_std(values.values()), "per_seed": values}
            if not is_baseline:
                diffs = [values[s] - base[s]["metrics"][task].get(metric) for s in paired
                         if _finite(values[s]) and _finite(base[s]["metrics"][task].get(metric))]
                stats["diff"] = paired_interval(diffs)
            per_task[task][metric] = stats
    speeds = mean_std(runs[s]["samples_per_second"] for s in sorted(runs))
    failed = [s["cell"] for s in statuses if s["model"] == model and s["balancer"] == balancer
              and s["status"] == "failed"]
    return {"model": model, "balancer": balancer, "seeds": sorted(runs), "paired_seeds": paired,
            "failed": failed, "tasks": per_task, "dm_percent": delta_m(runs, base, paired, tasks),
            "samples_per_second": speeds["mean"], "speed_ratio": speed_ratio(runs, base, paired),
            "skipped_steps": sum(runs[s]["skipped_steps"] for s in runs)}


def delta_m(runs: dict, base: dict, seeds: list[int], tasks: list[str], metric: str = "auc") -> float | None:
    """LibMTL's Δm% over tasks: mean_t (-1)^{lower is better} (M_b,t - M_base,t) / M_base,t · 100,
    with M the mean over the paired seeds of the test ``metric``; tasks without it are left out."""
    sign = -1.0 if LOWER_IS_BETTER[metric] else 1.0
    terms = []
    for task in tasks:
        pairs = [(runs[s]["metrics"][task].get(metric), base[s]["metrics"][task].get(metric)) for s in seeds]
        pairs = [(b, a) for b, a in pairs if _finite(b) and _finite(a)]
        if pairs:
            mb, ma = np.mean([p[0] for p in pairs]), np.mean([p[1] for p in pairs])
            terms.append(sign * (mb - ma) / ma * 100.0)
    return float(np.mean(terms)) if terms else None


def speed_ratio(runs: dict, base: dict, seeds: list[int]) -> float | None:
    """Mean training samples/s over the paired seeds, divided by the baseline's over the same seeds."""
    mine = [runs[s]["samples_per_second"] for s in seeds if _finite(runs[s]["samples_per_second"])]
    theirs = [base[s]["samples_per_second"] for s in seeds if _finite(base[s]["samples_per_second"])]
    if not mine or not theirs:
        return None
    return float(np.mean(mine) / np.mean(theirs))


# --- the summary as text -------------------------------------------------------------------------
def fmt(value, digits: int = 4, sign: bool = False) -> str:
    if not _finite(value):
        return "-"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def fmt_mean_std(stats: dict) -> str:
    if stats["mean"] is None:
        return "-"
    return fmt(stats["mean"]) + (f" ± {fmt(stats['std'])}" if stats["std"] is not None else "")


def fmt_diff(diff: dict | None) -> str:
    if not diff or diff["mean"] is None:
        return "-"
    if diff["lo"] is None:
        return fmt(diff["mean"], sign=True)
    mark = " *" if diff["excludes_zero"] else ""
    return f"{fmt(diff['mean'], sign=True)} [{fmt(diff['lo'], sign=True)}, {fmt(diff['hi'], sign=True)}]{mark}"


METRIC_NAMES = {"auc": "AUC", "gauc": "GAUC", "logloss": "LogLoss"}


def metric_rows(summary: dict, metrics=METRICS) -> tuple[list[str], list[list[str]]]:
    """The per task table: model, balancer, task, seeds, then per metric mean ± std and Δ [95% CI]."""
    header = ["model", "balancer", "task", "seeds"]
    for metric in metrics:
        header += [METRIC_NAMES[metric], f"Δ{METRIC_NAMES[metric]} [95% CI]"]
    rows = []
    for group in summary["groups"]:
        for task in summary["tasks"]:
            cells = [group["model"], group["balancer"], task, str(len(group["seeds"]))]
            for metric in metrics:
                stats = group["tasks"][task][metric]
                cells += [fmt_mean_std(stats), fmt_diff(stats.get("diff"))]
            rows.append(cells)
    return header, rows


def group_rows(summary: dict) -> tuple[list[str], list[list[str]]]:
    header = ["model", "balancer", "seeds done", "Δm% (AUC)", "samples/s", "× baseline", "skipped steps", "failed"]
    rows = []
    for g in summary["groups"]:
        rows.append([g["model"], g["balancer"], str(len(g["seeds"])), fmt(g["dm_percent"], 2, sign=True),
                     fmt(g["samples_per_second"], 0), fmt(g["speed_ratio"], 2), str(g["skipped_steps"]),
                     ", ".join(g["failed"]) or "-"])
    return header, rows


def failure_lines(summary: dict) -> list[str]:
    return [f"{c['cell']}: {c['phase']} exited {c['exit_code']}: {c['error']}"
            for c in summary["cells"] if c["status"] == "failed"]


def to_markdown(summary: dict) -> str:
    def table(header, rows):
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])

    parts = [f"# mtrec compare: {summary['dir']}", "",
             f"Data `{summary['data']}`, train flags `{' '.join(summary['train_args']) or '(defaults)'}`, "
             f"target `{summary['target']}`, baseline `{summary['baseline']}`. Test split; mean ± std over seeds; "
             "Δ: paired difference to the baseline (same model and seed) with its 95% t interval, "
             "* when the interval excludes 0.", "", table(*metric_rows(summary)), "", table(*group_rows(summary))]
    failures = failure_lines(summary)
    if failures:
        parts += ["", "Failed cells:", ""] + [f"- {line}" for line in failures]
    return "\n".join(parts) + "\n"


def to_csv(summary: dict) -> str:
    """One row per model × balancer × task; the per model × balancer columns repeat on its rows."""
    header = ["model", "balancer", "task", "seeds"]
    for metric in METRICS:
        header += [f"{metric}_mean", f"{metric}_std", f"{metric}_diff", f"{metric}_diff_lo", f"{metric}_diff_hi",
                   f"{metric}_diff_excludes_zero"]
    header += ["dm_percent_auc", "samples_per_second", "speed_ratio", "skipped_steps", "failed_cells"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for g in summary["groups"]:
        for task in summary["tasks"]:
            row = [g["model"], g["balancer"], task, len(g["seeds"])]
            for metric in METRICS:
                stats = g["tasks"][task][metric]
                diff = stats.get("diff") or {}
                row += [stats["mean"], stats["std"], diff.get("mean"), diff.get("lo"), diff.get("hi"),
                        diff.get("excludes_zero")]
            row += [g["dm_percent"], g["samples_per_second"], g["speed_ratio"], g["skipped_steps"],
                    " ".join(g["failed"])]
            writer.writerow(["" if v is None else v for v in row])
    return buffer.getvalue()


def write_summary(summary: dict, out: Path) -> None:
    atomic_write_text(Path(out) / "summary.csv", to_csv(summary))
    atomic_write_text(Path(out) / "summary.md", to_markdown(summary))
