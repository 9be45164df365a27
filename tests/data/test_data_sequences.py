"""Sequence (list) features: element vocabularies from train only, the encoded [N, max_len] block,
shared and hashed codes, inference and spec mistakes. Expected codes come from a plain-Python
reference encoder over the same small log."""

from __future__ import annotations

from collections import Counter

import numpy as np
import polars as pl
import pytest

from mtrec.core.errors import UserError
from mtrec.data.encode import encode
from mtrec.data.hashing import stable_hash
from mtrec.data.preprocess import preprocess
from mtrec.data.schema import Feature, Schema
from mtrec.data.spec import parse_spec

ROWS = 200  # time split 8:1:1 -> ranks 0..159 train, 160..179 valid, 180..199 test
TRAIN = 160


def make_log(seed: int = 0) -> pl.DataFrame:
    """Lists of varied length (empty, null, null elements), ids 0..29 in train, 100+ only later."""
    rng = np.random.default_rng(seed)
    rank = np.arange(ROWS)
    item = rng.integers(0, 12, ROWS)
    hist, tags = [], []
    for r in rank:  # building the fixture row by row is fine; the code under test never does
        n = int(rng.integers(0, 9))
        ids = [int(x) for x in rng.integers(0, 30, n)]
        if r >= TRAIN and n:
            ids[-1] = 100 + int(r)  # an id no train row has
        if r % 17 == 5 and n:
            ids[0] = None
        hist.append(None if r % 23 == 7 else ids)
        tags.append([f"t{int(x)}" for x in rng.integers(0, 6, int(rng.integers(0, 4)))])
    frame = pl.DataFrame({"user_id": (rank % 13).astype(np.int64), "item_id": item.astype(np.int64),
                          "hist": pl.Series(hist, dtype=pl.List(pl.Int64)), "tags": pl.Series(tags),
                          "ts": 1000 + 10 * rank, "rank": rank, "click": (rank % 3 == 0).astype(np.int8)})
    return frame.sample(fraction=1.0, shuffle=True, seed=seed)


def reference_vocab(values, min_count: int = 1) -> dict:
    """{value: code}: descending count, ties by value, codes from 2."""
    counts = Counter(values)
    kept = sorted((v for v, c in counts.items() if c >= min_count), key=lambda v: (-counts[v], v))
    return {v: code for code, v in enumerate(kept, start=2)}


def window_elements(lists, max_len: int):
    return [x for lst in lists if lst for x in lst[-max_len:] if x is not None]


def reference_codes(lists, vocab: dict, max_len: int) -> np.ndarray:
    out = np.zeros((len(lists), max_len), dtype=np.int32)
    for row, lst in enumerate(lists):
        for j, x in enumerate((lst or [])[-max_len:]):
            out[row, j] = 0 if x is None else vocab.get(x, 1)
    return out


@pytest.fixture
def log() -> pl.DataFrame:
    return make_log()


def run(tmp_path, frame: pl.DataFrame, spec: str = "", **kwargs):
    path = tmp_path / "log.parquet"
    frame.write_parquet(path)
    spec_path = None
    if spec:
        spec_path = tmp_path / "spec.toml"
        spec_path.write_text(spec)
    out = tmp_path / "out"
    summary = preprocess([str(path)], ["click"], str(out), user="user_id", item="item_id", time="ts",
                         exclude=["rank"], spec=str(spec_path) if spec_path else None, **kwargs)
    return summary, Schema.load(out), out


def by_rank(frame: pl.DataFrame, low: int, high: int) -> pl.DataFrame:
    """Raw rows with low <= rank < high, in input order (the order preprocess keeps)."""
    return frame.filter((pl.col("rank") >= low) & (pl.col("rank") < high))


def test_inferred_sequences_fitted_on_train_elements_in_the_window(tmp_path, log):
    summary, schema, out = run(tmp_path, log, "[features.hist]\nmax_len = 3\n")
    hist, tags = schema.feature("hist"), schema.feature("tags")
    assert (hist.kind, hist.max_len, hist.pooling, hist.share_with) == ("sequence", 3, "mean", None)
    assert (tags.kind, tags.max_len, tags.dtype) == ("sequence", 50, "List(String)")
    assert [f.name for f in schema.sequence_features] == ["hist", "tags"]
    assert "hist" not in schema.vocab_sizes and [f.name for f in schema.categorical_features] == ["user_id", "item_id"]

    train = by_rank(log, 0, TRAIN)
    expected = reference_vocab(window_elements(train["hist"].to_list(), 3))
    vocab = pl.read_parquet(out / "vocab" / "hist.parquet")
    assert dict(zip(vocab["value"].to_list(), vocab["code"].to_list())) == expected
    counts = Counter(window_elements(train["hist"].to_list(), 3))
    assert vocab["count"].to_list() == [counts[v] for v in vocab["value"].to_list()]  # occurrences, not rows
    assert hist.vocab_size == 2 + len(expected) and summary.vocab_sizes["hist"] == hist.vocab_size
    assert max(expected) < 100  # the ids that only valid / test rows have are not in it

    for name, low, high in (("train", 0, TRAIN), ("valid", TRAIN, 180), ("test", 180, ROWS)):
        split = pl.read_parquet(out / f"{name}.parquet")
        assert split.schema["hist"] == pl.Array(pl.Int32, 3) and split.schema["tags"] == pl.Array(pl.Int32, 50)
        block = split["hist"].to_numpy()
        assert block.shape == (high - low, 3) and block.dtype == np.int32
        np.testing.assert_array_equal(block, reference_codes(by_rank(log, low, high)["hist"].to_list(), expected, 3))

    valid = by_rank(log, TRAIN, 180)["hist"].to_list()
    elements = [x for lst in valid if lst for x in lst[-3:] if x is not None]
    assert hist.oov_rate_valid == pytest.approx(sum(x not in expected for x in elements) / len(elements))
    assert hist.oov_rate_valid > 0


def test_truncation_keeps_the_last_elements_and_null_or_empty_lists_are_padding(tmp_path):
    frame = pl.DataFrame({"hist": pl.Series([[1, 2, 3, 4, 5], [], None, [None, 2], [5], [9, 9, 9, 1, 2, 5]] * 10,
                                            dtype=pl.List(pl.Int64)),
                          "x": [1, 2] * 30, "click": [0, 1, 1] * 20})
    path = tmp_path / "log.parquet"
    frame.write_parquet(path)
    preprocess([str(path)], ["click"], str(tmp_path / "out"), split="random")
    schema = Schema.load(tmp_path / "out")
    codes = encode(frame.head(6), schema, tmp_path / "out" / "vocab", labels=[])["hist"].to_numpy()
    vocab = pl.read_parquet(tmp_path / "out" / "vocab" / "hist.parquet")
    code = dict(zip(vocab["value"].to_list(), vocab["code"].to_list()))
    assert codes.shape == (6, 50)
    assert codes[0, :5].tolist() == [code[v] for v in (1, 2, 3, 4, 5)] and not codes[0, 5:].any()
    assert not codes[1].any() and not codes[2].any()  # empty and null lists: all padding
    assert codes[3, :2].tolist() == [0, code[2]]  # a null element is padding too
    assert codes[5, :6].tolist() == [code[v] for v in (9, 9, 9, 1, 2, 5)]

    short = Schema.from_dict({**schema.to_dict(), "features": [
        {**f.to_dict(), "max_len": 2} if f.name == "hist" else f.to_dict() for f in schema.features]})
    codes = encode(frame.head(6), short, tmp_path / "out" / "vocab", labels=[])["hist"].to_numpy()
    assert codes.tolist()[0] == [code[4], code[5]] and codes.tolist()[5] == [code[2], code[5]]
    assert codes.tolist()[4] == [code[5], 0]  # left-aligned, padded on the right


def test_preprocess_and_encode_on_the_raw_rows_agree(tmp_path, log):
    spec = "[features.hist]\nmax_len = 4\nshare_with = 'item_id'\npooling = 'attention'\n"
    _, schema, out = run(tmp_path, log, spec)
    for lazy in (False, True):
        raw = log.lazy() if lazy else log
        encoded = encode(raw, schema, out / "vocab", labels=[], keep=("rank",))
        encoded = encoded.collect() if lazy else encoded
        assert "click" not in encoded.columns  # labels=[]: an unlabelled log encodes
        for name, low, high in (("train", 0, TRAIN), ("valid", TRAIN, 180), ("test", 180, ROWS)):
            split = pl.read_parquet(out / f"{name}.parquet")
            again = by_rank(encoded, low, high).drop("rank")
            assert again.equals(split.drop("click")), name


def test_share_with_uses_the_item_vocabulary_fitted_on_the_item_column(tmp_path, log):
    spec = "[features.hist]\nmax_len = 5\nshare_with = 'item_id'\n"
    summary, schema, out = run(tmp_path, log, spec)
    hist = schema.feature("hist")
    assert hist.share_with == "item_id" and hist.min_count is None
    assert hist.vocab_size == schema.feature("item_id").vocab_size
    assert not (out / "vocab" / "hist.parquet").exists()
    item_vocab = reference_vocab(by_rank(log, 0, TRAIN)["item_id"].to_list())  # the item column's train values only
    vocab = pl.read_parquet(out / "vocab" / "item_id.parquet")
    assert dict(zip(vocab["value"].to_list(), vocab["code"].to_list())) == item_vocab
    test = pl.read_parquet(out / "test.parquet")
    np.testing.assert_array_equal(test["hist"].to_numpy(),
                                  reference_codes(by_rank(log, 180, ROWS)["hist"].to_list(), item_vocab, 5))
    # an item id codes the same in both columns; history ids 12..29 never appear as items: OOV
    rows = encode(pl.DataFrame({"user_id": [1, 1], "item_id": [3, 20], "hist": [[3, 20], [None, 3]],
                                "tags": [["t1"], []], "ts": [0, 0]}), schema, out / "vocab", labels=[])
    assert rows["hist"].to_numpy().tolist() == [[item_vocab[3], 1, 0, 0, 0], [0, item_vocab[3], 0, 0, 0]]
    assert rows["item_id"].to_list() == [item_vocab[3], 1]


def test_hashed_sequences_and_sequences_sharing_a_hashed_column(tmp_path, log):
    spec = ("[features.item_id]\nhash_buckets = 7\n\n[features.hist]\nshare_with = 'item_id'\nmax_len = 6\n\n"
            "[features.tags]\nhash_buckets = 5\nmax_len = 2\n")
    _, schema, out = run(tmp_path, log, spec)
    assert schema.feature("hist").vocab_size == 9 and schema.feature("tags").vocab_size == 7
    assert not (out / "vocab" / "tags.parquet").exists()
    train = pl.read_parquet(out / "train.parquet")
    raw = by_rank(log, 0, TRAIN)

    def hashed(values, buckets):
        series = pl.Series(values, dtype=pl.Int64 if isinstance(values[0], int) else pl.String)
        return dict(zip(values, (stable_hash(series) % buckets + 2).to_list()))

    ids = sorted({x for lst in raw["hist"].to_list() if lst for x in lst if x is not None})
    np.testing.assert_array_equal(train["hist"].to_numpy(), reference_codes(raw["hist"].to_list(), hashed(ids, 7), 6))
    tags = sorted({x for lst in raw["tags"].to_list() for x in lst})
    np.testing.assert_array_equal(train["tags"].to_numpy(), reference_codes(raw["tags"].to_list(), hashed(tags, 5), 2))
    codes = hashed(sorted(set(raw["item_id"].to_list())), 7)
    assert train["item_id"].to_list() == [codes[v] for v in raw["item_id"].to_list()]  # same hash, same code


def test_min_count_on_sequence_elements(tmp_path, log):
    _, schema, out = run(tmp_path, log, "[features.hist]\nmin_count = 6\nmax_len = 8\n")
    expected = reference_vocab(window_elements(by_rank(log, 0, TRAIN)["hist"].to_list(), 8), min_count=6)
    vocab = pl.read_parquet(out / "vocab" / "hist.parquet")
    assert dict(zip(vocab["value"].to_list(), vocab["code"].to_list())) == expected
    assert vocab["count"].min() >= 6 and schema.feature("hist").min_count == 6


def test_fixed_size_and_categorical_lists_are_sequences_float_lists_are_skipped(tmp_path):
    frame = pl.DataFrame({"fixed": pl.Series([[1, 2], [3, 1]] * 10, dtype=pl.Array(pl.Int32, 2)),
                          "cats": pl.Series([["a"], ["b", "a"]] * 10, dtype=pl.List(pl.Categorical)),
                          "floats": [[0.5]] * 20, "click": [0, 1] * 10})
    path = tmp_path / "log.parquet"
    frame.write_parquet(path)
    summary = preprocess([str(path)], ["click"], str(tmp_path / "out"), split="random")
    assert [(f.name, f.kind, f.dtype) for f in summary.schema.features] == [
        ("fixed", "sequence", "List(Int32)"), ("cats", "sequence", "List(String)")]
    assert any("'floats'" in w for w in summary.warnings)
    train = pl.read_parquet(tmp_path / "out" / "train.parquet")
    assert train.schema["cats"] == pl.Array(pl.Int32, 50)
    assert set(train["fixed"].to_numpy()[:, :2].ravel()) <= {2, 3, 4}


def test_schema_round_trip_of_sequence_fields():
    schema = Schema(features=[Feature("item_id", "categorical", "Int64", vocab_size=9, min_count=1),
                              Feature("hist", "sequence", "List(Int64)", vocab_size=9, max_len=20,
                                      pooling="attention", share_with="item_id", oov_rate_valid=0.25)],
                    labels=["click"], split={"method": "column", "column": "part"})
    data = schema.to_dict()
    assert data["features"][1] == {"name": "hist", "kind": "sequence", "dtype": "List(Int64)", "vocab_size": 9,
                                   "min_count": None, "hash_buckets": None, "oov_rate_valid": 0.25, "max_len": 20,
                                   "pooling": "attention", "share_with": "item_id"}
    assert "max_len" not in data["features"][0]
    assert Schema.from_dict(data) == schema
    old = Schema.from_dict({**data, "features": [data["features"][0]]})  # a schema.json from before sequences
    assert old.features[0].max_len is None and old.sequence_features == []


SPEC_MISTAKES = [
    ("[features.hist]\npooling = 'attention'\n", "attention.*share_with"),
    ("[features.hist]\nshare_with = 'item_id'\nmin_count = 2\n", "shares the codes of 'item_id'.*min_count"),
    ("[features.hist]\nshare_with = 'item_id'\nhash_buckets = 9\n", "hash_buckets"),
    ("[features.hist]\nshare_with = 'hist'\n", "names the column itself"),
    ("[features.hist]\nmax_len = 0\n", "max_len must be at least 1"),
    ("[features.hist]\npooling = 'max'\n", "pooling must be one of mean, sum, attention"),
    ("[features.hist]\nmax_len = '5'\n", "max_len must be a int"),
    ("[features.item_id]\nmax_len = 5\n", "max_len applies to sequence"),
    ("[features.hist]\nlog1p = true\n", "log1p applies to numeric"),
    ("[features.hist]\nkind = 'sequence'\nbucketize = 3\n", "bucketize applies to numeric"),
]
RESOLVE_MISTAKES = [
    ("[features.hist]\nshare_with = 'nope'\n", "'nope'.*not in the data"),
    ("[features.hist]\nshare_with = 'rank'\n", "'rank'.*not a feature"),
    ("[features.hist]\nshare_with = 'click'\n", "not a feature"),
    ("[features.hist]\nshare_with = 'tags'\n", "that feature is sequence"),
    ("[features.hist]\nshare_with = 'price'\n", "that feature is numeric"),
    ("[features.hist]\nshare_with = 'age'\n\n[features.age]\nbucketize = 3\n", "that feature is bucketized"),
    ("[features.user_id]\nkind = 'sequence'\n", "'user_id'.*needs a list of strings or integers"),
    ("[features.hist]\nkind = 'categorical'\n", "cannot be a categorical"),
]


@pytest.mark.parametrize("text, match", SPEC_MISTAKES + RESOLVE_MISTAKES)
def test_sequence_spec_mistakes_are_one_line(tmp_path, log, text, match):
    frame = log.with_columns(price=pl.col("rank") * 0.5, age=pl.col("rank") * 1.0)
    with pytest.raises(UserError, match=match) as info:
        run(tmp_path, frame, text)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_spec_parsing_keeps_the_sequence_options():
    specs = parse_spec({"features": {"hist": {"kind": "sequence", "max_len": 7, "pooling": "sum"}}})
    assert (specs["hist"].kind, specs["hist"].max_len, specs["hist"].pooling) == ("sequence", 7, "sum")


def test_encode_refuses_a_flat_column_where_a_sequence_was_fitted(tmp_path, log):
    _, schema, out = run(tmp_path, log)
    with pytest.raises(UserError, match="'hist' is Int64 in the raw log but was List\\(Int64\\)"):
        encode(log.with_columns(pl.col("rank").alias("hist")), schema, out / "vocab", labels=[])


def test_the_streaming_encode_plan_zips_no_literal_input(tmp_path, log):
    """A literal Series (padding, a code table) becomes a separate input that the streaming engine
    zips with the scanned batches, and that zip held rows: peak memory grew with the log."""
    _, schema, out = run(tmp_path, log)
    plan = encode(pl.scan_parquet(tmp_path / "log.parquet"), schema, out / "vocab", check=False)
    graph = plan.show_graph(engine="streaming", plan_stage="physical", raw_output=True)
    assert "zip" not in graph and "input-independent" not in graph
