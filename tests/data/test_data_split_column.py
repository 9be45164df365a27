"""--split-column: the user's own train / valid / test assignment, through preprocess() and the CLI."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from mtrec.data.preprocess import preprocess
from mtrec.data.schema import Schema
from tests.cli.test_cli_errors import assert_user_error, invoke

ROWS = 120


def make_log() -> pl.DataFrame:
    """Parts interleaved, not by time (71 train, 33 valid, 16 test); city 'late' only outside train."""
    rank = np.arange(ROWS)
    part = np.where(rank % 6 < 3, "train", np.where(rank % 6 < 5, "valid", "test"))
    part[rank >= 100] = "train"
    city = np.where(part == "train", np.where(rank % 2 == 0, "a", "b"), "late")
    return pl.DataFrame({"user_id": rank % 9, "city": city, "price": rank * 1.0, "part": part, "rank": rank,
                         "click": (rank % 4 == 0).astype(np.int8)})


@pytest.fixture
def log_path(tmp_path):
    path = tmp_path / "log.parquet"
    make_log().write_parquet(path)
    return path


def test_the_split_column_gives_the_splits_and_fitting_sees_train_rows_only(tmp_path, log_path):
    raw = make_log()
    summary = preprocess([str(log_path)], ["click"], str(tmp_path / "out"), user="user_id",
                         split_column="part", exclude=["rank"])
    schema = Schema.load(tmp_path / "out")
    assert schema.split == {"method": "column", "column": "part"}
    expected_rows = {"train": 71, "valid": 33, "test": 16}
    assert summary.rows == schema.rows == expected_rows
    assert "part" not in [f.name for f in schema.features]
    for name in ("train", "valid", "test"):
        split = pl.read_parquet(tmp_path / "out" / f"{name}.parquet")
        assert "part" not in split.columns and split.height == expected_rows[name]
        part = raw.filter(pl.col("part") == name)
        assert split["click"].to_list() == part["click"].to_list()  # the same rows, in input order
    vocab = pl.read_parquet(tmp_path / "out" / "vocab" / "city.parquet")
    assert sorted(vocab["value"].to_list()) == ["a", "b"]  # 'late' exists only in valid / test: OOV
    assert schema.feature("city").oov_rate_valid == 1.0
    train_price = raw.filter(pl.col("part") == "train")["price"]
    assert schema.feature("price").mean == pytest.approx(train_price.mean())


def _write(tmp_path, change) -> str:
    path = tmp_path / "changed.parquet"
    change(make_log()).write_parquet(path)
    return str(path)


def _with_part(values):
    return lambda f: f.with_columns(part=pl.Series(values))


CLI_CASES = {
    "bad values": (lambda t: _write(t, _with_part(["train", "dev", "TEST", "valid", "test"] * 24)), [],
                   ["'TEST'", "'dev'", "train, valid or test"]),
    "no valid part": (lambda t: _write(t, _with_part(["train", "test"] * 60)), [], ["no valid"]),
    "no test part": (lambda t: _write(t, _with_part(["train", "valid", "valid"] * 40)), [], ["no test"]),
    "nulls": (lambda t: _write(t, _with_part(["train", "valid", "test", None] * 30)), [], ["null in 30 rows"]),
    "not strings": (lambda t: _write(t, _with_part([0, 1, 2] * 40)), [], ["Int64", "strings"]),
    "with --split": (lambda t: _write(t, lambda f: f), ["--split", "random"], ["drop --split random"]),
    "with --ratios": (lambda t: _write(t, lambda f: f), ["--ratios", "0.8,0.1,0.1"], ["drop --ratios"]),
    "missing column": (lambda t: _write(t, lambda f: f.drop("part")), [], ["--split-column column 'part'"]),
    "also a feature": (lambda t: _write(t, lambda f: f), ["--user", "part"], ["cannot be a feature"]),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_split_column_mistakes_exit_2_with_one_line(tmp_path, case):
    make, extra, needles = CLI_CASES[case]
    path = make(tmp_path)
    code, out = invoke("preprocess", path, "--labels", "click", "--split-column", "part", "--exclude", "rank",
                       *extra, "--out", tmp_path / "out")
    assert_user_error(code, out, *needles)
    assert not (tmp_path / "out").exists()


def test_split_column_through_the_cli(tmp_path, log_path):
    code, out = invoke("preprocess", log_path, "--labels", "click", "--split-column", "part", "--exclude", "rank",
                       "--out", tmp_path / "out")
    assert code == 0, out
    assert Schema.load(tmp_path / "out").split == {"method": "column", "column": "part"}
    code, out = invoke("preprocess", log_path, "--labels", "click", "--exclude", "rank,part", "--out", tmp_path / "r")
    assert code == 0, out  # without it, the default 8:1:1 random split still applies
    assert Schema.load(tmp_path / "r").split["ratios"] == [0.8, 0.1, 0.1]
