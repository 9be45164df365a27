"""The streaming split expressions: the time split equals a stable argsort cut at the ratios (ties,
floats, datetimes, several files); the random split is a seeded bijection with exact sizes."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from mtrec.data.preprocess import preprocess
from mtrec.data.splits import ROW_COL, SPLIT_COL, permuted_positions, random_split, split_sizes, time_split

RATIOS = (0.8, 0.1, 0.1)


def reference_time_split(stamps: np.ndarray, ratios=RATIOS) -> np.ndarray:
    """What the split must equal: stable argsort by timestamp, first shares train, then valid."""
    order = np.argsort(stamps, kind="stable")
    n_train, n_valid, _ = split_sizes(len(stamps), ratios)
    split = np.full(len(stamps), 2, dtype=np.uint8)
    split[order[:n_train]] = 0
    split[order[n_train:n_train + n_valid]] = 1
    return split


def streamed(frame: pl.DataFrame, expr_for) -> np.ndarray:
    lazy = frame.lazy().with_row_index(ROW_COL)
    return lazy.select(expr_for(lazy)).collect(engine="streaming")[SPLIT_COL].to_numpy()


@pytest.mark.parametrize("case", ["unique ints", "heavy ties", "one value", "floats", "datetimes", "ns epochs"])
def test_time_split_equals_a_stable_argsort(case):
    rng = np.random.default_rng(3)
    n = 5003
    stamps = {
        "unique ints": rng.permutation(n).astype(np.int64) * 7 - 1000,
        "heavy ties": rng.integers(0, 6, n),  # every cut falls inside a run of equal timestamps
        "one value": np.full(n, 42),
        "floats": np.round(rng.normal(0.0, 1e6, n), 1),
        "datetimes": rng.integers(0, 50, n).astype("datetime64[h]").astype("datetime64[us]"),
        "ns epochs": 1_700_000_000_000_000_000 + rng.integers(0, 3, n) * 2**40 + rng.integers(0, 3, n),
    }[case]
    frame = pl.DataFrame({"ts": stamps})
    got = streamed(frame, lambda lazy: time_split(lazy, n, RATIOS, "ts"))
    np.testing.assert_array_equal(got, reference_time_split(frame["ts"].to_physical().to_numpy()))


def test_time_split_over_several_files_keeps_the_input_order(tmp_path):
    rng = np.random.default_rng(1)
    parts = [pl.DataFrame({"ts": rng.integers(0, 40, 700), "click": rng.integers(0, 2, 700).astype(np.int8),
                           "x": rng.integers(0, 9, 700)}) for _ in range(3)]
    for k, part in enumerate(parts):
        part.write_parquet(tmp_path / f"day{k}.parquet")
    summary = preprocess([str(tmp_path)], ["click"], str(tmp_path / "out"), time="ts")
    raw = pl.concat(parts)
    expected = reference_time_split(raw["ts"].to_numpy())
    for index, name in enumerate(("train", "valid", "test")):
        split = pl.read_parquet(tmp_path / "out" / f"{name}.parquet")
        assert split["click"].to_list() == raw.filter(pl.Series(expected == index))["click"].to_list()
    assert summary.rows == {"train": 1680, "valid": 210, "test": 210}


@pytest.mark.parametrize("rows", [1, 2, 3, 17, 1000, 4097, 65536])
def test_random_positions_are_a_permutation(rows):
    positions = permuted_positions(np.arange(rows), rows, seed=5)
    assert sorted(positions.tolist()) == list(range(rows))
    again = np.concatenate([permuted_positions(np.arange(a, min(a + 300, rows)), rows, 5) for a in range(0, rows, 300)])
    np.testing.assert_array_equal(again, positions)  # elementwise: any batching gives the same positions


def test_random_split_exact_sizes_seeded_and_spread():
    n = 10_000
    frame = pl.DataFrame({"x": np.arange(n)})
    first = streamed(frame, lambda lazy: random_split(n, RATIOS, 1))
    assert np.bincount(first).tolist() == list(split_sizes(n, RATIOS))
    np.testing.assert_array_equal(first, streamed(frame, lambda lazy: random_split(n, RATIOS, 1)))
    other = streamed(frame, lambda lazy: random_split(n, RATIOS, 2))
    assert (first != other).mean() > 0.2
    # valid rows come from all over the input, not from one block
    assert np.histogram(np.flatnonzero(first == 1), bins=10, range=(0, n))[0].min() > 60
    assert abs(np.corrcoef(np.arange(n), first == 0)[0, 1]) < 0.05


def test_encoded_splits_are_written_in_fixed_row_groups(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    import mtrec.data.preprocess as module

    monkeypatch.setattr(module, "ROW_GROUP", 64)
    frame = pl.DataFrame({"ts": np.arange(1000), "x": np.arange(1000) % 7, "click": (np.arange(1000) % 3 == 0)})
    frame.write_parquet(tmp_path / "log.parquet")
    preprocess([str(tmp_path / "log.parquet")], ["click"], str(tmp_path / "out"), time="ts")
    groups = [pq.ParquetFile(tmp_path / "out" / "train.parquet").metadata.row_group(i).num_rows for i in range(13)]
    assert groups == [64] * 12 + [800 - 12 * 64]


def test_the_partitioned_sink_keeps_input_order_within_each_split(tmp_path, monkeypatch):
    import mtrec.data.preprocess as module

    monkeypatch.setattr(module, "ROW_GROUP", 50)
    n = 3000  # random split: the three splits interleave within every input row group
    frame = pl.DataFrame({"x": np.arange(n), "click": (np.arange(n) % 3 == 0)})
    for part in range(3):  # several input files
        frame.slice(part * 1000, 1000).write_parquet(tmp_path / f"log{part}.parquet", row_group_size=128)
    preprocess([str(tmp_path / f"log{part}.parquet") for part in range(3)], ["click"], str(tmp_path / "out"),
               split="random", seed=3, features=["x"], min_count=1)
    position = permuted_positions(np.arange(n), n, 3)
    n_train, n_valid, _ = split_sizes(n, RATIOS)
    expected = np.where(position < n_train, 0, np.where(position < n_train + n_valid, 1, 2))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["schema.json", "test.parquet", "train.parquet",
                                                                    "valid.parquet", "vocab"]
    for index, name in enumerate(("train", "valid", "test")):
        written = pl.read_parquet(tmp_path / "out" / f"{name}.parquet")
        # codes follow descending count, ties by value: every x is seen once, so code = rank of x + 2
        rows = np.flatnonzero(expected == index)
        train_values = np.flatnonzero(expected == 0)
        codes = np.searchsorted(train_values, rows) + 2 if index == 0 else None
        if codes is not None:
            assert written["x"].to_list() == codes.tolist()
        assert written["click"].to_list() == (rows % 3 == 0).astype(np.uint8).tolist()


def test_a_split_without_rows_still_gets_its_file(tmp_path):
    from mtrec.data.preprocess import _write_splits
    from mtrec.data.schema import Feature, Schema

    (tmp_path / "vocab").mkdir()
    schema = Schema(features=[Feature("v", "numeric", "Float64", mean=0.0, std=1.0)], labels=["click"])
    frame = pl.LazyFrame({"v": [1.0, 2.0, 3.0], "click": [1, 0, 1],
                          SPLIT_COL: pl.Series([0, 2, 0], dtype=pl.UInt8)})
    _write_splits(frame, schema, tmp_path)
    assert pl.read_parquet(tmp_path / "train.parquet")["v"].to_list() == [1.0, 3.0]
    assert pl.read_parquet(tmp_path / "test.parquet")["v"].to_list() == [2.0]
    valid = pl.read_parquet(tmp_path / "valid.parquet")
    assert valid.height == 0 and valid.schema == pl.Schema({"v": pl.Float32, "click": pl.UInt8})
