"""``mtrec evaluate``: rebuild a saved run and score a split (or raw logs) with ``mtrec.metrics.split``.

A split is scored if its data folder still has the run's encoder fingerprint (``serving.encoder``);
a raw log is encoded with the run's own vocabularies and scored chunk by chunk."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import torch

from mtrec.core.console import err_console
from mtrec.core.errors import UserError
from mtrec.core.files import read_json_object
from mtrec.data.stream import ParquetSplit
from mtrec.data.tensors import frame_to_split
from mtrec.engine import checkpoint
from mtrec.engine.build import build_for, feature_names, objective_for, resolve_device
from mtrec.metrics.split import logits_metrics, predict, split_metrics
from mtrec.serving.encoder import check_encoded_data, run_encoder

CHUNK_ROWS = 1 << 18


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
    schema_file = run_dir / "schema.json"
    schema = Schema.from_dict(read_json_object(schema_file, "the run directory is damaged: train again"),
                              where=str(schema_file))
    model, _ = build_for(cfg, schema, tasks)
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError) as err:
        raise UserError(f"checkpoint {path} does not match the run's config ({err}); "
                        "it may be from another run") from err
    return model.to(device), cfg, tasks, schema


def evaluate_run(run_dir: str | Path, data: str | None = None, raw: str | None = None, split: str = "test",
                 device: str = "auto", which: str = "best", chunk_rows: int = CHUNK_ROWS) -> dict:
    dev = resolve_device(device)
    model, cfg, tasks, run_schema = load_run(run_dir, which, dev)
    objective = objective_for(cfg, tasks)
    if raw is not None:
        result, label = _raw_metrics(model, cfg, tasks, run_dir, run_schema, objective, raw, data, chunk_rows)
    else:
        if split not in ("train", "valid", "test"):
            raise UserError(f"--split must be train, valid or test, not {split!r}")
        data_dir = Path(data or cfg.data)
        check_encoded_data(run_dir, run_schema, data_dir)
        categorical, numeric = feature_names(run_schema)
        # scored row group by row group, whatever its size: only the logits, labels and users stay
        part = ParquetSplit(data_dir / f"{split}.parquet", categorical, numeric, tasks)
        result = split_metrics(model, part, objective, cfg.eval_batch_size, cfg.ndcg_k)
        label = f"{split} split of {data_dir}"
    return {"run": str(run_dir), "data": label, "tasks": tasks, "target": tasks[0], "ndcg_k": cfg.ndcg_k,
            "metrics": result}


def _raw_metrics(model, cfg, tasks, run_dir, run_schema, objective, raw, data, chunk_rows) -> tuple[dict, str]:
    """Metrics of a raw log, encoded and scored chunk by chunk as predict does: only the logits,
    labels and user groups of all rows stay (4T + 4T + 8 bytes a row), never the encoded features."""
    from mtrec.data.encode import encode, read_raw

    encoder = run_encoder(run_dir, cfg, run_schema, data)
    categorical, numeric = feature_names(run_schema)
    log = read_raw(raw)
    present = set(log.collect_schema())
    scored = [t for t in tasks if t in present]
    if not scored:
        raise UserError(f"{raw} has none of the label columns {', '.join(tasks)}: pass a labelled log, or "
                        "score an unlabelled one with mtrec predict")
    encoded = encode(log, encoder.schema, encoder.vocab_dir, labels=scored)
    absent = [pl.lit(float("nan"), pl.Float32).alias(t) for t in tasks if t not in present]
    logits, labels, users = [], [], []
    try:
        for chunk in encoded.collect_batches(chunk_size=chunk_rows, maintain_order=True):
            if chunk.height == 0:
                continue
            # Absent labels become NaN columns, and the tasks (or conditions) that need them are not scored.
            part = frame_to_split(chunk.with_columns(absent) if absent else chunk, categorical, numeric, tasks)
            logits.append(predict(model, part, cfg.eval_batch_size))
            labels.append(part.labels)
            users.append(part.users)
    except pl.exceptions.ComputeError as err:
        raise UserError(f"reading {raw} failed ({str(err).splitlines()[0]}): check the log") from err
    if not logits:
        raise UserError(f"{raw} has no rows")
    objective.unscored = {t for t in tasks if t not in present}
    groups = None if users[0] is None else torch.cat(users)
    result = logits_metrics(torch.cat(logits), torch.cat(labels), groups, objective, cfg.ndcg_k)
    return result, f"raw {raw}"
