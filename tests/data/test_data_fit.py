"""The one-pass vocabulary count (``count_values``) against one group-by query per feature."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from mtrec.data import fit as fit_module
from mtrec.data.fit import _ValueCounts, _vocab_query, count_values, fit
from mtrec.data.schema import Feature


def _reference(values: list, dtype: pl.DataType) -> pl.DataFrame:
    series = pl.Series("value", values, dtype=dtype).drop_nulls()
    return series.value_counts(name="count").with_columns(pl.col("count").cast(pl.Int64)).sort("value")


@pytest.mark.parametrize("dtype, batches", [
    # the lowest value falls and the range grows after values were buffered
    (pl.Int64, [[5, 6, 7, 7], [0, 1, None], [30, 2, 5], [-4]]),
    (pl.Int8, [[127, 127, -128], [0, None, -128]]),  # offsets beyond int8
    (pl.UInt64, [[2**64 - 1, 2**64 - 3], [2**64 - 2, 2**64 - 1]]),  # ids above 2**63
    (pl.UInt8, [[3, 255], [0]]),
    (pl.String, [["a", "b", None], ["", "é", "a"], []]),
    (pl.Boolean, [[True, None], [False, True]]),
    (pl.Float64, [[1.5, 2.0], [1.5, None]]),
    (pl.Int32, [[None, None], []]),  # nothing but nulls
])
def test_value_counts_equal_a_group_by_whatever_the_batches(dtype, batches):
    counts = _ValueCounts(dtype)
    for batch in batches:
        counts.add(pl.Series("x", batch, dtype=dtype))
    got = counts.result().sort("value")
    want = _reference([v for batch in batches for v in batch], dtype)
    assert got.schema == want.schema
    assert got.equals(want)


def test_a_range_too_wide_for_dense_counting_switches_to_group_bys(monkeypatch):
    monkeypatch.setattr(fit_module, "_DENSE_SPAN", 16)
    counts = _ValueCounts(pl.Int64)
    batches = [[1, 2, 2, 3], [10, 1], [1000, 2, -5000], [1000, 7]]
    for batch in batches:
        counts.add(pl.Series(batch, dtype=pl.Int64))
    assert counts.dense is None  # left dense counting on the third batch
    assert counts.result().sort("value").equals(_reference([v for b in batches for v in b], pl.Int64))


def test_partial_counts_are_merged_as_they_grow(monkeypatch):
    monkeypatch.setattr(fit_module, "_MERGE_ROWS", 500)
    rng = np.random.default_rng(0)
    values = [f"v{v}" for v in rng.zipf(1.3, 30_000) % 5_000]
    counts = _ValueCounts(pl.String)
    for start in range(0, len(values), 1000):
        counts.add(pl.Series(values[start:start + 1000]))
    assert len(counts.parts) < 30 and counts.merged_rows > 0  # merged on the way, not only at the end
    assert counts.result().sort("value").equals(_reference(values, pl.String))


def _train_log(rows: int = 5_000) -> pl.LazyFrame:
    rng = np.random.default_rng(3)
    lists = [list(rng.integers(0, 300, rng.integers(0, 12))) for _ in range(rows)]
    lists[::17] = [None] * len(lists[::17])
    frame = pl.DataFrame({
        "user_id": rng.integers(-50, 4_000, rows),
        "item_id": pl.Series(rng.integers(0, 800, rows), dtype=pl.UInt32),
        "city": rng.choice(["a", "b", "c", "", "ü"], rows),
        "flag": rng.random(rows) < 0.3,
        "hist": pl.Series(lists, dtype=pl.List(pl.Int64)),
        "tags": [[f"t{t}" for t in rng.integers(0, 9, rng.integers(0, 4))] for _ in range(rows)],
        "keep": rng.random(rows) < 0.8,
    }).with_columns(pl.when(pl.int_range(pl.len()) % 11 == 0).then(None).otherwise(pl.col("city")).alias("city"))
    return frame.lazy().filter(pl.col("keep"))


def _features() -> list[Feature]:
    return [Feature("user_id", "categorical", "Int64", min_count=1),
            Feature("item_id", "categorical", "UInt32", min_count=3),
            Feature("city", "categorical", "String", min_count=1),
            Feature("flag", "categorical", "Boolean", min_count=1),
            Feature("hist", "sequence", "List(Int64)", min_count=2, max_len=5),
            Feature("tags", "sequence", "List(String)", min_count=1, max_len=2)]


def test_one_pass_counts_equal_one_query_per_feature_in_many_batches(monkeypatch):
    monkeypatch.setattr(fit_module, "_BATCH_ROWS", 97)
    train = _train_log()
    counts, rows = count_values(train, _features())
    assert rows == train.select(pl.len()).collect().item()
    for feature in _features():
        want = _vocab_query(train, feature).collect().sort("value")
        got = counts[feature.name].sort("value")
        assert got.schema == want.schema, feature.name
        assert got.equals(want), feature.name


def test_fit_vocabularies_equal_the_per_feature_counting_with_min_count_and_sharing(monkeypatch):
    monkeypatch.setattr(fit_module, "_BATCH_ROWS", 97)
    train = _train_log()
    features = _features() + [Feature("hist_shared", "sequence", "List(Int64)", max_len=5, share_with="item_id")]
    train = train.with_columns(pl.col("hist").alias("hist_shared"))
    vocabs, _ = fit(train, features, {"user_id", "item_id"}, [])
    assert "hist_shared" not in vocabs  # it takes item_id's codes
    assert features[-1].vocab_size == features[1].vocab_size
    for feature in _features():
        counts = _vocab_query(train, feature).collect()
        kept = counts.filter(pl.col("count") >= feature.min_count).sort(["count", "value"], descending=[True, False])
        assert vocabs[feature.name]["value"].to_list() == kept["value"].to_list(), feature.name
        assert vocabs[feature.name]["code"].to_list() == list(range(2, 2 + kept.height))
