"""``mtrec synth`` and ``mtrec preprocess``: making and encoding logs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from mtrec.cli.app import command, split_list
from mtrec.cli.render import render_preprocess
from mtrec.core.console import console
from mtrec.core.errors import UserError


def _written_by_synth(path: Path) -> bool:
    import pyarrow.parquet as pq

    from mtrec.data.synth import SYNTH_MARKER

    try:
        return (pq.read_schema(path).metadata or {}).get(b"mtrec") == SYNTH_MARKER[b"mtrec"]
    except (OSError, ValueError):
        return False


@command()
def synth(
    out: Annotated[Path, typer.Option(help="Parquet file to write.")],
    rows: Annotated[int, typer.Option(help="Number of impressions.")] = 100_000,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same log).")] = 0,
    force: Annotated[bool, typer.Option(help="Overwrite an existing file.")] = False,
    history: Annotated[int, typer.Option(
        help="Add hist_items (up to N recent item ids) and tags (multi-hot) list columns; 0: none.")] = 0,
):
    """Write a synthetic interaction log (users, items, features, click -> like -> share labels)."""
    from mtrec.data.synth import write_synthetic

    if rows < 1:
        raise UserError("--rows must be at least 1")
    if history < 0:
        raise UserError(f"--history must be 0 (no history) or a positive list length, got {history}")
    if out.exists() and not force:
        raise UserError(f"{out} exists: pass --force to overwrite it")
    if out.exists() and not _written_by_synth(out):
        raise UserError(f"--out {out} is not a log written by mtrec synth: --force only replaces those; "
                        "choose another --out")
    write_synthetic(out, rows=rows, seed=seed, history=history)
    console.print(f"wrote {rows:,} rows to {out}")


@command()
def preprocess(
    inputs: Annotated[list[str], typer.Argument(help="Parquet files, directories or globs.")],
    labels: Annotated[str, typer.Option(help="Comma-separated label columns, one per task.")],
    out: Annotated[Path, typer.Option(help="Output directory.")],
    user: Annotated[Optional[str], typer.Option(help="User id column (for GAUC / NDCG).")] = None,
    item: Annotated[Optional[str], typer.Option(help="Item id column.")] = None,
    time: Annotated[Optional[str], typer.Option(help="Timestamp column (enables --split time).")] = None,
    spec: Annotated[Optional[str], typer.Option(help="TOML feature spec (kinds, min counts, transforms).")] = None,
    split: Annotated[Optional[str], typer.Option(help="time or random (default: time when --time is given).")] = None,
    ratios: Annotated[Optional[str], typer.Option(help="train,valid,test fractions (default 0.8,0.1,0.1).")] = None,
    split_column: Annotated[Optional[str], typer.Option(
        help="Column of train / valid / test strings that gives the split (instead of --split / --ratios).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the random split.")] = 0,
    min_count: Annotated[int, typer.Option(help="Values seen fewer times in train become OOV.")] = 1,
    exclude: Annotated[Optional[str], typer.Option(help="Comma-separated columns that are not features.")] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing output directory.")] = False,
):
    """Encode raw Parquet logs into train/valid/test splits, vocabularies and a schema."""
    import contextlib

    from mtrec.data.preprocess import preprocess as run

    ratio_values = None
    if ratios is not None:
        try:
            ratio_values = tuple(float(r) for r in ratios.split(","))
        except ValueError as err:
            raise UserError(f"--ratios expects three numbers like 0.8,0.1,0.1, got {ratios!r}") from err
    kwargs = dict(user=user, item=item, time=time, spec=spec, ratios=ratio_values, seed=seed,
                  min_count=min_count, force=force, exclude=split_list(exclude), split_column=split_column)
    if split:
        kwargs["split"] = split
    # one spinner naming the current pass on a terminal; nothing when piped
    with console.status("preprocess") if console.is_terminal else contextlib.nullcontext() as status:
        if status is not None:
            kwargs["on_stage"] = lambda text: status.update(f"preprocess: {text}")
        summary = run(inputs, split_list(labels), str(out), **kwargs)
    render_preprocess(summary)
    console.print(f"wrote {out}")
