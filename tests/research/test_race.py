"""mtrec race: the racing rule on hand-made paired metrics, the result recomputed by hand from a
race directory's files, resume after Ctrl-C without retraining, the winner's train.toml through
mtrec train --config, and one tiny race of real runs."""

import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from typer.testing import CliRunner

from mtrec.cli import app
from mtrec.core.config import TrainConfig, read_toml
from mtrec.core.errors import UserError
from mtrec.core.files import read_jsonl
from mtrec.engine import checkpoint
from mtrec.research import race as racing
from mtrec.research import race_runner

TARGET = "like"
TINY = ["--expert-sizes", "8", "--tower-sizes", "4", "--embedding-dim", "4", "--batch-size", "256",
        "--diagnostics-every", "0", "--patience", "9"]


def t_interval(diffs):
    d = np.asarray(diffs, dtype=float)
    half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
    return d.mean() - half, d.mean() + half


# --- the racing rule -----------------------------------------------------------------------------
def test_an_arm_clearly_below_is_stopped_and_a_tie_survives():
    scores = {"ew": {1: 0.800, 2: 0.815, 3: 0.820},
              "pcgrad": {1: 0.805, 2: 0.805, 3: 0.815},  # differences +0.005, -0.005, -0.005: a tie
              "single": {1: 0.700, 2: 0.712, 3: 0.721},  # about 0.1 below on every seed
              "metabalance": {1: 0.802, 2: 0.812, 3: 0.822}}
    decisions = racing.decide(scores, "auc", eta=1)
    assert list(decisions)[0] == "metabalance"  # the best mean, listed first
    assert decisions["single"]["stop"] == "interval"
    assert decisions["pcgrad"]["stop"] is None and decisions["ew"]["stop"] is None
    assert decisions["metabalance"]["stop"] is None and decisions["metabalance"]["against"] == "metabalance"
    lo, hi = t_interval([scores["single"][s] - scores["metabalance"][s] for s in (1, 2, 3)])
    interval = decisions["single"]["interval"]
    assert interval["lo"] == pytest.approx(lo, abs=1e-12) and interval["hi"] == pytest.approx(hi, abs=1e-12) and hi < 0
    lo, hi = t_interval([scores["pcgrad"][s] - scores["metabalance"][s] for s in (1, 2, 3)])
    assert lo < 0 < hi and decisions["pcgrad"]["interval"]["hi"] == pytest.approx(hi, abs=1e-12)

    # Halving keeps ceil(4 / 2) = 2 of the arms that entered: after single (interval), the lower of ew/pcgrad goes.
    halved = racing.decide(scores, "auc", eta=2)
    assert {a: d["stop"] for a, d in halved.items()} == {"metabalance": None, "ew": None, "pcgrad": "halving",
                                                          "single": "interval"}
    # A lower-is-better metric: the smallest LogLoss is the best, and an arm above it on every seed stops.
    losses = {"ew": {1: 0.30, 2: 0.31, 3: 0.29}, "mgda": {1: 0.40, 2: 0.405, 3: 0.41}}
    assert {a: d["stop"] for a, d in racing.decide(losses, "logloss", eta=1).items()} == {"ew": None,
                                                                                           "mgda": "interval"}
    # One seed gives no interval: only halving can stop an arm.
    assert racing.decide({"ew": {1: 0.9}, "single": {1: 0.1}}, "auc", eta=1)["single"]["stop"] is None


def test_the_single_task_arm_can_win():
    scores = {"single": {1: 0.85, 2: 0.86}, "ew": {1: 0.84, 2: 0.845}, "famo": {1: 0.80, 2: 0.801}}
    decisions = racing.decide(scores, "auc", eta=1)
    assert next(iter(decisions)) == "single"
    assert all(d["against"] == "single" for d in decisions.values())


def test_rungs_and_settings(tmp_path):
    assert racing.rungs(1) == [1] and racing.rungs(4) == [1, 2, 4] and racing.rungs(6) == [1, 2, 4, 6]
    assert racing.parse_grid(["metabalance:relax=0.3,0.7", "metabalance:mode=both,reduce_only", "gradcraft:tau=1"]) == {
        "metabalance": {"relax": [0.3, 0.7], "mode": ["both", "reduce_only"]}, "gradcraft": {"tau": [1]}}
    data = tmp_path / "data"
    data.mkdir()
    (data / "schema.json").write_text(json.dumps({"features": [], "labels": ["click", "like", "share"]}))
    options = {"--lr-schedule": True, "--select": True, "--tasks": True, "--lr": True, "--epochs": True,
               "--balancer-opt": True}

    def make(balancers=("pcgrad",), grid=(), args=(), target=TARGET, model="mmoe", budget=4, seeds=(1, 2), eta=2):
        return racing.make_race(str(data), list(balancers), list(grid), list(seeds), budget, target, model, eta,
                                list(args), options)

    race = make(grid=["metabalance:relax=0.3,0.7", "metabalance:mode=both,reduce_only"], args=["--lr", "2e-3"])
    names = [arm.name for arm in race.arm_list]
    assert names == ["single", "ew", "pcgrad"] + [f"metabalance(relax={r},mode={m})" for r in (0.3, 0.7)
                                                  for m in ("both", "reduce_only")]
    mb = race.arm_list[3]
    assert mb.run_name(2) == "mmoe-metabalance-relax=0.3-mode=both-s2"
    assert race.arm_args(mb) == ["--model", "mmoe", "--balancer", "metabalance", "--balancer-opt", "relax=0.3",
                                 "--balancer-opt", 'mode="both"', "--target", TARGET, "--lr", "2e-3"]
    single = make(args=["--tasks", "like,click"]).arm_list[0]
    assert make(args=["--tasks", "like,click"]).arm_args(single)[-4:] == ["--target", TARGET, "--tasks", TARGET]
    for kwargs, needle in [({"grid": ["metabalance:nosuch=1"]}, "unknown hyperparameter"),
                           ({"grid": ["metabalance:relax=5"]}, "relax"),
                           ({"grid": ["metabalance=0.3"]}, "--grid expects"),
                           ({"balancers": ["bogus"]}, "unknown balancer 'bogus'"),
                           ({"target": "nosuch"}, "--target must be one of"),
                           ({"model": "single"}, "multi-task model"),
                           ({"seeds": (1, 1)}, "distinct"),
                           ({"budget": 0}, "--budget"),
                           ({"eta": 0}, "--eta"),
                           ({"args": ["--lr-schedule", "cosine"]}, "constant schedule"),
                           ({"args": ["--epochs", "3"]}, "use --budget"),
                           ({"args": ["--balancer-opt", "relax=1"]}, "use --grid")]:
        with pytest.raises(UserError, match=needle):
            make(**kwargs)
    out = tmp_path / "race"
    racing.save_race(race, out)
    racing.check_same_race(out, race)  # the same race continues
    with pytest.raises(UserError, match="other budget"):
        racing.check_same_race(out, make(grid=["metabalance:relax=0.3,0.7", "metabalance:mode=both,reduce_only"],
                                         args=["--lr", "2e-3"], budget=8))


# --- a race directory by hand ----------------------------------------------------------------------
def write_run(run_dir: Path, values: list[float], patience: int = 9, finished: bool = True) -> None:
    """A run directory as mtrec train leaves it: config.json, metrics.jsonl (the target's
    validation AUC per epoch) and last.pt."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps({"patience": patience, "target": TARGET}))
    history = [{"epoch": e + 1, "valid": {TARGET: {"auc": v, "logloss": 1 - v}, "click": {"auc": 0.5}}}
               for e, v in enumerate(values)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    checkpoint.save(run_dir / "last.pt", {}, {"finished": finished, "epoch": len(values)})


def fake_race(root: Path, budget: int = 2, eta: int = 1) -> racing.Race:
    arms = [racing.Arm("single", "ew"), racing.Arm("mmoe", "ew"), racing.Arm("mmoe", "pcgrad"),
            racing.Arm("mmoe", "metabalance", (("relax", 0.3),)), racing.Arm("mmoe", "gradcraft")]
    race = racing.Race("data", TARGET, "mmoe", [], [a.to_dict() for a in arms], [1, 2, 3], budget, eta, "auc")
    racing.save_race(race, root)
    return race


# validation AUC per seed, per epoch (rungs 1 and 2)
VALID = {"single": [[0.70, 0.75], [0.712, 0.76], [0.721, 0.77]],  # clearly behind at epoch 1
         "ew": [[0.80, 0.83], [0.815, 0.84], [0.82, 0.85]],
         "pcgrad": [[0.805, 0.835], [0.805, 0.845], [0.815, 0.86]],
         "metabalance(relax=0.3)": [[0.802, 0.84], [0.812, 0.85], [0.822, 0.855]],
         "gradcraft": [[0.60], [0.61], [0.60]]}  # stopped at epoch 1: never trained on
TEST = {"metabalance(relax=0.3)": [0.851, 0.846, 0.858], "ew": [0.848, 0.843, 0.851], "single": [0.77, 0.76, 0.79]}


def test_result_recomputed_by_hand(tmp_path):
    race = fake_race(tmp_path)
    for arm in race.arm_list:
        for i, seed in enumerate(race.seeds):
            write_run(tmp_path / arm.run_name(seed), VALID[arm.name][i])
            if arm.name in TEST:
                (tmp_path / arm.run_name(seed) / "eval.json").write_text(json.dumps(
                    {"target": TARGET, "metrics": {TARGET: {"auc": TEST[arm.name][i]}}}))
    result = CliRunner().invoke(app, ["race", "--summarize", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert json.loads((tmp_path / racing.RESULT_FILE).read_text()) == summary
    arms = {a["arm"]: a for a in summary["arms"]}

    # Rung 1: single and gradcraft are behind metabalance beyond the noise; ew and pcgrad tie with it.
    assert (arms["single"]["stopped_at"], arms["single"]["stopped_by"]) == (1, "interval")
    assert (arms["gradcraft"]["stopped_at"], arms["gradcraft"]["stopped_by"]) == (1, "interval")
    lo, hi = t_interval([VALID["single"][i][0] - VALID["metabalance(relax=0.3)"][i][0] for i in range(3)])
    assert arms["single"]["interval"]["hi"] == pytest.approx(hi, abs=1e-12) and arms["single"]["against"] == \
        "metabalance(relax=0.3)"
    # Rung 2 (the budget): metabalance has the best mean, 0.8483 against pcgrad's 0.8467 and ew's 0.84.
    assert summary["winner"] == "metabalance(relax=0.3)"
    assert [a["arm"] for a in summary["arms"]] == ["metabalance(relax=0.3)", "pcgrad", "ew", "single", "gradcraft"]
    assert [a["rank"] for a in summary["arms"]] == [1, 2, 3, 4, 5]
    for name in ("ew", "pcgrad"):
        assert arms[name]["stopped_at"] is None and arms[name]["last_rung"] == 2
        lo, hi = t_interval([VALID[name][i][1] - VALID["metabalance(relax=0.3)"][i][1] for i in range(3)])
        assert (arms[name]["interval"]["lo"], arms[name]["interval"]["hi"]) == pytest.approx((lo, hi), abs=1e-12)
    assert arms["ew"]["valid_by_rung"] == {"1": pytest.approx(0.811666666), "2": pytest.approx(0.84)}

    # Compute: 4 arms x 3 seeds x 2 epochs + gradcraft's 3 x 1, of 5 x 3 x 2.
    assert summary["epochs_spent"] == 27 and summary["full_grid_epochs"] == 30
    assert summary["compute_fraction"] == pytest.approx(0.9)
    assert arms["gradcraft"]["epochs_trained"] == 3

    # The test split: paired differences of the winner to ew and to single, with t intervals.
    test = summary["test"]
    for reference in ("ew", "single"):
        diffs = [TEST["metabalance(relax=0.3)"][i] - TEST[reference][i] for i in range(3)]
        lo, hi = t_interval(diffs)
        gain = test[f"gain_over_{reference}"]
        assert gain["mean"] == pytest.approx(np.mean(diffs)) and (gain["lo"], gain["hi"]) == pytest.approx((lo, hi))
    assert test["arms"]["ew"]["per_seed"] == {"1": 0.848, "2": 0.843, "3": 0.851}
    assert "beats the single-task model" in racing.verdict(summary)

    # A run that failed at a rung drops its arm there; a stopped run's further epochs change nothing.
    (tmp_path / "logs" / "mmoe-gradcraft-s1.failed.json").write_text("{}")
    assert racing.summarize(tmp_path)["arms"][-1]["stopped_by"] == "interval"  # it had reached epoch 1
    (tmp_path / "mmoe-pcgrad-s2" / "metrics.jsonl").unlink()
    (tmp_path / "logs" / "mmoe-pcgrad-s2.failed.json").write_text("{}")
    broken = {a["arm"]: a for a in racing.summarize(tmp_path)["arms"]}
    assert (broken["pcgrad"]["stopped_at"], broken["pcgrad"]["stopped_by"]) == (1, "failed")
    assert broken["pcgrad"]["rank"] == 5


@pytest.mark.parametrize("content", [b'{"data": "d', b"[1, 2]", b'{"data": "d", "unknown": 1}'])
def test_a_corrupt_race_json_is_one_line(tmp_path, content):
    """A truncated, non-object or hand-broken race.json is one line and exit 2, not a traceback."""
    fake_race(tmp_path)
    (tmp_path / racing.SETTINGS_FILE).write_bytes(content)
    result = CliRunner().invoke(app, ["race", "--summarize", str(tmp_path), "--json"])
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1 and "race.json" in errors[0], result.output
    assert "Traceback" not in result.output


def test_the_single_task_model_winning_is_said(tmp_path):
    race = fake_race(tmp_path, budget=1)
    for arm in race.arm_list:
        for i, seed in enumerate(race.seeds):
            values = [0.9 + 0.001 * i] if arm.name == "single" else [VALID[arm.name][i][0]]
            write_run(tmp_path / arm.run_name(seed), values)
    summary = racing.summarize(tmp_path)
    assert summary["winner"] == "single" and summary["complete"] and summary["test"] is None
    assert racing.verdict(summary).startswith("no multi-task setting beat training the target alone")
    assert racing.references(race, "single") == [race.arm_list[0], race.arm_list[1]]


# --- resume: an interrupted race trains nothing twice ---------------------------------------------
class FakeTrainer:
    """Stands in for subprocess.Popen of ``python -m mtrec train|evaluate``: writes the files a run
    would (validation AUC from a fixed table), counts the epochs it trains, and presses Ctrl-C when
    the ``interrupt_at``-th command starts."""

    def __init__(self, root: Path, interrupt_at: int | None = None):
        self.root, self.interrupt_at, self.commands, self.trained = root, interrupt_at, [], {}

    def __call__(self, command, env=None, stdout=None, stderr=None):
        args = [str(a) for a in command[3:]]
        self.commands.append(args)
        if self.interrupt_at is not None and len(self.commands) == self.interrupt_at:
            raise KeyboardInterrupt
        value = lambda flag: args[args.index(flag) + 1]  # noqa: E731
        if args[0] == "evaluate":
            stdout.write(json.dumps({"target": TARGET, "metrics": {TARGET: {"auc": 0.8}}}))
            return _Done()
        run_dir = Path(value("--resume") if "--resume" in args else value("--out"))
        epochs = int(value("--epochs"))
        done = len(read_jsonl(run_dir / "metrics.jsonl")) if "--resume" in args else 0
        assert "--resume" in args or not (run_dir / "last.pt").exists(), "a run with a checkpoint trained anew"
        self.trained[run_dir.name] = self.trained.get(run_dir.name, 0) + epochs - done
        arm = run_dir.name.rsplit("-s", 1)[0]
        seed = int(run_dir.name.rsplit("-s", 1)[1])
        level = {"single-ew": 0.70, "mmoe-ew": 0.80, "mmoe-pcgrad": 0.805, "mmoe-mgda": 0.60}[arm]
        noise = ({1: 0.0, 2: 0.004, 3: -0.002} if arm == "mmoe-pcgrad" else {1: 0.003, 2: -0.003, 3: 0.001})[seed]
        write_run(run_dir, [level + 0.01 * e + noise for e in range(epochs)])
        return _Done()


class _Done:
    returncode = 0

    def poll(self):
        return 0

    def send_signal(self, sig):
        pass


def test_an_interrupted_race_resumes_without_retraining(tmp_path, monkeypatch):
    race = racing.Race("data", TARGET, "mmoe", [], [racing.Arm("single", "ew").to_dict(),
                                                    racing.Arm("mmoe", "ew").to_dict(),
                                                    racing.Arm("mmoe", "pcgrad").to_dict(),
                                                    racing.Arm("mmoe", "mgda").to_dict()], [1, 2, 3], 4, 2, "auc")
    first = FakeTrainer(tmp_path, interrupt_at=14)  # 12 runs at epoch 1, then Ctrl-C in the second rung
    monkeypatch.setattr(race_runner.subprocess, "Popen", first)
    with pytest.raises(race_runner.RaceInterrupted):
        race_runner.run_race(race, tmp_path, say=lambda line: None)
    assert sum(first.trained.values()) == 13  # 12 first epochs and one second epoch

    second = FakeTrainer(tmp_path)
    monkeypatch.setattr(race_runner.subprocess, "Popen", second)
    summary = race_runner.run_race(race, tmp_path, say=lambda line: None)
    # Every epoch on disk was trained exactly once over the two invocations.
    on_disk = {a.run_name(s): len(read_jsonl(tmp_path / a.run_name(s) / "metrics.jsonl"))
               for a in race.arm_list for s in race.seeds}
    both = {run: first.trained.get(run, 0) + second.trained.get(run, 0) for run in on_disk}
    assert both == on_disk
    assert not [c for c in second.commands if c[0] == "train" and "--resume" not in c]  # no run started anew
    # Rung 1 stopped mgda and single (interval), halving at 2 kept ceil(2/2) = 1 of ew and pcgrad.
    arms = {a["arm"]: a for a in summary["arms"]}
    assert arms["mgda"]["stopped_at"] == 1 and arms["single"]["stopped_at"] == 1
    assert summary["winner"] == "pcgrad" and arms["ew"]["stopped_at"] == 2
    # The references were continued to the budget for the test comparison; mgda was not.
    assert on_disk["single-ew-s1"] == on_disk["mmoe-ew-s2"] == 4 and on_disk["mmoe-mgda-s3"] == 1
    assert summary["epochs_spent"] == sum(on_disk.values()) == 3 * (4 + 4 + 4 + 1)
    assert summary["compute_fraction"] == pytest.approx(39 / 48)
    evaluated = sorted(c[1] for c in second.commands if c[0] == "evaluate")
    assert evaluated == sorted(str(tmp_path / f"{r}-s{s}") for r in ("mmoe-pcgrad", "mmoe-ew", "single-ew")
                               for s in (1, 2, 3))
    # A third invocation finds everything done and starts nothing.
    third = FakeTrainer(tmp_path)
    monkeypatch.setattr(race_runner.subprocess, "Popen", third)
    assert race_runner.run_race(race, tmp_path, say=lambda line: None)["winner"] == "pcgrad"
    assert third.commands == []


# --- one real race -------------------------------------------------------------------------------
class InProcess:
    """subprocess.Popen of ``python -m mtrec ARGS`` run in this process through the Typer app: the
    same arguments, without a new interpreter's start-up (seconds per run on a small machine)."""

    calls: list[list[str]] = []

    def __init__(self, command, env=None, stdout=None, stderr=None):
        assert command[1:3] == ["-m", "mtrec"]
        args = [str(a) for a in command[3:]]
        InProcess.calls.append(args)
        result = CliRunner().invoke(app, args)
        if stdout is not None and stdout != subprocess.DEVNULL:
            stdout.write(result.stdout)
        stderr.write(result.output if result.exit_code else "")
        self.returncode = result.exit_code

    def poll(self):
        return self.returncode

    def send_signal(self, sig):
        pass


@pytest.fixture(scope="module")
def data_dir(encoded_synthetic):
    return encoded_synthetic("race", rows=3_000, seed=7) / "data"


def test_a_tiny_race_end_to_end(data_dir, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    InProcess.calls = []
    monkeypatch.setattr(race_runner.subprocess, "Popen", InProcess)
    out = tmp_path / "race"
    command = ["race", str(data_dir), "--balancers", "ew", "--grid", "metabalance:relax=0.3,0.7", "--budget", "2",
               "--seeds", "1,2", "--target", TARGET, "--out", str(out), "--json", *TINY]
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    names = {"single", "ew", "metabalance(relax=0.3)", "metabalance(relax=0.7)"}
    assert {a["arm"] for a in summary["arms"]} == names and summary["winner"] in names
    on_disk = {run.name: len(read_jsonl(run / "metrics.jsonl")) for run in out.iterdir()
               if (run / "metrics.jsonl").exists()}
    assert summary["epochs_spent"] == sum(on_disk.values()) and summary["full_grid_epochs"] == 4 * 2 * 2
    assert summary["compute_fraction"] == summary["epochs_spent"] / 16
    for arm in summary["arms"]:
        assert arm["stopped_at"] in (None, 1) and arm["interval"]["n"] == 2
    assert sum(a["stopped_at"] == 1 for a in summary["arms"]) >= 2  # halving keeps at most 2 of 4 after epoch 1
    test = summary["test"]
    assert test["gain_over_single"]["n"] == 2 and test["gain_over_ew"]["n"] == 2
    # Trained rung by rung: each run was started once and resumed at most once (to epoch 2).
    trains = [c for c in InProcess.calls if c[0] == "train"]
    assert len([c for c in trains if "--resume" not in c]) == 8
    assert all(c[c.index("--epochs") + 1] == "2" for c in trains if "--resume" in c)

    # The winner's train.toml trains the same run again through mtrec train --config.
    values = read_toml(out / "train.toml")
    TrainConfig.from_dict(values).validate()
    winner = next(a for a in summary["arms"] if a["arm"] == summary["winner"])
    run_dir = out / racing.Arm(winner["model"], winner["balancer"], tuple(winner["opts"].items())).run_name(1)
    again = CliRunner().invoke(app, ["train", "--config", str(out / "train.toml"), "--quiet"])
    assert again.exit_code == 0, again.output
    trained, original = (json.loads((d / "config.json").read_text()) for d in (out / "winner", run_dir))
    assert {k: v for k, v in trained.items() if k != "out"} == {k: v for k, v in original.items() if k != "out"}
    history = read_jsonl(out / "winner" / "metrics.jsonl")
    assert [r["valid"][TARGET]["auc"] for r in history] == [
        r["valid"][TARGET]["auc"] for r in read_jsonl(run_dir / "metrics.jsonl")]  # bit for bit on CPU

    # The figure, and a finished race re-run: nothing is trained again.
    figures = CliRunner().invoke(app, ["plot", str(out), "--out", str(tmp_path / "fig")])
    assert figures.exit_code == 0, figures.output
    assert (tmp_path / "fig" / "race_auc.png").read_bytes()[:4] == b"\x89PNG"
    InProcess.calls = []
    assert CliRunner().invoke(app, command).exit_code == 0 and InProcess.calls == []
