"""Integer vocabularies are encoded by a dense code table or by a join, small string vocabularies by an
Enum cast or by a join; each pair gives the same codes."""

import polars as pl
import pytest

from mtrec.data import encode as enc
from mtrec.data.schema import Feature, Schema

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


# UInt64 ids at or above 2**63 (random 64-bit ids in real logs) do not fit an Int64.
HUGE = [2**63, 2**63 + 12345, 2**64 - 1]


def _hashed_codes(values, dtype, buckets=1 << 20):
    feature = Feature(name="device", kind="categorical", dtype=str(dtype), hash_buckets=buckets)
    frame = pl.DataFrame({"device": pl.Series(values, dtype=dtype)})
    return frame.select(enc._hashed_expr(feature))["device"].to_list()


def test_hashed_uint64_ids_above_two_to_the_63_keep_distinct_codes():
    codes = _hashed_codes(HUGE + [None], pl.UInt64)
    assert codes[-1] == enc.PAD
    assert enc.OOV not in codes[:3] and len(set(codes[:3])) == 3  # was: all three OOV (code 1)
    # the same ids in a list column hash to the same codes as in a scalar column
    frame = pl.DataFrame({"device": pl.Series([HUGE], dtype=pl.List(pl.UInt64))})
    feature = Feature(name="device", kind="categorical", dtype="UInt64", hash_buckets=1 << 20)
    listed = frame.select(pl.col("device").list.eval(enc._hashed_code(pl.element(), feature)))
    assert listed["device"].to_list() == [codes[:3]]


def test_hashes_of_ids_below_two_to_the_63_did_not_change():
    # pinned before ids >= 2**63 were handled: models trained with hashed ids depend on these codes
    small = [0, 1, 12345, 2**40, 2**63 - 1]
    pinned = [904625, 154819, 70050, 50059, 237225]
    for dtype in (pl.Int64, pl.UInt64):
        assert _hashed_codes(small, dtype) == pinned
    assert _hashed_codes([-1, -(2**63)], pl.Int64) == [338978, 652253]
    assert _hashed_codes([3, 7], pl.Int32) == _hashed_codes([3, 7], pl.UInt64)


@pytest.mark.parametrize("vocab_values", [[5, 7, 9], [2**63 + 5, 2**63 + 7, 2**63 + 9]])
def test_uint64_ids_above_two_to_the_63_encode_without_a_crash(tmp_path, vocab_values, monkeypatch):
    feature = _vocab(tmp_path, pl.Series(vocab_values, dtype=pl.UInt64), dtype="UInt64")
    raw = pl.Series([vocab_values[0], 2**64 - 1, None, vocab_values[2], 2**63], dtype=pl.UInt64)
    expected = [2, enc.OOV, enc.PAD, 4, enc.OOV]
    frame = pl.LazyFrame({"item": raw})
    plan, expr = enc._join_vocab(frame, feature, 0, pl.UInt64, tmp_path / "vocab")
    assert plan.select(expr).collect()["item"].to_list() == expected
    monkeypatch.setattr(enc, "_dense_lookup", lambda path, feature: None)
    plan, expr = enc._join_vocab(frame, feature, 0, pl.UInt64, tmp_path / "vocab")
    assert plan.select(expr).collect()["item"].to_list() == expected


def test_a_boolean_column_that_arrives_as_strings_encodes_instead_of_crashing(tmp_path):
    # found by tests/fuzz: Polars has no String -> Boolean cast, not even non-strict (a traceback)
    feature = _vocab(tmp_path, pl.Series([True, False]), name="flag", dtype="Boolean")
    frame = pl.LazyFrame({"flag": pl.Series(["true", "false", "yes", None, "1"], dtype=pl.String)})
    plan, expr = enc._join_vocab(frame, feature, 0, pl.String, tmp_path / "vocab")
    assert plan.select(expr).collect(engine="streaming")["flag"].to_list() == [2, 3, enc.OOV, enc.PAD, enc.OOV]
    # and the same values as list elements of a sequence
    sequence = Feature(name="flags", kind="sequence", dtype="List(Boolean)", max_len=3, share_with="flag")
    schema = Schema(features=[feature, sequence], labels=[], positive_rate={}, user=None, item=None, time=None,
                    split={}, rows={})
    lists = pl.DataFrame({"flags": [["true", "no"], None]}, schema={"flags": pl.List(pl.String)})
    codes = lists.select(enc._sequence_expr(sequence, schema, tmp_path / "vocab", pl.List(pl.String)))
    assert codes["flags"].to_list() == [[2, enc.OOV, enc.PAD], [enc.PAD] * 3]
