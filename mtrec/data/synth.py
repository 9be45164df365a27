"""A synthetic impression log with a click -> like / share funnel that multi-task learning can exploit.

Generative story (all vectorised NumPy, one block of rows at a time):

- Items belong to a category and a brand (brands nest in categories); an item's taste vector is
  its category centroid + brand offset + noise, and it has a latent quality and a lognormal price.
- Users have an age bucket and a city; a user's taste vector is age centroid + city centroid +
  noise. Their activity follows a power law (Zipf) and drives both how often they appear and how
  much they click.
- Impressions draw a user by activity and an item by a Zipf popularity (boosted by quality), at a
  time following a diurnal curve over 30 days.
- One engagement score ``s`` = taste dot product + user bias + item quality + price sensitivity
  (by age) + device + hour of day. ``click ~ sigmoid(a + s + noise)``; given a click, ``like``
  and ``share`` follow ``sigmoid(b + 0.8 s + quality)`` and ``sigmoid(c + s + brand virality)``.
  Each world solves ``a``, ``b``, ``c`` on a calibration sample so that every seed and size gives
  click ~12%, like ~2.5%, share ~0.7% of impressions.

So ``share`` (rare) and ``click`` (dense) share almost all of their signal, most of it in the
user x item taste interaction that only ID / category embeddings can learn: a model that learns
it from clicks ranks shares better than one that sees only the rare shares (measured: Shared-Bottom
test AUC on share 0.80-0.82 alone, 0.87 with click, 200k rows; docs/data.md).

With ``history = N > 0`` each impression also has a latent *session intent*, a category drawn per
row (the impressed item's category with probability ``INTENT_MATCH``, else a uniformly drawn
category), and two list columns:

- ``hist_items``: up to N item ids, most recent last, standing in for "the user's last N clicked
  items": each element is an item of the intent category (popularity-weighted) with a probability
  rising from 0.5 for the oldest to 0.95 for the newest element, else a popular item of any
  category. Lengths are uniform in 1..N, 8% empty, 2% null lists.
- ``tags``: the impressed item's multi-hot tag list (0..5 distinct tags of 40, mostly from its
  category's five home tags; 1% null lists).

When the intent equals the impressed item's category, the engagement score gets ``INTENT_BONUS``
(click and share logits +1.6, like +0.8 x 1.6). The intent is independent of the user, the item
and every other column, so only the history can tell a model which impressions match it. The
intercepts are re-solved with the bonus, so the rates stay at click ~12%, like ~2.5%, share ~0.7%.
History draws come from their own generators, so ``history = 0`` gives the log it always gave,
byte for byte.

Every block of ``BLOCK`` rows is drawn from its own generator seeded by (seed, block index), so a
log is identical for a (rows, seed) pair however it is chunked when written.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

BLOCK = 1 << 16
SYNTH_MARKER = {b"mtrec": b"synth"}  # Parquet key-value metadata: synth --force replaces only such files
ROW_GROUP = 2 * BLOCK  # small row groups keep streaming readers (preprocess) low on memory
DAYS = 30
START = 1_700_006_400  # 2023-11-15 00:00:00 UTC
DIM = 8
N_CATEGORIES = 24
BRANDS_PER_CATEGORY = 10
N_CITIES = 60
AGE_SHARES = np.array([0.08, 0.22, 0.28, 0.20, 0.13, 0.09])
AGE_PRICE_SENSITIVITY = np.array([0.6, 0.5, 0.35, 0.25, 0.2, 0.3])
DEVICES = ["ios", "android", "web"]
DEVICE_EFFECT = np.array([0.1, 0.0, -0.25])
# Target shares of impressions; each world solves its intercepts for them on a calibration sample.
CLICK_RATE, LIKE_RATE, SHARE_RATE = 0.12, 0.025, 0.007
CALIBRATION_ROWS = 200_000
NULL_RATES = {"user_activity": 0.02, "item_price": 0.01, "item_popularity": 0.005, "user_city": 0.005}
# --history: the session intent and the lists that reveal it
INTENT_MATCH, INTENT_BONUS = 0.3, 1.6
HISTORY_EMPTY, HISTORY_NULL, TAGS_NULL = 0.08, 0.02, 0.01
N_TAGS, HOME_TAGS, MAX_TAGS = 40, 5, 5


@dataclass
class _World:
    """Users and items of one synthetic log (depends on rows and seed only)."""

    user_ids: np.ndarray
    user_cdf: np.ndarray
    user_vec: np.ndarray
    user_age: np.ndarray
    user_city: np.ndarray
    user_activity: np.ndarray
    user_bias: np.ndarray
    user_device: np.ndarray
    item_ids: np.ndarray
    item_cdf: np.ndarray
    item_vec: np.ndarray
    item_category: np.ndarray
    item_brand: np.ndarray
    item_quality: np.ndarray
    item_price: np.ndarray
    item_popularity: np.ndarray
    brand_virality: np.ndarray
    time_cdf: np.ndarray
    time_grid: np.ndarray
    log_price_mean: float
    click_bias: float = 0.0
    like_bias: float = 0.0
    share_bias: float = 0.0
    history: _History | None = None


@dataclass
class _History:
    """What ``--history`` adds to a world: items grouped by category, and every item's tags."""

    length: int
    category_cdf: np.ndarray  # category c's items (in by_category order) cover (c, c + 1]
    by_category: np.ndarray  # item indices sorted by category
    categories: np.ndarray  # the categories that have items
    tag_offsets: np.ndarray  # item k's tags: tag_values[tag_offsets[k]:tag_offsets[k + 1]]
    tag_values: np.ndarray


def _zipf(n: int, exponent: float, offset: float, rng: np.random.Generator) -> np.ndarray:
    """Power-law weights over ``n`` entities in a random order."""
    weights = 1.0 / (np.arange(n) + offset) ** exponent
    return weights[rng.permutation(n)]


def _normalised(weights: np.ndarray) -> np.ndarray:
    return weights / weights.sum()


def _cdf(weights: np.ndarray) -> np.ndarray:
    cdf = np.cumsum(weights)
    return cdf / cdf[-1]


def _world(rows: int, seed: int, history: int = 0) -> _World:
    rng = np.random.default_rng([seed, 0x5EED])
    n_users, n_items = max(200, rows // 40), max(100, rows // 80)
    n_brands = N_CATEGORIES * BRANDS_PER_CATEGORY

    category_vec = rng.normal(0.0, 1.0, (N_CATEGORIES, DIM))
    brand_vec = rng.normal(0.0, 0.5, (n_brands, DIM))
    category_log_price = rng.normal(3.0, 0.8, N_CATEGORIES)
    item_category = rng.choice(N_CATEGORIES, n_items, p=_normalised(_zipf(N_CATEGORIES, 0.8, 1.0, rng)))
    brand_rank = rng.choice(BRANDS_PER_CATEGORY, n_items, p=_normalised(_zipf(BRANDS_PER_CATEGORY, 1.0, 1.0, rng)))
    item_brand = item_category + N_CATEGORIES * brand_rank
    item_vec = category_vec[item_category] + brand_vec[item_brand] + rng.normal(0.0, 0.6, (n_items, DIM))
    item_quality = rng.normal(0.0, 0.4, n_items)
    item_price = np.round(np.exp(category_log_price[item_category] + rng.normal(0.0, 0.5, n_items)), 2)
    item_weight = _zipf(n_items, 1.0, 10.0, rng) * np.exp(0.5 * item_quality)
    item_share = item_weight / item_weight.sum()
    item_popularity = item_share * rows / DAYS * np.exp(rng.normal(0.0, 0.2, n_items))  # noisy daily views

    age_vec = rng.normal(0.0, 1.0, (len(AGE_SHARES), DIM))
    city_vec = rng.normal(0.0, 0.6, (N_CITIES, DIM))
    user_age = rng.choice(len(AGE_SHARES), n_users, p=AGE_SHARES)
    user_city = rng.choice(N_CITIES, n_users, p=_normalised(_zipf(N_CITIES, 0.9, 2.0, rng)))
    user_vec = age_vec[user_age] + city_vec[user_city] + rng.normal(0.0, 0.8, (n_users, DIM))
    user_weight = _zipf(n_users, 0.9, 10.0, rng)
    log_weight = np.log(user_weight)
    user_bias = 0.3 * (log_weight - log_weight.mean()) / log_weight.std() + rng.normal(0.0, 0.3, n_users)
    user_device = rng.choice(len(DEVICES), n_users, p=[0.35, 0.5, 0.15])
    daily = user_weight / user_weight.sum() * rows / DAYS
    user_activity = np.round(daily * np.exp(rng.normal(0.0, 0.2, n_users)), 3)  # noisy impressions per day

    hours = np.arange(DAYS * 24 + 1)
    hour_of_day = hours % 24
    # diurnal traffic: an evening peak around 20:30, a smaller lunch peak, a quiet night
    intensity = (0.35 + np.exp(-0.5 * ((hour_of_day - 20.5) / 3.0) ** 2)
                 + 0.5 * np.exp(-0.5 * ((hour_of_day - 12.5) / 2.0) ** 2))
    intensity *= 1.0 + 0.2 * hours / hours[-1]  # the service grows over the month
    time_cdf = np.concatenate([[0.0], np.cumsum(intensity[:-1])])
    time_cdf /= time_cdf[-1]

    world = _World(
        user_ids=rng.permutation(n_users).astype(np.int64) + 1, user_cdf=_cdf(user_weight), user_vec=user_vec,
        user_age=user_age, user_city=user_city, user_activity=user_activity, user_bias=user_bias,
        user_device=user_device, item_ids=rng.permutation(n_items).astype(np.int64) + 1_000_001,
        item_cdf=_cdf(item_weight), item_vec=item_vec, item_category=item_category, item_brand=item_brand,
        item_quality=item_quality, item_price=item_price, item_popularity=np.round(item_popularity, 2),
        brand_virality=rng.normal(0.0, 0.4, n_brands), time_cdf=time_cdf, time_grid=START + hours * 3600.0,
        log_price_mean=float(np.mean(category_log_price)),
    )
    if history:
        world.history = _history_world(world, seed, history)
    _calibrate(world, seed)
    return world


def _history_world(world: _World, seed: int, length: int) -> _History:
    """From its own generator, so the rest of the world is the same with or without history."""
    rng = np.random.default_rng([seed, 0x4157])
    by_category = np.argsort(world.item_category, kind="stable")
    category = world.item_category[by_category]
    weight = np.diff(world.item_cdf, prepend=0.0)[by_category]
    cumulative = np.cumsum(weight)
    first = np.searchsorted(category, category, side="left")  # each item's category segment start
    within = (cumulative - cumulative[first] + weight[first]) / np.bincount(category, weight)[category]
    within[np.r_[category[1:] != category[:-1], True]] = 1.0  # each segment ends at exactly c + 1

    n_items = len(world.item_ids)
    home = (np.arange(N_CATEGORIES)[:, None] * 3 + np.arange(HOME_TAGS)) % N_TAGS  # overlapping home tags
    scores = rng.random((n_items, N_TAGS), dtype=np.float32)
    scores[np.arange(n_items)[:, None], home[world.item_category]] += 1.0  # home tags first, mostly
    n_tags = rng.integers(0, MAX_TAGS + 1, n_items)
    ranked = np.argsort(-scores, axis=1)[:, :MAX_TAGS]
    keep = np.arange(MAX_TAGS) < n_tags[:, None]
    return _History(length=length, category_cdf=category + within, by_category=by_category,
                    categories=np.unique(category), tag_offsets=np.r_[0, np.cumsum(n_tags)],
                    tag_values=ranked[keep].astype(np.int32))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


_CITY_NAMES = pl.Series([f"city_{k:02d}" for k in range(N_CITIES)])
_BRAND_NAMES = pl.Series([f"brand_{k:03d}" for k in range(N_CATEGORIES * BRANDS_PER_CATEGORY)])
_DEVICE_NAMES = pl.Series(DEVICES)


def _impressions(world: _World, rng: np.random.Generator, quantile: np.ndarray):
    """Who sees what, when, on which device, for impressions at time quantiles ``quantile``."""
    m = len(quantile)
    u = np.searchsorted(world.user_cdf, rng.random(m), side="right").clip(max=len(world.user_cdf) - 1)
    i = np.searchsorted(world.item_cdf, rng.random(m), side="right").clip(max=len(world.item_cdf) - 1)
    ts = np.interp(quantile, world.time_cdf, world.time_grid) + rng.normal(0.0, 300.0, m)  # increasing-ish
    ts = ts.astype(np.int64)
    hour = ((ts - START) // 3600) % 24
    device = np.where(rng.random(m) < 0.8, world.user_device[u], rng.integers(0, len(DEVICES), m))
    return u, i, ts, hour, device


def _logits(world: _World, rng: np.random.Generator, u, i, hour, device):
    """Click logit and the post-click like / share logits, without their intercepts."""
    taste = np.einsum("nd,nd->n", world.user_vec[u], world.item_vec[i]) / 5.0
    log_price = np.log(world.item_price[i])
    score = (1.2 * taste + world.user_bias[u] + world.item_quality[i]
             - AGE_PRICE_SENSITIVITY[world.user_age[u]] * (log_price - world.log_price_mean)
             + DEVICE_EFFECT[device] + 0.25 * np.cos(2 * np.pi * (hour - 21) / 24))
    click = score + rng.normal(0.0, 0.3, len(u))
    like = 0.8 * score + 1.0 * world.item_quality[i]
    share = score + world.brand_virality[world.item_brand[i]]
    return click, like, share


def _solve_bias(rate_at, target: float) -> float:
    """The intercept at which the (increasing) expected rate ``rate_at(bias)`` equals ``target``."""
    low, high = -20.0, 20.0
    for _ in range(50):
        middle = 0.5 * (low + high)
        low, high = (middle, high) if rate_at(middle) < target else (low, middle)
    return 0.5 * (low + high)


def _intent(world: _World, rng: np.random.Generator, i: np.ndarray) -> np.ndarray:
    """Each impression's session intent: the item's category w.p. INTENT_MATCH, else a random one."""
    categories = world.history.categories
    other = categories[rng.integers(0, len(categories), len(i))]
    return np.where(rng.random(len(i)) < INTENT_MATCH, world.item_category[i], other)


def _intent_bonus(world: _World, intent: np.ndarray, i: np.ndarray, click, like, share):
    bonus = INTENT_BONUS * (intent == world.item_category[i])
    return click + bonus, like + 0.8 * bonus, share + bonus


def _calibrate(world: _World, seed: int) -> None:
    rng = np.random.default_rng([seed, 0xCA11])
    u, i, _, hour, device = _impressions(world, rng, rng.random(CALIBRATION_ROWS))
    click, like, share = _logits(world, rng, u, i, hour, device)
    if world.history is not None:
        intent = _intent(world, np.random.default_rng([seed, 0xCA11, 0x4157]), i)
        click, like, share = _intent_bonus(world, intent, i, click, like, share)
    world.click_bias = _solve_bias(lambda b: _sigmoid(b + click).mean(), CLICK_RATE)
    p_click = _sigmoid(world.click_bias + click)
    world.like_bias = _solve_bias(lambda b: (p_click * _sigmoid(b + like)).mean(), LIKE_RATE)
    world.share_bias = _solve_bias(lambda b: (p_click * _sigmoid(b + share)).mean(), SHARE_RATE)


def _block(world: _World, rows: int, seed: int, index: int) -> pl.DataFrame:
    start = index * BLOCK
    m = min(BLOCK, rows - start)
    rng = np.random.default_rng([seed, 0xB10C, index])
    u, i, ts, hour, device = _impressions(world, rng, (start + np.arange(m) + rng.random(m)) / rows)
    click_logit, like_logit, share_logit = _logits(world, rng, u, i, hour, device)
    if world.history is not None:
        history_rng = np.random.default_rng([seed, 0x4157, index])
        intent = _intent(world, history_rng, i)
        click_logit, like_logit, share_logit = _intent_bonus(world, intent, i, click_logit, like_logit, share_logit)
    click = rng.random(m) < _sigmoid(world.click_bias + click_logit)
    like = click & (rng.random(m) < _sigmoid(world.like_bias + like_logit))
    share = click & (rng.random(m) < _sigmoid(world.share_bias + share_logit))

    nulls = {name: rng.random(m) < rate for name, rate in NULL_RATES.items()}
    frame = pl.DataFrame({
        "user_id": world.user_ids[u],
        "item_id": world.item_ids[i],
        "ts": ts,
        "user_age_bucket": world.user_age[u].astype(np.int32),
        "user_city": _CITY_NAMES.gather(world.user_city[u]),
        "user_activity": np.where(nulls["user_activity"], np.nan, world.user_activity[u]),
        "item_category": world.item_category[i].astype(np.int32),
        "item_brand": _BRAND_NAMES.gather(world.item_brand[i]),
        "item_price": np.where(nulls["item_price"], np.nan, world.item_price[i]),
        "item_popularity": np.where(nulls["item_popularity"], np.nan, world.item_popularity[i]),
        "device": _DEVICE_NAMES.gather(device),
        "hour": hour.astype(np.int32),
        "click": click.astype(np.int8),
        "like": like.astype(np.int8),
        "share": share.astype(np.int8),
    })
    frame = frame.with_columns(
        pl.col("user_activity", "item_price", "item_popularity").fill_nan(None),
        pl.when(pl.Series(nulls["user_city"])).then(None).otherwise(pl.col("user_city")).alias("user_city"),
    )
    if world.history is None:
        return frame
    lists = pl.DataFrame([_history_items(world, history_rng, intent), _item_tags(world, history_rng, i)])
    return pl.concat([frame.drop("click", "like", "share"), lists, frame.select("click", "like", "share")],
                     how="horizontal")


def _list_series(name: str, lengths: np.ndarray, values: pa.Array, null: np.ndarray) -> pl.Series:
    lengths = np.where(null, 0, lengths)
    offsets = pa.array(np.r_[0, np.cumsum(lengths)].astype(np.int32))
    return pl.Series(name, pa.ListArray.from_arrays(offsets, values, mask=pa.array(null)))


def _history_items(world: _World, rng: np.random.Generator, intent: np.ndarray) -> pl.Series:
    """Up to ``length`` item ids per row, most recent last, mostly of the intent category."""
    history, m = world.history, len(intent)
    lengths = rng.integers(1, history.length + 1, m)
    lengths[rng.random(m) < HISTORY_EMPTY] = 0
    null = rng.random(m) < HISTORY_NULL
    lengths[null] = 0
    owner = np.repeat(np.arange(m), lengths)
    starts = np.cumsum(lengths) - lengths
    recency = (np.arange(len(owner)) - starts[owner] + 1) / np.maximum(lengths[owner], 1)  # (0, 1], 1 = newest
    from_intent = rng.random(len(owner)) < 0.5 + 0.45 * recency
    in_category = np.searchsorted(history.category_cdf, intent[owner] + rng.random(len(owner)), side="right")
    in_category = history.by_category[in_category.clip(max=len(history.by_category) - 1)]
    anywhere = np.searchsorted(world.item_cdf, rng.random(len(owner)), side="right").clip(max=len(world.item_cdf) - 1)
    items = world.item_ids[np.where(from_intent, in_category, anywhere)]
    return _list_series("hist_items", lengths, pa.array(items, type=pa.int64()), null)


_TAG_NAMES = pl.Series([f"tag_{k:02d}" for k in range(N_TAGS)])


def _item_tags(world: _World, rng: np.random.Generator, i: np.ndarray) -> pl.Series:
    """The impressed item's tags (a multi-hot list), 1% null."""
    history = world.history
    lengths = np.diff(history.tag_offsets)[i]
    null = rng.random(len(i)) < TAGS_NULL
    lengths = np.where(null, 0, lengths)
    owner = np.repeat(np.arange(len(i)), lengths)
    position = np.arange(len(owner)) - (np.cumsum(lengths) - lengths)[owner]
    tags = history.tag_values[history.tag_offsets[i][owner] + position]
    names = _TAG_NAMES.gather(tags).to_arrow(compat_level=pl.CompatLevel.oldest())
    return _list_series("tags", lengths, names, null)


def _blocks(rows: int) -> int:
    return -(-rows // BLOCK)


def synthesize(rows: int, seed: int = 0, history: int = 0) -> pl.DataFrame:
    """A synthetic log of ``rows`` impressions (columns listed in docs/data.md), deterministic per seed;
    ``history > 0`` adds ``hist_items`` (up to ``history`` ids) and ``tags``."""
    if rows < 1:
        raise ValueError("rows must be at least 1")
    if history < 0:
        raise ValueError("history must be at least 0")
    world = _world(rows, seed, history)
    return pl.concat([_block(world, rows, seed, b) for b in range(_blocks(rows))], rechunk=True)


def write_synthetic(path: str | Path, rows: int, seed: int = 0, chunk_rows: int = 1_000_000,
                    history: int = 0) -> Path:
    """Write ``synthesize(rows, seed, history)`` to Parquet (zstd) a chunk at a time, atomically.

    Memory stays bounded by ``chunk_rows`` (rounded up to whole blocks of 65,536 rows); the file's
    rows are the same whatever the chunk size.
    """
    if rows < 1:
        raise ValueError("rows must be at least 1")
    if history < 0:
        raise ValueError("history must be at least 0")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    world = _world(rows, seed, history)
    per_chunk = max(1, -(-chunk_rows // BLOCK))
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    writer = None
    try:
        for first in range(0, _blocks(rows), per_chunk):
            last = min(first + per_chunk, _blocks(rows))
            table = pl.concat([_block(world, rows, seed, b) for b in range(first, last)]).to_arrow(
                compat_level=pl.CompatLevel.oldest())
            table = table.replace_schema_metadata({**(table.schema.metadata or {}), **SYNTH_MARKER})
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema, compression="zstd")
            writer.write_table(table, row_group_size=ROW_GROUP)
        writer.close()
        writer = None
        os.replace(tmp, path)
    except BaseException:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return path
