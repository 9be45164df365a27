"""Integer vocabularies are encoded by a dense code table or by a join, small string vocabularies by an
Enum cast or by a join; each pair gives the same codes."""

import polars as pl
import pytest

from mtrec.data import encode as enc
from mtrec.data.schema import Feature

RAW = [5, 6, 7, None, 100, -3, 9, 5]
EXPECTED = [2, 1, 3, 0, 1, 1, 4, 2]  # 6 unseen inside the range, 100 / -3 outside, None -> PAD


def _vocab(tmp_path, values, name="item", dtype="Int64"):
    (tmp_path / "vocab").mkdir()
    feature = Feature(name=name, kind="categorical", dtype=dtype, vocab_size=2 + len(values))
    pl.DataFrame({"value": values, "code": pl.Series(range(2, 2 + len(values)), dtype=pl.Int32),
                  "count": [10] * len(values)}).write_parquet(enc.vocab_path(tmp_path / "vocab", name))
    return feature


@pytest.mark.parametrize("dense", [True, False])
def test_dense_table_and_join_agree(tmp_path, monkeypatch, dense):
    feature = _vocab(tmp_path, [5, 7, 9])
    if not dense:  # force the join path
        monkeypatch.setattr(enc, "_dense_lookup", lambda path, feature: None)
    frame = pl.LazyFrame({"item": pl.Series(RAW, dtype=pl.Int32)})
    plan, expr = enc._join_vocab(frame, feature, 0, pl.Int32, tmp_path / "vocab")
    assert plan.select(expr).collect()["item"].to_list() == EXPECTED


def test_sparse_integer_ids_use_the_join(tmp_path):
    feature = _vocab(tmp_path, [1, 2**40])  # a range far wider than the vocabulary
    assert enc._dense_lookup(enc.vocab_path(tmp_path / "vocab", "item"), feature) is None
    frame = pl.LazyFrame({"item": pl.Series([2**40, 1, 3, None], dtype=pl.Int64)})
    plan, expr = enc._join_vocab(frame, feature, 0, pl.Int64, tmp_path / "vocab")
    assert plan.select(expr).collect()["item"].to_list() == [3, 2, 1, 0]


STRINGS = ["b", "", "ü", None, "zz", "a", "b", "A"]
STRING_CODES = [2, 3, 4, 0, 1, 5, 2, 1]  # "" is a value, None -> PAD, unseen "zz" / "A" -> OOV


def _string_vocab(tmp_path, values):
    return _vocab(tmp_path, values, name="city", dtype="String")


@pytest.mark.parametrize("enum", [True, False])
def test_enum_cast_and_join_agree_on_strings(tmp_path, monkeypatch, enum):
    feature = _string_vocab(tmp_path, ["b", "", "ü", "a"])
    if enum:
        assert enc._enum_lookup(enc.vocab_path(tmp_path / "vocab", "city"), feature) is not None
    else:  # force the join path
        monkeypatch.setattr(enc, "_enum_lookup", lambda path, feature: None)
    frame = pl.LazyFrame({"city": pl.Series(STRINGS, dtype=pl.String)})
    plan, expr = enc._join_vocab(frame, feature, 0, pl.String, tmp_path / "vocab")
    assert plan.select(expr).collect(engine="streaming")["city"].to_list() == STRING_CODES


def test_large_string_vocabularies_use_the_join(tmp_path, monkeypatch):
    monkeypatch.setattr(enc, "_ENUM_MAX", 3)
    feature = _string_vocab(tmp_path, ["b", "", "ü", "a"])
    assert enc._enum_lookup(enc.vocab_path(tmp_path / "vocab", "city"), feature) is None
    frame = pl.LazyFrame({"city": pl.Series(STRINGS, dtype=pl.String)})
    plan, expr = enc._join_vocab(frame, feature, 0, pl.String, tmp_path / "vocab")
    assert plan.select(expr).collect()["city"].to_list() == STRING_CODES
