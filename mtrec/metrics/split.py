"""Scoring a split: fp32 predictions batch by batch, and per-task metrics over the rows each task covers."""

from __future__ import annotations

import math

import torch

from mtrec.data.tensors import Split, eval_batches
from mtrec.metrics import functional as metrics


@torch.no_grad()
def predict(model, split: Split, batch_size: int) -> torch.Tensor:
    """Logits ``[N, T]`` computed in fp32 on the model's device, whatever precision training used:
    bf16 logits keep 8 significant bits, so scores tie by the thousand and AUC, GAUC, NDCG, early
    stopping and best.pt would be quantised and differ between GPU and CPU (docs/design.md)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device  # a host-resident split is copied batch by batch
    out, row = None, 0
    with torch.autocast(device.type, enabled=False):
        for codes, numeric in eval_batches(split, batch_size):
            logits = model(codes.to(device), numeric.to(device)).float()
            if out is None:  # filled in place: a list of batches and their concatenation would be twice the size
                out = logits.new_empty((len(split), logits.shape[1]))
            out[row:row + len(logits)] = logits
            row += len(logits)
    model.train(was_training)
    return out


def split_metrics(model, split: Split, objective, batch_size: int, k: int) -> dict:
    """{column: {auc, gauc, logloss, ndcg, positive_rate, n, condition}} in task order (conditional
    tasks over the rows where their condition holds; ESMM adds ``ctcvr``), plus the mean over the
    tasks. ``objective``: a ``mtrec.engine.objective.Objective`` (which tasks, which conditions)."""
    logits = predict(model, split, batch_size)
    return logits_metrics(logits, split.labels, split.users, objective, k)


def logits_metrics(logits, labels, users, objective, k: int) -> dict:
    """``split_metrics`` of logits ``[N, T]`` already computed (e.g. chunk by chunk) against labels
    ``[N, T]`` and user groups ``[N]`` (or None)."""
    users = None if users is None else users.to(logits.device)
    per_task = {}
    for column in objective.columns(logits, labels.to(logits.device)):
        scores, truth, groups = column.logits, column.labels, users
        if column.rows is not None:
            scores, truth = scores[column.rows], truth[column.rows]
            groups = None if users is None else users[column.rows]
        (row,) = metrics.task_metrics(scores, truth, groups, k=k)
        per_task[column.name] = {"auc": row["auc"], "gauc": row["gauc"], "logloss": row["logloss"],
                                 "ndcg": row[f"ndcg@{k}"], "positive_rate": row["positive_rate"], "n": row["n"],
                                 "condition": column.condition}
    tasks = [per_task[t] for t in objective.tasks if t in per_task]
    keys = ("auc", "gauc", "logloss", "ndcg", "positive_rate")
    per_task["mean"] = {key: _mean([r[key] for r in tasks]) for key in keys}
    per_task["mean"]["n"] = len(logits)
    return per_task


def _mean(values):
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(values) / len(values) if values else None
