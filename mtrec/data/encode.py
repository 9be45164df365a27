"""Raw rows -> encoded rows, with saved vocabularies and statistics.

``encode`` is the one place that turns raw values into codes and standardised numbers: preprocess
runs it over its own splits, and ``mtrec evaluate --raw`` runs it over new logs, so the same raw
row always encodes to the same output. It builds one lazy plan: a left join (order kept) against
each vocabulary frame (or, for compact integer ids, a dense code table; for string vocabularies
of up to 65,536 values, a cast to an ``Enum`` of the vocabulary), and expressions for hashed,
bucketized and numeric features. Joins, not ``replace_strict``: with Polars 2.1 the streaming engine
runs joins in bounded memory, while
``replace_strict`` materialises whole columns (measured: 150 MB vs 670 MB peak for one string
feature over 10M rows). Sequence (list) features are the exception: ``list.eval`` with
``replace_strict`` maps the elements of each streamed batch (a join would need an explode and a
re-aggregation per row; measured below in docs/data.md), and the codes become a fixed-size
``Array(Int32, max_len)``.
"""

from __future__ import annotations

import math
from pathlib import Path
from urllib.parse import quote

import numpy as np
import polars as pl

from mtrec.core.errors import UserError
from mtrec.data.hashing import stable_hash_expr
from mtrec.data.labels import check_labels, label_expr
from mtrec.data.schema import Feature, Schema
from mtrec.data.sources import column_list, normalise_dtypes, scan_inputs

PAD, OOV = 0, 1  # reserved codes; the vocabulary starts at 2
USER_GROUP = "_user"
NULL_USER = -1


def vocab_path(vocab_dir: str | Path, feature: str) -> Path:
    """``vocab/<feature>.parquet``; names with path-unsafe characters are percent-encoded."""
    return Path(vocab_dir) / f"{quote(feature, safe='')}.parquet"


def uses_vocab(feature: Feature) -> bool:
    """Whether the feature has its own vocabulary file (a shared sequence uses its column's)."""
    if feature.kind == "sequence":
        return not feature.hash_buckets and not feature.share_with
    return feature.kind == "categorical" and not feature.hash_buckets and not feature.bucketize


def element_dtype(dtype: str) -> str:
    """The element dtype of a list dtype string (``"List(Int64)"`` -> ``"Int64"``)."""
    return dtype[len("List("):-1] if dtype.startswith("List(") else dtype


def numeric_base(name: str, log1p: bool) -> pl.Expr:
    """Float64 value with non-finite values as null, then sign(x) * log1p(|x|) when asked."""
    value = pl.col(name).cast(pl.Float64)
    value = pl.when(value.is_finite()).then(value)
    return value.sign() * value.abs().log1p() if log1p else value


def _integer_like(dtype: str) -> bool:
    return dtype.startswith(("Int", "UInt", "Boolean"))


def _hash_key(value: pl.Expr, dtype: str) -> pl.Expr:
    """The raw value in the dtype family it had at fit time, so int32 vs int64 inputs hash alike.

    Integers become their value modulo 2**64 as a UInt64 (through Int128, which holds every Int64
    and UInt64 value): an id below 2**63 hashes as it always did, and UInt64 ids up to 2**64 - 1 keep
    distinct hashes (an Int64 cast made every id >= 2**63 null, so OOV). A value outside
    [-2**63, 2**64) does not cast and is OOV."""
    if _integer_like(dtype):
        wide = value.cast(pl.Int128, strict=False)
        return pl.when(wide < 0).then(wide + 2**64).otherwise(wide).cast(pl.UInt64, strict=False)
    if dtype.startswith("Float"):
        return value.cast(pl.Float64, strict=False)
    return value.cast(pl.String, strict=False)


# Standardised values are clipped to this many standard deviations: a value far outside the train
# range (or a huge fill) would otherwise become +-inf in float32 and every step non-finite.
STANDARD_CLIP = 1e6


def _numeric_expr(feature: Feature) -> pl.Expr:
    value = numeric_base(feature.name, feature.log1p)
    fill = feature.mean if feature.fill is None else _transform_scalar(feature.fill, feature.log1p)
    standard = (value.fill_null(fill) - feature.mean) / feature.std
    return standard.clip(-STANDARD_CLIP, STANDARD_CLIP).cast(pl.Float32).alias(feature.name)


def _transform_scalar(value: float, log1p: bool) -> float:
    return math.copysign(math.log1p(abs(value)), value) if log1p else float(value)


def _hashed_expr(feature: Feature) -> pl.Expr:
    raw = pl.col(feature.name)
    return _hashed_code(raw, feature).alias(feature.name)


def _hashed_code(raw: pl.Expr, feature: Feature) -> pl.Expr:
    """``2 + hash % buckets``; null -> PAD, a value that does not cast to the fit-time family -> OOV."""
    hashed = stable_hash_expr(_hash_key(raw, element_dtype(feature.dtype))) % feature.hash_buckets + 2
    return pl.when(raw.is_null()).then(PAD).otherwise(hashed.fill_null(OOV)).cast(pl.Int32)


def _bucket_expr(feature: Feature) -> pl.Expr:
    value = numeric_base(feature.name, False)
    bucket = pl.lit(pl.Series(feature.boundaries or [], dtype=pl.Float64)).search_sorted(value, side="left")
    return pl.when(value.is_null()).then(PAD).otherwise(bucket + 2).cast(pl.Int32).alias(feature.name)


def user_group_expr(name: str, dtype: pl.DataType) -> pl.Expr:
    """``_user``: the raw id itself when it is an integer, else its stable 64-bit hash; rows with
    a null user form one group, -1."""
    if dtype == pl.UInt64:
        group = pl.col(name).reinterpret(signed=True)  # ids above 2**63 keep distinct groups
    elif dtype.is_integer() or dtype == pl.Boolean:
        group = pl.col(name).cast(pl.Int64)
    else:
        group = stable_hash_expr(pl.col(name)).reinterpret(signed=True)
    return group.fill_null(NULL_USER).alias(USER_GROUP)


def _check_columns(schema_in: pl.Schema, schema: Schema, labels: list[str], frame: pl.LazyFrame) -> None:
    features = [f.name for f in schema.features if f.name not in schema_in]
    missing_labels = [name for name in labels if name not in schema_in]
    if features:
        raise UserError(f"the raw log lacks feature column(s) {', '.join(features)} that the model was trained on "
                        f"(it has: {column_list(frame)}): pass logs with the same columns as at preprocess")
    if missing_labels:
        raise UserError(f"the raw log lacks label column(s) {', '.join(missing_labels)} "
                        f"(it has: {column_list(frame)}): pass logs with the labels to score against")
    for feature in schema.numeric_features + [f for f in schema.categorical_features if f.bucketize]:
        dtype = schema_in[feature.name]
        if not (dtype.is_numeric() or dtype == pl.Boolean):
            raise UserError(f"column {feature.name!r} is {dtype} in the raw log but numeric at preprocess "
                            f"(was {feature.dtype}): pass logs with the same column types")
    for feature in schema.features:
        is_list = isinstance(schema_in[feature.name], (pl.List, pl.Array))
        if is_list != (feature.kind == "sequence"):
            raise UserError(f"column {feature.name!r} is {schema_in[feature.name]} in the raw log but was "
                            f"{feature.dtype} at preprocess: pass logs with the same column types")


def encode(frame: pl.LazyFrame | pl.DataFrame, schema: Schema, vocab_dir: str | Path, *,
           labels: list[str] | None = None, check: bool = True,
           keep: tuple[str, ...] = ()) -> pl.LazyFrame | pl.DataFrame:
    """Encode raw rows with a schema and its vocabularies.

    Output columns: every feature of ``schema.features`` in order (int32 codes: 0 null, 1 OOV;
    float32 standardised numerics; ``Array(Int32, max_len)`` for sequences), every label (uint8;
    ``labels=[]`` for unlabelled logs), and ``_user`` (int64) when the schema names a user column.
    A LazyFrame in gives a LazyFrame out; a DataFrame in, a DataFrame out.
    ``check`` validates label values first (one extra pass); preprocess has done that already.
    ``keep`` names raw columns to pass through unchanged after those.
    """
    lazy = isinstance(frame, pl.LazyFrame)
    plan = frame if lazy else frame.lazy()
    labels = list(schema.labels if labels is None else labels)
    schema_in = plan.collect_schema()
    _check_columns(schema_in, schema, labels, plan)
    plan = normalise_dtypes(plan, schema_in)
    schema_in = plan.collect_schema()
    if check and labels:
        check_labels(plan, labels)

    outputs: list[pl.Expr] = []
    for index, feature in enumerate(schema.features):
        if feature.kind == "numeric":
            outputs.append(_numeric_expr(feature))
        elif feature.kind == "sequence":
            outputs.append(_sequence_expr(feature, schema, vocab_dir, schema_in[feature.name]))
        elif feature.hash_buckets:
            outputs.append(_hashed_expr(feature))
        elif feature.bucketize:
            outputs.append(_bucket_expr(feature))
        else:
            plan, code = _join_vocab(plan, feature, index, schema_in[feature.name], vocab_dir)
            outputs.append(code)
    outputs += [label_expr(name) for name in labels]
    if schema.user:
        if schema.user not in schema_in:
            raise UserError(f"the raw log lacks the user column {schema.user!r} (needed for GAUC / NDCG): "
                            "pass logs with the same columns as at preprocess")
        if schema_in[schema.user].is_nested():  # the groups hash one value per row
            raise UserError(f"the user column {schema.user!r} is {schema_in[schema.user]} in the raw log: a user id "
                            "holds one value per row, as at preprocess; pass logs with the same column types")
        outputs.append(user_group_expr(schema.user, schema_in[schema.user]))
    encoded = plan.select(*outputs, *keep)
    return encoded if lazy else encoded.collect(engine="streaming")


def _sequence_expr(feature: Feature, schema: Schema, vocab_dir, raw_dtype: pl.DataType) -> pl.Expr:
    """The last ``max_len`` elements as codes, left-aligned, padded with PAD: ``Array(Int32, max_len)``.

    Elements take the codes of the feature's own vocabulary or hash buckets, or those of the
    ``share_with`` column (the same raw id, the same code). Null and empty lists: all PAD.
    """
    source = schema.feature(feature.share_with) if feature.share_with else feature
    element = pl.element()
    if source.hash_buckets:
        code = _hashed_code(element, source)
    else:
        path = vocab_path(vocab_dir, source.name)
        if not path.is_file():
            raise UserError(f"vocabulary {path} is missing: the data directory is incomplete, re-run mtrec preprocess")
        vocab = pl.read_parquet(path, columns=["value", "code"])
        key = _cast_key(element, raw_dtype.inner, vocab["value"].dtype)
        found = key.replace_strict(vocab["value"], vocab["code"], default=OOV, return_dtype=pl.Int32)
        code = pl.when(element.is_null()).then(PAD).otherwise(found.fill_null(OOV)).cast(pl.Int32)
    width = feature.max_len
    # scalar list literals: a literal Series would be a separate input of the streaming plan, zipped
    # with the scanned batches, and that zip held rows: peak RSS grew with the rows (50-element
    # history, 9M rows: 1.5-2.2 GiB, flat with scalars; docs/data.md)
    empty = pl.lit([], dtype=pl.List(pl.Int32))
    padding = pl.lit([PAD] * width, dtype=pl.List(pl.Int32))
    codes = pl.col(feature.name).list.tail(width).list.eval(code).fill_null(empty)
    return codes.list.concat(padding).list.head(width).list.to_array(width).alias(feature.name)


def _cast_key(value: pl.Expr, raw_dtype: pl.DataType, vocab_dtype: pl.DataType) -> pl.Expr:
    """A raw value in its vocabulary's dtype; one that does not convert is null, so OOV. Polars has
    no String -> Boolean cast, not even a non-strict one (a log whose boolean column arrived as
    strings was a traceback): "true" / "false", the Boolean -> String spelling, are matched."""
    if raw_dtype == vocab_dtype:
        return value
    if vocab_dtype == pl.Boolean and raw_dtype == pl.String:
        return pl.when(value == "true").then(True).when(value == "false").then(False)
    return value.cast(vocab_dtype, strict=False)


def _join_vocab(plan: pl.LazyFrame, feature: Feature, index: int, raw_dtype: pl.DataType,
                vocab_dir) -> tuple[pl.LazyFrame, pl.Expr]:
    """Left-join the feature's vocabulary frame; returns the plan and the code expression
    (null raw value -> PAD, a value not in the vocabulary -> OOV)."""
    path = vocab_path(vocab_dir, feature.name)
    if not path.is_file():
        raise UserError(f"vocabulary {path} is missing: the data directory is incomplete, re-run mtrec preprocess")
    value_dtype = pl.read_parquet_schema(path)["value"]
    if raw_dtype.is_integer() and value_dtype.is_integer():
        lookup = _dense_lookup(path, feature)
        if lookup is not None:
            return plan, lookup
    if raw_dtype == pl.String and value_dtype == pl.String:
        lookup = _enum_lookup(path, feature)
        if lookup is not None:
            return plan, lookup
    key, code = f"__mtrec_key{index}", f"__mtrec_code{index}"
    raw = pl.col(feature.name)
    plan = plan.with_columns(_cast_key(raw, raw_dtype, value_dtype).alias(key))
    vocab = pl.scan_parquet(path).select(pl.col("value").alias(key), pl.col("code").alias(code))
    plan = plan.join(vocab, on=key, how="left", maintain_order="left")
    expr = pl.when(raw.is_null()).then(PAD).otherwise(pl.col(code).fill_null(OOV)).cast(pl.Int32)
    return plan, expr.alias(feature.name)


# Integer ids over a range at most this many times the vocabulary (or 1M values) are encoded by
# indexing a code table instead of a join: 6x faster per column at 10M rows (item_id: 0.06 s vs
# 0.36 s), and the table is small (int32, one entry per value of the range).
_DENSE_RANGE_FACTOR, _DENSE_RANGE_MIN = 4, 1 << 20


def _dense_lookup(path: Path, feature: Feature) -> pl.Expr | None:
    """Codes via ``table[value - lowest]`` when the vocabulary's integer range is dense enough."""
    vocab = pl.read_parquet(path, columns=["value", "code"])
    if vocab.height == 0:
        return None
    lowest, highest = int(vocab["value"].min()), int(vocab["value"].max())
    span = highest - lowest + 1
    if highest >= 2**63 or span > max(_DENSE_RANGE_FACTOR * vocab.height, _DENSE_RANGE_MIN):
        return None  # UInt64 ids past the Int64 range: the join (an Int128 table index costs 2.5x)
    table = np.full(span, OOV, dtype=np.int32)
    table[(vocab["value"] - lowest).to_numpy()] = vocab["code"].to_numpy()
    # a UInt64 value >= 2**63 does not fit and becomes null here: not inside, so OOV (null raw -> PAD)
    raw = pl.col(feature.name).cast(pl.Int64, strict=False)
    inside = (raw >= lowest) & (raw <= highest)
    found = pl.lit(pl.Series(table)).gather((raw - lowest).clip(0, span - 1))
    return (pl.when(pl.col(feature.name).is_null()).then(PAD).when(inside).then(found).otherwise(OOV)
            .cast(pl.Int32).alias(feature.name))


# String vocabularies up to this size are encoded by a cast to an Enum of the vocabulary (codes
# are the Enum's positions + 2) instead of a join: elementwise, so it streams in bounded memory,
# where chained left joins with maintain_order="left" buffer rows (measured at 10M rows, the three
# synth string features: 751 MiB peak and 0.79 s with joins).
_ENUM_MAX = 1 << 16


def _enum_lookup(path: Path, feature: Feature) -> pl.Expr | None:
    """Codes via a cast to ``Enum(vocabulary in code order)``: a value outside it -> OOV."""
    vocab = pl.read_parquet(path, columns=["value", "code"]).sort("code")
    if vocab.height == 0 or vocab.height > _ENUM_MAX:
        return None
    if not (vocab["code"] == pl.int_range(2, vocab.height + 2, dtype=pl.Int32, eager=True)).all():
        return None
    raw = pl.col(feature.name)
    position = raw.cast(pl.Enum(vocab["value"]), strict=False).to_physical().cast(pl.Int32)
    return (pl.when(raw.is_null()).then(PAD).otherwise((position + 2).fill_null(OOV))
            .cast(pl.Int32).alias(feature.name))


def read_raw(path: str | Path | list[str | Path]) -> pl.LazyFrame:
    """Raw logs for ``mtrec evaluate --raw``: a file, a directory or a glob, checked and scanned."""
    frame, _ = scan_inputs(path)
    return frame
