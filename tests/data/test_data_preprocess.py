"""preprocess: split before fitting, the index layout, train-only statistics, and encode parity."""

from __future__ import annotations

import json
import math

import numpy as np
import polars as pl
import pytest

from mtrec.core.errors import UserError
from mtrec.data.encode import encode, read_raw
from mtrec.data.preprocess import preprocess
from mtrec.data.schema import Schema

LABELS = ["click", "like", "share"]


def run(raw_path, out, **kwargs):
    kwargs.setdefault("exclude", ["rank"])
    return preprocess([str(raw_path)], LABELS, str(out), **kwargs)


@pytest.fixture
def encoded(raw_path, tmp_path):
    out = tmp_path / "data"
    summary = run(raw_path, out, user="user_id", item="item_id", time="ts", min_count=2)
    return out, summary


def split_rows(raw: pl.DataFrame, name: str) -> pl.DataFrame:
    """The raw rows of a time split, in input order (ranks 0-159 train, 160-179 valid, 180-199 test)."""
    low, high = {"train": (0, 160), "valid": (160, 180), "test": (180, 200)}[name]
    return raw.filter(pl.col("rank").is_between(low, high, closed="left"))


def test_output_files_and_dtypes_follow_the_contract(encoded):
    out, summary = encoded
    assert sorted(p.name for p in out.iterdir()) == ["schema.json", "test.parquet", "train.parquet", "valid.parquet",
                                                      "vocab"]
    assert sorted(p.name for p in (out / "vocab").iterdir()) == ["item_id.parquet", "user_city.parquet",
                                                                 "user_id.parquet"]
    schema = Schema.load(out)
    assert [f.name for f in schema.features] == ["user_id", "item_id", "user_city", "price", "age_days"]
    for name in ("train", "valid", "test"):
        frame_schema = pl.read_parquet_schema(out / f"{name}.parquet")
        assert list(frame_schema) == [f.name for f in schema.features] + LABELS + ["_user"]
        assert frame_schema == pl.Schema({"user_id": pl.Int32, "item_id": pl.Int32, "user_city": pl.Int32,
                                          "price": pl.Float32, "age_days": pl.Float32, "click": pl.UInt8,
                                          "like": pl.UInt8, "share": pl.UInt8, "_user": pl.Int64})
    raw = json.loads((out / "schema.json").read_text())
    assert raw["format"] == "mtrec-encoded" and raw["version"] == 1
    assert raw["rows"] == {"train": 160, "valid": 20, "test": 20} == summary.rows
    assert raw["split"] == {"method": "time", "ratios": [0.8, 0.1, 0.1], "seed": 0}
    assert (raw["user"], raw["item"], raw["time"]) == ("user_id", "item_id", "ts")
    vocab = pl.read_parquet(out / "vocab" / "user_city.parquet")
    assert vocab.schema["value"] == pl.String and vocab.schema["code"] == pl.Int32


def test_vocabulary_layout_descending_frequency_ties_by_value_min_count(encoded, raw_log):
    out, summary = encoded
    vocab = pl.read_parquet(out / "vocab" / "user_city.parquet")
    # train counts: a 80, b 30, c 30 (tie -> by value), zz 9; "rare" (1 < min_count 2) is left out
    assert vocab["value"].to_list() == ["a", "b", "c", "zz"]
    assert vocab["code"].to_list() == [2, 3, 4, 5]
    assert vocab["count"].to_list() == [80, 30, 30, 9]
    assert Schema.load(out).vocab_sizes["user_city"] == 6 == summary.vocab_sizes["user_city"]
    train = pl.read_parquet(out / "train.parquet")
    raw_train = split_rows(raw_log, "train")
    codes = dict(zip(raw_train["user_city"].to_list(), train["user_city"].to_list()))
    assert codes == {"a": 2, "b": 3, "c": 4, "zz": 5, "rare": 1, None: 0}


def test_no_vocabulary_or_statistic_sees_valid_or_test_rows(encoded, raw_log):
    out, summary = encoded
    schema = Schema.load(out)
    vocab_values = pl.read_parquet(out / "vocab" / "user_city.parquet")["value"].to_list()
    assert "only_test" not in vocab_values
    test = pl.read_parquet(out / "test.parquet")
    raw_test = split_rows(raw_log, "test")
    is_only_test = (raw_test["user_city"] == "only_test").to_numpy()
    assert set(test["user_city"].to_numpy()[is_only_test]) == {1}
    assert summary.oov_rate_valid["user_city"] == 0.0  # valid holds only a and b
    # price is 1000 in valid/test rows; a leak would move the mean far from the train mean (12)
    train_prices = split_rows(raw_log, "train")["price"].drop_nulls().to_numpy()
    price = schema.feature("price")
    assert price.mean == pytest.approx(train_prices.mean(), abs=1e-12)
    assert price.std == pytest.approx(train_prices.std(), abs=1e-12)
    assert np.allclose(test["price"].to_numpy(), (1000.0 - train_prices.mean()) / train_prices.std(), rtol=1e-6)
    # the unseen user: OOV code, but its own _user group
    unseen = (raw_test["user_id"] == 999).to_numpy()
    assert set(test["user_id"].to_numpy()[unseen]) == {1}
    assert set(test["_user"].to_numpy()[unseen]) == {999}


def test_null_numeric_is_filled_with_the_train_mean(encoded, raw_log):
    out, _ = encoded
    train = pl.read_parquet(out / "train.parquet")
    null_price = split_rows(raw_log, "train")["price"].is_null().to_numpy()
    assert null_price.sum() == 10
    assert np.all(train["price"].to_numpy()[null_price] == 0.0)


def test_time_split_respects_time_order(encoded):
    out, _ = encoded
    # age_days is the time rank; standardising is monotone, so order survives encoding
    ages = {name: pl.read_parquet(out / f"{name}.parquet")["age_days"] for name in ("train", "valid", "test")}
    assert ages["train"].max() < ages["valid"].min()
    assert ages["valid"].max() < ages["test"].min()


def test_labels_uint8_counts_binarised_with_a_warning(encoded, raw_log):
    out, summary = encoded
    train = pl.read_parquet(out / "train.parquet")
    assert set(train["share"].unique()) == {0, 1}
    raw_train = split_rows(raw_log, "train")
    assert train["share"].to_list() == (raw_train["share"] > 0).cast(pl.UInt8).to_list()
    assert train["like"].to_list() == raw_train["like"].cast(pl.UInt8).to_list()
    assert any("'share'" in w and "binarised" in w for w in summary.warnings)
    assert summary.positive_rate["train"]["click"] == pytest.approx(raw_train["click"].mean())
    assert Schema.load(out).positive_rate == summary.positive_rate["train"]


def test_encode_on_raw_rows_matches_the_preprocess_output(encoded, raw_log, tmp_path):
    out, _ = encoded
    schema = Schema.load(out)
    for name in ("train", "valid", "test"):
        written = pl.read_parquet(out / f"{name}.parquet")
        assert encode(split_rows(raw_log, name), schema, out / "vocab").equals(written)
    # the same, through read_raw on a file (the path of evaluate --raw), lazily
    path = tmp_path / "new_logs.parquet"
    split_rows(raw_log, "test").write_parquet(path)
    lazy = encode(read_raw(str(path)), schema, out / "vocab")
    assert isinstance(lazy, pl.LazyFrame)
    assert lazy.collect().equals(pl.read_parquet(out / "test.parquet"))


def test_encode_is_robust_to_other_integer_widths_and_column_order(encoded, raw_log):
    out, _ = encoded
    schema = Schema.load(out)
    raw_test = split_rows(raw_log, "test")
    changed = raw_test.with_columns(pl.col("user_id", "item_id").cast(pl.Int32)).select(reversed(raw_test.columns))
    assert encode(changed, schema, out / "vocab").equals(encode(raw_test, schema, out / "vocab"))


def test_random_split_is_deterministic_for_a_seed(raw_path, tmp_path):
    first = run(raw_path, tmp_path / "a", split="random", seed=1)
    run(raw_path, tmp_path / "b", split="random", seed=1)
    run(raw_path, tmp_path / "c", split="random", seed=2)
    assert first.rows == {"train": 160, "valid": 20, "test": 20}
    a, b, c = (pl.read_parquet(tmp_path / d / "train.parquet") for d in "abc")
    assert a.equals(b)
    assert not a.equals(c)
    # random: valid rows come from all over the time range
    valid_ages = pl.read_parquet(tmp_path / "a" / "valid.parquet")["age_days"]
    train_ages = a["age_days"]
    assert valid_ages.max() > train_ages.min() and valid_ages.min() < train_ages.max()


def test_split_defaults_to_time_when_a_time_column_is_given(raw_path, tmp_path):
    assert run(raw_path, tmp_path / "t", time="ts").schema.split["method"] == "time"
    assert run(raw_path, tmp_path / "r").schema.split["method"] == "random"


def test_force_replaces_an_earlier_output_and_nothing_else(raw_path, tmp_path):
    out = tmp_path / "data"
    run(raw_path, out, time="ts")
    (out / "old.txt").write_text("old")
    run(raw_path, out, time="ts", force=True)
    assert not (out / "old.txt").exists() and (out / "schema.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "in"]  # no temp or old dir left
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a data directory of mtrec preprocess"):
        run(raw_path, foreign, time="ts", force=True)
    assert (foreign / "notes.txt").read_text() == "keep me"
    (tmp_path / "file.parquet").write_bytes(b"x")
    with pytest.raises(UserError, match="not a data directory"):
        run(raw_path, tmp_path / "file.parquet", time="ts", force=True)
    assert (tmp_path / "file.parquet").read_bytes() == b"x"


def test_inputs_as_directory_glob_and_several_files(raw_log, tmp_path):
    parts = tmp_path / "parts"
    parts.mkdir()
    raw_log.slice(0, 120).write_parquet(parts / "a.parquet")
    raw_log.slice(120).write_parquet(parts / "b.parquet")
    for inputs in ([str(parts)], [str(parts / "*.parquet")], [str(parts / "a.parquet"), str(parts / "b.parquet")]):
        out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
        summary = preprocess(inputs, LABELS, str(out), time="ts", exclude=["rank"])
        assert sum(summary.rows.values()) == 200
        assert len(summary.files) == 2


def test_string_user_ids_get_distinct_stable_groups(tmp_path):
    rows = 100
    frame = pl.DataFrame({"user": [None if i % 17 == 5 else f"u{i % 13}" for i in range(rows)],
                          "x": [i % 4 for i in range(rows)], "click": [i % 2 for i in range(rows)]})
    path = tmp_path / "log.parquet"
    frame.write_parquet(path)
    preprocess([str(path)], ["click"], str(tmp_path / "out"), user="user", split="random")
    schema = Schema.load(tmp_path / "out")
    encoded = encode(frame, schema, tmp_path / "out" / "vocab")
    groups = pl.DataFrame({"user": frame["user"], "group": encoded["_user"]}).unique()
    assert set(groups.filter(pl.col("user").is_null())["group"]) == {-1}  # rows without a user: one group
    assert groups.height == 14 and groups["group"].n_unique() == 14  # one group per user, no collisions
    parts = pl.concat([pl.read_parquet(tmp_path / "out" / f"{s}.parquet") for s in ("train", "valid", "test")])
    assert set(parts["_user"].unique()) == set(groups["group"])


def test_spec_kinds_and_transforms(raw_path, tmp_path, raw_log):
    spec = tmp_path / "spec.toml"
    spec.write_text("""
[features.item_id]
hash_buckets = 5

[features.user_id]
kind = "numeric"
log1p = true

[features.price]
fill = -1.0
log1p = true

[features.age_days]
bucketize = 4

[features.user_city]
kind = "drop"
""")
    out = tmp_path / "data"
    summary = run(raw_path, out, time="ts", spec=str(spec))
    schema = Schema.load(out)
    kinds = {f.name: (f.kind, f.transforms) for f in schema.features}
    assert kinds == {"item_id": ("categorical", "hash into 5 buckets"),
                     "user_id": ("numeric", "log1p, fill train mean, standardise"),
                     "price": ("numeric", "log1p, fill -1, standardise"),
                     "age_days": ("categorical", "4 quantile buckets")}
    assert not (out / "vocab" / "item_id.parquet").exists()
    train = pl.read_parquet(out / "train.parquet")
    raw_train = split_rows(raw_log, "train")
    # hashing: codes in [2, 7), the same raw value always the same code
    assert schema.vocab_sizes["item_id"] == 7
    pairs = pl.DataFrame({"raw": raw_train["item_id"], "code": train["item_id"]}).unique()
    assert pairs.height == 7 and pairs["code"].is_between(2, 6).all()
    # log1p: statistics of log1p(train values); declared fill in raw units
    price = schema.feature("price")
    logged = np.log1p(raw_train["price"].drop_nulls().to_numpy())
    assert price.mean == pytest.approx(logged.mean()) and price.std == pytest.approx(logged.std())
    null_rows = raw_train["price"].is_null().to_numpy()
    expected_fill = (-math.log1p(1.0) - price.mean) / price.std
    assert np.allclose(train["price"].to_numpy()[null_rows], expected_fill, rtol=1e-6)
    # quantile buckets fitted on train ranks 0..159: quartile boundaries, codes 2..5
    age = schema.feature("age_days")
    assert age.boundaries == pytest.approx([39.75, 79.5, 119.25])
    assert sorted(train["age_days"].unique()) == [2, 3, 4, 5]
    assert set(pl.read_parquet(out / "test.parquet")["age_days"]) == {5}
    assert summary.vocab_sizes["age_days"] == 6


def test_min_count_makes_rare_values_oov_in_train_too(raw_path, tmp_path):
    run(raw_path, tmp_path / "data", time="ts", min_count=31)
    vocab = pl.read_parquet(tmp_path / "data" / "vocab" / "user_city.parquet")
    assert vocab["value"].to_list() == ["a"]  # b and c have 30 train rows


def test_warnings_for_id_like_and_positive_free_tasks(tmp_path):
    rows = 2000
    frame = pl.DataFrame({"row_id": np.arange(rows), "x": np.arange(rows) % 5,
                          "click": (np.arange(rows) % 2).astype(np.int8), "buy": np.zeros(rows, np.int8)})
    frame.write_parquet(tmp_path / "log.parquet")
    summary = preprocess([str(tmp_path / "log.parquet")], ["click", "buy"], str(tmp_path / "out"))
    assert any("row_id" in w and "row id" in w for w in summary.warnings)
    assert any("'buy'" in w and "no positive in the train split" in w for w in summary.warnings)
    summary = preprocess([str(tmp_path / "log.parquet")], ["click", "buy"], str(tmp_path / "out2"),
                         exclude=["row_id"])
    assert [f.name for f in summary.schema.features] == ["x"]


def test_summary_tables(encoded):
    _, summary = encoded
    columns, rows = summary.feature_table()
    assert columns[:4] == ["feature", "kind", "source dtype", "transforms"]
    assert rows[2][:4] == ["user_city", "categorical", "String", "vocabulary, min count 2"]
    columns, rows = summary.split_table()
    assert columns == ["split", "rows", "click pos. rate", "like pos. rate", "share pos. rate"]
    assert [r[:2] for r in rows] == [["train", 160], ["valid", 20], ["test", 20]]


def test_sample_data_is_what_its_readme_command_makes_and_its_spec_works(tmp_path):
    from pathlib import Path

    from mtrec.data.synth import synthesize

    sample = Path(__file__).resolve().parents[2] / "sample_data"
    frame = pl.read_parquet(sample / "interactions.parquet")
    assert frame.equals(synthesize(100_000, seed=0)), "regenerate sample_data with the command in its README"
    summary = preprocess([str(sample / "interactions.parquet")], LABELS, str(tmp_path / "out"), user="user_id",
                         item="item_id", time="ts", spec=str(sample / "spec.toml"))
    assert summary.schema.feature("item_popularity").bucketize == 10
    assert summary.schema.feature("item_price").log1p
    assert summary.warnings == []


def test_each_pass_is_announced_in_order(raw_path, tmp_path):
    stages: list[str] = []
    preprocess([str(raw_path)], ["click"], str(tmp_path / "out"), time="ts", exclude=["rank"], on_stage=stages.append)
    assert stages == ["checking the labels", "assigning the time split",
                      "fitting vocabularies and statistics on the train rows", "encoding and writing the splits",
                      "measuring positive and OOV rates"]


def test_a_relative_out_directory_holds_the_rows_of_every_split(raw_path, tmp_path, monkeypatch):
    """The splits are written by one partitioned sink: with a relative --out (as `make demo` passes)
    its files must land in that directory, not nested below it."""
    monkeypatch.chdir(tmp_path)
    summary = run(raw_path, "rel/data", user="user_id", item="item_id", time="ts")
    for name in ("train", "valid", "test"):
        assert pl.read_parquet(tmp_path / "rel" / "data" / f"{name}.parquet").height == summary.rows[name] > 0
    assert sorted(p.name for p in (tmp_path / "rel").iterdir()) == ["data"]


def test_huge_numeric_values_and_fills_encode_to_finite_numbers(tmp_path):
    # found by tests/fuzz: values of 1e300 overflowed the std (taken for "a single value") and
    # every encoded value became +-inf in float32; a fill of 1e300 did the same to the null rows
    rows = 60
    values = [1e300 if i % 7 == 0 else float(i) for i in range(rows)]
    frame = pl.DataFrame({"big": values, "holes": [None if i % 3 == 0 else float(i) for i in range(rows)],
                          "click": [i % 2 for i in range(rows)]})
    (tmp_path / "in").mkdir()
    frame.write_parquet(tmp_path / "in" / "log.parquet")
    (tmp_path / "spec.toml").write_text("[features.holes]\nfill = 1e300\n")
    summary = preprocess([str(tmp_path / "in" / "log.parquet")], ["click"], str(tmp_path / "out"), split="random",
                         spec=str(tmp_path / "spec.toml"))
    assert not any("single value" in w for w in summary.warnings)
    schema = Schema.load(tmp_path / "out")
    big = schema.feature("big")
    train = pl.read_parquet(tmp_path / "out" / "train.parquet")
    assert 0 < big.std < math.inf
    for split in ("train", "valid", "test"):
        encoded = pl.read_parquet(tmp_path / "out" / f"{split}.parquet")
        assert encoded.select(pl.col("big", "holes").is_finite().all()).row(0) == (True, True), split
    # the train column is standardised: mean 0, std 1
    assert train["big"].cast(pl.Float64).mean() == pytest.approx(0.0, abs=1e-6)
    assert train["big"].cast(pl.Float64).std(ddof=0) == pytest.approx(1.0, rel=1e-5)
    assert train["holes"].max() == pytest.approx(1e6)  # a fill far outside the range is clipped
