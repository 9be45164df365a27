"""The researcher's commands: ``mtrec compare`` (a grid of runs and its summary), ``mtrec race``
(a budgeted race of balancer settings) and ``mtrec plot``.

Registered on the one Typer app through ``mtrec.cli.app.command`` (one place for exit codes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from mtrec.cli.app import app, command, split_list
from mtrec.cli.render import simple_table
from mtrec.core.console import console, err_console
from mtrec.core.errors import UserError
from mtrec.core.files import strict_json


def _say(line: str) -> None:
    err_console.print(line, markup=False, highlight=False, soft_wrap=True)


def _train_options() -> dict[str, bool]:
    """{option of ``mtrec train``: whether it takes a value}, read from the command itself, so
    flags added to train pass through compare without a change here."""
    train = typer.main.get_command(app).commands["train"]
    return {opt: not getattr(param, "is_flag", False) for param in train.params for opt in param.opts
            if opt.startswith("--")}


def _seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in split_list(text)]
    except ValueError as err:
        raise UserError(f"--seeds expects comma-separated integers like 1,2,3, got {text!r}") from err


@command("compare")
def compare(
    ctx: typer.Context,
    data: Annotated[Optional[str], typer.Argument(help="Directory made by mtrec preprocess (first, before any flag).")] = None,
    balancers: Annotated[Optional[str], typer.Option(help="Comma-separated balancers, e.g. ew,metabalance,pcgrad.")] = None,
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds.")] = "1,2,3",
    models: Annotated[str, typer.Option(help="Comma-separated models.")] = "mmoe",
    baseline: Annotated[Optional[str], typer.Option(help="Balancer the others are compared with (default: ew if compared, else the first).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Compare directory: one run directory per cell.")] = None,
    jobs: Annotated[int, typer.Option(help="Cells trained at once (the cores are divided between them).")] = 1,
    summarize: Annotated[Optional[Path], typer.Option(help="Only recompute the summary of this compare directory.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
):
    """Train and evaluate every model x balancer x seed (any other mtrec train flag applies to every
    cell), then summarize: test metrics over seeds, paired differences to the baseline with 95%
    intervals, Δm%, speed and skipped steps. Re-running skips finished cells and resumes interrupted ones."""
    from mtrec.research import compare as grid_runner

    if summarize is not None:
        if ctx.args or data:
            raise UserError("--summarize DIR takes no DATA and no train flags (only --baseline and --json)")
        directory = summarize
    else:
        if not data:
            raise UserError("missing DATA: the directory made by mtrec preprocess (or pass --summarize DIR)")
        if out is None:
            raise UserError("--out is required: the compare directory to create or continue")
        if jobs < 1:
            raise UserError("--jobs must be at least 1")
        grid = grid_runner.make_grid(data, split_list(models), split_list(balancers), _seeds(seeds), baseline,
                                     list(ctx.args), _train_options())
        grid = grid_runner.merge_grid(out, grid)
        try:
            grid_runner.run_grid(grid, out, jobs=jobs, say=_say)
        except grid_runner.CompareInterrupted:
            _say("interrupted: the running cells saved their checkpoints; run the same command again to continue")
            raise typer.Exit(130) from None
        directory = out
    summary = grid_runner.summarize(directory, baseline)
    grid_runner.write_summary(summary, directory)
    if as_json:
        print(strict_json(summary))
    else:
        render_summary(summary)
        console.print(f"summary written to {Path(directory) / 'summary.md'} and summary.csv")
    if any(c["status"] == "failed" for c in summary["cells"]):
        raise typer.Exit(1)


# Passed-through train flags arrive in ctx.args: the command accepts options it does not declare.
next(c for c in app.registered_commands if c.name == "compare").context_settings = {
    "allow_extra_args": True, "ignore_unknown_options": True}


def render_summary(summary: dict) -> None:
    """One table per metric (mean ± std over seeds, paired Δ to the baseline), one per model x balancer."""
    from mtrec.research.compare import METRIC_NAMES, METRICS, failure_lines, group_rows, metric_rows

    for metric in METRICS:
        header, rows = metric_rows(summary, [metric])
        if all(row[4] == "-" for row in rows):
            continue  # e.g. GAUC without user ids
        console.print(simple_table(f"test {METRIC_NAMES[metric]}, mean ± std over seeds; Δ: paired difference "
                                   f"to {summary['baseline']}, 95% t interval (* excludes 0)", header, rows))
    header, rows = group_rows(summary)
    console.print(simple_table(f"per model × balancer (Δm%: LibMTL's mean relative AUC change over tasks, "
                               f"samples/s ratio to {summary['baseline']})", header, rows))
    for line in failure_lines(summary):
        err_console.print(f"failed: {line}", markup=False, highlight=False, soft_wrap=True)


@command("race")
def race(
    ctx: typer.Context,
    data: Annotated[Optional[str], typer.Argument(help="Directory made by mtrec preprocess (first, before any flag).")] = None,
    balancers: Annotated[str, typer.Option(help="Comma-separated balancers (ew and the single-task model always race).")] = "ew",
    grid: Annotated[Optional[list[str]], typer.Option(
        help="A balancer's settings to race, balancer:param=v1,v2 (repeat; one balancer's params form a product).")] = None,
    budget: Annotated[int, typer.Option(help="Epochs of a run that races to the end (rungs: 1, 2, 4, ..., budget).")] = 4,
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds; every arm trains on all of them (paired).")] = "1,2,3",
    target: Annotated[Optional[str], typer.Option(help="The target task.")] = None,
    model: Annotated[str, typer.Option(help="The multi-task model of the arms.")] = "mmoe",
    eta: Annotated[int, typer.Option(help="Successive halving: at most 1/eta of a rung's arms go on (1: only the interval rule).")] = 2,
    full_grid: Annotated[bool, typer.Option(help="Stop no arm: train the whole grid to the budget (to check a race).")] = False,
    out: Annotated[Optional[Path], typer.Option(help="Race directory: one run directory per arm and seed.")] = None,
    jobs: Annotated[int, typer.Option(help="Runs trained at once (the cores are divided between them).")] = 1,
    summarize: Annotated[Optional[Path], typer.Option(help="Only recompute the result of this race directory.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
):
    """Race balancer x setting arms (plus EW and the single-task model) on the validation split with
    successive halving and paired intervals, then score the winner, EW and the single-task model on
    the test split once; writes result.json and the winner's train.toml. Re-running continues a race."""
    from mtrec.research import race as racing
    from mtrec.research.race_runner import RaceInterrupted, run_race

    if summarize is not None:
        if ctx.args or data:
            raise UserError("--summarize DIR takes no DATA and no train flags (only --json)")
        result = racing.summarize(summarize)
        racing.write_result(result, summarize)
    else:
        if not data:
            raise UserError("missing DATA: the directory made by mtrec preprocess (or pass --summarize DIR)")
        if out is None:
            raise UserError("--out is required: the race directory to create or continue")
        if jobs < 1:
            raise UserError("--jobs must be at least 1")
        settings = racing.make_race(data, split_list(balancers), list(grid or []), _seeds(seeds), budget, target or "",
                                    model, eta, list(ctx.args), _train_options(), full_grid)
        racing.check_same_race(out, settings)
        try:
            result = run_race(settings, out, jobs=jobs, say=_say)
        except RaceInterrupted:
            _say("interrupted: the running runs saved their checkpoints; run the same command again to continue")
            raise typer.Exit(130) from None
    if as_json:
        print(strict_json(result))
    else:
        render_race(result)
    failed = [a["arm"] for a in result["arms"] if a["stopped_by"] == "failed"]
    if failed or not result["complete"] or (result["winner"] and result["test"] is None):
        raise typer.Exit(1)


next(c for c in app.registered_commands if c.name == "race").context_settings = {
    "allow_extra_args": True, "ignore_unknown_options": True}


def render_race(result: dict) -> None:
    """The ranking of the arms (validation, paired interval at the rung each stopped), the test
    gains of the winner, the compute spent and the verdict."""
    from mtrec.research.compare import fmt, fmt_diff
    from mtrec.research.race import verdict

    metric = result["metric"]
    header = ["rank", "arm", "stopped at", "why", f"valid {metric} (mean)", "Δ vs best there [95% CI]", "epochs"]
    rows = [[str(a["rank"]), a["arm"], "-" if a["stopped_at"] is None else f"epoch {a['stopped_at']}",
             a["stopped_by"] or ("winner" if a["arm"] == result["winner"] else "finished"), fmt(a["valid_mean"]),
             "-" if a["arm"] == a["against"] else fmt_diff(a["interval"]), str(a["epochs_trained"])]
            for a in result["arms"]]
    console.print(simple_table(f"race on {result['target']} (validation {metric}, best so far at the arm's last "
                               f"rung; Δ paired over seeds, * excludes 0)", header, rows))
    test = result["test"]
    if test:
        header = ["arm", f"test {metric} (mean ± sd)", "winner minus it [95% CI]"]
        rows = []
        for name, stats in test["arms"].items():
            gain = test.get(f"gain_over_{name}") if name != result["winner"] else None
            spread = "" if stats["std"] is None else f" ± {fmt(stats['std'])}"
            rows.append([name, fmt(stats["mean"]) + spread, fmt_diff(gain) if gain else "-"])
        console.print(simple_table(f"test split, scored once: winner {result['winner']}", header, rows))
    console.print(f"compute: {result['epochs_spent']} of the full grid's {result['full_grid_epochs']} epochs "
                  f"({result['compute_fraction']:.0%})")
    console.print(verdict(result), markup=False, highlight=False)
    if result["config"]:
        console.print(f"the winner's settings: {result['config']} (mtrec train --config FILE)")


@command("plot")
def plot(
    source: Annotated[Path, typer.Argument(help="A run directory (mtrec train) or a compare directory (mtrec compare).")],
    out: Annotated[Optional[Path], typer.Option(help="Folder for the figures (PNG and SVG).")] = None,
    metric: Annotated[str, typer.Option(help="Metric of the compare figures: auc, gauc or logloss.")] = "auc",
    tensorboard: Annotated[Optional[Path], typer.Option(
        help="Also write the logged scalars as TensorBoard events here (a compare directory: one run per cell).")] = None,
):
    """Figures of a run (validation metrics, gradient norm ratios and cosines over steps) or of a
    compare directory (metric per balancer with its interval, target-versus-auxiliary trade-off)."""
    from mtrec.research import plot as figures

    if out is None and tensorboard is None:
        raise UserError("pass --out FIGDIR for the figures (and/or --tensorboard DIR for TensorBoard events)")
    if tensorboard is not None:
        from mtrec.research.tensorboard import export

        for run, count in export(source, tensorboard):
            console.print(f"wrote {count} scalars of {run} as TensorBoard events")
        console.print(f"view them with: tensorboard --logdir {tensorboard}")
    if out is not None:
        written, notes = figures.plot(source, out, metric=metric)
        for note in notes:
            _say(note)
        for path in written:
            console.print(f"wrote {path}")
