"""Fitting on the train split only: vocabularies, numeric statistics, quantile boundaries.

Every query reads the train rows and nothing else; the results are written into the ``Feature``
objects (vocab_size, mean, std, boundaries) and returned as vocabulary frames.

All flat vocabularies are counted in one streaming pass over the train rows (``count_values``):
the batches of one query, each counted per feature, integers in a dense count array, other values
with a group-by per batch, merged as they come. One streaming group-by query per vocabulary
re-read the split filter's columns for every feature and cost 10-35 ns a row even for six
distinct values (100M-row synth log, 8 vocabularies: 24 s of fit, now in one pass; docs/data.md).
"""

from __future__ import annotations

import math

import numpy as np
import polars as pl

from mtrec.data.encode import numeric_base, uses_vocab
from mtrec.data.schema import Feature

RESERVED = 2  # codes 0 (null / padding) and 1 (out of vocabulary)
_ID_LIKE_MIN_ROWS = 1000


def _vocab_query(train: pl.LazyFrame, feature: Feature) -> pl.LazyFrame:
    """Train counts of the values as one query of its own (sequences; ``count_values`` agrees with it)."""
    value = pl.col(feature.name)
    if feature.kind == "sequence":
        value = value.list.tail(feature.max_len).explode()
    return (train.select(value.alias("value"))
            .filter(pl.col("value").is_not_null())
            .group_by("value").agg(pl.len().cast(pl.Int64).alias("count")))


# A dense count array covers at most this many integer values (64 MiB of int64 counts); a wider
# range is counted by group-bys.
_DENSE_SPAN = 1 << 23
# Partial counts are merged once they hold this many rows and more than the merged counts.
_MERGE_ROWS = 1 << 21
# Rows per batch of the counting pass (memory: one batch of the vocabulary columns).
_BATCH_ROWS = 1 << 18


class _ValueCounts:
    """Counts of one feature's non-null values, fed batch by batch.

    Integers go into ``dense`` (count of ``lowest + i``) while their range stays under
    ``_DENSE_SPAN``; the values of a batch are buffered until they are about as many as the
    range, so each ``bincount`` over the range costs O(values). Anything else (strings, booleans,
    floats, wide integer ranges) is counted per batch by a group-by, and the partial counts are
    merged whenever they outgrow the merged ones.
    """

    def __init__(self, dtype: pl.DataType):
        self.dtype = dtype
        self.dense_ok = dtype.is_integer()
        self.lowest: int | None = None
        self.dense: np.ndarray | None = None
        self.buffer: list[np.ndarray] = []
        self.buffered = 0
        self.parts: list[pl.DataFrame] = []
        self.pending = 0
        self.merged_rows = 0

    def add(self, values: pl.Series) -> None:
        values = values.drop_nulls()
        if values.is_empty():
            return
        if self.dense_ok:
            low, high = int(values.min()), int(values.max())
            lowest = low if self.lowest is None else min(low, self.lowest)
            highest = high if self.dense is None else max(high, self.lowest + len(self.dense) - 1)
            if highest - lowest + 1 <= _DENSE_SPAN:
                self._add_dense(values, lowest, highest)
                return
            self._to_parts()
        self.parts.append(values.rename("value").value_counts(name="count").with_columns(pl.col("count").cast(pl.Int64)))
        self.pending += self.parts[-1].height
        if self.pending > max(_MERGE_ROWS, 2 * self.merged_rows):
            self._merge()

    def _add_dense(self, values: pl.Series, lowest: int, highest: int) -> None:
        span = highest - lowest + 1
        if self.dense is None:
            self.lowest, self.dense = lowest, np.zeros(span, dtype=np.int64)
        elif lowest < self.lowest or span > len(self.dense):
            self._flush()  # the buffered offsets are from the old lowest value
            grown = np.zeros(span, dtype=np.int64)
            start = self.lowest - lowest
            grown[start:start + len(self.dense)] = self.dense
            self.lowest, self.dense = lowest, grown
        # offsets from the lowest value as int64, subtracted in a dtype that holds both ends
        # (int8 values minus their lowest may exceed int8; uint64 ids may exceed int64)
        if self.dtype.is_unsigned_integer():
            offsets = (values.cast(pl.UInt64) - self.lowest).cast(pl.Int64)
        else:
            offsets = values.cast(pl.Int64) - self.lowest
        self.buffer.append(offsets.to_numpy())
        self.buffered += len(values)
        if self.buffered >= len(self.dense):
            self._flush()

    def _flush(self) -> None:
        if self.buffer:
            offsets = np.concatenate(self.buffer)
            self.dense += np.bincount(offsets, minlength=len(self.dense))
            self.buffer, self.buffered = [], 0

    def _to_parts(self) -> None:
        """Leave dense counting: the range grew too wide."""
        self.dense_ok = False
        if self.dense is not None:
            self._flush()
            self.parts.append(self._dense_frame())
            self.pending += self.parts[-1].height
            self.dense = None

    def _dense_frame(self) -> pl.DataFrame:
        seen = np.flatnonzero(self.dense)
        dtype = pl.UInt64 if self.dtype.is_unsigned_integer() else pl.Int64
        value = pl.Series("value", seen, dtype=dtype) + self.lowest
        return pl.DataFrame({"value": value.cast(self.dtype), "count": pl.Series(self.dense[seen], dtype=pl.Int64)})

    def _merge(self) -> None:
        merged = pl.concat(self.parts).group_by("value").agg(pl.col("count").sum())
        self.parts, self.pending, self.merged_rows = [merged], 0, merged.height

    def result(self) -> pl.DataFrame:
        """(value, count) of every value seen, in no particular order."""
        if self.dense is not None:
            self._flush()
            return self._dense_frame()
        if not self.parts:
            return pl.DataFrame(schema={"value": self.dtype, "count": pl.Int64})
        self._merge()
        return self.parts[0]


def count_values(train: pl.LazyFrame, features: list[Feature]) -> tuple[dict[str, pl.DataFrame], int]:
    """({feature: (value, count) frame}, train rows), all in one streaming pass over ``train``.

    A sequence counts every element occurrence in its kept window (the last ``max_len``).
    """
    columns = [pl.col(f.name).list.tail(f.max_len) if f.kind == "sequence" else pl.col(f.name) for f in features]
    plan = train.select(columns)
    dtypes = plan.collect_schema()
    counts = {f.name: _ValueCounts(dtypes[f.name].inner if f.kind == "sequence" else dtypes[f.name])
              for f in features}
    rows = 0
    for batch in plan.collect_batches(chunk_size=_BATCH_ROWS, maintain_order=False, engine="streaming"):
        rows += batch.height
        for f in features:
            values = batch[f.name]
            counts[f.name].add(values.explode() if f.kind == "sequence" else values)
    return {name: count.result() for name, count in counts.items()}, rows


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


def _rescaled_moments(train: pl.LazyFrame, numeric: list[Feature], row: dict) -> None:
    """Values so large that their sum or squares overflow (1e300) gave an infinite mean or std,
    taken for "a single value", and every encoded value became +-inf. Those features' moments are
    computed again, once, on the values divided by a power of two near the largest |value| (exact
    scaling); the others keep the bits of the plain mean and std."""
    overflowed = [f for f in numeric if any(row[f"{f.name}#{m}"] is not None and not math.isfinite(row[f"{f.name}#{m}"])
                                            for m in ("mean", "std"))]
    if not overflowed:
        return
    stats = []
    for f in overflowed:
        value = numeric_base(f.name, f.log1p)
        scale = pl.lit(2.0).pow(value.abs().max().log(2).ceil())
        stats += [((value / scale).mean() * scale).alias(f"{f.name}#mean"),
                  ((value / scale).std(ddof=0) * scale).alias(f"{f.name}#std")]
    row.update(train.select(stats).collect(engine="streaming").row(0, named=True))


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
    # Sequences keep one streaming query each: their batches of lists, pulled by a slower counting
    # loop, queued up in the engine (50-element history: fit peak 681 / 1,003 / 1,940 MiB at 1M /
    # 3M / 9M rows in the one pass, against about 0.4-0.5 GiB as queries of their own).
    flat = [f for f in vocab_features if f.kind != "sequence"]
    sequences = [f for f in vocab_features if f.kind == "sequence"]
    value_counts = count_values(train, flat)[0] if flat else {}  # the rows come from the stats query
    results = pl.collect_all([train.select(stats)] + [_vocab_query(train, f) for f in sequences], engine="streaming",
                             optimizations=pl.QueryOptFlags(comm_subplan_elim=False))
    row = results[0].row(0, named=True)
    _rescaled_moments(train, numeric, row)
    value_counts.update({f.name: counts for f, counts in zip(sequences, results[1:])})
    rows = row["#rows"]

    vocabs = {}
    empty, single = [], []
    for f in vocab_features:
        counts = value_counts[f.name]
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
