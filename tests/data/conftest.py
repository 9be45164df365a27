"""Small hand-made raw logs whose every count is known, for the data-layer tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

ROWS = 200  # time split 8:1:1 -> time ranks 0..159 train, 160..179 valid, 180..199 test


def _city(rank: int) -> str | None:
    if rank >= 180:
        return "only_test" if rank % 2 else "a"
    if rank >= 160:
        return "a" if rank % 2 else "b"
    # train: a 80, b 30, c 30 (a tie with b), zz 9, rare 1, null 10
    slot = rank % 16
    if rank == 159:
        return "rare"
    if slot < 8:
        return "a"
    if slot < 11:
        return "b"
    if slot < 14:
        return "c"
    if slot == 14:
        return None
    return "zz"


def make_raw_log(seed: int = 0) -> pl.DataFrame:
    """Rows in shuffled order; ``rank`` is the time order (ts = 1000 + 10 * rank)."""
    rank = np.arange(ROWS)
    cities = [_city(r) for r in rank]
    # "zz" must be 9 in train: slot 15 gives 10 rows (ranks 15, 31, ..., 159); 159 is "rare".
    price = np.where(rank < 160, 10.0 + rank % 5, 1000.0)
    price_null = (rank < 160) & (rank % 16 == 3)
    frame = pl.DataFrame({
        "user_id": np.where(rank >= 190, 999, rank % 20).astype(np.int64),
        "item_id": (rank % 7).astype(np.int64),
        "user_city": cities,
        "price": pl.Series(price).set(pl.Series(price_null), None),
        "age_days": rank.astype(np.float64),
        "ts": 1000 + 10 * rank,
        "rank": rank,
        "click": (rank % 3 == 0).astype(np.int8),
        "like": rank % 6 == 0,
        "share": np.where(rank % 12 == 0, 2, 0).astype(np.int64),  # counts: binarised with a warning
    })
    return frame.sample(fraction=1.0, shuffle=True, seed=seed)


@pytest.fixture
def raw_log() -> pl.DataFrame:
    return make_raw_log()


@pytest.fixture
def raw_path(tmp_path: Path, raw_log: pl.DataFrame) -> Path:
    path = tmp_path / "in" / "log.parquet"
    path.parent.mkdir()
    raw_log.write_parquet(path)
    return path
