"""mtrec plot: the series handed to matplotlib equal the logged values (checked on the data, not
on pixels), every figure is written as PNG and SVG, and a run without diagnostics says so."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from test_compare import TASKS, write_fake_compare
from typer.testing import CliRunner

from mtrec.cli import app
from mtrec.core.errors import UserError
from mtrec.research import plot

pytest.importorskip("matplotlib")


def fake_run(root: Path, epochs: int = 3, steps: int = 5, shared: int = 2, train_loss: bool = False,
             weights: bool = False, update_change: bool = False) -> tuple:
    """A run directory with config.json, metrics.jsonl and diagnostics.jsonl of random values."""
    rng = np.random.default_rng(1)
    root.mkdir()
    (root / "config.json").write_text(json.dumps({"tasks": TASKS}))
    history = []
    for e in range(epochs):
        valid = {t: {"auc": float(rng.uniform(0.6, 0.9)), "gauc": None if t == "share" else float(rng.uniform()),
                     "logloss": float(rng.uniform(0.1, 0.5))} for t in TASKS}
        valid["mean"] = {"auc": 0.0}
        record = {"epoch": e + 1, "step": 10 * (e + 1), "samples_per_second": 1e4, "valid": valid}
        if train_loss:
            record["train_loss"] = {t: float(rng.uniform(0.1, 0.5)) for t in TASKS}
        history.append(record)
    (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    diagnostics = []
    for s in range(steps):
        norms = rng.uniform(1e-4, 1e-2, size=(shared, len(TASKS)))
        norms[0, 0] = 0.0 if s == 2 else norms[0, 0]  # a target with no gradient on tensor 0 at one step
        cos = rng.uniform(-1, 1, size=(shared, len(TASKS), len(TASKS)))
        cos = (cos + cos.transpose(0, 2, 1)) / 2
        diagnostics.append({"step": 1 + 200 * s, "scope": "shared", "norms": norms.tolist(), "cosines": cos.tolist()})
        if update_change:
            diagnostics[-1]["update_change"] = rng.uniform(0, 0.5, size=shared).tolist()
        if weights:
            diagnostics[-1]["weights"] = rng.uniform(0.1, 2.0, size=len(TASKS)).tolist()
    (root / "diagnostics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in diagnostics))
    return history, diagnostics


def assert_figures(out: Path, names: list[str]) -> None:
    for name in names:
        png, svg = out / f"{name}.png", out / f"{name}.svg"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert svg.stat().st_size > 1000 and b"<svg" in svg.read_bytes()[:500], name
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{n}.{e}" for n in names for e in ("png", "svg"))


def test_run_series_equal_the_logged_values(tmp_path):
    history, diagnostics = fake_run(tmp_path / "run", shared=4)
    auc = plot.validation_series(history, "auc")
    assert list(auc) == TASKS  # target first, no mean
    for task, (epochs, values) in auc.items():
        assert epochs == [1, 2, 3] and values == [r["valid"][task]["auc"] for r in history]
    assert all(math.isnan(v) for v in plot.validation_series(history, "gauc")["share"][1])
    assert plot.train_loss_series(history) is None

    steps, ratios = plot.norm_ratio_series(diagnostics)
    assert steps.tolist() == [r["step"] for r in diagnostics]
    assert ratios.shape == (4, len(TASKS) - 1, len(diagnostics))
    for s, record in enumerate(diagnostics):
        for k, norms in enumerate(record["norms"]):
            for t in range(1, len(TASKS)):
                expected = norms[t] / norms[0] if norms[0] > 0 else math.nan
                assert ratios[k, t - 1, s] == pytest.approx(expected, rel=1e-12, nan_ok=True)
    steps, pairs, cosines = plot.cosine_series(diagnostics)
    assert pairs == [(0, 1), (0, 2), (1, 2)]
    for s, record in enumerate(diagnostics):
        for k in range(4):
            assert [cosines[k, p, s] for p in range(3)] == [record["cosines"][k][i][j] for i, j in pairs]


def test_run_figures_are_written(tmp_path):
    fake_run(tmp_path / "run")
    written, notes = plot.plot(tmp_path / "run", tmp_path / "figs")
    assert notes == ["metrics.jsonl holds no training loss per task: no train_loss figure",
                     "diagnostics.jsonl holds no update change (logged before it existed): no update_change figure",
                     "diagnostics.jsonl holds no task weights (the balancer has none): no task_weights figure"]
    assert len(written) == 6
    assert_figures(tmp_path / "figs", ["valid_metrics", "grad_norm_ratio", "grad_cosine"])
    # With a training loss per task and task weights logged, their figures are drawn from the logged values too.
    history, diagnostics = fake_run(tmp_path / "run2", shared=2, train_loss=True, weights=True, update_change=True)
    losses = plot.train_loss_series(history)
    assert {t: v for t, (_, v) in losses.items()} == {t: [r["train_loss"][t] for r in history] for t in TASKS}
    steps, weights = plot.weight_series(diagnostics)
    assert list(steps) == [d["step"] for d in diagnostics]
    assert weights.tolist() == [[d["weights"][t] for d in diagnostics] for t in range(len(TASKS))]
    steps, changes = plot.update_change_series(diagnostics)
    assert list(steps) == [d["step"] for d in diagnostics]
    assert changes.tolist() == [[d["update_change"][k] for d in diagnostics] for k in range(2)]
    written, notes = plot.plot(tmp_path / "run2", tmp_path / "figs2")
    assert notes == [] and (tmp_path / "figs2" / "train_loss.svg").exists()
    assert (tmp_path / "figs2" / "update_change.svg").exists()
    assert (tmp_path / "figs2" / "task_weights.svg").exists()


def test_compare_series_equal_the_summary_and_figures_are_written(tmp_path):
    from mtrec.research.compare import summarize

    cells = write_fake_compare(tmp_path / "cmp", ["mmoe", "ple"], ["ew", "pcgrad", "gradcraft"], [1, 2, 3])
    summary = summarize(tmp_path / "cmp")
    series = plot.interval_series(summary, "auc")
    assert list(series) == TASKS
    for task in TASKS:
        for model in ("mmoe", "ple"):
            assert [p[0] for p in series[task][model]] == ["ew", "pcgrad", "gradcraft"]
            for balancer, mean, lo, hi in series[task][model]:
                values = [cells[(model, balancer, s)]["metrics"][task]["auc"] for s in (1, 2, 3)]
                ci = stats.t.interval(0.95, 2, loc=np.mean(values), scale=stats.sem(values))
                assert (mean, lo, hi) == (pytest.approx(np.mean(values), rel=1e-12), pytest.approx(ci[0], rel=1e-9),
                                          pytest.approx(ci[1], rel=1e-9))
    points = plot.tradeoff_points(summary, "auc")
    for model, rows in points.items():
        for balancer, x, x_sd, y, y_sd in rows:
            target = [cells[(model, balancer, s)]["metrics"]["like"]["auc"] for s in (1, 2, 3)]
            aux = [np.mean([cells[(model, balancer, s)]["metrics"][t]["auc"] for t in TASKS[1:]]) for s in (1, 2, 3)]
            assert (x, x_sd) == (pytest.approx(np.mean(target)), pytest.approx(np.std(target, ddof=1)))
            assert (y, y_sd) == (pytest.approx(np.mean(aux)), pytest.approx(np.std(aux, ddof=1)))
    diffs = plot.diff_series(summary, "auc")
    groups = {(g["model"], g["balancer"]): g for g in summary["groups"]}
    for task in TASKS:
        for model in ("mmoe", "ple"):
            assert [p[0] for p in diffs[task][model]] == ["pcgrad", "gradcraft"]  # not the baseline
            for balancer, mean, lo, hi in diffs[task][model]:
                a = [cells[(model, balancer, s)]["metrics"][task]["auc"] for s in (1, 2, 3)]
                b = [cells[(model, "ew", s)]["metrics"][task]["auc"] for s in (1, 2, 3)]
                ci = stats.ttest_rel(a, b).confidence_interval(0.95)
                assert (mean, lo, hi) == (pytest.approx(np.mean(a) - np.mean(b)), pytest.approx(ci.low),
                                          pytest.approx(ci.high))
                assert groups[(model, balancer)]["tasks"][task]["auc"]["diff"]["lo"] == lo
    written, _ = plot.plot(tmp_path / "cmp", tmp_path / "figs")
    assert len(written) == 6
    assert_figures(tmp_path / "figs", ["compare_auc", "compare_auc_diff", "tradeoff_auc"])


def test_plot_errors_are_one_line(tmp_path):
    runner = CliRunner()
    fake_run(tmp_path / "run")
    (tmp_path / "run" / "diagnostics.jsonl").unlink()
    result = runner.invoke(app, ["plot", str(tmp_path / "run"), "--out", str(tmp_path / "figs")])
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no gradient diagnostics" in errors[0] and "--diagnostics-every" in errors[0]
    assert not (tmp_path / "figs").exists()  # nothing half-written
    with pytest.raises(UserError, match="not a run directory .* or a race directory"):
        plot.plot(tmp_path, tmp_path / "figs")
    with pytest.raises(UserError, match="--metric must be one of"):
        plot.plot(tmp_path / "run", tmp_path / "figs", metric="ndcg")


def test_plot_of_a_real_run(encoded_synthetic, tmp_path):
    """A run trained by mtrec train: its logs' format is what the series functions read."""
    data = encoded_synthetic("plot", rows=3_000, seed=3) / "data"
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "mtrec", "train", str(data), "--model", "mmoe", "--target", "like",
                    "--expert-sizes", "8", "--tower-sizes", "4", "--embedding-dim", "4", "--epochs", "1",
                    "--batch-size", "512", "--diagnostics-every", "1", "--out", str(run), "--quiet"],
                   env=env, check=True, capture_output=True)
    result = CliRunner().invoke(app, ["plot", str(run), "--out", str(tmp_path / "figs")])
    assert result.exit_code == 0, result.output
    assert_figures(tmp_path / "figs", ["valid_metrics", "train_loss", "grad_norm_ratio", "grad_cosine", "update_change",
                                       "task_weights"])
    diagnostics = plot.read_jsonl(run / "diagnostics.jsonl")
    steps, weights = plot.weight_series(diagnostics)  # EW: every task weighs 1 on every logged step
    assert list(steps) == [d["step"] for d in diagnostics] and np.array_equal(weights, np.ones((3, len(steps))))
    steps, ratios = plot.norm_ratio_series(diagnostics)
    norms = np.array(diagnostics[-1]["norms"])
    assert steps[-1] == diagnostics[-1]["step"] and np.allclose(ratios[:, :, -1], norms[:, 1:] / norms[:, :1])
    steps, changes = plot.update_change_series(diagnostics)  # EW: the plain sum, up to fp32 summation order
    assert changes.shape == (norms.shape[0], len(diagnostics)) and np.all(changes < 1e-5)


def test_tensorboard_events_hold_the_logged_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    history, diagnostics = fake_run(tmp_path / "run", train_loss=True)
    result = CliRunner().invoke(app, ["plot", str(tmp_path / "run"), "--tensorboard", str(tmp_path / "tb")])
    assert result.exit_code == 0, result.output
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()

    def scalars(tag):
        return [(e.step, e.value) for e in events.Scalars(tag)]

    for task in TASKS:
        assert scalars(f"valid_auc/{task}") == [(r["step"], pytest.approx(r["valid"][task]["auc"], rel=1e-6))
                                                 for r in history]
        assert scalars(f"train_loss/{task}") == [(r["step"], pytest.approx(r["train_loss"][task], rel=1e-6))
                                                  for r in history]
    assert "valid_gauc/share" not in events.Tags()["scalars"]  # never logged (None)
    steps, ratios = plot.norm_ratio_series(diagnostics)
    _, pairs, cosines = plot.cosine_series(diagnostics)
    ratio = [(s, v) for s, v in zip(steps.tolist(), ratios[1, 1]) if np.isfinite(v)]
    assert scalars("grad_norm_ratio/tensor1/share") == [(s, pytest.approx(v, rel=1e-6)) for s, v in ratio]
    assert scalars("grad_cosine/tensor0/click-share") == [(s, pytest.approx(v, rel=1e-6, abs=1e-7))
                                                          for s, v in zip(steps.tolist(), cosines[0, 2])]
    assert len(scalars("grad_norm_ratio/tensor0/click")) == len(diagnostics) - 1  # the target's norm was 0 once
    # Events are never appended to an earlier export.
    result = CliRunner().invoke(app, ["plot", str(tmp_path / "run"), "--tensorboard", str(tmp_path / "tb")])
    assert result.exit_code == 2 and "holds TensorBoard events already" in result.output
