"""The tables the commands print: metrics per task, simple listings, the preprocess summary."""

from __future__ import annotations

import math

from rich.table import Table

from mtrec.core.console import console, err_console

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


def render_preprocess(summary) -> None:
    """The resolved schema, rows and positive rate per split (the summary's own tables), and the
    warnings of a preprocess run."""
    console.print(simple_table("features", *summary.feature_table()))
    console.print(simple_table("splits", *summary.split_table()))
    for line in summary.warnings:
        err_console.print(f"warning: {line}", markup=False, highlight=False, soft_wrap=True)
