"""``mtrec plot``: figures of a run or of a compare directory (matplotlib, Agg; PNG and SVG).

The series handed to matplotlib come from the small pure functions below (``*_series``,
``*_points``), which the tests compare with the logged values; the ``_figure_*`` functions only draw.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from mtrec.core.config import run_tasks
from mtrec.core.errors import UserError
from mtrec.core.files import atomic_write, read_jsonl
from mtrec.engine.diagnostics import cosine_series, norm_ratio_series, update_change_series, weight_series
from mtrec.research.compare import METRIC_NAMES, mean_std, t_quantile


def _number(value) -> float:
    return float("nan") if value is None else float(value)


# --- series of a run -----------------------------------------------------------------------------
def validation_series(history: list[dict], metric: str) -> dict[str, tuple[list[int], list[float]]]:
    """{task: (epochs, values)} of a validation metric from metrics.jsonl records, in logged task
    order (target first), without the mean over tasks; a missing value is NaN."""
    tasks = [t for t in history[0]["valid"] if t != "mean"]
    epochs = [r["epoch"] for r in history]
    return {t: (epochs, [_number(r["valid"][t].get(metric)) for r in history]) for t in tasks}


def train_loss_series(history: list[dict]) -> dict[str, tuple[list[int], list[float]]] | None:
    """{task: (epochs, mean training loss)} when metrics.jsonl records carry ``train_loss``
    ({task: value}); None when they do not."""
    if not history or not all(isinstance(r.get("train_loss"), dict) for r in history):
        return None
    epochs = [r["epoch"] for r in history]
    return {t: (epochs, [_number(r["train_loss"].get(t)) for r in history]) for t in history[0]["train_loss"]}


# --- series of a compare directory ---------------------------------------------------------------
def interval_series(summary: dict, metric: str) -> dict[str, dict[str, list[tuple]]]:
    """{task: {model: [(balancer, mean, lo, hi)]}}: the test metric's mean over seeds with its 95%
    t interval, mean ± t_{0.975, n-1} · sd / sqrt(n) (lo = hi = mean for one seed)."""
    series = {}
    for task in summary["tasks"]:
        series[task] = {}
        for group in summary["groups"]:
            stats = group["tasks"][task][metric]
            if stats["mean"] is None:
                continue
            half = 0.0 if stats["std"] is None else t_quantile(stats["n"] - 1) * stats["std"] / math.sqrt(stats["n"])
            series[task].setdefault(group["model"], []).append(
                (group["balancer"], stats["mean"], stats["mean"] - half, stats["mean"] + half))
    return series


def diff_series(summary: dict, metric: str) -> dict[str, dict[str, list[tuple]]]:
    """{task: {model: [(balancer, mean, lo, hi)]}}: the paired difference to the baseline (same model
    and seed) with its 95% t interval, as in the summary; the baseline itself is left out, and so
    is a balancer with one paired seed (no interval)."""
    series = {}
    for task in summary["tasks"]:
        series[task] = {}
        for group in summary["groups"]:
            diff = group["tasks"][task][metric].get("diff")
            if diff and diff["lo"] is not None:
                series[task].setdefault(group["model"], []).append(
                    (group["balancer"], diff["mean"], diff["lo"], diff["hi"]))
    return series


def tradeoff_points(summary: dict, metric: str) -> dict[str, list[tuple]]:
    """{model: [(balancer, target mean, target sd, auxiliary mean, auxiliary sd)]} over seeds, where
    a seed's auxiliary value is the mean of its auxiliary tasks' test metric (sd: None for one seed)."""
    target, aux = summary["tasks"][0], summary["tasks"][1:]
    points = {}
    for group in summary["groups"]:
        seeds = group["seeds"]
        if not seeds:
            continue
        per_task = {t: group["tasks"][t][metric]["per_seed"] for t in summary["tasks"]}
        x = mean_std(per_task[target][s] for s in seeds)
        y = mean_std(np.nanmean([_number(per_task[t][s]) for t in aux]) for s in seeds)
        if x["mean"] is None or y["mean"] is None:
            continue
        points.setdefault(group["model"], []).append((group["balancer"], x["mean"], x["std"], y["mean"], y["std"]))
    return points


def race_series(summary: dict) -> dict[str, dict]:
    """{arm: {"epochs", "means", "stopped_at", "winner"}}: each arm's mean validation value (best so
    far, over seeds) at every rung it was compared at, in the race's ranking order."""
    series = {}
    for arm in summary["arms"]:
        rungs = sorted(arm["valid_by_rung"], key=int)
        if rungs:
            series[arm["arm"]] = {"epochs": [int(e) for e in rungs], "means": [arm["valid_by_rung"][e] for e in rungs],
                                  "stopped_at": arm["stopped_at"], "winner": arm["arm"] == summary["winner"]}
    return series


def label_groups(points: list[tuple[str, float, float]], tolerance: float = 0.02) -> list[tuple[str, float, float]]:
    """Labels of points that would hide each other, joined: points closer than ``tolerance`` of
    the axes' spans (in both x and y) share one label "a, b" at their first point's position."""
    if not points:
        return []
    xs, ys = [p[1] for p in points], [p[2] for p in points]
    xspan, yspan = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    groups: list[list[tuple[str, float, float]]] = []
    for point in points:
        for group in groups:
            head = group[0]
            if abs(point[1] - head[1]) <= tolerance * xspan and abs(point[2] - head[2]) <= tolerance * yspan:
                group.append(point)
                break
        else:
            groups.append([point])
    return [(", ".join(p[0] for p in group), group[0][1], group[0][2]) for group in groups]


def wrapped(text: str, width: int = 48) -> str:
    """A long axis label over several lines, broken after commas or spaces."""
    import textwrap

    return "\n".join(textwrap.wrap(text, width)) or text


# --- drawing -------------------------------------------------------------------------------------
def _new_figure(panels: int, width: float = 4.2, height: float = 3.2):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    cols = min(panels, 3)
    rows = math.ceil(panels / cols)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False).ravel())
    for ax in axes[panels:]:
        ax.set_visible(False)
    return fig, axes[:panels]


def _save(fig, out: Path, name: str) -> list[Path]:
    written = []
    for fmt in ("png", "svg"):
        path = out / f"{name}.{fmt}"
        atomic_write(path, lambda tmp, fmt=fmt: fig.savefig(tmp, format=fmt, dpi=120))
        written.append(path)
        fig.set_layout_engine("none")  # the layout of the first drawing holds for the second
    return written


def _figure_lines(series_by_panel: dict[str, dict], xlabel: str, title: str, out: Path, name: str) -> list[Path]:
    from matplotlib.ticker import MaxNLocator

    fig, axes = _new_figure(len(series_by_panel))
    for ax, (panel, series) in zip(axes, series_by_panel.items()):
        for label, (x, y) in series.items():
            ax.plot(x, y, marker="o", label=label)
        ax.set_title(panel)
        ax.set_xlabel(xlabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize="small")
    fig.suptitle(title)
    return _save(fig, out, name)


def _figure_norm_ratios(steps, ratios, tasks, scope, out: Path) -> list[Path]:
    fig, axes = _new_figure(ratios.shape[0])
    for k, ax in enumerate(axes):
        for t in range(ratios.shape[1]):
            ax.plot(steps, ratios[k, t], label=f"{tasks[t + 1]} / {tasks[0]}")
        ax.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
        ax.set_yscale("log")
        ax.set_title(f"shared tensor {k}")
        ax.set_xlabel("step")
        ax.legend(fontsize="small")
    fig.suptitle(f"gradient norm of each auxiliary task / the target's (scope {scope})")
    return _save(fig, out, "grad_norm_ratio")


def _figure_cosines(steps, pairs, cosines, tasks, scope, out: Path) -> list[Path]:
    fig, axes = _new_figure(cosines.shape[0])
    gap = float(np.median(np.diff(steps))) if len(steps) > 1 else 1.0
    extent = (steps[0] - gap / 2, steps[-1] + gap / 2, len(pairs) - 0.5, -0.5)
    image = None
    for k, ax in enumerate(axes):
        image = ax.imshow(cosines[k], aspect="auto", cmap="RdBu", vmin=-1, vmax=1, extent=extent,
                          interpolation="nearest")
        ax.set_yticks(range(len(pairs)), [f"{tasks[i]}·{tasks[j]}" for i, j in pairs])
        ax.set_title(f"shared tensor {k}")
        ax.set_xlabel("step")
    fig.colorbar(image, ax=list(axes), label="cosine")
    fig.suptitle(f"cosine of task gradients (scope {scope})")
    return _save(fig, out, "grad_cosine")


def _figure_intervals(series: dict, metric: str, title: str, out: Path, name: str,
                      zero_line: bool = False) -> list[Path]:
    fig, axes = _new_figure(len(series))
    for ax, (task, by_model) in zip(axes, series.items()):
        models = list(by_model)
        for m, (model, points) in enumerate(by_model.items()):
            offset = (m - (len(models) - 1) / 2) * 0.15
            x = np.arange(len(points)) + offset
            means = np.array([p[1] for p in points])
            errors = np.array([[p[1] - p[2] for p in points], [p[3] - p[1] for p in points]])
            ax.errorbar(x, means, yerr=errors, fmt="o", capsize=3, label=model)
            ax.set_xticks(np.arange(len(points)), [p[0] for p in points], rotation=45, ha="right")
        if zero_line:
            ax.axhline(0.0, color="grey", linewidth=0.8, linestyle=":")
        ax.set_title(task)
        ax.set_ylabel(("Δ " if zero_line else "") + f"test {METRIC_NAMES[metric]}")
        ax.legend(fontsize="small")
    fig.suptitle(title)
    return _save(fig, out, name)


def _figure_tradeoff(points: dict, summary: dict, metric: str, out: Path) -> list[Path]:
    fig, (ax,) = _new_figure(1, width=5.5, height=4.5)
    for model, rows in points.items():
        xerr = [0.0 if r[2] is None else r[2] for r in rows]
        yerr = [0.0 if r[4] is None else r[4] for r in rows]
        ax.errorbar([r[1] for r in rows], [r[3] for r in rows], xerr=xerr, yerr=yerr, fmt="o", capsize=3, label=model)
    # Coincident points (e.g. two balancers with the same means) share one label instead of hiding it.
    labelled = [(f"{r[0]} ({model})" if len(points) > 1 else r[0], r[1], r[3]) for model, rows in points.items()
                for r in rows]
    for label, x, y in label_groups(labelled):
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize="small")
    name = METRIC_NAMES[metric]
    ax.set_xlabel(f"target ({summary['target']}) test {name}")
    ax.set_ylabel(wrapped(f"mean auxiliary test {name} ({', '.join(summary['tasks'][1:])})", 40))
    ax.legend(fontsize="small")
    ax.set_title("target versus auxiliary tasks (error bars: sd over seeds)")
    return _save(fig, out, f"tradeoff_{metric}")


# --- entry point ---------------------------------------------------------------------------------
def plot(source: Path, out: Path, metric: str = "auc") -> tuple[list[Path], list[str]]:
    """Write the figures of a run or a compare directory into ``out``. Returns (files, notes)."""
    source = Path(source)
    if metric not in METRIC_NAMES:
        raise UserError(f"--metric must be one of {', '.join(METRIC_NAMES)}, not {metric!r}")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError("mtrec plot needs matplotlib: pip install 'mtrec[plot]'") from None
    if (source / "race.json").exists():
        return _plot_race(source, Path(out)), []
    if (source / "compare.json").exists():
        return _plot_compare(source, Path(out), metric), []
    if (source / "config.json").exists():
        return _plot_run(source, Path(out))
    raise UserError(f"{source} is not a run directory (config.json), a compare directory (compare.json) or a "
                    "race directory (race.json)")


def _plot_run(run: Path, out: Path) -> tuple[list[Path], list[str]]:
    if not (run / "metrics.jsonl").exists() or not read_jsonl(run / "metrics.jsonl"):
        raise UserError(f"{run} has no metrics.jsonl yet: plot after its first epoch")
    diag_path = run / "diagnostics.jsonl"
    diagnostics = read_jsonl(diag_path) if diag_path.exists() else []
    if not diagnostics:
        raise UserError(f"{run} has no gradient diagnostics ({diag_path.name} missing or empty): train with "
                        "--diagnostics-every N (N > 0) and a model with shared parameters")
    history = read_jsonl(run / "metrics.jsonl")
    tasks = run_tasks(run)
    out.mkdir(parents=True, exist_ok=True)
    panels = {METRIC_NAMES[m]: validation_series(history, m) for m in METRIC_NAMES}
    panels = {k: v for k, v in panels.items() if any(np.isfinite(y).any() for _, y in v.values())}
    written = _figure_lines(panels, "epoch", "validation metrics per task", out, "valid_metrics")
    notes = []
    losses = train_loss_series(history)
    if losses is None:
        notes.append("metrics.jsonl holds no training loss per task: no train_loss figure")
    else:
        written += _figure_lines({"training loss": losses}, "epoch", "mean training loss per task", out, "train_loss")
    scope = diagnostics[0].get("scope", "?")
    if len(tasks) > 1:
        written += _figure_norm_ratios(*norm_ratio_series(diagnostics), tasks, scope, out)
        written += _figure_cosines(*cosine_series(diagnostics), tasks, scope, out)
    changes = update_change_series(diagnostics)
    if changes is None:
        notes.append("diagnostics.jsonl holds no update change (logged before it existed): no update_change figure")
    else:
        steps, values = changes
        series = {f"shared tensor {k}": (steps, values[k]) for k in range(values.shape[0])}
        written += _figure_lines({"||update - sum g|| / ||sum g||": series}, "step",
                                 f"the balancer's change of the plain sum of task gradients (scope {scope}; 0: "
                                 "it did nothing)", out, "update_change")
    weights = weight_series(diagnostics)
    if weights is None:
        notes.append("diagnostics.jsonl holds no task weights (the balancer has none): no task_weights figure")
    else:
        steps, values = weights
        series = {t: (steps, values[i]) for i, t in enumerate(tasks)}
        written += _figure_lines({"task weight": series}, "step", "the balancer's task weights", out, "task_weights")
    return written, notes


def _plot_compare(directory: Path, out: Path, metric: str) -> list[Path]:
    from mtrec.research.compare import summarize

    summary = summarize(directory)
    if not any(group["seeds"] for group in summary["groups"]):
        raise UserError(f"{directory} has no evaluated cell yet: run mtrec compare first")
    out.mkdir(parents=True, exist_ok=True)
    name, baseline = METRIC_NAMES[metric], summary["baseline"]
    written = _figure_intervals(interval_series(summary, metric), metric,
                                f"test {name}: mean over seeds with its 95% t interval", out, f"compare_{metric}")
    diffs = diff_series(summary, metric)
    if any(diffs.values()):
        written += _figure_intervals(diffs, metric, f"test {name} minus {baseline}'s (same model and seed): mean "
                                     "with its 95% paired t interval", out, f"compare_{metric}_diff", zero_line=True)
    if len(summary["tasks"]) > 1:
        written += _figure_tradeoff(tradeoff_points(summary, metric), summary, metric, out)
    return written


def _plot_race(directory: Path, out: Path) -> list[Path]:
    """The race: each arm's mean validation value per rung, a cross where it was stopped, the
    winner drawn thick; the metric is the race's (--select), not --metric."""
    from mtrec.research.race import summarize

    summary = summarize(directory)
    series = race_series(summary)
    if not series:
        raise UserError(f"{directory} has no decided rung yet: run mtrec race first")
    out.mkdir(parents=True, exist_ok=True)
    fig, (ax,) = _new_figure(1, width=7.0, height=4.5)
    for arm, line in series.items():
        drawn = ax.plot(line["epochs"], line["means"], marker="o", linewidth=2.8 if line["winner"] else 1.2,
                        label=arm + (" (winner)" if line["winner"] else ""))
        if line["stopped_at"] is not None:
            ax.plot([line["epochs"][-1]], [line["means"][-1]], marker="x", markersize=11, color=drawn[0].get_color())
    ax.set_xticks(summary["rungs"])
    ax.set_xlabel("epoch (rung)")
    ax.set_ylabel(f"validation {METRIC_NAMES[summary['metric']]} of {summary['target']} (mean over seeds)")
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.02, 0.5))
    ax.set_title(wrapped(f"race: x = stopped; {summary['epochs_spent']} of {summary['full_grid_epochs']} "
                         f"epochs of the full grid ({summary['compute_fraction']:.0%})", 60))
    return _save(fig, out, f"race_{summary['metric']}")
