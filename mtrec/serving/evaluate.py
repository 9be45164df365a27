"""``mtrec evaluate``: rebuild a saved run and score a split (or raw logs) with ``mtrec.metrics.split``."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from mtrec.core.console import err_console
from mtrec.core.errors import UserError
from mtrec.data.stream import ParquetSplit
from mtrec.data.tensors import Split, fits_on_device, frame_to_split
from mtrec.engine import checkpoint
from mtrec.engine.build import build_for, feature_names, objective_for, resolve_device
from mtrec.metrics.split import split_metrics


def load_run(run_dir: str | Path, which: str = "best", device: str = "cpu"):
    """Rebuild the model of a run from its config and checkpoint. Returns (model, cfg, tasks, schema)."""
    from mtrec.core.config import TrainConfig, read_run_config
    from mtrec.data.schema import Schema

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
        raise UserError(f"checkpoint {path} does not match the run's config ({err}); "
                        "it may be from another run") from err
    return model.to(device), cfg, tasks, schema


def evaluate_run(run_dir: str | Path, data: str | None = None, raw: str | None = None, split: str = "test",
                 device: str = "auto", which: str = "best") -> dict:
    from mtrec.data.schema import Schema

    dev = resolve_device(device)
    model, cfg, tasks, run_schema = load_run(run_dir, which, dev)
    data_dir = Path(data or cfg.data)
    categorical, numeric = feature_names(run_schema)
    if raw is not None:
        from mtrec.data.encode import encode, read_raw

        data_schema = Schema.load(data_dir)
        check_same_schema(run_schema, data_schema, data_dir)
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
        check_same_schema(run_schema, Schema.load(data_dir), data_dir)
        # scored row group by row group, whatever its size: only the logits, labels and users stay
        part = ParquetSplit(data_dir / f"{split}.parquet", categorical, numeric, tasks)
        label = f"{split} split of {data_dir}"
    if isinstance(part, Split) and fits_on_device(part, dev):
        part = part.to(dev)  # else copied batch by batch
    objective = objective_for(cfg, tasks)
    if raw is not None:
        objective.unscored = {t for t in tasks if t not in present}
    result = split_metrics(model, part, objective, cfg.eval_batch_size, cfg.ndcg_k)
    return {"run": str(run_dir), "data": label, "tasks": tasks, "target": tasks[0], "ndcg_k": cfg.ndcg_k,
            "metrics": result}


def check_same_schema(run_schema, data_schema, data_dir) -> None:
    def shape(s):
        return [(f.name, f.kind, f.vocab_size if f.kind != "numeric" else None) for f in s.features]

    if shape(run_schema) != shape(data_schema) or not set(run_schema.labels) <= set(data_schema.labels):
        raise UserError(f"the data in {data_dir} has other features or tasks than the run was trained on: "
                        "evaluate on data made by the same mtrec preprocess run (or pass --raw logs)")
