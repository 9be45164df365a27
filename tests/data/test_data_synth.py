"""The synthetic log: deterministic, a consistent funnel, realistic shapes, learnable labels."""

from __future__ import annotations

import hashlib

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


def _digest(frame: pl.DataFrame) -> str:
    """sha256 of every column's values and null mask (independent of the Parquet writer's bytes)."""
    digest = hashlib.sha256()
    for name in frame.columns:
        series = frame[name]
        digest.update(name.encode())
        digest.update(series.is_null().to_numpy().tobytes())
        if series.dtype == pl.String:
            digest.update("\x00".join(series.fill_null("").to_list()).encode())
        else:
            digest.update(series.fill_null(0).to_numpy().tobytes())
    return digest.hexdigest()


def test_history_zero_is_the_log_written_before_history_existed(tmp_path):
    # recorded with write_synthetic before --history was added (commit 74bb653)
    path = write_synthetic(tmp_path / "a.parquet", rows=2 * BLOCK + 1234, seed=3, chunk_rows=BLOCK, history=0)
    assert _digest(pl.read_parquet(path)) == "fad49f959c4a9ab7df03084528cff716d951f0e8a75c7dcd99fe07b813d98312"
    assert _digest(synthesize(5000, seed=0)) == "566836f2afa45eaece0e8be14deb697bff4858a6102dc70be2a0152972124b4e"


def test_history_is_deterministic_whatever_the_chunking(tmp_path):
    rows = 2 * BLOCK + 777
    a = write_synthetic(tmp_path / "a.parquet", rows=rows, seed=5, chunk_rows=BLOCK, history=12)
    b = write_synthetic(tmp_path / "b.parquet", rows=rows, seed=5, history=12)
    frame = pl.read_parquet(a)
    assert frame.equals(pl.read_parquet(b)) and frame.equals(synthesize(rows, seed=5, history=12))
    assert frame.schema["hist_items"] == pl.List(pl.Int64) and frame.schema["tags"] == pl.List(pl.String)
    assert frame.columns[-5:] == ["hist_items", "tags", "click", "like", "share"]
    base = synthesize(rows, seed=5)
    assert frame.select(base.columns[:12]).equals(base.select(base.columns[:12]))  # same impressions


@pytest.fixture(scope="module")
def history_log() -> pl.DataFrame:
    return synthesize(60_000, seed=2, history=20)


def test_history_shapes_rates_and_item_space(history_log):
    log = history_log
    lengths = log["hist_items"].list.len()
    assert 0.01 < log["hist_items"].null_count() / log.height < 0.03
    assert 0.05 < (lengths == 0).mean() < 0.11 and lengths.max() == 20
    assert 0.005 < log["tags"].null_count() / log.height < 0.02
    assert log["tags"].list.len().max() == 5 and (log["tags"].list.len() == 0).sum() > 0
    assert (log["tags"].list.n_unique() == log["tags"].list.len()).all()  # multi-hot: no repeated tag
    items = set(log["item_id"].unique().to_list())
    history = log["hist_items"].explode().drop_nulls()
    assert history.is_in(list(items)).mean() > 0.95  # ids of the log's item space
    rates = log.select(pl.col("click", "like", "share").mean()).row(0)
    assert 0.10 <= rates[0] <= 0.15 and 0.02 <= rates[1] <= 0.03 and 0.005 <= rates[2] <= 0.01


def test_history_carries_click_signal_that_no_other_column_has(history_log):
    log = history_log.with_row_index("row")
    category = log.select(hist_items="item_id", hist_category="item_category").unique()
    match = (log.select("row", "item_category", "hist_items").explode("hist_items")
             .join(category, on="hist_items", how="left")
             .group_by("row").agg((pl.col("hist_category") == pl.col("item_category")).mean().alias("match")))
    log = log.join(match, on="row", how="left").with_columns(pl.col("match").fill_null(0.0))
    click = log["click"].to_numpy()
    # the share of history items in the impressed item's category ranks clicks by itself ...
    assert roc_auc_score(click, log["match"].to_numpy()) > 0.55
    # ... while it is (nearly) independent of the user and item features the log already has
    x = _features(log)
    assert np.abs(np.corrcoef(np.c_[x, log["match"].to_numpy()].T)[-1, :-1]).max() < 0.1
    # and the most recent elements are the most telling (so truncation should keep the last ones)
    ends = log.filter(pl.col("hist_items").list.len() >= 10).select(
        "item_category", newest=pl.col("hist_items").list.last(), oldest=pl.col("hist_items").list.first())
    hit = {end: ends.join(category, left_on=end, right_on="hist_items", how="inner")
           .select((pl.col("hist_category") == pl.col("item_category")).mean()).item() for end in ("newest", "oldest")}
    assert hit["newest"] > hit["oldest"] + 0.1


def test_synth_history_through_the_cli(tmp_path):
    from tests.cli.test_cli_errors import assert_user_error, invoke

    code, out = invoke("synth", "--out", tmp_path / "h.parquet", "--rows", 500, "--history", 4)
    assert code == 0, out
    assert pl.read_parquet(tmp_path / "h.parquet").equals(synthesize(500, seed=0, history=4))
    code, out = invoke("synth", "--out", tmp_path / "bad.parquet", "--history", -1)
    assert_user_error(code, out, "--history")
    assert not (tmp_path / "bad.parquet").exists()


def test_synth_force_replaces_its_own_log_and_nothing_else(tmp_path):
    from tests.cli.test_cli_errors import assert_user_error, invoke

    code, out = invoke("synth", "--out", tmp_path / "log.parquet", "--rows", 300)
    assert code == 0, out
    code, out = invoke("synth", "--out", tmp_path / "log.parquet", "--rows", 400, "--force")
    assert code == 0, out
    assert pl.read_parquet(tmp_path / "log.parquet").height == 400
    foreign = pl.DataFrame({"x": [1, 2, 3]})
    foreign.write_parquet(tmp_path / "mine.parquet")
    code, out = invoke("synth", "--out", tmp_path / "mine.parquet", "--rows", 300, "--force")
    assert_user_error(code, out, "not a log written by mtrec synth")
    assert pl.read_parquet(tmp_path / "mine.parquet").equals(foreign)
