"""``mtrec predict``: probabilities of a trained run for new raw logs, streamed to one Parquet file.

One lazy plan encodes every input file with the run's vocabularies (``encode``, the same function
preprocess used, so a raw row encodes exactly as at training time), and Polars' streaming engine
hands it over in chunks, in input order; each chunk is scored and appended to a temporary file that
is renamed to ``--out`` when complete. Memory holds one chunk, whatever the size of the log.
Labels are not needed. Output: the ``--keep`` columns as they are in the input (default: the user
and item columns), then a float32 ``p_<task>`` per task (ESMM also ``p_ctcvr``).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import torch

from mtrec.core.errors import UserError
from mtrec.core.files import check_replaceable

CHUNK_ROWS = 1 << 18
_KEEP = "__mtrec_keep_"
MARKER = {b"mtrec": b"predictions"}  # Parquet key-value metadata: --force replaces only such files


def _check_out(out: Path, force: bool) -> None:
    """--out may be replaced only with --force, and only when it is a predictions file mtrec wrote."""
    check_replaceable(out, force, ".parquet",
                      lambda path: (pq.read_schema(path).metadata or {}).get(b"mtrec") == MARKER[b"mtrec"],
                      "a predictions file of mtrec predict")


def check_keep(keep: list[str], outputs: list[str], frame: pl.LazyFrame) -> None:
    """--keep columns: in the log, each once, none named like an output column."""
    from mtrec.data.sources import column_list

    repeated = sorted({c for c in keep if keep.count(c) > 1})
    if repeated:
        raise UserError(f"--keep names {', '.join(repeated)} more than once: name each column once")
    clash = [c for c in keep if c in outputs]
    if clash:
        raise UserError(f"--keep column(s) {', '.join(clash)} would collide with the predictions "
                        f"({', '.join(outputs)}): rename the column in the log, or leave it out of --keep")
    missing = [c for c in keep if c not in frame.collect_schema()]
    if missing:
        raise UserError(f"--keep column(s) {', '.join(missing)} not in the log (columns: {column_list(frame)})")


def predict_log(run_dir: str | Path, raw: list[str], out: str | Path, *, keep: list[str] | None = None,
                which: str = "best", device: str = "auto", data: str | None = None, force: bool = False,
                chunk_rows: int = CHUNK_ROWS) -> dict:
    from mtrec.data.encode import encode
    from mtrec.data.sources import scan_inputs
    from mtrec.data.tensors import frame_to_split
    from mtrec.engine.build import feature_names, objective_for, resolve_device
    from mtrec.engine.objective import CTCVR
    from mtrec.metrics.split import predict
    from mtrec.serving.encoder import run_encoder
    from mtrec.serving.evaluate import load_run

    out = Path(out)
    _check_out(out, force)
    dev = resolve_device(device)
    model, cfg, tasks, run_schema = load_run(run_dir, which, dev)
    encoder = run_encoder(run_dir, cfg, run_schema, data)
    schema = encoder.schema
    objective = objective_for(cfg, tasks)
    names = [f"p_{t}" for t in tasks] + ([f"p_{CTCVR}"] if objective.esmm else [])
    frame, files = scan_inputs(raw)
    if any(f.resolve() == out.resolve() for f in files):
        raise UserError(f"--out {out} is one of the inputs: choose another file")
    columns = frame.collect_schema()
    if keep is None:  # the user and item columns, once each (a log may use one column as both)
        keep = list(dict.fromkeys(c for c in (schema.user, schema.item) if c and c in columns))
    check_keep(keep, names, frame)
    frame = frame.with_columns(pl.col(c).alias(_KEEP + c) for c in keep)
    encoded = encode(frame, schema, encoder.vocab_dir, labels=[], check=False, keep=tuple(_KEEP + c for c in keep))
    categorical, numeric = feature_names(run_schema)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    writer, rows = None, 0
    try:
        for chunk in encoded.collect_batches(chunk_size=chunk_rows, maintain_order=True):
            if chunk.height == 0:
                continue
            logits = predict(model, frame_to_split(chunk, categorical, numeric, []), cfg.eval_batch_size)
            scores = [c.logits for c in objective.columns(logits, None)]
            probs = torch.sigmoid(torch.stack(scores, 1)).float().cpu().numpy()
            table = pl.DataFrame([chunk[_KEEP + c].alias(c) for c in keep]
                                 + [pl.Series(name, probs[:, j]) for j, name in enumerate(names)]).to_arrow()
            table = table.replace_schema_metadata({**(table.schema.metadata or {}), **MARKER})
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema, compression="zstd")
            writer.write_table(table)
            rows += chunk.height
        if writer is None:
            raise UserError(f"the log {', '.join(map(str, raw))} has no rows: nothing to predict")
        writer.close()
        writer = None
        os.replace(tmp, out)
    except (pl.exceptions.ComputeError, OSError) as err:
        raise UserError(f"reading the log or writing {out} failed ({str(err).splitlines()[0]}): check the inputs "
                        "and the disk") from err
    finally:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
    return {"out": str(out), "rows": rows, "columns": keep + names, "run": str(run_dir), "checkpoint": which}
