"""Integer vocabularies are encoded by a dense code table or by a join; both give the same codes."""

import polars as pl
import pytest

from mtrec.data import encode as enc
from mtrec.data.schema import Feature

RAW = [5, 6, 7, None, 100, -3, 9, 5]
EXPECTED = [2, 1, 3, 0, 1, 1, 4, 2]  # 6 unseen inside the range, 100 / -3 outside, None -> PAD


def _vocab(tmp_path, values):
    (tmp_path / "vocab").mkdir()
    feature = Feature(name="item", kind="categorical", dtype="Int64", vocab_size=2 + len(values))
    pl.DataFrame({"value": values, "code": pl.Series(range(2, 2 + len(values)), dtype=pl.Int32),
                  "count": [10] * len(values)}).write_parquet(enc.vocab_path(tmp_path / "vocab", "item"))
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
