"""A hash of raw values that stays the same across Polars versions and machines.

Polars' own ``Expr.hash`` may change between releases, which would silently re-map every hashed
feature of a model trained before an upgrade. This hash is defined here, in NumPy, once:

- integers (and booleans) are taken modulo 2**64 (their int64 two's-complement bit pattern; a
  UInt64 id at or above 2**63 keeps its own bits) and mixed with the splitmix64 finaliser;
- floats are mixed from their float64 bit pattern (``-0.0`` as ``0.0``);
- strings (UTF-8 bytes ``b_0 .. b_{L-1}``) become ``sum((b_j + 1) * P**(L-1-j)) mod 2**64``, then
  the length is folded in and the result mixed with splitmix64.

Everything is vectorised over whole Arrow buffers (a chunk of strings at a time), never per row.
Nulls stay null.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_POLY = np.uint64(0x100000001B3)  # the FNV prime: odd, so every power is invertible mod 2**64
_STRING_CHUNK = 1 << 18


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, elementwise over uint64."""
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MIX1
        z = (z ^ (z >> np.uint64(27))) * _MIX2
        return z ^ (z >> np.uint64(31))


def _hash_string_chunk(arr: pa.LargeStringArray) -> np.ndarray:
    n = len(arr)
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset:arr.offset + n + 1]
    data_buffer = arr.buffers()[2]
    data = np.frombuffer(data_buffer, dtype=np.uint8) if data_buffer is not None else np.zeros(0, np.uint8)
    lengths = np.diff(offsets)
    sums = np.zeros(n, dtype=np.uint64)
    total = int(offsets[-1] - offsets[0])
    if total:
        data = data[offsets[0]:offsets[-1]].astype(np.uint64) + np.uint64(1)
        owner = np.repeat(np.arange(n), lengths)
        position = np.arange(total, dtype=np.int64) + offsets[0]
        from_end = offsets[1:][owner] - 1 - position
        with np.errstate(over="ignore"):
            powers = np.cumprod(np.full(int(lengths.max()), _POLY, dtype=np.uint64))
            powers = np.concatenate([np.ones(1, np.uint64), powers[:-1]])
            terms = data * powers[from_end]
        nonempty = np.flatnonzero(lengths > 0)
        with np.errstate(over="ignore"):
            sums[nonempty] = np.add.reduceat(terms, (offsets[:-1][nonempty] - offsets[0]))
    with np.errstate(over="ignore"):
        return splitmix64(sums ^ (lengths.astype(np.uint64) * _MIX2))


def _hash_strings(series: pl.Series) -> np.ndarray:
    chunked = series.cast(pl.String).to_arrow(compat_level=pl.CompatLevel.oldest())
    array = chunked.combine_chunks() if isinstance(chunked, pa.ChunkedArray) else chunked
    array = array.cast(pa.large_string())
    parts = [_hash_string_chunk(array.slice(start, _STRING_CHUNK)) for start in range(0, len(array), _STRING_CHUNK)]
    return np.concatenate(parts) if parts else np.zeros(0, np.uint64)


def stable_hash(series: pl.Series) -> pl.Series:
    """UInt64 hash of every value of ``series`` (null stays null), stable across versions."""
    dtype = series.dtype
    if dtype == pl.UInt64:  # no cast: ids >= 2**63 do not fit an int64
        hashed = splitmix64(series.fill_null(0).to_numpy().astype(np.uint64, copy=False))
    elif dtype.is_integer() or dtype == pl.Boolean:
        values = series.cast(pl.Int64).fill_null(0).to_numpy().view(np.uint64)
        hashed = splitmix64(values)
    elif dtype.is_float():
        values = series.cast(pl.Float64).fill_null(0.0).to_numpy() + 0.0  # folds -0.0 into 0.0
        hashed = splitmix64(values.view(np.uint64))
    else:
        hashed = _hash_strings(series.fill_null(""))
    out = pl.Series(series.name, hashed, dtype=pl.UInt64)
    if series.null_count():
        out = pl.select(pl.when(series.is_null()).then(None).otherwise(out)).to_series().alias(series.name)
    return out


def stable_hash_expr(expr: pl.Expr) -> pl.Expr:
    return expr.map_batches(stable_hash, return_dtype=pl.UInt64, is_elementwise=True)
