"""mtrec compare: the summary's numbers recomputed by hand from the cells' files, the grid's rules
(flags, baseline, merging), --jobs, and real cells: an interrupted cell is resumed, a failing cell
is reported while the others finish, and a re-run starts only what is not done."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from mtrec.core.errors import UserError
from mtrec.engine import checkpoint
from mtrec.research import compare

TASKS = ["like", "click", "share"]  # target first, as eval.json lists them
TINY = ["--target", "like", "--expert-sizes", "8", "--tower-sizes", "4", "--embedding-dim", "4",
        "--batch-size", "64", "--diagnostics-every", "0"]


def write_fake_compare(root: Path, models, balancers, seeds, seed: int = 0) -> dict:
    """A compare directory whose cells hold random but valid eval.json and metrics.jsonl (no
    training). Returns {(model, balancer, seed): {"metrics": ..., "speeds": [...], "skipped": n}}."""
    rng = np.random.default_rng(seed)
    grid = compare.Grid("data", ["--target", "like"], list(models), list(balancers), list(seeds), balancers[0])
    root.mkdir(parents=True, exist_ok=True)
    (root / compare.SETTINGS_FILE).write_text(json.dumps(grid.__dict__))
    cells = {}
    for cell in grid.cells:
        metrics = {t: {"auc": float(rng.uniform(0.6, 0.9)), "gauc": float(rng.uniform(0.5, 0.8)),
                       "logloss": float(rng.uniform(0.05, 0.5)), "ndcg": 0.5, "positive_rate": 0.1, "n": 100}
                   for t in TASKS}
        metrics["share"]["gauc"] = None  # e.g. every test user single-class for this task
        speeds = rng.uniform(1e4, 5e4, size=3).tolist()
        skipped = int(rng.integers(0, 3))
        (root / cell.name).mkdir()
        (root / cell.name / "eval.json").write_text(json.dumps(
            {"run": str(root / cell.name), "tasks": TASKS, "target": TASKS[0], "metrics": metrics}))
        records = [{"epoch": e + 1, "samples_per_second": s, "skipped_steps": skipped if e == 2 else 0,
                    "valid": metrics} for e, s in enumerate(speeds)]
        (root / cell.name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        cells[(cell.model, cell.balancer, cell.seed)] = {"metrics": metrics, "speeds": speeds, "skipped": skipped}
    return cells


def test_summary_numbers_equal_a_hand_computation_from_the_cells(tmp_path):
    models, balancers, seeds = ["mmoe", "ple"], ["ew", "pcgrad", "metabalance"], [1, 2, 3, 4]
    cells = write_fake_compare(tmp_path, models, balancers, seeds)
    # ple-pcgrad-s3 failed: no eval.json, a failure record; its seed drops out of the pairs.
    (tmp_path / "ple-pcgrad-s3" / "eval.json").unlink()
    del cells[("ple", "pcgrad", 3)]
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "ple-pcgrad-s3.failed.json").write_text(json.dumps(
        {"phase": "train", "exit_code": 2, "error": "error: boom", "log": "x"}))

    summary = compare.summarize(tmp_path)
    assert summary["tasks"] == TASKS and summary["target"] == "like" and summary["baseline"] == "ew"
    failed = [c for c in summary["cells"] if c["status"] == "failed"]
    assert [(c["cell"], c["exit_code"], c["error"]) for c in failed] == [("ple-pcgrad-s3", 2, "error: boom")]
    groups = {(g["model"], g["balancer"]): g for g in summary["groups"]}
    for (model, balancer), group in groups.items():
        mine = {s: cells[(model, balancer, s)] for s in seeds if (model, balancer, s) in cells}
        base = {s: cells[(model, "ew", s)] for s in seeds}
        paired = sorted(set(mine) & set(base))
        assert group["seeds"] == sorted(mine) and group["paired_seeds"] == paired
        for task in TASKS:
            for metric in ("auc", "gauc", "logloss"):
                got = group["tasks"][task][metric]
                values = np.array([mine[s]["metrics"][task][metric] for s in sorted(mine)], dtype=float)
                if task == "share" and metric == "gauc":
                    assert got["mean"] is None and got["n"] == 0
                    continue
                assert got["mean"] == pytest.approx(values.mean(), rel=1e-12)
                assert got["std"] == pytest.approx(values.std(ddof=1), rel=1e-12)
                if balancer == "ew":
                    assert "diff" not in got
                    continue
                a = np.array([mine[s]["metrics"][task][metric] for s in paired])
                b = np.array([base[s]["metrics"][task][metric] for s in paired])
                ci = stats.ttest_rel(a, b).confidence_interval(0.95)  # scipy's paired t, independently
                diff = got["diff"]
                assert diff["n"] == len(paired) and diff["mean"] == pytest.approx((a - b).mean(), rel=1e-12)
                assert (diff["lo"], diff["hi"]) == (pytest.approx(ci.low, rel=1e-9), pytest.approx(ci.high, rel=1e-9))
                assert diff["excludes_zero"] == (ci.low > 0 or ci.high < 0)
        # Δm% (LibMTL) on AUC from the means over the paired seeds; speed ratio over the same seeds.
        dm = np.mean([(np.mean([mine[s]["metrics"][t]["auc"] for s in paired])
                       - np.mean([base[s]["metrics"][t]["auc"] for s in paired]))
                      / np.mean([base[s]["metrics"][t]["auc"] for s in paired]) * 100 for t in TASKS])
        assert group["dm_percent"] == pytest.approx(dm, rel=1e-12, abs=1e-12)
        mine_speed = np.mean([np.mean(mine[s]["speeds"]) for s in paired])
        ratio = mine_speed / np.mean([np.mean(base[s]["speeds"]) for s in paired])
        assert group["speed_ratio"] == pytest.approx(ratio, rel=1e-12)
        assert group["skipped_steps"] == sum(mine[s]["skipped"] for s in mine)
    assert groups[("ple", "pcgrad")]["failed"] == ["ple-pcgrad-s3"]

    # The files: summary.csv holds the same numbers; summary.md lists the failure; target rows first.
    compare.write_summary(summary, tmp_path)
    import csv

    rows = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert len(rows) == len(models) * len(balancers) * len(TASKS)
    assert [r["task"] for r in rows[:3]] == TASKS
    for row in rows:
        group = groups[(row["model"], row["balancer"])]
        assert float(row["auc_mean"]) == group["tasks"][row["task"]]["auc"]["mean"]
        assert float(row["dm_percent_auc"]) == group["dm_percent"]
        if row["balancer"] != "ew":
            assert float(row["logloss_diff_lo"]) == group["tasks"][row["task"]]["logloss"]["diff"]["lo"]
    markdown = (tmp_path / "summary.md").read_text()
    assert "ple-pcgrad-s3: train exited 2: error: boom" in markdown
    assert markdown.count("| mmoe | pcgrad | like |") == 1


def test_t_quantile_fallback_matches_scipy():
    for df in range(1, 31):
        assert compare.t_quantile_fallback(df) == pytest.approx(stats.t.ppf(0.975, df), abs=6e-5), df
    for df in (31, 40, 60, 120, 1000):
        assert compare.t_quantile_fallback(df) == pytest.approx(stats.t.ppf(0.975, df), abs=2e-4), df
    assert compare.t_quantile(4) == pytest.approx(2.7764451, abs=1e-6)


def test_grid_rules(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "schema.json").write_text("{}")
    options = {"--target": True, "--epochs": True, "--lr": True, "--model": True, "--seed": True, "--force": False,
               "--balancer-opt": True}

    def grid(balancers="ew,pcgrad", models="mmoe", baseline=None, args=()):
        return compare.make_grid(str(data), models.split(","), balancers.split(","), [1, 2], baseline, list(args),
                                 options)

    assert grid().baseline == "ew" and grid("pcgrad,mgda").baseline == "pcgrad"
    passed = ["--epochs", "2", "--lr=1e-3", "--balancer-opt", "alpha=1", "--balancer-opt", "beta=2", "--target", "x"]
    assert grid(args=passed).train_args == passed
    for kwargs, needle in [({"balancers": "ew,nosuch"}, "unknown balancer 'nosuch'"),
                           ({"models": "mmoe,transformer"}, "unknown model"),
                           ({"balancers": "ew,ew"}, "twice"),
                           ({"baseline": "mgda"}, "--baseline mgda must be one of"),
                           ({"args": ["--seed", "3"]}, "use --seeds"),
                           ({"args": ["--model=ple"]}, "use --models"),
                           ({"args": ["--epochs", "1", "--no-such-flag", "2"]}, "unknown flag --no-such-flag"),
                           ({"args": ["--epochs", "1", "data2"]}, "unexpected argument 'data2': DATA comes first"),
                           ({"args": ["--lr=1e-3", "--epochs"]}, "--epochs needs a value"),
                           ({"args": ["--force"]}, "use a new --out")]:
        with pytest.raises(UserError, match=needle):
            grid(**kwargs)
    with pytest.raises(UserError, match="no schema.json"):
        compare.make_grid(str(tmp_path), ["mmoe"], ["ew"], [1], None, [], options)

    # A second compare into the same directory extends the grid; other train flags are refused.
    out = tmp_path / "cmp"
    out.mkdir()
    first = grid(args=["--epochs", "2"])
    (out / compare.SETTINGS_FILE).write_text(json.dumps(first.__dict__))
    merged = compare.merge_grid(out, grid("ew,mgda", "mmoe,ple", args=["--epochs", "2"]))
    assert merged.balancers == ["ew", "pcgrad", "mgda"] and merged.models == ["mmoe", "ple"]
    with pytest.raises(UserError, match="other train flags"):
        compare.merge_grid(out, grid(args=["--epochs", "3"]))


def test_jobs_run_at_once_with_the_cores_divided(tmp_path, monkeypatch):
    """--jobs 2 on 8 cores: two cells at a time, each with 4 torch threads. The cells' command is a
    stand-in that prints its thread setting and fails, which also exercises the failure record."""
    assert compare.threads_per_job(3, cores=16) == 5 and compare.threads_per_job(4, cores=2) == 1
    assert compare.threads_per_job(1, cores=16, limit=2) == 2
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    script = "import os, sys, time; time.sleep(0.4); print('threads', os.environ['OMP_NUM_THREADS'], " \
             "os.environ['MKL_NUM_THREADS'], file=sys.stderr); sys.exit(3)"
    monkeypatch.setattr(compare, "_command", lambda *args: [sys.executable, "-c", script])
    live, most = [], [0]
    real_popen = subprocess.Popen

    def popen(*args, **kwargs):
        live[:] = [p for p in live if p.poll() is None]
        proc = real_popen(*args, **kwargs)
        live.append(proc)
        most[0] = max(most[0], len(live))
        return proc

    monkeypatch.setattr(compare.subprocess, "Popen", popen)
    grid = compare.Grid("data", [], ["mmoe"], ["ew", "pcgrad"], [1, 2], "ew")
    counts = compare.run_grid(grid, tmp_path, jobs=2, say=lambda line: None)
    assert counts == {"skipped": 0, "done": 0, "failed": 4}
    assert most[0] == 2
    for cell in grid.cells:
        record = json.loads((tmp_path / "logs" / f"{cell.name}.failed.json").read_text())
        assert record == {"phase": "train", "exit_code": 3, "error": "threads 4 4",
                          "log": str(tmp_path / "logs" / f"{cell.name}.train.log")}


@pytest.fixture(scope="module")
def data_dir(encoded_synthetic):
    return encoded_synthetic("compare", rows=3_000, seed=7) / "data"


def _kill_after_unfinished_checkpoint(command: list[str], last: Path) -> dict:
    """Run ``command`` and SIGKILL it as soon as ``last`` is a checkpoint of an unfinished run
    (retried: a fast machine may finish between the check and the kill)."""
    for _ in range(4):
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        meta = None
        while proc.poll() is None:
            try:
                _, meta = checkpoint.load(last)
            except UserError:
                meta = None
            if meta is not None and not meta["finished"]:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
        proc.wait()
        _, meta = checkpoint.load(last)
        if not meta["finished"]:
            return meta
        for path in last.parent.iterdir():
            path.unlink()
    raise AssertionError("the run always finished before it could be killed")


def test_cells_resume_fail_and_are_skipped_on_a_rerun(data_dir, tmp_path, monkeypatch):
    """single-ew-s1 is killed mid-run and must be resumed; single-pcgrad-s1 fails (a gradient
    balancer has nothing to balance in the single-task model) while the other cell finishes; a
    second run starts only the failed cell again."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = [*TINY, "--epochs", "2", "--checkpoint-every", "5"]
    grid = compare.Grid(str(data_dir), args, ["single"], ["ew", "pcgrad"], [1], "ew")
    killed = tmp_path / "single-ew-s1"
    meta = _kill_after_unfinished_checkpoint(
        compare._command(compare.Cell("single", "ew", 1), "train", grid, tmp_path, "new"), killed / "last.pt")
    assert compare.cell_state(killed) == "interrupted"

    started = []
    real_popen = subprocess.Popen

    def popen(command, **kwargs):
        started.append(command[3:])
        assert kwargs["env"]["OMP_NUM_THREADS"] == kwargs["env"]["MKL_NUM_THREADS"] == "1"
        return real_popen(command, **kwargs)

    monkeypatch.setattr(compare.subprocess, "Popen", popen)
    lines = []
    counts = compare.run_grid(grid, tmp_path, jobs=1, say=lines.append)
    assert counts == {"skipped": 0, "done": 1, "failed": 1}, lines
    assert started[0] == ["train", "--resume", str(killed), "--quiet"]
    assert started[1] == ["evaluate", str(killed), "--split", "test", "--json"]
    assert started[2][:2] == ["train", str(data_dir)] and "pcgrad" in started[2]

    # Resumed, not restarted: the run continued from the killed checkpoint to the end of epoch 2.
    _, final = checkpoint.load(killed / "last.pt")
    steps_per_epoch = final["history"][0]["step"]
    assert final["finished"] and final["global_step"] == 2 * steps_per_epoch > meta["global_step"] > 0
    assert [r["epoch"] for r in final["history"]] == [1, 2]
    assert final["history"][:len(meta["history"])] == meta["history"]  # epochs done before the kill kept
    evaluation = json.loads((killed / "eval.json").read_text())
    assert evaluation["target"] == "like" and evaluation["tasks"] == ["like", "click", "share"]

    failure = json.loads((tmp_path / "logs" / "single-pcgrad-s1.failed.json").read_text())
    assert failure["exit_code"] == 2 and "shares no parameters" in failure["error"]
    summary = compare.summarize(tmp_path)
    cells = {c["cell"]: c for c in summary["cells"]}
    assert cells["single-ew-s1"]["status"] == "done" and cells["single-pcgrad-s1"]["status"] == "failed"
    group = {g["balancer"]: g for g in summary["groups"]}
    assert group["ew"]["tasks"]["like"]["auc"]["mean"] == evaluation["metrics"]["like"]["auc"]
    assert group["pcgrad"]["failed"] == ["single-pcgrad-s1"] and group["pcgrad"]["seeds"] == []

    # Re-run: the evaluated cell is skipped; only the failed cell is tried again (here a stand-in
    # that fails at once: what is counted is what compare starts).
    started.clear()
    monkeypatch.setattr(compare.subprocess, "Popen", lambda command, **kwargs: started.append(command[3:]) or
                        real_popen([sys.executable, "-c", "raise SystemExit(2)"], **kwargs))
    counts = compare.run_grid(grid, tmp_path, jobs=1, say=lines.append)
    assert counts == {"skipped": 1, "done": 0, "failed": 1}
    assert len(started) == 1 and started[0][:2] == ["train", str(data_dir)] and "pcgrad" in started[0]


def test_compare_command_line(data_dir, tmp_path):
    """Through the CLI: flag errors are one line and exit 2; --summarize prints the JSON summary and
    exits 1 while a cell has failed."""
    from typer.testing import CliRunner

    from mtrec.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["compare", str(data_dir), "--balancers", "ew", "--seed", "1", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "--seed is set by compare for each cell: use --seeds" in result.output
    result = runner.invoke(app, ["compare", str(data_dir), "--balancers", "ew,bogus", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "unknown balancer 'bogus'" in result.output
    write_fake_compare(tmp_path / "cmp", ["mmoe"], ["ew", "mgda"], [1, 2])
    result = runner.invoke(app, ["compare", "--summarize", str(tmp_path / "cmp"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert [g["balancer"] for g in summary["groups"]] == ["ew", "mgda"]
    assert (tmp_path / "cmp" / "summary.md").exists() and (tmp_path / "cmp" / "summary.csv").exists()
    (tmp_path / "cmp" / "mmoe-mgda-s2" / "eval.json").unlink()
    (tmp_path / "cmp" / "logs").mkdir()
    (tmp_path / "cmp" / "logs" / "mmoe-mgda-s2.failed.json").write_text(json.dumps(
        {"phase": "evaluate", "exit_code": 1, "error": "RuntimeError: out of memory", "log": "x"}))
    result = runner.invoke(app, ["compare", "--summarize", str(tmp_path / "cmp")])
    assert result.exit_code == 1
    assert "mmoe-mgda-s2: evaluate exited 1: RuntimeError: out of memory" in result.output
    assert math.isclose(summary["groups"][0]["speed_ratio"], 1.0)


def test_cell_states(tmp_path):
    cell = tmp_path / "mmoe-ew-s1"
    assert compare.cell_state(cell) == "new"
    cell.mkdir()
    (cell / "config.json").write_text("{}")
    assert compare.cell_state(cell) == "partial"  # killed before its first checkpoint
    checkpoint.save(cell / "last.pt", {}, {"finished": False})
    assert compare.cell_state(cell) == "interrupted"
    checkpoint.save(cell / "last.pt", {}, {"finished": True})
    assert compare.cell_state(cell) == "trained"
    whole = (cell / "last.pt").read_bytes()
    (cell / "last.pt").write_bytes(whole[: len(whole) // 2])  # a copy cut short
    assert compare.cell_state(cell) == "partial"  # an unreadable checkpoint cannot be continued
    (cell / "eval.json").write_text("{}")
    assert compare.cell_state(cell) == "evaluated"
    grid = compare.Grid("data", ["--epochs", "2", "--device", "cpu"], ["mmoe"], ["ew"], [1], "ew")
    c = compare.Cell("mmoe", "ew", 1)
    assert compare._command(c, "train", grid, tmp_path, "partial")[3:] == [
        "train", "data", "--model", "mmoe", "--balancer", "ew", "--seed", "1", "--out", str(cell),
        "--epochs", "2", "--device", "cpu", "--force", "--quiet"]
    assert "--force" not in compare._command(c, "train", grid, tmp_path, "new")
    assert compare._command(c, "evaluate", grid, tmp_path, "trained")[-2:] == ["--device", "cpu"]


def test_ctrl_c_stops_the_running_cells_and_starts_no_more(tmp_path, monkeypatch):
    """Ctrl-C: the running cell gets SIGINT, compare waits for it and raises CompareInterrupted;
    the cell is not recorded as failed and the queued cell never starts."""
    script = "import signal, sys, time; signal.signal(signal.SIGINT, lambda *a: sys.exit(130)); " \
             "print('ready', file=sys.stderr, flush=True); time.sleep(60)"
    monkeypatch.setattr(compare, "_command", lambda *args: [sys.executable, "-c", script])
    started = []
    real_popen, real_sleep = subprocess.Popen, time.sleep

    def popen(*args, **kwargs):
        started.append(real_popen(*args, **kwargs))
        return started[-1]

    pressed = []

    def sleep(seconds):  # Ctrl-C once, when the first cell has set up its SIGINT handler
        log = tmp_path / "logs" / "mmoe-ew-s1.train.log"
        if not pressed and log.exists() and "ready" in log.read_text():
            pressed.append(True)
            raise KeyboardInterrupt
        real_sleep(seconds)

    monkeypatch.setattr(compare.subprocess, "Popen", popen)
    monkeypatch.setattr(compare.time, "sleep", sleep)
    grid = compare.Grid("data", [], ["mmoe"], ["ew", "pcgrad"], [1], "ew")
    with pytest.raises(compare.CompareInterrupted):
        compare.run_grid(grid, tmp_path, jobs=1, say=lambda line: None)
    assert len(started) == 1 and started[0].returncode == 130
    assert not list((tmp_path / "logs").glob("*.failed.json"))
