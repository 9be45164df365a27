"""schema.json round trip and version checks; the stable hash; the data layer does not import torch."""

from __future__ import annotations

import json
import subprocess
import sys

import polars as pl
import pytest

from mtrec.core.errors import UserError
from mtrec.data.hashing import stable_hash
from mtrec.data.schema import Feature, Schema


def small_schema() -> Schema:
    return Schema(
        features=[Feature("user_id", "categorical", "Int64", vocab_size=10, min_count=1, oov_rate_valid=0.1),
                  Feature("bucket", "categorical", "Float64", vocab_size=5, bucketize=3, boundaries=[1.0, 2.0]),
                  Feature("price", "numeric", "Float64", log1p=True, fill=0.0, mean=1.5, std=0.5)],
        labels=["click", "share"], positive_rate={"click": 0.1, "share": 0.01}, user="user_id", item=None,
        time="ts", split={"method": "time", "ratios": [0.8, 0.1, 0.1], "seed": 0},
        rows={"train": 8, "valid": 1, "test": 1})


def test_save_load_round_trip_and_helpers(tmp_path):
    schema = small_schema()
    schema.save(tmp_path)
    loaded = Schema.load(tmp_path)
    assert loaded == schema
    assert Schema.load(tmp_path / "schema.json") == schema
    assert [f.name for f in loaded.categorical_features] == ["user_id", "bucket"]
    assert [f.name for f in loaded.numeric_features] == ["price"]
    assert loaded.vocab_sizes == {"user_id": 10, "bucket": 5}
    data = json.loads((tmp_path / "schema.json").read_text())
    assert data["format"] == "mtrec-encoded" and data["version"] == 1
    assert data["features"][2] == {"name": "price", "kind": "numeric", "dtype": "Float64", "log1p": True,
                                   "fill": 0.0, "mean": 1.5, "std": 0.5}
    assert "boundaries" not in data["features"][0] and data["features"][1]["boundaries"] == [1.0, 2.0]
    assert Schema.from_dict(data) == schema
    assert [p.name for p in tmp_path.iterdir()] == ["schema.json"]  # no temp file left


def test_load_errors_name_the_problem_and_the_fix(tmp_path):
    with pytest.raises(UserError, match="not found"):
        Schema.load(tmp_path / "nothing")
    with pytest.raises(UserError, match="not made by mtrec preprocess.*run mtrec preprocess first"):
        Schema.load(tmp_path)
    file = tmp_path / "schema.json"
    file.write_text("{broken")
    with pytest.raises(UserError, match="unreadable"):
        Schema.load(tmp_path)
    data = small_schema().to_dict()
    file.write_text(json.dumps({**data, "format": "something-else"}))
    with pytest.raises(UserError, match="not made by mtrec preprocess"):
        Schema.load(tmp_path)
    file.write_text(json.dumps({**data, "version": 99}))
    with pytest.raises(UserError, match="version 99.*re-run mtrec preprocess"):
        Schema.load(tmp_path)
    file.write_text(json.dumps({k: v for k, v in data.items() if k != "labels"}))
    with pytest.raises(UserError, match="incomplete"):
        Schema.load(tmp_path)
    file.write_text(json.dumps({**data, "features": [{"name": "x", "kind": "text"}]}))
    with pytest.raises(UserError, match="malformed feature"):
        Schema.load(tmp_path)


def test_stable_hash_is_pinned():
    # These values must never change: models trained with hashed features depend on them.
    assert stable_hash(pl.Series(["", "a", "user_42", None, "héllo"])).to_list() == [
        16294208416658607535, 11484309206301288700, 2328898015401482724, None, 4049333864272913934]
    assert stable_hash(pl.Series([0, 1, -1, 2**40], dtype=pl.Int64)).to_list() == [
        16294208416658607535, 10451216379200822465, 16490336266968443936, 2296115805719413641]
    # integer width does not matter; -0.0 hashes as 0.0
    assert stable_hash(pl.Series([1, -1], dtype=pl.Int32)).equals(stable_hash(pl.Series([1, -1], dtype=pl.Int64)))
    assert stable_hash(pl.Series([-0.0])).to_list() == stable_hash(pl.Series([0.0])).to_list()


def test_stable_hash_has_no_collisions_on_many_ids_and_survives_chunking():
    ids = pl.Series([f"id_{i}" for i in range(300_000)])  # more than one internal chunk of strings
    hashed = stable_hash(ids)
    assert hashed.n_unique() == ids.len()
    assert hashed.slice(123_456, 10).equals(stable_hash(ids.slice(123_456, 10)))


def test_the_data_layer_does_not_import_torch():
    code = ("import sys; import mtrec.data.preprocess, mtrec.data.encode, mtrec.data.synth, mtrec.data.schema; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
