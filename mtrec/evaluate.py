"""Scoring: predictions over a whole split, per-task metrics, and evaluating a saved run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import polars as pl
import torch

from mtrec import checkpoint, metrics
from mtrec.data.stream import ParquetSplit, available_memory
from mtrec.data.tensors import Split, eval_batches, fits_on_device, frame_to_split, load_split
from mtrec.errors import UserError
from mtrec.report import err_console


@torch.no_grad()
def predict(model, split: Split, batch_size: int) -> torch.Tensor:
    """Logits ``[N, T]`` computed in fp32 on the model's device, whatever precision training used:
    bf16 logits keep 8 significant bits, so scores tie by the thousand and AUC, GAUC, NDCG, early
    stopping and best.pt would be quantised and differ between GPU and CPU (docs/design.md)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device  # a host-resident split is copied batch by batch
    out = []
    with torch.autocast(device.type, enabled=False):
        for codes, numeric in eval_batches(split, batch_size):
            out.append(model(codes.to(device), numeric.to(device)).float())
    model.train(was_training)
    return torch.cat(out)


def split_metrics(model, split: Split, objective, batch_size: int, k: int) -> dict:
    """{column: {auc, gauc, logloss, ndcg, positive_rate, n, condition}} in task order (conditional
    tasks over the rows where their condition holds; ESMM adds ``ctcvr``), plus the mean over the
    tasks. ``objective``: a ``mtrec.objective.Objective`` (which tasks, which conditions)."""
    logits = predict(model, split, batch_size)
    users = None if split.users is None else split.users.to(logits.device)
    per_task = {}
    for column in objective.columns(logits, split.labels.to(logits.device)):
        scores, labels, groups = column.logits, column.labels, users
        if column.rows is not None:
            scores, labels = scores[column.rows], labels[column.rows]
            groups = None if users is None else users[column.rows]
        (row,) = metrics.task_metrics(scores, labels, groups, k=k)
        per_task[column.name] = {"auc": row["auc"], "gauc": row["gauc"], "logloss": row["logloss"],
                                 "ndcg": row[f"ndcg@{k}"], "positive_rate": row["positive_rate"], "n": row["n"],
                                 "condition": column.condition}
    tasks = [per_task[t] for t in objective.tasks if t in per_task]
    per_task["mean"] = {key: _mean([r[key] for r in tasks]) for key in ("auc", "gauc", "logloss", "ndcg", "positive_rate")}
    per_task["mean"]["n"] = len(split)
    return per_task


def _mean(values):
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(values) / len(values) if values else None


def load_run(run_dir: str | Path, which: str = "best", device: str = "cpu"):
    """Rebuild the model of a run from its config and checkpoint. Returns (model, cfg, tasks, schema)."""
    from mtrec.config import TrainConfig, read_run_config
    from mtrec.data.schema import Schema
    from mtrec.train import build_for

    run_dir = Path(run_dir)
    cfg = TrainConfig.from_dict(read_run_config(run_dir))
    tasks = cfg.tasks
    path = run_dir / f"{which}.pt"
    if not path.exists() and which == "best" and (run_dir / "last.pt").exists():
        # No epoch improved the selection metric (or the run stopped before the first epoch end).
        err_console.print(f"warning: {run_dir} has no best.pt (no epoch improved the validation {cfg.select}); "
                          "using last.pt", markup=False, highlight=False, soft_wrap=True)
        path = run_dir / "last.pt"
    state, meta = checkpoint.load(path, map_location=device)
    schema = Schema.from_dict(json.loads((run_dir / "schema.json").read_text()))
    model, _ = build_for(cfg, schema, tasks)
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError) as err:
        raise UserError(f"checkpoint {path} does not match the run's config ({err}); it may be from another run") from err
    return model.to(device), cfg, tasks, schema


def evaluate_run(run_dir: str | Path, data: str | None = None, raw: str | None = None, split: str = "test",
                 device: str = "auto", which: str = "best") -> dict:
    from mtrec.data.schema import Schema
    from mtrec.train import feature_names, objective_for, resolve_device

    dev = resolve_device(device)
    model, cfg, tasks, run_schema = load_run(run_dir, which, dev)
    data_dir = Path(data or cfg.data)
    categorical, numeric = feature_names(run_schema)
    if raw is not None:
        from mtrec.data.encode import encode, read_raw

        data_schema = Schema.load(data_dir)
        _check_same_schema(run_schema, data_schema, data_dir)
        log = read_raw(raw)
        present = set(log.collect_schema())
        scored = [t for t in tasks if t in present]
        if not scored:
            raise UserError(f"{raw} has none of the label columns {', '.join(tasks)}: pass a labelled log, or "
                            "score an unlabelled one with mtrec predict")
        frame = encode(log, data_schema, data_dir / "vocab", labels=scored).collect(engine="streaming")
        if frame.height == 0:
            raise UserError(f"{raw} has no rows")
        # Absent labels become NaN columns, and the tasks (or conditions) that need them are not scored.
        frame = frame.with_columns(pl.lit(float("nan"), pl.Float32).alias(t) for t in tasks if t not in present)
        part = frame_to_split(frame, categorical, numeric, tasks)
        label = f"raw {raw}"
    else:
        if split not in ("train", "valid", "test"):
            raise UserError(f"--split must be train, valid or test, not {split!r}")
        _check_same_schema(run_schema, Schema.load(data_dir), data_dir)
        on_disk = ParquetSplit(data_dir / f"{split}.parquet", categorical, numeric, tasks)
        # a split too large for memory is scored row group by row group (only logits/labels stay)
        part = (load_split(data_dir, split, categorical, numeric, tasks)
                if on_disk.nbytes <= available_memory() / 2 else on_disk)
        label = f"{split} split of {data_dir}"
    if isinstance(part, Split) and fits_on_device(part, dev):
        part = part.to(dev)  # else copied batch by batch
    objective = objective_for(cfg, tasks)
    if raw is not None:
        objective.unscored = {t for t in tasks if t not in present}
    result = split_metrics(model, part, objective, cfg.eval_batch_size, cfg.ndcg_k)
    return {"run": str(run_dir), "data": label, "tasks": tasks, "target": tasks[0], "ndcg_k": cfg.ndcg_k,
            "metrics": result}


def _check_same_schema(run_schema, data_schema, data_dir) -> None:
    def shape(s):
        return [(f.name, f.kind, f.vocab_size if f.kind != "numeric" else None) for f in s.features]

    if shape(run_schema) != shape(data_schema) or not set(run_schema.labels) <= set(data_schema.labels):
        raise UserError(f"the data in {data_dir} has other features or tasks than the run was trained on: "
                        "evaluate on data made by the same mtrec preprocess run (or pass --raw logs)")
