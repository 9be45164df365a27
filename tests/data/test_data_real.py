"""preprocess on the real datasets in shared/data (skipped where that folder is absent)."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from mtrec.core.errors import UserError
from mtrec.data.preprocess import preprocess
from mtrec.data.schema import Schema

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


def dataset(relative: str) -> Path:
    path = DATA / relative
    if not path.exists():
        pytest.skip(f"{path} not available")
    return path


def test_census_with_excluded_columns_and_a_numeric_override(tmp_path):
    path = dataset("census_income_kdd/census_income_kdd_test.parquet")
    spec = tmp_path / "spec.toml"
    spec.write_text("[features.age]\nkind = 'numeric'\n\n[features.wage_per_hour]\nkind = 'numeric'\nlog1p = true\n")
    labels = ["label_income_50k", "label_never_married"]
    summary = preprocess([str(path)], labels, str(tmp_path / "census"), split="random", spec=str(spec),
                         exclude=["row_id", "instance_weight", "split"])
    schema = Schema.load(tmp_path / "census")
    names = [f.name for f in schema.features]
    assert len(names) == 44 - 2 - 3 and not {"row_id", "instance_weight", "split", *labels} & set(names)
    kinds = {f.name: f.kind for f in schema.features}
    assert kinds["age"] == "numeric" and kinds["wage_per_hour"] == "numeric"
    assert kinds["capital_gains"] == "categorical"  # integer columns are categorical unless declared
    assert kinds["education"] == "categorical"
    assert sum(summary.rows.values()) == 99_762
    assert summary.positive_rate["train"]["label_income_50k"] == pytest.approx(0.062, abs=0.005)
    assert summary.positive_rate["train"]["label_never_married"] == pytest.approx(0.432, abs=0.01)
    assert summary.warnings == []
    train = pl.read_parquet(tmp_path / "census" / "train.parquet")
    assert abs(train["age"].mean()) < 1e-3 and abs(train["age"].std() - 1) < 1e-2  # standardised on train
    assert "_user" not in train.columns  # no user column: no groups


@pytest.mark.parametrize("name, rows", [("ali_ccp_rechub_sample.parquet", 200), ("ali_ccp_aitm_sample.parquet", 98)])
def test_ali_ccp_samples(tmp_path, name, rows):
    path = dataset(f"ali_ccp_sample/{name}")
    summary = preprocess([str(path)], ["click", "purchase"], str(tmp_path / "ali"), user="user_id", item="item_id",
                         split="random", exclude=["split"])
    assert sum(summary.rows.values()) == rows
    schema = Schema.load(tmp_path / "ali")
    assert schema.features[0].name == "user_id" and schema.features[1].name == "item_id"
    assert "206" in schema.vocab_sizes  # Ali-CCP field ids are integer codes -> categorical
    valid = pl.read_parquet(tmp_path / "ali" / "valid.parquet")
    assert valid.schema["purchase"] == pl.UInt8 and valid.schema["_user"] == pl.Int64


def test_ali_ccp_shipped_split_column(tmp_path):
    path = dataset("ali_ccp_sample/ali_ccp_rechub_sample.parquet")
    summary = preprocess([str(path)], ["click", "purchase"], str(tmp_path / "ali"), user="user_id", item="item_id",
                         split_column="split")
    assert summary.rows == {"train": 100, "valid": 50, "test": 50}  # torch-rechub's own train / val / test files
    assert "split" not in [f.name for f in summary.schema.features]
    train_items = pl.read_parquet(path).filter(pl.col("split") == "train")["item_id"].n_unique()
    assert summary.vocab_sizes["item_id"] == train_items + 2


def test_taobao_labels_with_a_time_split(tmp_path):
    path = dataset("taobao_userbehavior_head/taobao_user_item_labels.parquet")
    labels = ["label_buy", "label_cart", "label_fav", "label_pv"]
    summary = preprocess([str(path)], labels, str(tmp_path / "tb"), user="user_id", item="item_id", time="first_ts")
    assert summary.schema.split["method"] == "time"
    assert sum(summary.rows.values()) == 3329
    assert summary.vocab_sizes["user_id"] <= 43 + 2
    assert "first_ts" not in summary.vocab_sizes  # the time column is not a feature
    assert summary.oov_rate_valid["item_id"] > 0.5  # later pairs are mostly new items: measured, not hidden
    raw = pl.read_parquet(path)
    cutoff = raw["first_ts"].sort()[summary.rows["train"] - 1]
    train_users = raw.filter(pl.col("first_ts") <= cutoff)["user_id"].n_unique()
    assert summary.vocab_sizes["user_id"] <= train_users + 2


def test_taobao_events_string_labels_are_refused(tmp_path):
    path = dataset("taobao_userbehavior_head/taobao_events.parquet")
    with pytest.raises(UserError, match="string column"):
        preprocess([str(path)], ["behavior_type"], str(tmp_path / "ev"), time="timestamp")
    assert list(tmp_path.iterdir()) == []
