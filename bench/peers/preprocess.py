"""Preprocessing: mtrec preprocess vs FuxiCTR's FeatureProcessor vs a careful pandas baseline.

Same input (a ``mtrec synth`` log), same work: time split 80/10/10 by ``ts``; vocabularies on the
train rows (min count 1; 0 = null, OOV for unseen values) for the 8 categorical columns (user_id,
item_id, user_age_bucket, user_city, item_category, item_brand, device, hour); train mean / std
standardisation of the 3 float columns; labels click, like, share; train/valid/test Parquet
written. Every tool runs in its own fresh subprocess; rows/s = input rows / wall time of the whole
job (read, split, fit, encode, write) and peak memory = that process's ``ru_maxrss``.

FuxiCTR: its ``FeatureProcessor`` (``preprocess`` + ``fit``, polars-based, unchanged) and its
``transform`` applied in 100k-row numpy batches, which is what ``build_dataset`` hands to Ray Data's
``map_batches``; Ray itself is not used (``fuxictr.preprocess`` imports ``ray``, whose install pulls
a large dependency tree): ``build_dataset`` would run ``cpu_count() // 2`` = 1 Ray worker on this
2-core machine, plus Arrow/pandas conversions and a sort, so the in-process loop favours FuxiCTR.
The split is done with polars before FuxiCTR sees the data (FuxiCTR takes pre-split files); that
time is counted.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np

from .common import emit, header, run_worker, table

LABELS = ["click", "like", "share"]
CATEGORICAL = ["user_id", "item_id", "user_age_bucket", "user_city", "item_category", "item_brand", "device", "hour"]
NUMERIC = ["user_activity", "item_price", "item_popularity"]
SPLITS = ("train", "valid", "test")


def time_split(ts: np.ndarray) -> np.ndarray:
    """0/1/2 per row exactly as mtrec's time split (stable argsort, 80/10/10 by row count)."""
    order = np.argsort(ts, kind="stable")
    n = len(ts)
    n_train, n_valid = int(round(n * 0.8)), int(round(n * 0.1))
    split = np.full(n, 2, dtype=np.uint8)
    split[order[:n_train]] = 0
    split[order[n_train:n_train + n_valid]] = 1
    return split


# --- the three tools (each runs inside a worker process) ---------------------------------------

def run_mtrec(raw: str, out: str) -> int:
    from mtrec.data.preprocess import preprocess

    summary = preprocess([raw], LABELS, out, user="user_id", item="item_id", time="ts", force=True)
    return sum(summary.rows.values())


def run_pandas(raw: str, out: str) -> int:
    import pandas as pd

    df = pd.read_parquet(raw, columns=[*CATEGORICAL, *NUMERIC, *LABELS, "ts"])
    split = time_split(df["ts"].to_numpy())
    train = split == 0
    enc = {}
    for c in CATEGORICAL:
        col = df[c]
        counts = col[train].value_counts(dropna=True)  # descending frequency
        vocab = pd.Index(counts.index[counts >= 1])
        idx = vocab.get_indexer(col)  # -1: unseen or null
        codes = np.where(idx >= 0, idx + 2, 1).astype(np.int32)
        codes[col.isna().to_numpy()] = 0
        enc[c] = codes
    for c in NUMERIC:
        x = df[c].to_numpy(dtype=np.float64)
        t = x[train]
        mean = np.nanmean(t)
        std = np.nanstd(t) or 1.0
        x = np.where(np.isnan(x), mean, x)
        enc[c] = ((x - mean) / std).astype(np.float32)
    for c in LABELS:
        enc[c] = df[c].to_numpy().astype(np.uint8)
    enc["_user"] = df["user_id"].to_numpy()
    del df
    frame = pd.DataFrame(enc)
    Path(out).mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(SPLITS):
        frame[split == i].to_parquet(Path(out) / f"{name}.parquet", index=False)
    return len(frame)


def _load_fuxictr_processor():
    """``fuxictr.preprocess.feature_processor`` without running ``fuxictr/preprocess/__init__`` (imports ray)."""
    import importlib
    import importlib.util

    if "fuxictr.preprocess" not in sys.modules:
        import fuxictr

        pkg = types.ModuleType("fuxictr.preprocess")
        pkg.__path__ = [str(Path(fuxictr.__file__).parent / "preprocess")]
        sys.modules["fuxictr.preprocess"] = pkg
    return importlib.import_module("fuxictr.preprocess.feature_processor").FeatureProcessor


def _fuxictr_columns() -> tuple[list[dict], list[dict]]:
    """The same columns as mtrec's run, in FuxiCTR's feature-spec form."""
    string_cols = {"user_city", "item_brand", "device"}
    feature_cols = [{"name": c, "active": True, "dtype": "str" if c in string_cols else "int", "type": "categorical"}
                    for c in CATEGORICAL]
    feature_cols += [{"name": c, "active": True, "dtype": "float", "type": "numeric", "normalizer": "StandardScaler"}
                     for c in NUMERIC]
    return feature_cols, [{"name": c, "dtype": "float"} for c in LABELS]


def run_fuxictr(raw: str, out: str) -> int:
    import logging

    import polars as pl

    logging.disable(logging.INFO)
    FeatureProcessor = _load_fuxictr_processor()
    feature_cols, label_cols = _fuxictr_columns()
    data_root = Path(out).parent
    fp = FeatureProcessor(feature_cols=feature_cols, label_col=label_cols, dataset_id=Path(out).name,
                          data_root=str(data_root))
    frame = pl.read_parquet(raw)
    frame = frame.with_columns(pl.Series("__split", time_split(frame["ts"].to_numpy())))
    lazy = frame.lazy()
    parts = {name: fp.preprocess(lazy.filter(pl.col("__split") == i)) for i, name in enumerate(SPLITS)}
    del frame, lazy
    fp.fit(parts["train"], min_categr_count=1, rebuild_dataset=True)
    total = 0
    for name in SPLITS:
        df = parts.pop(name).collect()  # what fuxictr's transform() does before handing batches to Ray
        total += df.height
        pieces = []
        for start in range(0, df.height, 100_000):
            chunk = df.slice(start, 100_000)
            batch = {c: chunk[c].to_numpy() for c in chunk.columns}
            batch = fp.transform(batch)
            pieces.append(pl.DataFrame({c: np.asarray(v) for c, v in batch.items()}))
        del df
        pl.concat(pieces).write_parquet(Path(out) / f"{name}.parquet")
    return total


def run_fuxictr_ray(raw: str, out: str) -> int:
    """FuxiCTR's own ``build_dataset`` (Ray Data transform), on split files written by polars first."""
    import logging

    import polars as pl

    logging.disable(logging.INFO)
    from fuxictr.preprocess import FeatureProcessor, build_dataset

    feature_cols, label_cols = _fuxictr_columns()
    frame = pl.read_parquet(raw)
    split = time_split(frame["ts"].to_numpy())
    raw_dir = Path(out) / "raw_splits"
    raw_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for i, name in enumerate(SPLITS):
        paths[name] = str(raw_dir / f"{name}.parquet")
        frame.filter(pl.Series(split == i)).write_parquet(paths[name])
    rows = frame.height
    del frame
    fp = FeatureProcessor(feature_cols=feature_cols, label_col=label_cols, dataset_id="fuxictr",
                          data_root=str(out))
    build_dataset(fp, train_data=paths["train"], valid_data=paths["valid"], test_data=paths["test"],
                  data_format="parquet", min_categr_count=1)
    import ray

    ray.shutdown()
    return rows


TOOLS = {"mtrec": run_mtrec, "fuxictr": run_fuxictr, "pandas": run_pandas, "fuxictr-ray": run_fuxictr_ray}


def worker(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tool", required=True, choices=list(TOOLS))
    ap.add_argument("--raw", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    shutil.rmtree(args.out, ignore_errors=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rows = TOOLS[args.tool](args.raw, args.out)
    emit({"tool": args.tool, "rows": rows, "seconds": time.perf_counter() - start})


def check_same(out_a: Path, out_b: Path) -> str:
    """Do two outputs hold the same train vocabulary sizes (max code per column)?"""
    import polars as pl

    try:
        a = pl.read_parquet(out_a / "train.parquet")
        b = pl.read_parquet(out_b / "train.parquet")
    except Exception as err:  # noqa: BLE001
        return f"n/a ({type(err).__name__})"
    diffs = [c for c in CATEGORICAL if a[c].n_unique() != b[c].n_unique()]
    rows = a.height == b.height
    return "same" if rows and not diffs else f"differs ({'rows ' if not rows else ''}{', '.join(diffs)})"


def run(quick: bool, rows_arg: str | None, workdir: str | None, tools_arg: str | None = None) -> None:
    import polars as pl

    from mtrec.data.synth import write_synthetic

    header("preprocessing: mtrec vs FuxiCTR FeatureProcessor vs pandas")
    sizes = [int(float(r)) for r in rows_arg.split(",")] if rows_arg else ([200_000] if quick else [1_000_000])
    base = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="mtrec-peers-pre-"))
    base.mkdir(parents=True, exist_ok=True)
    out_rows = []
    for n in sizes:
        raw = base / f"synth_{n}.parquet"
        if not raw.exists():
            started = time.perf_counter()
            write_synthetic(raw, rows=n, seed=0)
            print(f"mtrec synth {n:,} rows: {time.perf_counter() - started:.1f} s (not timed below)")
        mem = pl.read_parquet(raw).estimated_size() / 2**20
        print(f"{n:,} rows: Parquet {raw.stat().st_size / 2**20:.0f} MiB on disk, {mem:.0f} MiB in memory (Arrow)")
        tools = tools_arg.split(",") if tools_arg else ["mtrec", "pandas", "fuxictr"]
        if "mtrec" not in tools:
            tools.insert(0, "mtrec")
        results = {}
        for tool in tools:
            results[tool] = run_worker(["_worker", "preprocess", "--tool", tool, "--raw", str(raw),
                                        "--out", str(base / f"out_{tool}_{n}")])
        ours = results["mtrec"]
        for tool in tools:
            r = results[tool]
            if "error" in r:
                out_rows.append([f"{n:,}", tool, "fails", "", "", "", r["error"][:100]])
                continue
            speed = n / r["seconds"]
            ratio = r["seconds"] / ours["seconds"] if "seconds" in ours else float("nan")
            other = base / f"out_{tool}_{n}" / ("fuxictr" if tool == "fuxictr-ray" else "")
            same = "" if tool == "mtrec" else check_same(base / f"out_mtrec_{n}", other)
            if tool == "fuxictr-ray":
                same += "; peak RSS: driver process only (Ray's raylet and worker processes not counted)"
            out_rows.append([f"{n:,}", tool, r["seconds"], speed, r["peak_rss_mib"], ratio,
                             f"{r['peak_rss_mib'] / mem:.2f}x raw in-memory; train vocab sizes {same}".strip()])
    print(table(["rows", "tool", "wall s", "rows/s", "peak RSS MiB", "x mtrec time", "notes"], out_rows))
    print(f"work dir: {base}")
