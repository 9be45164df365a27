"""Which rows are train, valid and test: one uint8 expression per method, computed while streaming.

Every method becomes an expression of the row's own columns and its position in the input (a row
index the streaming engine adds), so assigning a split never holds a per-row array: a literal
Series column of all rows would make Polars keep the whole input in memory (measured: peak RSS
growing by ~135 bytes a row on a history log).

- ``time``: the same split as a stable sort by timestamp (ties in input order) cut at the ratios.
  The two cut timestamps are found by streaming histogram passes over the time column, and the
  rows tied at a cut are divided by their row index.
- ``random``: the row index through a seeded pseudo-random permutation of ``[0, rows)`` (a Feistel
  network with cycle walking), cut at the ratios: exact sizes, no stored permutation.
- ``column``: a column of ``train`` / ``valid`` / ``test`` strings.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from mtrec.core.errors import UserError
from mtrec.data.hashing import splitmix64

SPLITS = ("train", "valid", "test")
SPLIT_COL = "__mtrec_split"
ROW_COL = "__mtrec_row"
_BINS = 1 << 16
_MAX_ROUNDS = 12


def split_sizes(rows: int, ratios: tuple[float, float, float]) -> tuple[int, int, int]:
    train = int(round(rows * ratios[0]))
    valid = int(round(rows * ratios[1]))
    return train, valid, rows - train - valid


def _cut(earlier: pl.Expr, key: pl.Expr, value, last_row: int) -> pl.Expr:
    """Rows before the cut: key < value, or key == value up to row index ``last_row``."""
    return (key < value) | ((key == value) & (pl.col(ROW_COL) <= last_row)) | earlier


def _assignment(train: pl.Expr, valid: pl.Expr) -> pl.Expr:
    return pl.when(train).then(0).when(valid).then(1).otherwise(2).cast(pl.UInt8).alias(SPLIT_COL)


# --- time -----------------------------------------------------------------------------------------

def _value_at_rank(frame: pl.LazyFrame, key: pl.Expr, rank: int, low, high) -> tuple[object, int]:
    """The ``rank``-th smallest key (0-based) and how many rows have a smaller key.

    Each round is one streaming pass: the rows in [low, high] counted in value bins (with each bin's
    min and max), then the range narrows to the bin holding the rank, until it holds one value.
    Binning is monotonic in the key, so the narrowed range holds exactly that bin's rows.
    """
    below = 0
    for _ in range(_MAX_ROUNDS):
        if low == high:
            return low, below
        span = float(high - low)
        bins = ((pl.col("k") - low).cast(pl.Float64) / span * _BINS).floor().clip(0, _BINS - 1).cast(pl.Int32)
        counts = (frame.select(key.alias("k")).filter(pl.col("k").is_between(low, high))
                  .group_by(bins.alias("bin")).agg(pl.len().alias("n"), pl.col("k").min().alias("lo"),
                                                   pl.col("k").max().alias("hi"))
                  .collect(engine="streaming").sort("bin"))
        ends = counts["n"].cum_sum().to_numpy()
        index = int(np.searchsorted(ends, rank - below, side="right"))
        below += int(ends[index - 1]) if index else 0
        low, high = counts["lo"][index], counts["hi"][index]
    # a range that still holds several values after many rounds (extremely skewed floats):
    # its distinct values, counted exactly
    values = (frame.select(key.alias("k")).filter(pl.col("k").is_between(low, high)).group_by("k")
              .agg(pl.len().alias("n")).collect(engine="streaming").sort("k"))
    ends = values["n"].cum_sum().to_numpy()
    index = int(np.searchsorted(ends, rank - below, side="right"))
    return values["k"][index], below + (int(ends[index - 1]) if index else 0)


def _tie_cut(frame: pl.LazyFrame, key: pl.Expr, value, needed: int) -> int:
    """Row index of the ``needed``-th row (in input order) whose key equals ``value``."""
    found = (frame.filter(key == value).select(pl.col(ROW_COL)).slice(needed - 1, 1)
             .collect(engine="streaming"))
    return int(found[ROW_COL][0])


def time_split(frame: pl.LazyFrame, rows: int, ratios, time: str) -> pl.Expr:
    """The split of a stable sort by ``time`` (ties keep input order) cut at ``ratios``.

    ``frame`` must carry the row index column ``ROW_COL``.
    """
    dtype = frame.collect_schema()[time]
    key = pl.col(time).to_physical()
    if dtype.is_float():
        key = key.cast(pl.Float64)
    missing = key.is_null() | (key.is_nan() if dtype.is_float() else pl.lit(False))
    stats = frame.select(missing.sum().alias("missing"), key.min().alias("low"), key.max().alias("high")
                         ).collect(engine="streaming").row(0, named=True)
    if stats["missing"]:
        raise UserError(f"--time column {time!r} is null in {stats['missing']:,} rows: fill or drop "
                        "those rows, or use --split random")
    n_train, n_valid, _ = split_sizes(rows, ratios)
    earlier = pl.lit(False)
    conditions = []
    for rank in (n_train - 1, n_train + n_valid - 1):
        value, below = _value_at_rank(frame, key, rank, stats["low"], stats["high"])
        earlier = _cut(earlier, key, value, _tie_cut(frame, key, value, rank + 1 - below))
        conditions.append(earlier)
    return _assignment(*conditions)


# --- random ---------------------------------------------------------------------------------------

_ROUNDS = 4


def _feistel(values: np.ndarray, half_bits: int, keys: np.ndarray) -> np.ndarray:
    mask = np.uint64((1 << half_bits) - 1)
    left, right = values >> np.uint64(half_bits), values & mask
    for key in keys:
        mixed = splitmix64(right ^ key) & mask
        left, right = right, left ^ mixed
    return (left << np.uint64(half_bits)) | right


def permuted_positions(index: np.ndarray, rows: int, seed: int) -> np.ndarray:
    """A seeded bijection of [0, rows) applied to ``index`` (cycle walking keeps it in range)."""
    half_bits = max(1, (max(rows - 1, 1).bit_length() + 1) // 2)
    keys = np.random.default_rng([seed, 0x5B117]).integers(0, 2**63, _ROUNDS, dtype=np.uint64)
    out = index.astype(np.uint64)
    outside = np.ones(len(out), dtype=bool)
    while outside.any():
        out[outside] = _feistel(out[outside], half_bits, keys)
        outside = out >= rows
    return out


def random_split(rows: int, ratios, seed: int) -> pl.Expr:
    """Exact split sizes from a seeded permutation of the row index; ``ROW_COL`` must be present."""
    n_train, n_valid, _ = split_sizes(rows, ratios)
    position = pl.col(ROW_COL).map_batches(
        lambda index: pl.Series(permuted_positions(index.to_numpy(), rows, seed), dtype=pl.UInt64),
        return_dtype=pl.UInt64, is_elementwise=True)
    return _assignment(position < n_train, position < n_train + n_valid)


# --- a given column -------------------------------------------------------------------------------

def column_split(frame: pl.LazyFrame, column: str) -> tuple[pl.Expr, tuple[int, int, int]]:
    """The split given by a column of ``train`` / ``valid`` / ``test`` strings: (uint8 split
    expression, rows per split). One pass over the column; any other value, a null, or a missing
    part is a UserError."""
    dtype = frame.collect_schema()[column]
    if dtype != pl.String:
        raise UserError(f"--split-column {column!r} is {dtype}: it must hold the strings train, valid and test")
    counts = dict(frame.group_by(pl.col(column)).len().collect(engine="streaming").iter_rows())
    nulls = counts.pop(None, 0)
    if nulls:
        raise UserError(f"--split-column {column!r} is null in {nulls:,} rows: give every row train, valid or test")
    bad = sorted(set(counts) - set(SPLITS))
    if bad:
        shown = ", ".join(repr(v) for v in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise UserError(f"--split-column {column!r} holds {shown}: its values must be exactly train, valid or test")
    missing = [name for name in SPLITS if not counts.get(name)]
    if missing:
        raise UserError(f"--split-column {column!r} has no {' or '.join(missing)} rows: every split needs rows "
                        "(add them, or use --split time / random)")
    value = pl.col(column)
    return _assignment(value == "train", value == "valid"), tuple(counts[name] for name in SPLITS)
