"""Label columns: which raw values are acceptable, and their encoding as uint8 {0, 1}."""

from __future__ import annotations

import polars as pl

from mtrec.core.errors import UserError


def check_label_dtypes(schema: pl.Schema, labels: list[str]) -> None:
    for name in labels:
        dtype = schema[name]
        if dtype == pl.String:
            raise UserError(f"label {name!r} is a string column: labels must be 0/1 (or counts); "
                            f"derive a 0/1 column first, e.g. (pl.col({name!r}) == 'yes').cast(pl.Int8)")
        if not (dtype.is_numeric() or dtype == pl.Boolean):
            raise UserError(f"label {name!r} has dtype {dtype}: labels must be 0/1 integers or booleans")


def check_labels(frame: pl.LazyFrame, labels: list[str], warnings: list[str] | None = None) -> int:
    """Raise on labels that cannot be binary; append a warning for counts that get binarised.

    Returns the number of rows. One pass over the label columns.
    """
    schema = frame.collect_schema()
    check_label_dtypes(schema, labels)
    stats = []
    for name in labels:
        col = pl.col(name)
        if schema[name] == pl.Boolean:
            col = col.cast(pl.Int8)
        if schema[name].is_float():
            missing = col.is_null() | col.is_nan()
            fractional = (col.is_not_nan() & (col != col.floor())).sum()
        else:
            missing = col.is_null()
            fractional = pl.lit(0, dtype=pl.UInt32)
        stats += [missing.sum().alias(f"{name}#missing"), col.min().cast(pl.Float64).alias(f"{name}#min"),
                  col.max().cast(pl.Float64).alias(f"{name}#max"), (col > 1).sum().alias(f"{name}#over"),
                  fractional.alias(f"{name}#fractional")]
    row = frame.select(pl.len().alias("#rows"), *stats).collect(engine="streaming").row(0, named=True)
    rows = row["#rows"]
    for name in labels:
        missing = row[f"{name}#missing"]
        if rows and missing == rows:
            raise UserError(f"label {name!r} is null in every row: pick another label column")
        if missing:
            raise UserError(f"label {name!r} is null or NaN in {missing:,} of {rows:,} rows: "
                            "drop or fill those rows first")
        if rows and row[f"{name}#min"] < 0:
            raise UserError(f"label {name!r} has negative values (min {row[f'{name}#min']:g}): "
                            "labels must be 0/1 (or counts)")
        if row[f"{name}#fractional"]:
            raise UserError(f"label {name!r} has {row[f'{name}#fractional']:,} fractional values: "
                            "labels must be 0/1 (or counts)")
        if row[f"{name}#over"] and warnings is not None:
            warnings.append(f"label {name!r} has {row[f'{name}#over']:,} values > 1 (max "
                            f"{row[f'{name}#max']:g}): binarised as value > 0")
    return rows


def label_expr(name: str) -> pl.Expr:
    """0/1 as uint8; counts > 1 become 1 (null stays null: callers check labels first)."""
    return (pl.col(name).cast(pl.Float64) > 0).cast(pl.UInt8).alias(name)
