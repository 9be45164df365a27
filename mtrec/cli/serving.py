"""``mtrec evaluate``, ``mtrec predict`` and ``mtrec export``: scoring a trained run, and serving it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from mtrec.cli.app import command, split_list
from mtrec.cli.render import metrics_table
from mtrec.core.console import console
from mtrec.core.errors import UserError
from mtrec.core.files import strict_json


@command()
def evaluate(
    run_dir: Annotated[str, typer.Argument(help="Run directory made by mtrec train.")],
    data: Annotated[Optional[str], typer.Option(help="Encoded data directory (default: the run's).")] = None,
    raw: Annotated[Optional[str], typer.Option(help="Raw Parquet log to encode with the saved vocabularies.")] = None,
    split: Annotated[str, typer.Option(help="train, valid or test.")] = "test",
    checkpoint: Annotated[str, typer.Option(help="best or last.")] = "best",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
):
    """Score a trained run: AUC, GAUC, LogLoss, NDCG@K and positive rate per task."""
    from mtrec.serving.evaluate import evaluate_run

    if checkpoint not in ("best", "last"):
        raise UserError("--checkpoint must be best or last")
    result = evaluate_run(run_dir, data=data, raw=raw, split=split, device=device, which=checkpoint)
    if as_json:
        print(strict_json(result))
    else:
        console.print(metrics_table(result["metrics"], f"{result['data']} (target: {result['target']})",
                                    result["ndcg_k"]))


@command()
def predict(
    run_dir: Annotated[str, typer.Argument(help="Run directory made by mtrec train.")],
    raw: Annotated[list[str], typer.Option(help="Raw Parquet log(s) to score: files, directories or globs (repeat).")],
    out: Annotated[Path, typer.Option(help="Parquet file to write: the --keep columns and p_<task> per task.")],
    keep: Annotated[Optional[str], typer.Option(
        help="Comma-separated input columns to copy (default: the user and item columns).")] = None,
    checkpoint: Annotated[str, typer.Option(help="best or last.")] = "best",
    data: Annotated[Optional[str], typer.Option(help="Encoded data directory with the vocabularies (default: the run's).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    force: Annotated[bool, typer.Option(help="Overwrite an existing --out file.")] = False,
):
    """Write the run's probabilities for a raw log (labels not needed), one row per input row, in order."""
    from mtrec.serving.predict import predict_log

    if checkpoint not in ("best", "last"):
        raise UserError("--checkpoint must be best or last")
    result = predict_log(run_dir, raw, out, keep=None if keep is None else split_list(keep), which=checkpoint,
                         device=device, data=data, force=force)
    console.print(f"wrote {result['rows']:,} rows to {result['out']} ({', '.join(result['columns'])})")


@command()
def export(
    run_dir: Annotated[str, typer.Argument(help="Run directory made by mtrec train.")],
    out: Annotated[Path, typer.Option(help="ONNX file to write.")],
    checkpoint: Annotated[str, typer.Option(help="best or last.")] = "best",
    format: Annotated[str, typer.Option("--format", help="onnx (the only format).")] = "onnx",
    codes: Annotated[bool, typer.Option(help="The network alone, on encoded codes (for teams with their own encoder).")] = False,
    force: Annotated[bool, typer.Option(help="Overwrite an existing --out written by mtrec export.")] = False,
):
    """Export the run as one ONNX graph: raw feature columns in, p_<task> out (docs/serving.md)."""
    from mtrec.serving.export import export_run

    if checkpoint not in ("best", "last"):
        raise UserError("--checkpoint must be best or last")
    result = export_run(run_dir, out, which=checkpoint, fmt=format, codes_only=codes, force=force)
    console.print(f"wrote {result['out']} ({result['bytes']:,} bytes, {result['format']} inputs: "
                  f"{len(result['inputs'])}; outputs: {', '.join(result['outputs'])})")
