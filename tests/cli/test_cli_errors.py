"""The table of bad inputs: each gets one line naming the problem, exit code 2, no traceback, and
leaves no output behind. One parametrised test per command (docs/reliability.md lists them)."""

import json
import shutil
from pathlib import Path

import polars as pl
import pytest
import torch
from typer.testing import CliRunner

from mtrec.cli import app

runner = CliRunner()


def invoke(*args):
    """Exit code and everything printed (stdout and stderr, whichever way this Click mixes them)."""
    result = runner.invoke(app, [str(a) for a in args])
    output = result.output
    try:
        if result.stderr and result.stderr not in output:
            output += result.stderr
    except (ValueError, AttributeError):  # older Click: stderr not captured separately
        pass
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        output += "Traceback: " + repr(result.exception)
    return result.exit_code, output


def assert_user_error(code, output, *needles):
    assert code == 2, output
    assert "Traceback" not in output, output
    lines = [line for line in output.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, output
    for needle in needles:
        assert needle.lower() in lines[0].lower(), lines[0]


@pytest.fixture(scope="module")
def world(encoded_synthetic):
    root = encoded_synthetic("cli", rows=3000, seed=1)
    code, out = invoke("train", root / "data", "--model", "shared-bottom", "--target", "click", "--epochs", "1",
                       "--batch-size", "512", "--embedding-dim", "4", "--quiet", "--out", root / "run")
    assert code == 0, out
    return root


def _log(world, path, change):
    frame = pl.read_parquet(world / "log.parquet")
    change(frame).write_parquet(path)
    return path


PREPROCESS_CASES = {
    "missing path": (lambda w, t: [t / "nope.parquet"], ["not found"]),
    "not parquet": (lambda w, t: [_text(t / "x.parquet")], ["parquet"]),
    "truncated parquet": (lambda w, t: [_truncated(w, t / "x.parquet")], ["parquet"]),
    "empty file": (lambda w, t: [_empty(t / "x.parquet")], []),
    "zero rows": (lambda w, t: [_log(w, t / "x.parquet", lambda f: f.head(0))], ["no rows"]),
    "missing label": (lambda w, t: [w / "log.parquet", "--labels", "click,buy"], ["buy"]),
    "all-null label": (lambda w, t: [_log(w, t / "x.parquet", lambda f: f.with_columns(
        pl.lit(None, dtype=pl.Int8).alias("like")))], ["like"]),
    "string label": (lambda w, t: [_log(w, t / "x.parquet", lambda f: f.with_columns(
        pl.col("like").cast(pl.String)))], ["like"]),
    "NaN label rows": (lambda w, t: [_log(w, t / "x.parquet", lambda f: f.with_columns(
        pl.when(pl.col("user_id") % 7 == 0).then(None).otherwise(pl.col("like")).alias("like")))], ["like"]),
    "missing user column": (lambda w, t: [w / "log.parquet", "--user", "uid"], ["uid"]),
    "feature is a label": (lambda w, t: [w / "log.parquet", "--user", "click"], ["click"]),
    "ratios do not sum to 1": (lambda w, t: [w / "log.parquet", "--ratios", "0.8,0.1,0.2"], ["ratio"]),
}


def _text(path):
    path.write_text("user,click\n1,0\n")
    return path


def _truncated(world, path):
    data = (world / "log.parquet").read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _empty(path):
    path.write_bytes(b"")
    return path


@pytest.mark.parametrize("case", list(PREPROCESS_CASES))
def test_preprocess_bad_input(world, tmp_path, case):
    make, needles = PREPROCESS_CASES[case]
    args = make(world, tmp_path)
    inputs = [a for a in args if not str(a).startswith("--") and args.index(a) == 0]
    rest = args[1:]
    labels = [] if "--labels" in rest else ["--labels", "click,like,share"]
    code, out = invoke("preprocess", *inputs, *labels, "--time", "ts", *rest, "--out", tmp_path / "out")
    assert_user_error(code, out, *needles)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".") or "tmp" in p.name]


def test_preprocess_existing_output_needs_force(world, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    code, out = invoke("preprocess", world / "log.parquet", "--labels", "click,like", "--out", tmp_path / "out")
    assert_user_error(code, out, "--force")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def _fake_data(world, tmp_path, change):
    dst = tmp_path / "data"
    shutil.copytree(world / "data", dst)
    schema = json.loads((dst / "schema.json").read_text())
    change(schema, dst)
    (dst / "schema.json").write_text(json.dumps(schema))
    return dst


TRAIN_CASES = {
    "not a preprocess dir": (lambda w, t: [_plain_dir(t)], ["preprocess"]),
    "incompatible version": (lambda w, t: [_fake_data(w, t, lambda s, d: s.update(version=99))], ["version"]),
    "unknown model": (lambda w, t: [w / "data", "--model", "transformer"], ["transformer", "mmoe"]),
    "unknown balancer": (lambda w, t: [w / "data", "--balancer", "magic"], ["magic", "metabalance"]),
    "unknown target": (lambda w, t: [w / "data", "--target", "buy"], ["buy", "click"]),
    "unknown task": (lambda w, t: [w / "data", "--tasks", "click,buy"], ["buy"]),
    "negative lr": (lambda w, t: [w / "data", "--lr", "-0.1"], ["lr"]),
    "batch size 0": (lambda w, t: [w / "data", "--batch-size", "0"], ["batch"]),
    "relax >= 1": (lambda w, t: [w / "data", "--balancer", "metabalance", "--balancer-opt", "relax=1.5"], ["relax"]),
    "bad layer sizes": (lambda w, t: [w / "data", "--expert-sizes", "256,wide"], ["--expert-sizes"]),
    "unknown scope": (lambda w, t: [w / "data", "--balancer", "pcgrad", "--balance-scope", "everything"], ["scope"]),
    "target without positives": (lambda w, t: [_fake_data(w, t, lambda s, d: s["positive_rate"].update(share=0.0)),
                                               "--target", "share"], ["positive"]),
    "single with gradient balancer": (lambda w, t: [w / "data", "--model", "single", "--balancer", "pcgrad"],
                                      ["single"]),
    "config value is a string": (lambda w, t: _toml(t, w, 'seed = "3"'), ["seed", "integer", "'3'"]),
    "config list is a number": (lambda w, t: _toml(t, w, "expert_sizes = 256"), ["expert_sizes", "list"]),
    "config number is a bool": (lambda w, t: _toml(t, w, "lr = true"), ["lr", "number"]),
    "unknown lr schedule": (lambda w, t: [w / "data", "--lr-schedule", "step"], ["--lr-schedule", "cosine"]),
    "negative clip": (lambda w, t: [w / "data", "--clip-grad", "-1"], ["--clip-grad"]),
    "unknown select metric": (lambda w, t: [w / "data", "--select", "ndcg"], ["--select", "logloss"]),
    "select gauc without users": (lambda w, t: [_fake_data(w, t, lambda s, d: s.update(user=None)), "--select",
                                                "gauc"], ["--select gauc", "--user"]),
}


def _toml(tmp_path, world, line):
    (tmp_path / "bad.toml").write_text(f'data = "{world / "data"}"\n{line}\n')
    return ["--config", tmp_path / "bad.toml"]


def _plain_dir(tmp_path):
    (tmp_path / "plain").mkdir()
    return tmp_path / "plain"


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_train_bad_input(world, tmp_path, case):
    make, needles = TRAIN_CASES[case]
    args = make(world, tmp_path)
    target = [] if "--target" in args else ["--target", "click"]
    code, out = invoke("train", *args, *target, "--epochs", "1", "--quiet", "--out", tmp_path / "run")
    assert_user_error(code, out, *needles)
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_train_cuda_without_cuda(world, tmp_path):
    code, out = invoke("train", world / "data", "--target", "click", "--device", "cuda", "--out", tmp_path / "run")
    assert_user_error(code, out, "cuda")
    assert not (tmp_path / "run").exists()


def test_train_existing_run_needs_force_or_resume(world, tmp_path):
    code, out = invoke("train", world / "data", "--target", "click", "--out", world / "run")
    assert_user_error(code, out, "--force", "--resume")
    assert (world / "run" / "best.pt").exists()


def _run_copy(world, tmp_path, change):
    dst = tmp_path / "run"
    shutil.copytree(world / "run", dst)
    change(dst)
    return dst


def _truncate(path: Path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


EVALUATE_CASES = {
    "not a run dir": (lambda w, t: [_plain_dir(t)], ["run directory"]),
    "no checkpoint": (lambda w, t: [_run_copy(w, t, lambda d: [(d / n).unlink() for n in ("best.pt", "last.pt")])],
                      ["checkpoint"]),
    "truncated checkpoint": (lambda w, t: [_run_copy(w, t, lambda d: (_truncate(d / "best.pt")))], ["corrupt"]),
    "schema mismatch": (lambda w, t: [w / "run", "--data", _fake_data(w, t, lambda s, d: s["features"].pop())],
                        ["features"]),
    "raw log missing a feature": (lambda w, t: [w / "run", "--raw", _log(w, t / "raw.parquet",
                                                                         lambda f: f.drop("item_brand"))],
                                  ["item_brand"]),
}


@pytest.mark.parametrize("case", list(EVALUATE_CASES))
def test_evaluate_bad_input(world, tmp_path, case):
    make, needles = EVALUATE_CASES[case]
    code, out = invoke("evaluate", *make(world, tmp_path), "--device", "cpu")
    assert_user_error(code, out, *needles)


def test_evaluate_raw_logs_match_encoded_split(world, tmp_path):
    """Raw logs through the saved vocabularies score exactly like the rows preprocess encoded."""
    from mtrec.data.tensors import frame_to_split
    from mtrec.engine.build import feature_names
    from mtrec.engine.objective import Objective
    from mtrec.metrics.split import split_metrics
    from mtrec.serving.evaluate import load_run

    code, out = invoke("evaluate", world / "run", "--json", "--device", "cpu", "--raw", world / "log.parquet")
    assert code == 0, out
    raw = json.loads(out)["metrics"]
    model, cfg, tasks, schema = load_run(world / "run")
    encoded = pl.concat([pl.read_parquet(world / "data" / f"{s}.parquet") for s in ("train", "valid", "test")])
    split = frame_to_split(encoded, *feature_names(schema), tasks)
    expected = split_metrics(model, split, Objective(tasks, {}), 4096, cfg.ndcg_k)
    for task in tasks:
        for key in ("auc", "gauc", "logloss", "ndcg"):
            assert raw[task][key] == pytest.approx(expected[task][key], rel=1e-9, abs=1e-12), (task, key)


def test_config_paths_are_relative_to_the_config_file(world, tmp_path):
    (tmp_path / "conf").mkdir()
    shutil.copytree(world / "data", tmp_path / "conf" / "d")
    (tmp_path / "conf" / "run.toml").write_text('data = "d"\nout = "r"\ntarget = "click"\nmodel = "shared-bottom"\n'
                                                'epochs = 1\nembedding_dim = 4\nbatch_size = 1024\n')
    code, out = invoke("train", "--config", tmp_path / "conf" / "run.toml", "--quiet")
    assert code == 0, out
    assert (tmp_path / "conf" / "r" / "best.pt").exists()
    config = json.loads((tmp_path / "conf" / "r" / "config.json").read_text())
    assert config["model"] == "shared-bottom" and config["epochs"] == 1


def test_debug_shows_the_traceback(world, tmp_path):
    code, out = invoke("--debug", "train", tmp_path / "missing", "--target", "click", "--out", tmp_path / "run")
    assert code == 2 and "Traceback" in out


def test_balancers_table_lists_every_balancer_and_opts_reach_the_run(world, tmp_path):
    from mtrec import balancers

    code, out = invoke("balancers")
    assert code == 0
    for name in balancers.names():
        assert name in out
    code, out = invoke("train", world / "data", "--target", "click", "--balancer", "metabalance",
                       "--balancer-opt", "relax=0.5", "--balancer-opt", "mode=reduce_only", "--model", "shared-bottom",
                       "--epochs", "1", "--embedding-dim", "4", "--quiet", "--out", tmp_path / "run")
    assert code == 0, out
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["balancer_opts"] == {"relax": 0.5, "mode": "reduce_only"}


def test_architecture_flags_reach_the_model(world, tmp_path):
    code, out = invoke("train", world / "data", "--target", "click", "--model", "ple", "--levels", "2",
                       "--expert-sizes", "16,8", "--tower-sizes", "4", "--shared-experts", "2", "--task-experts", "1",
                       "--epochs", "1", "--embedding-dim", "4", "--diagnostics-every", "0", "--quiet",
                       "--out", tmp_path / "run")
    assert code == 0, out
    from mtrec.serving.evaluate import load_run

    model, cfg, _, _ = load_run(tmp_path / "run")
    assert cfg.expert_sizes == [16, 8] and cfg.tower_sizes == [4] and len(model.task_experts) == 2
    assert model.shared_experts[0].n == 2 and model.towers.weights[0].shape[-1] == 4
    assert not (tmp_path / "run" / "diagnostics.jsonl").exists()


CORRUPT_JSON = {"truncated": b'{"model": "mm', "empty": b"", "a list": b"[1, 2]", "binary": b"\x80\x81\xfe\x00"}


@pytest.mark.parametrize("content", list(CORRUPT_JSON))
@pytest.mark.parametrize("command", ["evaluate", "train --resume", "plot"])
def test_a_corrupt_config_json_is_one_line(world, tmp_path, command, content):
    run = _run_copy(world, tmp_path, lambda d: (d / "config.json").write_bytes(CORRUPT_JSON[content]))
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    args = {"evaluate": ["evaluate", run, "--device", "cpu"], "train --resume": ["train", "--resume", run],
            "plot": ["plot", run, "--out", tmp_path / "figs"]}[command]
    code, out = invoke(*args)
    assert_user_error(code, out, "config.json", "corrupt")
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


@pytest.mark.parametrize("content", list(CORRUPT_JSON))
def test_a_corrupt_run_schema_json_is_one_line(world, tmp_path, content):
    """evaluate rebuilds the model from the run's schema.json: a damaged one is one line, exit 2."""
    run = _run_copy(world, tmp_path, lambda d: (d / "schema.json").write_bytes(CORRUPT_JSON[content]))
    code, out = invoke("evaluate", run, "--device", "cpu")
    assert_user_error(code, out, "schema.json", "corrupt")


def test_a_corrupt_compare_json_is_one_line(tmp_path):
    from mtrec.research.compare import SETTINGS_FILE

    good = {"data": str(tmp_path), "train_args": [], "models": ["mmoe"], "balancers": ["ew"], "seeds": [1],
            "baseline": "ew"}
    for content, needle in [(b"{not json", "corrupt or truncated"), (b"\xff\xfe", "corrupt or truncated"),
                            (b'"a string"', "not an object"),
                            (json.dumps({k: v for k, v in good.items() if k != "seeds"}).encode(), "seeds"),
                            (json.dumps({**good, "seeds": ["1"]}).encode(), "seeds"),
                            (json.dumps({**good, "models": "mmoe"}).encode(), "models")]:
        (tmp_path / SETTINGS_FILE).write_bytes(content)
        code, out = invoke("compare", "--summarize", tmp_path)
        assert_user_error(code, out, SETTINGS_FILE, needle)
