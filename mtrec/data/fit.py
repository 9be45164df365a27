"""Fitting on the train split only: vocabularies, numeric statistics, quantile boundaries.

Every query reads the train rows and nothing else; the results are written into the ``Feature``
objects (vocab_size, mean, std, boundaries) and returned as vocabulary frames.
"""

from __future__ import annotations

import math

import polars as pl

from mtrec.data.encode import numeric_base, uses_vocab
from mtrec.data.schema import Feature

RESERVED = 2  # codes 0 (null / padding) and 1 (out of vocabulary)
_ID_LIKE_MIN_ROWS = 1000


def _vocab_query(train: pl.LazyFrame, feature: Feature) -> pl.LazyFrame:
    """Train counts of the values; of a sequence, every element occurrence in the kept window."""
    value = pl.col(feature.name)
    if feature.kind == "sequence":
        value = value.list.tail(feature.max_len).explode()
    return (train.select(value.alias("value"))
            .filter(pl.col("value").is_not_null())
            .group_by("value").agg(pl.len().cast(pl.Int64).alias("count")))


def _finish_vocab(counts: pl.DataFrame, feature: Feature) -> pl.DataFrame:
    """Descending train frequency, ties by value; values under min_count are left out (-> OOV)."""
    kept = counts.filter(pl.col("count") >= (feature.min_count or 1)).sort(
        ["count", "value"], descending=[True, False], maintain_order=True)
    vocab = kept.select("value", (pl.int_range(pl.len(), dtype=pl.Int32) + RESERVED).alias("code"), "count")
    feature.vocab_size = RESERVED + vocab.height
    return vocab


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:12])
    return shown + (f" and {len(names) - 12} more" if len(names) > 12 else "")


def fit(train: pl.LazyFrame, features: list[Feature], protected: set[str],
        warnings: list[str]) -> tuple[dict[str, pl.DataFrame], int]:
    """Fit every feature on ``train``. Returns ({feature: vocabulary frame}, train rows).

    ``protected`` names columns that are expected to be id-like (user, item): no warning for them.
    """
    vocab_features = [f for f in features if uses_vocab(f)]
    numeric = [f for f in features if f.kind == "numeric"]
    bucketized = [f for f in features if f.bucketize]

    stats = [pl.len().alias("#rows")]
    for f in numeric:
        value = numeric_base(f.name, f.log1p)
        stats += [value.mean().alias(f"{f.name}#mean"), value.std(ddof=0).alias(f"{f.name}#std")]
    for f in bucketized:
        value = numeric_base(f.name, False)
        stats += [value.quantile(i / f.bucketize, "linear").alias(f"{f.name}#q{i}") for i in range(1, f.bucketize)]
    queries = [train.select(stats)] + [_vocab_query(train, f) for f in vocab_features]
    results = pl.collect_all(queries, engine="streaming", optimizations=pl.QueryOptFlags(comm_subplan_elim=False))
    row = results[0].row(0, named=True)
    rows = row["#rows"]

    vocabs = {}
    empty, single = [], []
    for f, counts in zip(vocab_features, results[1:]):
        vocabs[f.name] = _finish_vocab(counts, f)
        distinct = counts.height
        if distinct == 0:
            empty.append(f.name)
        elif distinct == 1:
            single.append(f.name)
        elif (f.kind == "categorical" and f.name not in protected and rows >= _ID_LIKE_MIN_ROWS
              and distinct > rows / 2):
            warnings.append(f"feature {f.name!r} has {distinct:,} distinct values in {rows:,} train rows: "
                            f"it looks like a row id; exclude it (--exclude {f.name}) unless it is one")
    for f in numeric:
        mean, std = row[f"{f.name}#mean"], row[f"{f.name}#std"]
        if mean is None or not math.isfinite(mean):
            empty.append(f.name)
            mean, std = 0.0, 1.0
        elif not std or not math.isfinite(std):
            single.append(f.name)
            std = 1.0
        f.mean, f.std = float(mean), float(std)
    if empty:
        warnings.append(f"null in every train row, so no signal (encoded as a constant): {_names(empty)}")
    if single:
        warnings.append(f"a single value in train, so no signal: {_names(single)}")

    for f in bucketized:
        cuts = [row[f"{f.name}#q{i}"] for i in range(1, f.bucketize)]
        f.boundaries = sorted({float(c) for c in cuts if c is not None and math.isfinite(c)})
        f.vocab_size = RESERVED + len(f.boundaries) + 1
        if len(f.boundaries) < f.bucketize - 1:
            warnings.append(f"feature {f.name!r}: only {len(f.boundaries) + 1} distinct quantile buckets of the "
                            f"{f.bucketize} asked (many equal values)")
    for f in features:
        if f.hash_buckets:
            f.vocab_size = RESERVED + f.hash_buckets
    by_name = {f.name: f for f in features}
    for f in features:
        if f.share_with:
            f.vocab_size = by_name[f.share_with].vocab_size  # the shared column's codes
    return vocabs, rows
