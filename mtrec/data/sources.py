"""Raw Parquet inputs: paths, directories and globs resolved to files, checked, and scanned lazily."""

from __future__ import annotations

import glob
from pathlib import Path

import polars as pl

from mtrec.core.errors import UserError

_MAGIC = b"PAR1"


def _has_glob(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def _check_parquet(path: Path) -> pl.Schema:
    """The file's schema, or a UserError saying why it is not a usable Parquet file."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            head = handle.read(4)
            handle.seek(max(size - 4, 0))
            tail = handle.read(4)
    except OSError as err:
        raise UserError(f"cannot read {path} ({err.strerror}): check the file's permissions") from err
    if size == 0:
        raise UserError(f"{path} is an empty file, not Parquet: pass Parquet logs")
    if head != _MAGIC or tail != _MAGIC:
        raise UserError(f"{path} is not a Parquet file: convert it first, e.g. "
                        "polars.read_csv(...).write_parquet(...)")
    try:
        return pl.read_parquet_schema(path)
    except Exception as err:  # noqa: BLE001 - any failure to parse the footer means a broken file
        raise UserError(f"{path} is a corrupt Parquet file ({type(err).__name__}): re-export it") from err


def resolve_inputs(inputs: str | Path | list[str | Path]) -> list[Path]:
    """Files named by paths, directories (every ``*.parquet`` inside) and globs, in a stable order."""
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    if not inputs:
        raise UserError("no input given: pass Parquet files, directories or globs")
    files: list[Path] = []
    for entry in inputs:
        text = str(entry)
        path = Path(text)
        if path.is_dir():
            found = sorted(p for p in path.glob("*.parquet") if p.is_file())
            if not found:
                raise UserError(f"directory {path} holds no .parquet file: pass the files or another directory")
        elif path.is_file():
            found = [path]
        elif _has_glob(text):
            found = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
            if not found:
                raise UserError(f"no file matches {text!r}: check the pattern")
        else:
            raise UserError(f"input {text} not found: check the path")
        files.extend(found)
    unique = list(dict.fromkeys(p.resolve() for p in files))
    for path in unique:
        _check_parquet(path)
    return unique


def normalise_dtypes(frame: pl.LazyFrame, schema: pl.Schema) -> pl.LazyFrame:
    """Dictionary strings read as plain strings, decimals as floats, fixed-size lists as lists (of
    plain strings): one dtype per kind of value."""
    casts = []
    for name, dtype in schema.items():
        plain = _plain_dtype(dtype)
        if plain != dtype:
            casts.append(pl.col(name).cast(plain))
    return frame.with_columns(casts) if casts else frame


def _plain_dtype(dtype: pl.DataType) -> pl.DataType:
    if isinstance(dtype, (pl.Categorical, pl.Enum)):
        return pl.String
    if isinstance(dtype, pl.Decimal):
        return pl.Float64
    if isinstance(dtype, (pl.List, pl.Array)):
        inner = dtype.inner
        plain = _plain_dtype(inner)
        return pl.List(plain) if isinstance(dtype, pl.Array) or plain != inner else dtype
    return dtype


def scan_files(files: list[Path]) -> pl.LazyFrame:
    """One LazyFrame over all files; files must agree on column names and dtypes."""
    schemas = [(path, _check_parquet(path)) for path in files]
    first_path, first = schemas[0]
    for path, schema in schemas[1:]:
        if dict(schema) != dict(first):
            ours, theirs = set(first.items()), set(schema.items())
            diff = sorted({name for name, _ in ours ^ theirs})
            raise UserError(f"{path} and {first_path} have different columns or dtypes ({', '.join(diff)}): "
                            "make the files agree or preprocess them separately")
    frame = pl.scan_parquet([str(p) for p in files])
    return normalise_dtypes(frame, first)


def scan_inputs(inputs: str | Path | list[str | Path]) -> tuple[pl.LazyFrame, list[Path]]:
    files = resolve_inputs(inputs)
    return scan_files(files), files


def column_list(frame: pl.LazyFrame) -> str:
    names = frame.collect_schema().names()
    shown = ", ".join(names[:40]) + (f", ... ({len(names)} in all)" if len(names) > 40 else "")
    return shown
