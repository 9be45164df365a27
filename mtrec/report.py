"""Everything the user sees: one rich Console, the tables, and the training progress line."""

from __future__ import annotations

import math
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

console = Console()
err_console = Console(stderr=True)

METRIC_COLUMNS = ("auc", "gauc", "logloss", "ndcg", "positive_rate")


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def metrics_table(per_task: dict[str, dict], title: str, ndcg_k: int = 10) -> Table:
    """per_task: ordered {task: {auc, gauc, logloss, ndcg, positive_rate, n}}, target first, plus mean."""
    table = Table(title=title)
    table.add_column("task")
    headers = {"ndcg": f"NDCG@{ndcg_k}", "positive_rate": "pos. rate", "auc": "AUC", "gauc": "GAUC",
               "logloss": "LogLoss"}
    for key in METRIC_COLUMNS:
        table.add_column(headers[key], justify="right")
    table.add_column("rows", justify="right")
    conditional = False
    for task, row in per_task.items():
        name = task
        if row.get("condition"):  # scored only on the rows where its condition holds
            name, conditional = f"{task} | {row['condition']}=1", True
        table.add_row(name, *(_fmt(row.get(k)) for k in METRIC_COLUMNS), _fmt(row.get("n")),
                      style="bold" if task == "mean" else None)
    if conditional:
        table.caption = "a | b=1: task a is conditional, scored over the rows where b = 1 (rows: how many)"
    return table


def simple_table(title: str, columns: list[str], rows: list[list]) -> Table:
    table = Table(title=title)
    for c in columns:
        table.add_column(c)
    for row in rows:
        table.add_row(*(_fmt(v) for v in row))
    return table


class TrainProgress:
    """A progress bar per epoch with samples/s, running loss per task, skipped and clipped steps."""

    def __init__(self, tasks: list[str], quiet: bool = False):
        self.tasks = tasks
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("{task.fields[info]}"),
                                 console=console, disable=quiet or not console.is_terminal, transient=True)
        self.bar = None
        self.started = time.perf_counter()
        self.samples = 0

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        self.progress.__exit__(*exc)

    def epoch(self, epoch: int, steps: int, done: int = 0) -> None:
        self.bar = self.progress.add_task(f"epoch {epoch + 1}", total=steps, completed=done, info="")
        self.started, self.samples = time.perf_counter(), 0

    def update(self, steps: int, samples: int, mean_losses: list[float], bad_steps: int, clipped_steps: int = 0) -> None:
        self.samples += samples
        rate = self.samples / max(time.perf_counter() - self.started, 1e-9)
        losses = " ".join(f"{t}={v:.4f}" for t, v in zip(self.tasks, mean_losses))
        info = (f"{rate:,.0f} samples/s  {losses}" + (f"  skipped={bad_steps}" if bad_steps else "")
                + (f"  clipped={clipped_steps}" if clipped_steps else ""))
        self.progress.update(self.bar, advance=steps, info=info)

    @property
    def samples_per_second(self) -> float:
        return self.samples / max(time.perf_counter() - self.started, 1e-9)


def render_preprocess(summary) -> None:
    """The resolved schema, rows and positive rate per split (the summary's own tables), and the
    warnings of a preprocess run."""
    console.print(simple_table("features", *summary.feature_table()))
    console.print(simple_table("splits", *summary.split_table()))
    for line in summary.warnings:
        err_console.print(f"warning: {line}", markup=False, highlight=False, soft_wrap=True)
