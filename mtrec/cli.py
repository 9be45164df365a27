"""The command line. Commands are thin: typed options, then one call into a plain function.

User mistakes raise ``UserError`` anywhere below; ``main`` turns them into one line on stderr and
exit code 2 (``--debug`` shows the traceback). Ctrl-C during training exits 130 after saving.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import traceback
from pathlib import Path
from typing import Annotated, Optional

import typer

from mtrec.errors import TrainingInterrupted, UserError
from mtrec.report import console, err_console, metrics_table, render_preprocess, simple_table

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train multi-task CTR / recommendation models with gradient balancers.")
_debug = {"on": False}


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False):
    _debug["on"] = debug


def command(name: str | None = None):
    """``app.command`` plus the one place where errors become exit codes: a UserError prints one
    line and exits 2; Ctrl-C during training exits 130 after its checkpoint."""

    def decorate(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except UserError as err:
                if _debug["on"]:
                    traceback.print_exc()
                err_console.print(f"error: {err}", markup=False, highlight=False, soft_wrap=True)
                raise typer.Exit(2) from None
            except TrainingInterrupted as stop:
                err_console.print(f"interrupted: checkpoint saved; continue with: mtrec train --resume "
                                  f"{stop.run_dir}", markup=False, highlight=False, soft_wrap=True)
                raise typer.Exit(130) from None

        return app.command(name)(run)

    return decorate


def _written_by_synth(path: Path) -> bool:
    import pyarrow.parquet as pq

    from mtrec.data.synth import SYNTH_MARKER

    try:
        return (pq.read_schema(path).metadata or {}).get(b"mtrec") == SYNTH_MARKER[b"mtrec"]
    except (OSError, ValueError):
        return False


def _split_list(text: Optional[str]) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()] if text else []


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
                  min_count=min_count, force=force, exclude=_split_list(exclude), split_column=split_column)
    if split:
        kwargs["split"] = split
    # one spinner naming the current pass on a terminal; nothing when piped
    with console.status("preprocess") if console.is_terminal else contextlib.nullcontext() as status:
        if status is not None:
            kwargs["on_stage"] = lambda text: status.update(f"preprocess: {text}")
        summary = run(inputs, _split_list(labels), str(out), **kwargs)
    render_preprocess(summary)
    console.print(f"wrote {out}")


@command()
def train(
    ctx: typer.Context,
    data: Annotated[Optional[str], typer.Argument(help="Directory made by mtrec preprocess.")] = None,
    model: Annotated[Optional[str], typer.Option(help="single, shared-bottom, mmoe, ple or esmm.")] = None,
    target: Annotated[Optional[str], typer.Option(help="Target task (task 0; --select and early stopping use it).")] = None,
    tasks: Annotated[Optional[str], typer.Option(help="Comma-separated tasks (default: every label).")] = None,
    conditions: Annotated[Optional[list[str]], typer.Option(
        "--condition", help="TASK:GIVEN, e.g. purchase:click: TASK is trained and scored only where GIVEN = 1 (repeat).")] = None,
    balancer: Annotated[Optional[str], typer.Option(help="Balancer name (see mtrec balancers).")] = None,
    balancer_opt: Annotated[Optional[list[str]], typer.Option(help="Balancer hyperparameter key=value (repeat).")] = None,
    scope: Annotated[Optional[str], typer.Option(
        "--balance-scope", help="shared, all or representation (default: the balancer's, see mtrec balancers).")] = None,
    balance_groups: Annotated[Optional[str], typer.Option(
        help="tensor or part: one group per tensor, or per expert / field (default: the balancer's).")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Maximum epochs.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Batch size.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Adam learning rate.")] = None,
    weight_decay: Annotated[Optional[float], typer.Option(help="Adam weight decay.")] = None,
    embedding_optimizer: Annotated[Optional[str], typer.Option(
        help="Embedding rows: lazy-adam (default: touched rows only), rowwise-adagrad, or adam (dense).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed (init, shuffling).")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu or cuda.")] = None,
    precision: Annotated[Optional[str], typer.Option(help="auto (bf16 on CUDA), fp32 or bf16.")] = None,
    patience: Annotated[Optional[int], typer.Option(help="Early-stopping patience in epochs.")] = None,
    lr_schedule: Annotated[Optional[str], typer.Option(
        help="constant, cosine or linear (decay towards 0 over all planned steps, after the warmup).")] = None,
    warmup_steps: Annotated[Optional[int], typer.Option(help="Steps of linear learning-rate warmup (0: none).")] = None,
    clip_grad: Annotated[Optional[float], typer.Option(
        help="Clip the global norm of the applied gradients, after balancing (0: off).")] = None,
    select: Annotated[Optional[str], typer.Option(
        help="Target-task validation metric for best.pt and early stopping: auc, gauc or logloss.")] = None,
    embedding_dim: Annotated[Optional[int], typer.Option(help="Embedding width.")] = None,
    num_experts: Annotated[Optional[int], typer.Option("--experts", help="MMoE experts.")] = None,
    levels: Annotated[Optional[int], typer.Option(help="PLE levels (1 = CGC).")] = None,
    expert_sizes: Annotated[Optional[str], typer.Option(help="Expert / bottom layer sizes, e.g. 256,128.")] = None,
    tower_sizes: Annotated[Optional[str], typer.Option(help="Tower layer sizes, e.g. 64.")] = None,
    shared_experts: Annotated[Optional[int], typer.Option(help="PLE shared experts per level.")] = None,
    task_experts: Annotated[Optional[int], typer.Option(help="PLE experts per task per level.")] = None,
    dropout: Annotated[Optional[float], typer.Option(help="Dropout in experts and towers.")] = None,
    ndcg_k: Annotated[Optional[int], typer.Option(help="K of NDCG@K.")] = None,
    data_placement: Annotated[Optional[str], typer.Option(
        help="device, host, stream (row groups from disk, shuffled in a buffer) or auto (stream when the "
             "train split exceeds --memory-budget, else device when it fits there).")] = None,
    shuffle_buffer: Annotated[Optional[int], typer.Option(help="Rows shuffled together when streaming.")] = None,
    memory_budget_gb: Annotated[Optional[float], typer.Option(
        "--memory-budget", help="GiB a split may take in memory before auto streams it (default: half the available memory).")] = None,
    diagnostics_every: Annotated[Optional[int], typer.Option(help="Gradient diagnostics every N steps (0: off).")] = None,
    max_bad_steps: Annotated[Optional[int], typer.Option(help="Non-finite steps in a row before stopping.")] = None,
    checkpoint_every: Annotated[Optional[int], typer.Option(help="Save last.pt every N steps (0: epochs only).")] = None,
    out: Annotated[Optional[str], typer.Option(help="Run directory to create.")] = None,
    tensorboard: Annotated[Optional[str], typer.Option(
        help="Also write the logged scalars as TensorBoard events here (pip install 'mtrec[tensorboard]').")] = None,
    config: Annotated[Optional[Path], typer.Option(help="TOML file with any of these settings.")] = None,
    force: Annotated[bool, typer.Option(help="Overwrite an existing run directory.")] = False,
    resume: Annotated[Optional[str], typer.Option(help="Continue the run in this directory from last.pt.")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
):
    """Train a multi-task model with a gradient balancer."""
    from mtrec.config import TrainConfig, parse_opt, read_toml
    from mtrec.train import train as run

    if resume:
        values = _saved_config(resume)
        values.update(_resume_changes(ctx))
    else:
        values = read_toml(config) if config else {}
        values.update(_config_flags(ctx))
        if balancer_opt:
            values["balancer_opts"] = {**values.get("balancer_opts", {}), **dict(parse_opt(o) for o in balancer_opt)}
        if not values.get("data"):
            raise UserError("missing DATA: the directory made by mtrec preprocess")
    cfg = TrainConfig.from_dict(values)
    result = run(cfg, resume=bool(resume), force=force, quiet=quiet)
    from mtrec.distributed import is_main_process

    if not is_main_process():
        return
    if result["history"] and result["best_epoch"] >= 1:
        best = result["history"][result["best_epoch"] - 1]["valid"]
        console.print(metrics_table(best, f"best validation (epoch {result['best_epoch']}, by {cfg.select})",
                                    cfg.ndcg_k))
    elif result["history"]:
        err_console.print(f"warning: no epoch gave a defined validation {cfg.select} for {cfg.target}, so there "
                          "is no best.pt; showing the last epoch", markup=False, highlight=False, soft_wrap=True)
        last = result["history"][-1]
        console.print(metrics_table(last["valid"], f"last validation (epoch {last['epoch']})", cfg.ndcg_k))
    console.print(f"run saved in {result['run_dir']}  (evaluate: mtrec evaluate {result['run_dir']})")


def _int_list(text: Optional[str], flag: str) -> Optional[list[int]]:
    if text is None:
        return None
    try:
        return [int(part) for part in _split_list(text)]
    except ValueError as err:
        raise UserError(f"{flag} expects comma-separated integers like 256,128, got {text!r}") from err


# What --resume may change: none of it alters what the saved state means.
RESUMABLE = ("epochs", "patience", "device", "checkpoint_every", "max_bad_steps")


def _config_flags(ctx: typer.Context) -> dict:
    """The TrainConfig fields given as flags: the command's parameters carry the fields' names, so
    no setting is renamed between the command line, the TOML file and the model."""
    from mtrec.config import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    lists = {"expert_sizes": "--expert-sizes", "tower_sizes": "--tower-sizes"}
    values = {}
    for name, value in ctx.params.items():
        if name not in fields or value is None:
            continue
        if name in lists:
            value = _int_list(value, lists[name])
        elif name == "tasks":
            value = _split_list(value)
        elif name == "conditions":
            value = list(value)
        values[name] = value
    return values


def _resume_changes(ctx: typer.Context) -> dict:
    """The resumable settings given on the command line; any other flag is refused, in one line."""
    given = [name for name in ctx.params if name not in ("resume", "quiet")
             and getattr(ctx.get_parameter_source(name), "name", None) == "COMMANDLINE"]
    refused = [name for name in given if name not in RESUMABLE]
    if refused:
        flag = {p.name: (p.opts[0] if p.opts[0].startswith("-") else p.name.upper()) for p in ctx.command.params}
        names = ", ".join(flag[n] for n in refused)
        allowed = ", ".join(flag[n] for n in RESUMABLE)
        raise UserError(f"--resume continues the saved run as it was configured, so {names} cannot change: only "
                        f"{allowed} and --quiet can (start a new run to change the rest)")
    return {name: ctx.params[name] for name in given}


def _saved_config(run_dir: str) -> dict:
    from mtrec.config import read_run_config

    values = read_run_config(run_dir)
    values.setdefault("embedding_optimizer", "adam")  # runs from before the flag updated tables densely
    if "balance_groups" not in values:  # runs from before the faithful defaults balanced per tensor, IMTL-G only
        values["balance_groups"] = "tensor"
        if values.get("balancer") == "imtl":
            values["balancer_opts"] = {"variant": "gradient", **values.get("balancer_opts", {})}
    values["out"] = str(run_dir)
    return values


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
    from mtrec.evaluate import evaluate_run

    if checkpoint not in ("best", "last"):
        raise UserError("--checkpoint must be best or last")
    result = evaluate_run(run_dir, data=data, raw=raw, split=split, device=device, which=checkpoint)
    if as_json:
        print(json.dumps(result, indent=2))
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
    from mtrec.predict import predict_log

    if checkpoint not in ("best", "last"):
        raise UserError("--checkpoint must be best or last")
    result = predict_log(run_dir, raw, out, keep=None if keep is None else _split_list(keep), which=checkpoint,
                         device=device, data=data, force=force)
    console.print(f"wrote {result['rows']:,} rows to {result['out']} ({', '.join(result['columns'])})")


@command("balancers")
def list_balancers():
    """List the registered balancers: what they need, their default scope and groups (as their papers /
    official code run them; --balance-scope and --balance-groups override), hyperparameters, papers."""
    from mtrec import balancers as registry

    rows = []
    for info in registry.describe():
        hp = ", ".join(f"{k}={v}" for k, v in info["hparams"].items()) or "-"
        rows.append([info["name"], info["kind"], info["needs"], info["default_scope"], info["default_groups"], hp,
                     info["paper"]])
    table = simple_table("balancers", ["name", "kind", "needs", "scope", "groups", "hyperparameters (defaults)",
                                       "paper"], rows)
    for i in (0, 1, 3, 4):  # names, kinds, scopes and groups whole, however narrow the terminal
        table.columns[i].no_wrap, table.columns[i].min_width = True, max(len(str(row[i])) for row in rows)
    console.print(table)


def main() -> None:
    app(prog_name="mtrec")


from mtrec import cli_research  # noqa: E402,F401
