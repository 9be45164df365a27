"""Every user mistake in preprocess / encode: a one-line UserError naming the problem, nothing left on disk."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from mtrec.core.errors import UserError
from mtrec.data.encode import encode, read_raw
from mtrec.data.preprocess import preprocess
from mtrec.data.schema import Schema

LABELS = ["click", "like", "share"]


def fails(tmp_path, inputs, labels=LABELS, match: str = "", **kwargs):
    """preprocess must raise a one-line UserError matching ``match`` and leave tmp_path as it was."""
    before = sorted(p.name for p in tmp_path.iterdir())
    kwargs.setdefault("exclude", ["rank"] if "rank" in _columns(inputs) else [])
    with pytest.raises(UserError, match=match) as info:
        preprocess([str(i) for i in inputs], labels, str(tmp_path / "out"), **kwargs)
    message = str(info.value)
    assert "\n" not in message and len(message) > 20
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output dir, no temp dir
    return message


def _columns(inputs) -> list[str]:
    try:
        return list(pl.read_parquet_schema(inputs[0]))
    except Exception:  # noqa: BLE001 - the broken-input cases
        return []


def write(tmp_path, frame: pl.DataFrame, name: str = "log.parquet"):
    path = tmp_path / name
    frame.write_parquet(path)
    return path


def test_missing_and_unreadable_inputs(tmp_path, raw_path):
    fails(tmp_path, [tmp_path / "nope.parquet"], match="not found")
    fails(tmp_path, [str(tmp_path / "*.nothing")], match="no file matches")
    (tmp_path / "empty_dir").mkdir()
    fails(tmp_path, [tmp_path / "empty_dir"], match="holds no .parquet file")
    csv = tmp_path / "log.csv"
    csv.write_text("a,b\n1,2\n")
    fails(tmp_path, [csv], match="not a Parquet file")
    empty = tmp_path / "empty.parquet"
    empty.write_bytes(b"")
    fails(tmp_path, [empty], match="empty file")
    data = raw_path.read_bytes()
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(data[: len(data) // 2] + b"PAR1")
    fails(tmp_path, [corrupt], match="corrupt Parquet")


def test_zero_rows(tmp_path, raw_log):
    path = write(tmp_path, raw_log.head(0))
    fails(tmp_path, [path], match="no rows")


def test_files_with_different_columns(tmp_path, raw_log):
    a = write(tmp_path, raw_log, "a.parquet")
    b = write(tmp_path, raw_log.drop("price"), "b.parquet")
    fails(tmp_path, [a, b], match="different columns")


def test_missing_label_lists_the_available_columns(tmp_path, raw_path):
    message = fails(tmp_path, [raw_path], labels=["click", "purchase"], match="'purchase'")
    assert "user_city" in message and "price" in message


@pytest.mark.parametrize("role", ["user", "item", "time"])
def test_missing_declared_columns(tmp_path, raw_path, role):
    fails(tmp_path, [raw_path], match=f"--{role} column 'missing'", **{role: "missing"})


def test_missing_feature_exclude_or_spec_columns(tmp_path, raw_path):
    fails(tmp_path, [raw_path], match="feature column", features=["nope"])
    fails(tmp_path, [raw_path], match="--exclude column", exclude=["nope"])
    spec = tmp_path / "spec.toml"
    spec.write_text("[features.nope]\nkind = 'drop'\n")
    fails(tmp_path, [raw_path], match="feature spec column", spec=str(spec))


def test_a_column_cannot_be_feature_and_label(tmp_path, raw_path):
    fails(tmp_path, [raw_path], match="both a label and a feature", features=["price", "click"])
    fails(tmp_path, [raw_path], match="both a label and the --user column", user="click")
    spec = tmp_path / "spec.toml"
    spec.write_text("[features.click]\nkind = 'categorical'\n")
    fails(tmp_path, [raw_path], match="both a label and a feature", spec=str(spec))


def test_label_argument_mistakes(tmp_path, raw_path):
    fails(tmp_path, [raw_path], labels=["click", "click"], match="given twice")
    fails(tmp_path, [raw_path], labels=[], match="--labels is empty")


@pytest.mark.parametrize("ratios, match", [((0.8, 0.1, 0.2), "sum to 1"), ((0.9, 0.1), "three positive"),
                                           ((1.0, 0.0, 0.0), "three positive"), ((0.8, -0.1, 0.3), "three positive"),
                                           (("a", 1, 2), "three numbers")])
def test_bad_ratios(tmp_path, raw_path, ratios, match):
    fails(tmp_path, [raw_path], ratios=ratios, match=match)


def test_split_mistakes(tmp_path, raw_path):
    fails(tmp_path, [raw_path], split="time", match="needs the timestamp column")
    fails(tmp_path, [raw_path], split="hash", match="time or random")
    fails(tmp_path, [raw_path], time="user_city", match="must hold numbers")
    fails(tmp_path, [raw_path], min_count=0, match="--min-count")


def test_a_split_that_would_be_empty(tmp_path, raw_log):
    path = write(tmp_path, raw_log.head(5))
    fails(tmp_path, [path], match="valid split would be empty")


def test_output_exists_without_force(tmp_path, raw_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(UserError, match="exists: pass --force"):
        preprocess([str(raw_path)], LABELS, str(out), exclude=["rank"])
    assert (out / "keep.txt").read_text() == "precious"


def test_output_must_not_contain_the_inputs(tmp_path, raw_path):
    with pytest.raises(UserError, match="inside the output"):
        preprocess([str(raw_path)], LABELS, str(raw_path.parent), force=True)
    assert raw_path.exists()


def test_bad_label_values(tmp_path, raw_log):
    def check(frame, match):
        fails(tmp_path, [write(tmp_path, frame)], match=match)
        (tmp_path / "log.parquet").unlink()

    check(raw_log.with_columns(pl.col("click").cast(pl.String)), "string column")
    nulls = raw_log.with_columns(pl.when(pl.col("rank") < 7).then(None).otherwise(pl.col("click")).alias("click"))
    message = fails(tmp_path, [write(tmp_path, nulls)], match="null or NaN in 7 of 200 rows")
    assert "'click'" in message
    (tmp_path / "log.parquet").unlink()
    check(raw_log.with_columns(pl.lit(None, dtype=pl.Int8).alias("like")), "null in every row")
    nan = raw_log.with_columns(pl.when(pl.col("rank") < 3).then(float("nan")).otherwise(pl.col("click"))
                               .cast(pl.Float64).alias("click"))
    check(nan, "null or NaN in 3 of 200 rows")
    check(raw_log.with_columns((pl.col("click") - 1).alias("click")), "negative values")
    check(raw_log.with_columns((pl.col("click") * 0.5).alias("click")), "fractional")


def test_bad_feature_spec(tmp_path, raw_path):
    spec = tmp_path / "spec.toml"
    for text, match in [("[features.price]\nlog1p = 'yes'\n", "log1p must be a bool"),
                        ("[features.price]\nbuckets = 3\n", "unknown key"),
                        ("[features.user_city]\nlog1p = true\n", "log1p applies to numeric"),
                        ("[features.price]\nmin_count = 3\n", "min_count applies to categorical"),
                        ("[features.user_city]\nkind = 'numeric'\n", "cannot be numeric"),
                        ("[features.price]\nkind = 'text'\n", "kind must be one of"),
                        ("[features.user_city]\nhash_buckets = 0\n", "at least 1"),
                        ("[features.user_city]\nhash_buckets = 8\nmin_count = 2\n", "both hash_buckets and min_count"),
                        ("[features.price]\nfill = inf\n", "fill must be a finite number, got inf"),
                        ("[features.price]\nfill = -inf\n", "fill must be a finite number, got -inf"),
                        ("[features.price]\nfill = nan\n", "fill must be a finite number, got nan"),
                        ("[other]\nx = 1\n", "unknown section"),
                        ("[features.price\n", "not valid TOML")]:
        spec.write_text(text)
        fails(tmp_path, [tmp_path / "in" / "log.parquet"], match=match, spec=str(spec))
    fails(tmp_path, [raw_path], spec=str(tmp_path / "missing.toml"), match="feature spec .* not found")


def test_nothing_left_behind_when_writing_fails(tmp_path, raw_path, monkeypatch):
    import mtrec.data.preprocess as module

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(module, "_measure", broken)  # fails after the splits were written to the temp dir
    with pytest.raises(OSError):
        preprocess([str(raw_path)], LABELS, str(tmp_path / "out"), exclude=["rank"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_encode_rejects_missing_columns_and_bad_labels(tmp_path, raw_path, raw_log):
    preprocess([str(raw_path)], LABELS, str(tmp_path / "out"), exclude=["rank"], time="ts")
    schema = Schema.load(tmp_path / "out")
    vocab = tmp_path / "out" / "vocab"
    with pytest.raises(UserError, match="lacks feature column.*user_city"):
        encode(raw_log.drop("user_city"), schema, vocab)
    with pytest.raises(UserError, match="lacks label column.*share"):
        encode(raw_log.drop("share"), schema, vocab)
    assert "share" not in encode(raw_log.drop("share"), schema, vocab, labels=["click"]).columns
    with pytest.raises(UserError, match="null or NaN in 1 of"):
        bad = raw_log.with_columns(pl.when(pl.col("rank") == 0).then(None).otherwise(pl.col("click")).alias("click"))
        encode(bad, schema, vocab)
    with pytest.raises(UserError, match="is String in the raw log but numeric"):
        encode(raw_log.with_columns(pl.col("price").cast(pl.String)), schema, vocab)
    with pytest.raises(UserError, match="not found"):
        read_raw(str(tmp_path / "nothing.parquet"))
    (vocab / "user_city.parquet").unlink()
    with pytest.raises(UserError, match="re-run mtrec preprocess"):
        encode(raw_log, schema, vocab)


def test_unsupported_column_types_are_skipped_with_a_warning_or_refused_when_asked_for(tmp_path):
    frame = pl.DataFrame({"x": [1, 2, 3, 4] * 5, "tags": [[1.5, 2.0]] * 20, "when": pl.datetime_range(
        pl.datetime(2024, 1, 1), pl.datetime(2024, 1, 20), "1d", eager=True), "click": np.arange(20) % 2})
    path = write(tmp_path, frame)
    summary = preprocess([str(path)], ["click"], str(tmp_path / "ok"))
    assert [f.name for f in summary.schema.features] == ["x"]
    assert any("'tags'" in w for w in summary.warnings) and any("'when'" in w and "--time" in w
                                                                 for w in summary.warnings)
    fails(tmp_path, [path], labels=["click"], features=["x", "tags"], match="cannot be a feature")


@pytest.mark.parametrize("role", ["user", "item"])
def test_a_list_column_cannot_be_the_user_or_item_id(tmp_path, raw_log, role):
    # found by tests/fuzz: a list --user crashed in the user-group hash with a Polars traceback
    (tmp_path / "in").mkdir()
    log = raw_log.with_columns(pl.concat_list("user_id", "item_id").alias("history"))
    path = write(tmp_path / "in", log)
    fails(tmp_path, [path], match=f"--{role} column 'history' is List\\(Int64\\): an id holds one value per row",
          **{role: "history"})


def test_encode_refuses_a_list_user_column(tmp_path, raw_log):
    # found by tests/fuzz: a user column that is no feature (all null at preprocess) and arrives as
    # lists in a raw log crashed the user-group hash with a Polars traceback
    (tmp_path / "in").mkdir()
    log = raw_log.with_columns(pl.lit(None).alias("visitor"))
    path = write(tmp_path / "in", log)
    preprocess([str(path)], LABELS, str(tmp_path / "out"), exclude=["rank"], user="visitor")
    schema = Schema.load(tmp_path / "out")
    assert "visitor" not in [f.name for f in schema.features]
    with pytest.raises(UserError, match="user column 'visitor' is List\\(Int64\\) in the raw log"):
        encode(log.with_columns(pl.concat_list("user_id").alias("visitor")), schema, tmp_path / "out" / "vocab")
