"""``mtrec race``: pick a balancer (and its settings) within a budget, with paired evidence.

Arms are (model, balancer, balancer settings); the single-task model of the target and EW are
always arms. Every arm is trained on the same seeds, so every comparison is paired. Rungs are
epochs 1, 2, 4, ... and the budget; after each rung but the last, the racing rule (``decide``)
stops the arms that are behind, and the survivors continue from their checkpoints. The decisions
are never stored: ``replay`` recomputes them from the runs' ``metrics.jsonl`` (validation only),
so an interrupted race continues where it was and ``summarize`` can be rerun at any time. The
driver that trains the runs is ``race_runner.py``; rules and layout: docs/compare.md ("race").
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtrec.core.config import parse_opt, read_run_config
from mtrec.core.errors import UserError
from mtrec.core.files import atomic_write_text, read_json_object, read_jsonl
from mtrec.research.compare import LOG_DIR, _flag_value, check_train_args, mean_std, paired_interval

SETTINGS_FILE = "race.json"
RESULT_FILE = "result.json"
CONFIG_FILE = "train.toml"
LOWER_IS_BETTER = {"auc": False, "gauc": False, "logloss": True}
# Flags the race sets per run (or that would break the race), and what to use instead.
OWN_FLAGS = {"--model": "--model (a race option)", "--balancer": "--balancers", "--balancer-opt": "--grid",
             "--seed": "--seeds", "--epochs": "--budget", "--out": "--out", "--target": "--target",
             "--resume": "a re-run of the same race command", "--force": "a new --out directory",
             "--quiet": "nothing (runs always train quietly)"}


@dataclass(frozen=True)
class Arm:
    """One contestant: a model, a balancer and the balancer settings the race tries."""

    model: str
    balancer: str
    opts: tuple[tuple[str, Any], ...] = ()

    @property
    def name(self) -> str:
        if self.model == "single":
            return "single"
        settings = ",".join(f"{k}={v}" for k, v in self.opts)
        return f"{self.balancer}({settings})" if settings else self.balancer

    def run_name(self, seed: int) -> str:
        return "-".join([self.model, self.balancer, *(f"{k}={v}" for k, v in self.opts), f"s{seed}"])

    def to_dict(self) -> dict:
        return {"model": self.model, "balancer": self.balancer, "opts": dict(self.opts)}


@dataclass
class Race:
    """What a race directory holds (race.json): the data, the arms, seeds, budget and rule."""

    data: str
    target: str
    model: str
    train_args: list[str]
    arms: list[dict]
    seeds: list[int]
    budget: int
    eta: int
    metric: str
    full_grid: bool = False

    @property
    def arm_list(self) -> list[Arm]:
        return [Arm(a["model"], a["balancer"], tuple(a["opts"].items())) for a in self.arms]

    @property
    def rungs(self) -> list[int]:
        return rungs(self.budget)

    def arm_args(self, arm: Arm) -> list[str]:
        """The train flags of one arm's runs: the single-task arm trains the target alone."""
        args = list(self.train_args)
        if arm.model == "single":
            args = _without_flag(args, "--tasks") + ["--tasks", self.target]
        opts = [token for k, v in arm.opts for token in ("--balancer-opt", f"{k}={_toml_value(v)}")]
        return ["--model", arm.model, "--balancer", arm.balancer, *opts, "--target", self.target, *args]


def rungs(budget: int) -> list[int]:
    """Epochs at which the arms are compared: 1, 2, 4, ... below the budget, then the budget."""
    epochs, e = [], 1
    while e < budget:
        epochs.append(e)
        e *= 2
    return epochs + [budget]


def _without_flag(args: list[str], flag: str) -> list[str]:
    kept, skip = [], False
    for token in args:
        if skip:
            skip = False
        elif token == flag:
            skip = True
        elif not token.startswith(flag + "="):
            kept.append(token)
    return kept


# --- the race's settings ------------------------------------------------------------------------
def parse_grid(specs: list[str]) -> dict[str, dict[str, list]]:
    """``name:param=v1,v2`` (repeatable; several params of one balancer form their product) ->
    {balancer: {param: [values]}}; values are TOML literals (numbers, true/false) or strings."""
    grids: dict[str, dict[str, list]] = {}
    for spec in specs:
        name, colon, rest = spec.partition(":")
        param, equals, values = rest.partition("=")
        if not colon or not equals or not name or not param or not values:
            raise UserError(f"--grid expects balancer:param=v1,v2 (e.g. metabalance:relax=0.3,0.7), got {spec!r}")
        parsed = [parse_opt(f"{param}={v.strip()}")[1] for v in values.split(",") if v.strip()]
        if any("/" in str(v) for v in parsed) or len(set(map(str, parsed))) != len(parsed):
            raise UserError(f"--grid {spec}: values must be distinct and contain no '/'")
        if param.strip() in grids.get(name, {}):
            raise UserError(f"--grid gives {name}:{param} twice: list all its values in one --grid")
        grids.setdefault(name.strip(), {})[param.strip()] = parsed
    return grids


def make_race(data: str, balancers: list[str], grid_specs: list[str], seeds: list[int], budget: int, target: str,
              model: str, eta: int, train_args: list[str], train_options: dict[str, bool],
              full_grid: bool = False) -> Race:
    """The requested race, checked before anything runs: the data, known balancers and valid
    settings (each arm's balancer is built once), distinct seeds, the rule, the train flags."""
    from mtrec import balancers as registry
    from mtrec.models import names as model_names

    if not (Path(data) / "schema.json").exists():
        raise UserError(f"{data} is not a directory made by mtrec preprocess (no schema.json); "
                        "DATA comes first, then the flags")
    labels = read_json_object(Path(data) / "schema.json", "re-run mtrec preprocess").get("labels") or []
    if not target or target not in labels:
        raise UserError(f"--target must be one of the labels of {data}: {', '.join(labels)}")
    if model == "single" or model not in model_names():
        raise UserError(f"--model must be a multi-task model ({', '.join(m for m in model_names() if m != 'single')}); "
                        "the single-task model of the target is always an arm")
    if budget < 1:
        raise UserError("--budget must be at least 1 epoch")
    if eta < 1:
        raise UserError("--eta must be at least 1 (1: stop only arms whose interval lies below the best)")
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError("--seeds must list distinct seeds, e.g. 1,2,3")
    check_train_args(train_args, train_options)
    _check_owned(train_args)
    schedule = _flag_value(train_args, "--lr-schedule")
    if schedule not in (None, "constant"):
        raise UserError(f"--lr-schedule {schedule} depends on the planned epochs, which grow rung by rung: a race "
                        "trains with the constant schedule (warmup steps are fine)")
    metric = _flag_value(train_args, "--select") or "auc"
    if metric not in LOWER_IS_BETTER:
        raise UserError(f"--select must be one of {', '.join(LOWER_IS_BETTER)}, not {metric!r}")
    grids = parse_grid(grid_specs)
    names = ["ew"] + [b for b in list(balancers) + list(grids) if b != "ew"]
    names = list(dict.fromkeys(names))
    tasks = _flag_value(train_args, "--tasks")
    num_tasks = len(tasks.split(",")) if tasks else len(labels)
    arms = [Arm("single", "ew")]
    for name in names:
        if name not in registry.names():
            raise UserError(f"unknown balancer {name!r}: choose from {', '.join(registry.names())}")
        grid = grids.get(name, {})
        for values in itertools.product(*grid.values()):
            opts = tuple(zip(grid, values))
            registry.build(name, num_tasks=num_tasks, **dict(opts))  # a bad setting fails here, not in a run
            arms.append(Arm(model, name, opts))
    return Race(str(Path(data).resolve()), target, model, list(train_args), [a.to_dict() for a in arms],
                list(seeds), budget, eta, metric, full_grid)


def _check_owned(train_args: list[str]) -> None:
    for token in train_args:
        flag = token.split("=", 1)[0]
        if flag in OWN_FLAGS:
            raise UserError(f"{flag} is set by the race for each run: use {OWN_FLAGS[flag]} instead")


def load_race(out: Path) -> Race:
    path = Path(out) / SETTINGS_FILE
    if not path.exists():
        raise UserError(f"{out} is not a race directory (no {SETTINGS_FILE}): pass the --out of mtrec race")
    values = read_json_object(path, "restore it, or race again in another --out")
    try:
        return Race(**values)
    except TypeError as err:  # a key missing or unknown
        raise UserError(f"{path} is corrupt ({err}): restore it, or race again in another --out") from err


def check_same_race(out: Path, requested: Race) -> None:
    """A race directory continues only the same race: other settings would mix incomparable runs."""
    if not (Path(out) / SETTINGS_FILE).exists():
        return
    saved = load_race(out).__dict__
    changed = [key for key, value in requested.__dict__.items() if saved.get(key) != value]
    if changed:
        raise UserError(f"{out} holds a race with other {', '.join(changed)}: use another --out, or repeat "
                        "the earlier command to continue it")


def save_race(race: Race, out: Path) -> None:
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / LOG_DIR).mkdir(exist_ok=True)
    atomic_write_text(Path(out) / SETTINGS_FILE, json.dumps(race.__dict__, indent=2))


# --- the racing rule ----------------------------------------------------------------------------
def decide(scores: dict[str, dict[int, float]], metric: str, eta: int) -> dict[str, dict]:
    """One rung's decisions. ``scores``: {arm: {seed: validation value}} of the arms still racing.

    The best arm has the best mean over seeds (the first listed on a tie). Every other arm gets the
    paired 95% t interval of (arm - best) over their common seeds; an arm whose whole interval is
    on the worse side of 0 is stopped ("interval"). Then, successive halving: when more than
    ceil(n / eta) arms remain (n: the arms that entered the rung), the lowest means are stopped
    ("halving"); eta = 1 keeps every arm the interval did not stop. Returns {arm: {"mean",
    "interval", "against", "stop"}} with stop None for a survivor."""
    sign = -1.0 if LOWER_IS_BETTER[metric] else 1.0
    means = {arm: mean_std(by_seed.values())["mean"] for arm, by_seed in scores.items()}
    order = sorted(scores, key=lambda arm: -sign * means[arm])
    best = order[0]
    decisions = {}
    for arm in order:
        common = sorted(set(scores[arm]) & set(scores[best]))
        interval = paired_interval([scores[arm][s] - scores[best][s] for s in common])
        behind = interval["lo"] is not None and (interval["hi"] < 0 if sign > 0 else interval["lo"] > 0)
        decisions[arm] = {"mean": means[arm], "interval": interval, "against": best,
                          "stop": "interval" if arm != best and behind else None}
    keep = math.ceil(len(scores) / eta)
    alive = [arm for arm in order if decisions[arm]["stop"] is None]
    for arm in alive[keep:]:
        decisions[arm]["stop"] = "halving"
    return decisions


# --- replaying the race from the runs' files ----------------------------------------------------
def run_progress(run_dir: Path, metric: str) -> dict | None:
    """A run's completed epochs and whether it stopped early (patience), from metrics.jsonl and
    config.json; None when it has completed no epoch."""
    log = run_dir / "metrics.jsonl"
    history = read_jsonl(log) if log.exists() else []
    if not history:
        return None
    patience = read_json_object(run_dir / "config.json", "the run directory is damaged").get("patience", 2)
    return {"history": history, "epochs": len(history),
            "early_stopped": _since_best(history, metric) >= patience}


def _since_best(history: list[dict], metric: str) -> int:
    from mtrec.engine.schedule import improves

    best, since = None, 0
    target = next(iter(history[0]["valid"]))
    for record in history:
        value = record["valid"][target].get(metric)
        if improves(metric, value, best):
            best, since = value, 0
        else:
            since += 1
    return since


def score_at(history: list[dict], epoch: int, metric: str) -> float | None:
    """The target's best validation value over the epochs up to ``epoch``: the value of the
    checkpoint (best.pt) a run stopped there would be evaluated with. None when none is defined."""
    from mtrec.engine.schedule import improves

    target = next(iter(history[0]["valid"]))
    best = None
    for record in history[:epoch]:
        value = record["valid"][target].get(metric)
        if improves(metric, value, best):
            best = value
    return best


def reached(progress: dict | None, epoch: int) -> bool:
    return progress is not None and (progress["epochs"] >= epoch or progress["early_stopped"])


def replay(race: Race, out: Path) -> dict:
    """The race's state from its files: per arm the rung it stopped at (and why, with its interval),
    the rungs decided, and the pending rung with the runs it still needs ({arm: [seeds]}).

    A run with a failure record (logs/<run>.failed.json) drops its arm at that rung ("failed"); the
    runner removes the records when it starts, so a re-run tries those runs again."""
    out = Path(out)
    arms = race.arm_list
    alive = [arm.name for arm in arms]
    by_name = {arm.name: arm for arm in arms}
    status = {arm.name: {"stopped_at": None, "stopped_by": None, "decision": None, "by_rung": {}} for arm in arms}
    log = []
    for index, epoch in enumerate(race.rungs):
        scores, missing = {}, {}
        for name in alive:
            arm = by_name[name]
            progress = {s: run_progress(out / arm.run_name(s), race.metric) for s in race.seeds}
            todo = [s for s in race.seeds if not reached(progress[s], epoch)]
            if any((out / LOG_DIR / f"{arm.run_name(s)}.failed.json").exists() for s in todo):
                status[name].update(stopped_at=epoch, stopped_by="failed")
                continue
            if todo:
                missing[name] = todo
                continue
            values = {s: score_at(progress[s]["history"], epoch, race.metric) for s in race.seeds}
            if any(v is None or math.isnan(v) for v in values.values()):
                status[name].update(stopped_at=epoch, stopped_by="no score")
                continue
            scores[name] = values
        alive = [name for name in alive if status[name]["stopped_by"] is None]
        if missing:
            return {"arms": status, "rungs": log, "pending": {"epoch": epoch, "runs": missing}, "winner": None}
        last = index == len(race.rungs) - 1
        if not scores:
            break
        eta = 1 if last else race.eta
        decisions = decide(scores, race.metric, eta)
        if last or race.full_grid:
            for decision in decisions.values():
                decision["stop"] = None
        best = next(iter(decisions))
        for name, decision in decisions.items():
            status[name]["decision"] = {"epoch": epoch, "per_seed": scores[name], **decision}
            status[name]["by_rung"][epoch] = decision["mean"]
            if decision["stop"]:
                status[name].update(stopped_at=epoch, stopped_by=decision["stop"])
        alive = [name for name in alive if status[name]["stopped_by"] is None]
        log.append({"epoch": epoch, "best": best, "entered": list(decisions), "survivors": list(alive),
                    "stopped": [n for n, d in decisions.items() if d["stop"]]})
    winner = log[-1]["best"] if log and log[-1]["epoch"] == race.budget else None
    return {"arms": status, "rungs": log, "pending": None, "winner": winner}


def references(race: Race, winner: str | None) -> list[Arm]:
    """The arms scored on the test split: the winner, EW and the single-task model."""
    names = list(dict.fromkeys([n for n in (winner, "ew", "single") if n]))
    by_name = {arm.name: arm for arm in race.arm_list}
    return [by_name[name] for name in names]


# --- the result -----------------------------------------------------------------------------------
def summarize(out: Path) -> dict:
    """The race's result from its files alone: winner, ranking, compute, and the test-split gains
    of the winner over EW and the single-task model (once the runner has evaluated them)."""
    out = Path(out)
    race = load_race(out)
    state = replay(race, out)
    sign = -1.0 if LOWER_IS_BETTER[race.metric] else 1.0
    arms = []
    for arm in race.arm_list:
        st = state["arms"][arm.name]
        decision = st["decision"] or {}
        epochs = 0
        for seed in race.seeds:
            progress = run_progress(out / arm.run_name(seed), race.metric)
            epochs += progress["epochs"] if progress else 0
        arms.append({"arm": arm.name, **arm.to_dict(), "stopped_at": st["stopped_at"], "stopped_by": st["stopped_by"],
                     "last_rung": decision.get("epoch"), "valid_mean": decision.get("mean"),
                     "valid_per_seed": decision.get("per_seed"), "valid_by_rung": st["by_rung"],
                     "interval": decision.get("interval"), "against": decision.get("against"),
                     "epochs_trained": epochs})

    def rank_key(a):  # survivors first, then by the rung reached, then by the mean there; failures last
        failed = a["stopped_by"] in ("failed", "no score")
        return (failed, -(a["last_rung"] or 0), -sign * a["valid_mean"] if a["valid_mean"] is not None else 0.0)

    arms.sort(key=rank_key)
    for rank, a in enumerate(arms, 1):
        a["rank"] = rank
    spent = sum(a["epochs_trained"] for a in arms)
    full = len(race.arms) * len(race.seeds) * race.budget
    winner = state["winner"]
    return {"dir": str(out), "data": race.data, "target": race.target, "metric": race.metric, "model": race.model,
            "seeds": race.seeds, "budget": race.budget, "rungs": race.rungs, "eta": race.eta,
            "full_grid": race.full_grid, "complete": state["pending"] is None and winner is not None,
            "pending": state["pending"], "winner": winner, "epochs_spent": spent, "full_grid_epochs": full,
            "compute_fraction": spent / full, "arms": arms, "rung_log": state["rungs"],
            "test": test_result(race, out, winner), "config": str(out / CONFIG_FILE) if winner else None}


def test_result(race: Race, out: Path, winner: str | None) -> dict | None:
    """Per reference arm its test metric per seed (eval.json), and the paired differences winner -
    EW and winner - single with 95% t intervals. None until the winner is evaluated on every seed."""
    if winner is None:
        return None
    values = {}
    for arm in references(race, winner):
        per_seed = {}
        for seed in race.seeds:
            path = out / arm.run_name(seed) / "eval.json"
            if path.exists():
                result = json.loads(path.read_text())
                per_seed[seed] = result["metrics"][result["target"]].get(race.metric)
        values[arm.name] = per_seed
    if len(values[winner]) < len(race.seeds):
        return None
    result = {"metric": race.metric, "split": "test",
              "arms": {name: {**mean_std(v.values()), "per_seed": v} for name, v in values.items()}}
    for reference in ("ew", "single"):
        theirs = values.get(reference, {})
        common = [s for s in race.seeds if s in theirs and values[winner][s] is not None and theirs[s] is not None]
        result[f"gain_over_{reference}"] = paired_interval([values[winner][s] - theirs[s] for s in common])
    return result


def verdict(summary: dict) -> str:
    """One honest sentence on what the race found."""
    if not summary["complete"]:
        return "the race is not finished: run the same command again to continue it"
    winner, test = summary["winner"], summary["test"]
    if winner == "single":
        return ("no multi-task setting beat training the target alone on validation: the single-task model "
                "won the race")
    if not test:
        return f"{winner} won on validation (not yet scored on the test split)"
    gain = test["gain_over_single"]
    lower = LOWER_IS_BETTER[summary["metric"]]
    better = gain["lo"] is not None and ((gain["hi"] < 0) if lower else (gain["lo"] > 0))
    if better:
        return f"{winner} won, and beats the single-task model on the test split beyond the seed noise"
    return (f"{winner} won on validation, but its test gain over the single-task model is within the seed noise "
            "(its interval includes 0 or lies below it): multi-task training may not pay for the target here")


def write_result(summary: dict, out: Path) -> None:
    atomic_write_text(Path(out) / RESULT_FILE, json.dumps(summary, indent=2))


# --- the winner's train.toml --------------------------------------------------------------------
def winner_config(race: Race, out: Path, winner: str) -> dict:
    """The settings of the winner's run at the first seed, trained for the whole budget: what
    ``mtrec train --config train.toml`` needs to train it again (``out`` = winner next to the file)."""
    arm = next(a for a in race.arm_list if a.name == winner)
    values = read_run_config(out / arm.run_name(race.seeds[0]))
    values.update(epochs=race.budget, out="winner")
    return values


def to_toml(values: dict) -> str:
    """A flat TOML document of ``values`` (scalars and lists first, then one table per dict)."""
    lines = [f"{key} = {_toml_value(value)}" for key, value in values.items() if not isinstance(value, dict)]
    for key, table in values.items():
        if isinstance(table, dict):
            lines += ["", f"[{key}]"] + [f"{k} = {_toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise UserError(f"cannot write {value!r} to TOML")


def write_winner_config(race: Race, out: Path, winner: str) -> Path:
    path = Path(out) / CONFIG_FILE
    header = f"# the race's winner, {winner}: mtrec train --config {path}\n"
    atomic_write_text(path, header + to_toml(winner_config(race, out, winner)))
    return path

