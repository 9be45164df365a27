"""The synthetic log: deterministic, a consistent funnel, realistic shapes, learnable labels."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from mtrec.data.synth import BLOCK, synthesize, write_synthetic

ROWS = 200_000


@pytest.fixture(scope="module")
def log() -> pl.DataFrame:
    return synthesize(ROWS, seed=0)


def test_same_seed_same_log_other_seed_other_log():
    assert synthesize(3000, seed=7).equals(synthesize(3000, seed=7))
    assert not synthesize(3000, seed=7).equals(synthesize(3000, seed=8))


def test_chunked_writing_gives_the_same_rows_whatever_the_chunk_size(tmp_path):
    rows = 2 * BLOCK + 1234
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    write_synthetic(a, rows=rows, seed=3, chunk_rows=BLOCK)  # three chunks, three row groups
    write_synthetic(b, rows=rows, seed=3)  # one chunk
    assert pl.read_parquet_schema(a) == pl.read_parquet_schema(b)
    frame = pl.read_parquet(a)
    assert frame.height == rows
    assert frame.equals(pl.read_parquet(b))
    assert frame.equals(synthesize(rows, seed=3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.parquet", "b.parquet"]  # no temp file left


def test_columns_and_dtypes(log):
    assert log.schema == pl.Schema({
        "user_id": pl.Int64, "item_id": pl.Int64, "ts": pl.Int64, "user_age_bucket": pl.Int32,
        "user_city": pl.String, "user_activity": pl.Float64, "item_category": pl.Int32, "item_brand": pl.String,
        "item_price": pl.Float64, "item_popularity": pl.Float64, "device": pl.String, "hour": pl.Int32,
        "click": pl.Int8, "like": pl.Int8, "share": pl.Int8})


def test_funnel_like_and_share_only_after_a_click(log):
    assert log.filter((pl.col("like") == 1) & (pl.col("click") == 0)).height == 0
    assert log.filter((pl.col("share") == 1) & (pl.col("click") == 0)).height == 0
    # like and share are correlated beyond the shared click: they share the engagement score
    clicked = log.filter(pl.col("click") == 1)
    assert np.corrcoef(clicked["like"], clicked["share"])[0, 1] > 0.02


@pytest.mark.parametrize("seed", [0, 1])
def test_positive_rates_in_the_intended_ranges(seed, log):
    frame = log if seed == 0 else synthesize(50_000, seed=seed)
    rates = frame.select(pl.col("click", "like", "share").mean()).row(0)
    assert 0.10 <= rates[0] <= 0.15
    assert 0.02 <= rates[1] <= 0.03
    assert 0.005 <= rates[2] <= 0.01


def test_power_law_popularity_nulls_and_time_window(log):
    item_counts = log["item_id"].value_counts()["count"].sort(descending=True).to_numpy()
    top_1pct = item_counts[: max(1, len(item_counts) // 100)].sum() / ROWS
    assert top_1pct > 0.10  # a few items take a large share of impressions
    user_counts = log["user_id"].value_counts()["count"].to_numpy()
    assert user_counts.max() > 20 * np.median(user_counts)
    for name in ("user_activity", "item_price", "item_popularity", "user_city"):
        assert 0 < log[name].null_count() < 0.05 * ROWS, name
    ts = log["ts"].to_numpy()
    assert 29 * 86400 <= ts.max() - ts.min() <= 31 * 86400
    assert np.corrcoef(np.arange(ROWS), ts)[0, 1] > 0.999  # increasing-ish
    assert np.array_equal(log["hour"].to_numpy(), ((ts - ts.min() // 86400 * 86400) // 3600) % 24)
    price = log["item_price"].drop_nulls()
    assert price.mean() > 1.3 * price.median()  # right-skewed


def _features(frame: pl.DataFrame) -> np.ndarray:
    x = frame.select(
        pl.col("item_price").fill_null(pl.col("item_price").median()).log(),
        pl.col("user_activity").fill_null(pl.col("user_activity").median()).log(),
        pl.col("item_popularity").fill_null(pl.col("item_popularity").median()).log1p(),
        *[(pl.col("device") == d).cast(pl.Float64).alias(d) for d in ("ios", "android", "web")],
        *[(pl.col("user_age_bucket") == a).cast(pl.Float64).alias(f"age{a}") for a in range(6)],
        (pl.col("hour") * (2 * np.pi / 24)).cos().alias("hour_cos"),
    ).to_numpy()
    return (x - x.mean(0)) / (x.std(0) + 1e-9)


def test_labels_are_learnable_and_click_carries_the_share_signal(log):
    x = _features(log)
    half = ROWS // 2
    share, click = log["share"].to_numpy(), log["click"].to_numpy()
    share_model = LogisticRegression(max_iter=300).fit(x[:half], share[:half])
    assert roc_auc_score(share[half:], share_model.decision_function(x[half:])) > 0.68
    # A model fitted on the dense click labels alone ranks the rare shares well: the auxiliary task
    # carries the target's signal, which is what multi-task learning exploits.
    click_model = LogisticRegression(max_iter=300).fit(x[:half], click[:half])
    assert roc_auc_score(share[half:], click_model.decision_function(x[half:])) > 0.68
