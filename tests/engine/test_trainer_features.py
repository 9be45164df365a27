"""What users expect of a trainer: the lr schedule, clipping in the loop, the selection metric, and
a run directory that is safe to --force, to resume with other flags, and to move."""

import dataclasses
import json
import math
import shutil
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from mtrec.cli import app
from mtrec.core.config import TrainConfig
from mtrec.core.errors import UserError
from mtrec.engine import checkpoint
from mtrec.engine.loop import Trainer
from mtrec.engine.schedule import improves, lr_factor

SMALL = dict(target="like", batch_size=256, embedding_dim=4, expert_sizes=[16, 8], tower_sizes=[8], seed=2,
             diagnostics_every=0)


@pytest.fixture(scope="module")
def data_dir(encoded_synthetic):
    return encoded_synthetic("features", rows=4000, seed=7) / "data"


def invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output + (result.stderr if result.stderr not in result.output else "")


def test_lr_factor_by_hand():
    # Warmup of 4: 1/4, 2/4, 3/4, then the decay over the remaining 10 - 4 = 6 steps.
    assert [lr_factor("constant", 4, s, 10) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert [lr_factor("linear", 4, s, 10) for s in (4, 7, 9)] == [1.0, 0.5, pytest.approx(1 / 6)]
    assert lr_factor("cosine", 4, 7, 10) == pytest.approx(0.5)  # half way: cos(pi / 2) = 0
    assert lr_factor("cosine", 0, 9, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.9)))
    # past the planned steps (more epochs on resume): the rate of the last planned update, not 0
    assert lr_factor("linear", 0, 50, 10) == lr_factor("linear", 0, 9, 10) == pytest.approx(0.1)
    assert lr_factor("cosine", 4, 12, 10) == lr_factor("cosine", 4, 9, 10)


def test_improves_follows_the_metric_direction():
    assert improves("auc", 0.7, 0.6) and not improves("auc", 0.6, 0.7)
    assert improves("logloss", 0.3, 0.4) and not improves("logloss", 0.4, 0.3)
    assert improves("gauc", 0.5, None) and not improves("auc", float("nan"), None) and not improves("auc", None, 0.5)


def test_schedule_reaches_every_group_and_clipping_is_counted(data_dir, tmp_path):
    cfg = TrainConfig(data=str(data_dir), out=str(tmp_path / "run"), epochs=2, lr=0.01, lr_schedule="linear",
                      warmup_steps=5, clip_grad=1e-3, balancer="uw", **SMALL)
    trainer = Trainer(cfg, quiet=True)
    result = trainer.run()
    steps = math.ceil(len(trainer.train_split) / cfg.batch_size)
    last = lr_factor("linear", 5, 2 * steps - 1, 2 * steps)
    groups = trainer.optimizer.param_groups
    assert len(groups) >= 2  # the model's and UW's log-variances
    assert all(g["lr"] == pytest.approx(0.01 * last) and g["initial_lr"] == 0.01 for g in groups)
    # A norm of 1e-3 is far below any real gradient norm here: every applied step was clipped.
    assert result["clipped_steps"] == 2 * steps
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["clipped_steps"] for r in records] == [steps, 2 * steps]


def test_a_training_run_logs_the_update_change_of_cograds_exact_form(data_dir, tmp_path):
    """A real 1-epoch run with hessian=hvp: every diagnostics record carries the realised change
    of the update from the plain sum, one finite, positive value per shared tensor."""
    settings = {**SMALL, "diagnostics_every": 5}
    cfg = TrainConfig(data=str(data_dir), out=str(tmp_path / "run"), epochs=1, balancer="cograd",
                      balancer_opts={"hessian": "hvp"}, **settings)
    trainer = Trainer(cfg, quiet=True)
    trainer.run()
    records = [json.loads(x) for x in (tmp_path / "run" / "diagnostics.jsonl").read_text().splitlines()]
    steps = math.ceil(len(trainer.train_split) / cfg.batch_size)
    assert [r["step"] for r in records] == list(range(1, steps + 1, 5))
    shared = len(trainer.model.shared_parameters())
    for r in records:
        assert r["scope"] == "all" and len(r["update_change"]) == len(r["norms"]) == shared
        assert all(0 < c < 1 for c in r["update_change"]), r["update_change"]


def test_resume_with_more_epochs_keeps_the_first_runs_schedule(data_dir, tmp_path, monkeypatch, capsys):
    import mtrec.engine.loop as loop

    factors = []
    monkeypatch.setattr(loop, "set_lr", lambda optimizer, factor: factors.append(factor))
    cfg = TrainConfig(data=str(data_dir), out=str(tmp_path / "run"), epochs=2, lr_schedule="cosine", **SMALL)
    trainer = Trainer(cfg, quiet=True)
    trainer.run()
    steps = math.ceil(len(trainer.train_split) / cfg.batch_size)
    planned = [lr_factor("cosine", 0, s, 2 * steps) for s in range(2 * steps)]
    assert factors == planned and factors[-1] < 0.01
    factors.clear()
    Trainer(dataclasses.replace(cfg, epochs=3), resume=True, quiet=True).run()
    # the third epoch continues at the finished schedule's final rate (re-planning over 3 epochs
    # jumped back to about half the base rate: 0.5 * (1 + cos(pi * 2/3)) = 0.25 .. 0.5)
    assert len(factors) == steps and set(factors) == {planned[-1]}
    assert "planned over" in capsys.readouterr().err
    checkpoint_meta = checkpoint.load(tmp_path / "run" / "last.pt")[1]
    assert checkpoint_meta["schedule_steps"] == 2 * steps


def test_select_logloss_keeps_the_epoch_with_the_lowest_target_logloss(data_dir, tmp_path):
    cfg = TrainConfig(data=str(data_dir), out=str(tmp_path / "run"), epochs=3, patience=3, lr=0.02,
                      select="logloss", **SMALL)
    result = Trainer(cfg, quiet=True).run()
    losses = [r["valid"]["like"]["logloss"] for r in result["history"]]
    assert result["best_epoch"] == losses.index(min(losses)) + 1
    assert result["best_score"] == min(losses)
    _, meta = checkpoint.load(tmp_path / "run" / "best.pt")
    assert meta["epoch"] == result["best_epoch"]


@pytest.mark.parametrize("value, where", [(float("nan"), 0), (float("inf"), -1), (-float("inf"), 0)])
def test_save_refuses_non_finite_parameters(data_dir, tmp_path, value, where):
    cfg = TrainConfig(data=str(data_dir), out=str(tmp_path / "run"), epochs=1, **SMALL)
    trainer = Trainer(cfg, quiet=True)
    trainer.save("last.pt")
    before = (tmp_path / "run" / "last.pt").read_bytes()
    with torch.no_grad():  # one value of the first (the embedding table) or the last parameter
        list(trainer.model.parameters())[where].view(-1)[-1] = value
    with pytest.raises(UserError, match="no longer finite"):
        trainer.save("last.pt")
    assert (tmp_path / "run" / "last.pt").read_bytes() == before


def test_force_never_removes_the_data_or_a_foreign_folder(data_dir, tmp_path):
    base = ["train", "--target", "like", "--epochs", "1", "--quiet", "--force"]
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    for out, needle in ((copy, "data directory"), (tmp_path, "data directory")):
        code, output = invoke(*base[:1], copy, *base[1:], "--out", out)
        assert code == 2 and needle in output and "Traceback" not in output, output
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    code, output = invoke("train", copy, *base[1:], "--out", foreign)
    assert code == 2 and "not an mtrec run directory" in output, output
    assert (foreign / "notes.txt").read_text() == "keep" and (copy / "schema.json").exists()


def _tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def test_force_replaces_only_what_mtrec_train_wrote(data_dir, tmp_path):
    base = ["train", data_dir, "--target", "like", "--epochs", "1", "--batch-size", "1024", "--embedding-dim", "4",
            "--quiet"]
    # a project folder whose config.json is the project's own (a common name): nothing is removed
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "config.json").write_text('{"name": "my project"}')
    (project / "src" / "main.py").write_text("print('keep')")
    before = _tree(project)
    code, output = invoke(*base, "--out", project, "--force")
    assert code == 2 and "no config.json written by mtrec train" in output, output
    assert _tree(project) == before
    # a run of mtrec train beside a file it did not write: refused, naming the file; the run is intact
    run = tmp_path / "run"
    code, output = invoke(*base, "--out", run, "--tensorboard", run / "tb")
    assert code == 0, output
    (run / "notes.txt").write_text("keep")
    (run / "src").mkdir()
    before = _tree(run)
    code, output = invoke(*base, "--out", run, "--force")
    assert code == 2 and "notes.txt, src" in output and "did not write" in output, output
    assert _tree(run) == before
    # without them (its own TensorBoard folder and a leftover temporary file are its own): replaced
    (run / "notes.txt").unlink()
    (run / "src").rmdir()
    (run / ".last.pt.abc123.tmp").write_bytes(b"half")
    code, output = invoke(*base, "--out", run, "--force", "--seed", "5")
    assert code == 0, output
    assert json.loads((run / "config.json").read_text())["seed"] == 5
    assert sorted(p.name for p in run.iterdir()) == ["best.pt", "config.json", "diagnostics.jsonl", "encoder.json",
                                                      "last.pt", "metrics.jsonl", "schema.json", "vocab"]


def test_resume_honours_safe_flags_and_refuses_the_rest(data_dir, tmp_path):
    run = tmp_path / "run"
    code, output = invoke("train", data_dir, "--target", "like", "--epochs", "1", "--batch-size", "512",
                          "--embedding-dim", "4", "--quiet", "--out", run)
    assert code == 0, output
    code, output = invoke("train", "--resume", run, "--epochs", "2", "--lr", "0.1", "--quiet")
    assert code == 2 and "--lr" in output and "--epochs" in output and "Traceback" not in output, output
    code, output = invoke("train", "--resume", run, "--epochs", "2", "--patience", "4", "--quiet")
    assert code == 0, output
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    saved = json.loads((run / "config.json").read_text())
    assert saved["epochs"] == 2 and saved["patience"] == 4 and saved["lr"] == 1e-3


def _with(command: list[str], flag: str, value: str) -> list[str]:
    at = command.index(flag) + 1
    return command[:at] + [value] + command[at + 1:]


def test_resume_accepts_the_same_command_and_names_what_really_changed(data_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").symlink_to(data_dir)
    (tmp_path / "base.toml").write_text('model = "shared-bottom"\nexpert_sizes = [8]\n')
    command = ["train", "data", "--target", "like", "--tasks", "click,like", "--epochs", "1", "--batch-size",
               "512", "--embedding-dim", "4", "--lr", "0.001", "--balancer", "uw", "--config", "base.toml",
               "--out", "run", "--quiet"]
    code, output = invoke(*command)
    assert code == 0, output
    # the same command with --resume added (and more epochs) continues the run
    code, output = invoke(*_with(command, "--epochs", "2"), "--resume", "run")
    assert code == 0, output
    assert [json.loads(x)["epoch"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    # a real change is refused, naming the setting with its saved and given values; --force too
    code, output = invoke(*_with(command, "--lr", "0.01"), "--resume", "run")
    assert code == 2 and "--lr (saved 0.001, given 0.01)" in output and "Traceback" not in output, output
    (tmp_path / "other.toml").write_text('model = "mmoe"\n')
    code, output = invoke("train", "--config", "other.toml", "--resume", "run")
    assert code == 2 and "--model (saved 'shared-bottom', given 'mmoe')" in output, output
    code, output = invoke(*command, "--resume", "run", "--force")
    assert code == 2 and "pass one of the two" in output, output
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2


def test_config_holds_absolute_paths_and_a_moved_run_finds_its_data(data_dir, tmp_path, monkeypatch):
    project = tmp_path / "project"
    shutil.copytree(data_dir, project / "data")
    monkeypatch.chdir(project)
    code, output = invoke("train", "data", "--target", "like", "--epochs", "1", "--batch-size", "512",
                          "--embedding-dim", "4", "--quiet", "--out", "runs/a")
    assert code == 0, output
    saved = json.loads((project / "runs" / "a" / "config.json").read_text())
    assert saved["data"] == str(project / "data") and saved["out"] == str(project / "runs" / "a")
    monkeypatch.chdir(tmp_path)
    shutil.move(project, tmp_path / "moved")
    code, output = invoke("evaluate", tmp_path / "moved" / "runs" / "a", "--device", "cpu", "--json")
    assert code == 0 and "not at" in output, output


def test_missing_best_checkpoint_falls_back_to_last_with_a_warning(data_dir, tmp_path):
    run = tmp_path / "run"
    code, output = invoke("train", data_dir, "--target", "like", "--epochs", "1", "--embedding-dim", "4",
                          "--quiet", "--out", run)
    assert code == 0, output
    (run / "best.pt").unlink()
    code, output = invoke("evaluate", run, "--device", "cpu")
    assert code == 0 and "no best.pt" in output and "using last.pt" in output, output


def test_synth_and_preprocess_do_not_import_torch(tmp_path):
    script = f"""
import sys
from typer.testing import CliRunner
from mtrec.cli import app
log, out = {str(tmp_path / 'log.parquet')!r}, {str(tmp_path / 'data')!r}
for args in (["synth", "--out", log, "--rows", "500"],
             ["preprocess", log, "--labels", "click,like", "--user", "user_id", "--time", "ts", "--out", out]):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
print(sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
    assert (tmp_path / "data" / "schema.json").exists()


def test_scoring_is_fp32_whatever_the_training_precision(data_dir, tmp_path):
    """One checkpoint trained under bf16 autocast, scored with its bf16 config and with fp32: the
    same metrics (bf16 logits would tie by the thousand and move GAUC / NDCG)."""
    from mtrec.data.tensors import load_split
    from mtrec.engine.build import feature_names
    from mtrec.metrics.split import predict
    from mtrec.serving.evaluate import evaluate_run, load_run

    run = tmp_path / "run"
    Trainer(TrainConfig(data=str(data_dir), out=str(run), epochs=1, precision="bf16", **SMALL), quiet=True).run()
    as_trained = evaluate_run(run, split="valid", device="cpu")["metrics"]
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "precision": "fp32"}))
    assert evaluate_run(run, split="valid", device="cpu")["metrics"] == as_trained
    model, _, tasks, schema = load_run(run, device="cpu")
    split = load_split(data_dir, "valid", *feature_names(schema), tasks)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a caller's autocast does not reach the scores
        inside = predict(model, split, 4096)
    assert inside.dtype == torch.float32 and torch.equal(inside, predict(model, split, 4096))
    assert inside[:, 0].unique().numel() > 0.9 * len(split)  # fp32 scores barely tie


def test_a_run_where_no_epoch_improved_says_so_instead_of_epoch_minus_one(data_dir, tmp_path):
    import polars as pl

    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    valid = pl.read_parquet(data / "valid.parquet")
    valid.with_columns(pl.lit(0, valid.schema["like"]).alias("like")).write_parquet(data / "valid.parquet")
    code, output = invoke("train", data, "--target", "like", "--epochs", "1", "--embedding-dim", "4", "--quiet",
                          "--out", tmp_path / "run")  # one class in valid: the target's AUC is undefined
    assert code == 0, output
    assert "no epoch gave a defined validation auc" in output and "last validation (epoch 1)" in output
    assert "epoch -1" not in output and not (tmp_path / "run" / "best.pt").exists()


def test_train_writes_tensorboard_events_equal_to_its_logs(encoded_synthetic, tmp_path):
    """`mtrec train --tensorboard DIR`: the same scalars as metrics.jsonl (validation metrics,
    the epoch's mean training loss per task) and diagnostics.jsonl, as TensorBoard reads them."""
    pytest.importorskip("tensorboard")
    import json

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from typer.testing import CliRunner

    from mtrec.cli import app

    data = encoded_synthetic("tensorboard", rows=3_000, seed=2) / "data"
    run, tb = tmp_path / "run", tmp_path / "tb"
    result = CliRunner().invoke(app, ["train", str(data), "--model", "mmoe", "--target", "click", "--epochs", "2",
                                      "--batch-size", "256", "--embedding-dim", "4", "--expert-sizes", "8",
                                      "--tower-sizes", "4", "--diagnostics-every", "5", "--quiet", "--out", str(run),
                                      "--tensorboard", str(tb), "--device", "cpu"])  # fp32: EW's change is ~0
    assert result.exit_code == 0, result.output
    history = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    diagnostics = [json.loads(x) for x in (run / "diagnostics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(tb))
    events.Reload()
    scalars = lambda tag: [(e.step, e.value) for e in events.Scalars(tag)]  # noqa: E731
    for task in ("click", "like", "share"):
        assert all(r["train_loss"][task] > 0 for r in history)
        assert scalars(f"train_loss/{task}") == [(r["step"], pytest.approx(r["train_loss"][task], rel=1e-6))
                                                 for r in history]
        assert scalars(f"valid_auc/{task}") == [(r["step"], pytest.approx(r["valid"][task]["auc"], rel=1e-6))
                                                for r in history]
    norms = scalars("grad_norm/tensor0/like")
    assert norms == [(d["step"], pytest.approx(d["norms"][0][1], rel=1e-5)) for d in diagnostics]
    assert scalars("task_weight/share") == [(d["step"], 1.0) for d in diagnostics]  # EW weighs every task 1
    # EW's update is the plain sum: its logged change is 0 up to fp32 summation order, as in the events.
    changes = scalars("update_change/tensor0")
    assert changes == [(d["step"], pytest.approx(d["update_change"][0], abs=1e-7)) for d in diagnostics]
    assert all(value < 1e-5 for _, value in changes)
