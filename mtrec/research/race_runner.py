"""Running a race: each run is an ordinary ``mtrec train`` subprocess (as in compare), trained to a
rung's epoch with ``--epochs E`` and continued to the next rung with ``mtrec train --resume RUN
--epochs E'``, so nothing is ever retrained. What to train next always comes from ``race.replay``
of the files, which is why an interrupted race continues where it stopped.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from mtrec.core.files import atomic_write_text
from mtrec.research.compare import LOG_DIR, _flag_value, _last_line, _mtrec, cell_state, job_env, run_jobs
from mtrec.research.race import (
    Arm,
    Race,
    reached,
    references,
    replay,
    run_progress,
    save_race,
    summarize,
    write_result,
    write_winner_config,
)


class RaceInterrupted(Exception):
    """Ctrl-C: the running runs saved their checkpoints; the same command continues the race."""


@dataclass
class Job:
    run: str  # the run directory's name
    phase: str  # train, resume or evaluate
    command: list[str]
    final: bool = False  # after the race (references to the budget, test scores): not a rung's run


def train_job(race: Race, out: Path, arm: Arm, seed: int, epoch: int, final: bool = False) -> Job:
    """Train ``arm`` at ``seed`` up to ``epoch``: a new run, or a resumed one (with its checkpoint)."""
    run_dir = out / arm.run_name(seed)
    state = cell_state(run_dir)
    if state in ("new", "partial"):
        force = ["--force"] if state == "partial" else []  # only ever a directory without a checkpoint
        return Job(arm.run_name(seed), "train", _mtrec("train", race.data, *race.arm_args(arm), "--seed", seed,
                                                       "--epochs", epoch, "--out", run_dir, *force, "--quiet"),
                   final)
    return Job(arm.run_name(seed), "resume", _mtrec("train", "--resume", run_dir, "--epochs", epoch, "--quiet"),
               final)


def evaluate_job(race: Race, out: Path, arm: Arm, seed: int) -> Job:
    device = _flag_value(race.train_args, "--device")
    return Job(arm.run_name(seed), "evaluate", _mtrec("evaluate", out / arm.run_name(seed), "--split", "test",
                                                      "--json", *(["--device", device] if device else [])),
               final=True)


def failure_path(out: Path, run: str, final: bool = False) -> Path:
    """Where a failed job is recorded; ``replay`` drops an arm for a rung's failure only."""
    return out / LOG_DIR / (f"{run}.final.failed.json" if final else f"{run}.failed.json")


def record_failure(out: Path, job: Job, code: int, error: str, log: Path) -> None:
    record = {"phase": job.phase, "exit_code": code, "error": error, "log": str(log)}
    atomic_write_text(failure_path(out, job.run, job.final), json.dumps(record, indent=2))


def run_race_jobs(jobs_list: list[Job], out: Path, jobs: int, say) -> int:
    """Run the jobs, ``jobs`` subprocesses at a time with the cores divided between them. A failing
    job is recorded in logs/<run>.failed.json; an evaluation's JSON becomes <run>/eval.json.
    Returns the number of failures; Ctrl-C stops the running jobs and raises RaceInterrupted."""
    env = job_env(jobs)
    failures = 0

    def start(job: Job) -> tuple[subprocess.Popen, tuple[Job, Path, Path]]:
        log = out / LOG_DIR / f"{job.run}.{job.phase}.log"
        stdout_path = out / LOG_DIR / f".{job.run}.eval.json.tmp"
        with open(log, "w") as stderr, open(stdout_path if job.phase == "evaluate" else os.devnull, "w") as stdout:
            return subprocess.Popen(job.command, env=env, stdout=stdout, stderr=stderr), (job, log, stdout_path)

    def finish(handle: tuple[Job, Path, Path], code: int, stopping: bool) -> list:
        nonlocal failures
        job, log, stdout_path = handle
        if stopping:
            stdout_path.unlink(missing_ok=True)
            return []  # interrupted, not failed: the next run continues it
        error = None
        if code == 0 and job.phase == "evaluate":
            try:
                result = json.loads(stdout_path.read_text())
            except json.JSONDecodeError:
                code, error = 1, "mtrec evaluate printed no JSON"
            else:
                atomic_write_text(out / job.run / "eval.json", json.dumps(result, indent=2))
        stdout_path.unlink(missing_ok=True)
        if code != 0:
            error = error or _last_line(log)
            record_failure(out, job, code, error, log)
            say(f"{job.run}: FAILED in {job.phase} (exit {code}): {error}")
            failures += 1
        return []

    if run_jobs(jobs_list, jobs, start, finish, say, "runs"):
        raise RaceInterrupted()
    return failures


def run_race(race: Race, out: Path, jobs: int = 1, say=print) -> dict:
    """Run the race in ``out`` to its end (or continue it), score the winner, EW and the single-task
    model on the test split, write the winner's train.toml and result.json. Returns the summary."""
    out = Path(out)
    save_race(race, out)
    for record in (out / LOG_DIR).glob("*.failed.json"):
        record.unlink()  # every run that failed before is tried again
    by_name = {arm.name: arm for arm in race.arm_list}
    told = 0
    while True:
        state = replay(race, out)
        for rung in state["rungs"][told:]:
            stopped = ", ".join(rung["stopped"]) or "none"
            say(f"epoch {rung['epoch']}: best {rung['best']}; stopped: {stopped}")
        told = len(state["rungs"])
        pending = state["pending"]
        if pending is None:
            break
        epoch = pending["epoch"]
        todo = [train_job(race, out, by_name[name], seed, epoch) for name, seeds in pending["runs"].items()
                for seed in seeds]
        say(f"rung at epoch {epoch}: {len(pending['runs'])} arms, {len(todo)} runs to train")
        run_race_jobs(todo, out, jobs, say)
        for job in todo:  # a run that exited 0 must have reached the rung, or the race would not advance
            progress = run_progress(out / job.run, race.metric)
            if not reached(progress, epoch) and not failure_path(out, job.run).exists():
                record_failure(out, job, 0, f"the run did not reach epoch {epoch}",
                               out / LOG_DIR / f"{job.run}.{job.phase}.log")
    winner = state["winner"]
    if winner:
        finish_references(race, out, winner, jobs, say)
        write_winner_config(race, out, winner)
    summary = summarize(out)
    write_result(summary, out)
    return summary


def finish_references(race: Race, out: Path, winner: str, jobs: int, say) -> None:
    """EW and the single-task model may have been stopped early; the reported gains compare runs of
    equal length, so they are continued to the budget (the epochs count as spent), then the winner,
    EW and the single-task model are evaluated once on the test split."""
    arms = references(race, winner)
    todo = [train_job(race, out, arm, seed, race.budget, final=True) for arm in arms for seed in race.seeds
            if not reached(run_progress(out / arm.run_name(seed), race.metric), race.budget)]
    if todo:
        say(f"continuing {len(todo)} reference runs to the budget ({race.budget} epochs) for the test comparison")
        run_race_jobs(todo, out, jobs, say)
    failed = {job.run for job in todo if failure_path(out, job.run, final=True).exists()}
    evaluations = [evaluate_job(race, out, arm, seed) for arm in arms for seed in race.seeds
                   if arm.run_name(seed) not in failed and not (out / arm.run_name(seed) / "eval.json").exists()]
    if evaluations:
        say(f"scoring {len(evaluations)} runs on the test split (winner {winner}, ew, single)")
        run_race_jobs(evaluations, out, jobs, say)
