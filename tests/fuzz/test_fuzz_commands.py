"""The fuzzer: malformed raw logs, feature specs and training configs through the real commands.

Hypothesis draws a raw log (columns of every dtype mtrec meets: integers of every width with huge
and negative ids, UInt64 ids past 2**63, floats with NaN / inf / huge values, strings, booleans,
all-null columns, list columns of every element type; odd labels: counts, strings, NaN, nulls,
no positive), a TOML feature spec (valid and invalid options), preprocess flags and a training
config, then runs ``preprocess``, ``train`` (one epoch, tiny, CPU), ``evaluate`` (the encoded
test split, the raw log, and a second log with one column redrawn or dropped), the same ``train``
command with ``--resume`` added and ``--epochs 2`` (it must continue the run), and ``predict``
(both logs), in-process on ``mtrec.cli.app``, in a temporary folder. For every example and every
command:

- exit 0 with a correct result (the splits hold every input row; the run has its checkpoint and
  one epoch of metrics; evaluate prints metrics in range for every task), or exit 2 with one
  ``error:`` line and no traceback;
- no file outside the command's own output changed (the inputs, the data directory for train,
  the run for evaluate);
- no half-written output: a failed preprocess or predict leaves nothing, a failed train leaves
  no run or a recognisable one (its config.json and schema), and no temporary file is left.

``MTREC_FUZZ_EXAMPLES=N`` runs N random examples (docs/reliability.md reports the last long
run); without it, a fixed set of 30 derandomised examples runs in about 15 s (2-core VM).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path

import polars as pl
import pytest
import torch
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from mtrec.cli import app

LONG = int(os.environ.get("MTREC_FUZZ_EXAMPLES", "0"))
runner = CliRunner()

# --- raw logs ------------------------------------------------------------------------------------
SCALARS = {
    "Int64": (pl.Int64, st.integers(-(2**63), 2**63 - 1)),
    "Int32": (pl.Int32, st.integers(-(2**31), 2**31 - 1)),
    "Int8": (pl.Int8, st.integers(-128, 127)),
    "UInt64": (pl.UInt64, st.integers(0, 2**64 - 1)),
    "UInt8": (pl.UInt8, st.integers(0, 255)),
    "Float64": (pl.Float64, st.floats(allow_nan=True, allow_infinity=True)
                | st.sampled_from([1e300, -1e300, 3.5e38, 1e-310, 2.0**63, 2.0**64])),
    "Float32": (pl.Float32, st.floats(width=32, allow_nan=True, allow_infinity=True)),
    "String": (pl.String, st.text(max_size=5)),
    "Boolean": (pl.Boolean, st.booleans()),
}


@st.composite
def column(draw, rows: int):
    """(dtype, values): a scalar column with a few distinct values (so vocabularies repeat), an
    all-null column, or a list column of any element type."""
    shape = draw(st.sampled_from(["scalar", "scalar", "scalar", "null", "list"]))
    if shape == "null":
        return pl.Null, [None] * rows
    name = draw(st.sampled_from(sorted(SCALARS)))
    dtype, values = SCALARS[name]
    pool = draw(st.lists(values, min_size=1, max_size=4))
    element = st.sampled_from(pool) | st.none() if draw(st.booleans()) else st.sampled_from(pool)
    if shape == "list":
        lists = st.lists(element, max_size=4) | st.none()
        return pl.List(dtype), draw(st.lists(lists, min_size=rows, max_size=rows))
    return dtype, draw(st.lists(element, min_size=rows, max_size=rows))


def mostly(valid, invalid):
    """``valid`` nine times in ten, so that most examples reach train and evaluate."""
    # not 0 (nor 19): Hypothesis draws the ends of a range far more often than the middle
    return st.integers(0, 19).flatmap(lambda roll: invalid if roll in (7, 13) else valid)


LABELS = {  # the odd labels users have: counts, strings, NaN, nulls, no positive, a constant
    "binary": (pl.Int64, st.sampled_from([0, 1])),
    "bool": (pl.Boolean, st.booleans()),
    "float": (pl.Float64, st.sampled_from([0.0, 1.0])),
    "counts": (pl.Int64, st.integers(0, 3)),
    "with NaN": (pl.Float64, st.sampled_from([0.0, 1.0, math.nan])),
    "with nulls": (pl.Int8, st.sampled_from([0, 1]) | st.none()),
    "strings": (pl.String, st.sampled_from(["0", "1", "yes"])),
    "no positive": (pl.Int64, st.just(0)),
    "fractions": (pl.Float64, st.floats(0, 1)),
}


@st.composite
def raw_log(draw):
    rows = draw(mostly(st.integers(8, 48), st.integers(0, 7)))
    columns = {}
    for i in range(draw(st.integers(1, 2))):
        kind = draw(mostly(st.sampled_from(["binary", "bool", "float", "counts"]), st.sampled_from(sorted(LABELS))))
        dtype, values = LABELS[kind]
        columns[f"y{i}"] = pl.Series(draw(st.lists(values, min_size=rows, max_size=rows)), dtype=dtype)
    for i in range(draw(st.integers(1, 5))):
        dtype, values = draw(column(rows))
        columns[f"c{i}"] = pl.Series(values, dtype=dtype, strict=False)
    return pl.DataFrame(columns)


# --- feature spec, preprocess flags, training config ----------------------------------------------
def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if value != value else ("inf" if value > 0 else "-inf") if math.isinf(value) else repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    return str(value)


def spec_options(names: list[str]):
    """Options of one column: the right type and range mostly, any value now and then."""
    anything = (st.integers(-2, 40) | st.floats(allow_nan=True, allow_infinity=True) | st.booleans()
                | st.sampled_from(["x", *names]))
    valid = {"hash_buckets": st.integers(1, 40), "min_count": st.integers(1, 3), "log1p": st.booleans(),
             "fill": st.floats(-1e6, 1e6) | st.sampled_from([1e300, -1e300, 3.5e38]),
             "bucketize": st.integers(2, 5), "kind": st.sampled_from(["categorical", "numeric", "sequence", "drop"]),
             "max_len": st.integers(1, 4), "pooling": st.sampled_from(["mean", "sum", "attention"]),
             "share_with": st.sampled_from(names)}
    keys = st.lists(mostly(st.sampled_from(sorted(valid)), st.just("bogus")), max_size=3, unique=True)
    return keys.flatmap(lambda chosen: st.fixed_dictionaries(
        {key: mostly(valid[key], anything) if key in valid else anything for key in chosen}))


@st.composite
def spec_text(draw, names: list[str]) -> str | None:
    if not names or draw(st.booleans()):
        return None
    lines = []
    for name in draw(st.lists(st.sampled_from(names), max_size=3, unique=True)):
        lines.append(f'[features."{name}"]')
        lines += [f"{key} = {_toml_value(value)}" for key, value in draw(spec_options(names)).items()]
    return "\n".join(lines) + "\n"


def optional_flag(flag: str, values):
    return st.none() | values.map(lambda v: [flag, str(v)])


@st.composite
def case(draw):
    log = draw(raw_log())
    labels = [c for c in log.columns if c.startswith("y")]
    features = [c for c in log.columns if c.startswith("c")]
    names = mostly(st.sampled_from(features), st.just("nope"))
    chosen = draw(mostly(st.lists(st.sampled_from(labels), min_size=1, max_size=2, unique=True),
                         st.lists(st.sampled_from(labels + ["nope"]), min_size=1, max_size=2)))
    preprocess = ["--labels", ",".join(chosen)]
    for flag in ("--user", "--item", "--time"):
        preprocess += draw(optional_flag(flag, names)) or []
    preprocess += draw(optional_flag("--split", mostly(st.just("random"), st.sampled_from(["time", "bogus"])))) or []
    preprocess += draw(optional_flag("--min-count", mostly(st.integers(1, 3), st.just(0)))) or []
    spec = draw(spec_text(features))
    train = ["--epochs", "1", "--device", "cpu", "--quiet", "--embedding-dim", "2", "--expert-sizes", "4",
             "--tower-sizes", "2", "--diagnostics-every", str(draw(st.sampled_from([0, 1])))]
    train += ["--target", draw(mostly(st.sampled_from(chosen), st.sampled_from(labels + ["nope"])))]
    train += ["--model", draw(st.sampled_from(["single", "shared-bottom", "mmoe", "ple", "esmm"]))]
    train += ["--balancer", draw(st.sampled_from(["ew", "uw", "dwa", "pcgrad", "mgda", "metabalance", "cagrad",
                                                   "imtl", "nash-mtl", "famo", "gradnorm"]))]
    train += ["--batch-size", str(draw(mostly(st.integers(1, 16), st.just(0))))]
    for flag, values in (("--lr", mostly(st.sampled_from([1e-3, 0.5, 1e6]), st.sampled_from([0.0, -1.0]))),
                         ("--lr-schedule", mostly(st.sampled_from(["constant", "cosine", "linear"]), st.just("step"))),
                         ("--warmup-steps", st.integers(0, 3)), ("--clip-grad", st.sampled_from([0.0, 1e-6, 1.0])),
                         ("--select", st.sampled_from(["auc", "gauc", "logloss"])),
                         ("--data-placement", st.sampled_from(["auto", "host", "stream"])),
                         ("--embedding-optimizer", st.sampled_from(["lazy-adam", "rowwise-adagrad", "adam"])),
                         ("--max-bad-steps", st.integers(1, 3)), ("--checkpoint-every", st.integers(0, 2))):
        train += draw(optional_flag(flag, values)) or []
    # new logs scored by a trained run: the same columns, one of them redrawn (another dtype,
    # nulls, lists) or dropped
    changed = draw(st.sampled_from(log.columns))
    dtype, values = draw(column(log.height))
    other = log.with_columns(pl.Series(changed, values, dtype=dtype, strict=False))
    other = other.drop(changed) if draw(mostly(st.just(False), st.just(True))) else other
    return log, preprocess, spec, train, other


# --- the invariants -------------------------------------------------------------------------------
def snapshot(root: Path, skip: Path | None = None) -> dict[str, str]:
    """Every file under ``root`` (but ``skip``'s subtree) with a hash of its bytes."""
    files = {}
    for path in sorted(root.rglob("*")):
        if skip is not None and (path == skip or skip in path.parents):
            continue
        files[str(path.relative_to(root))] = hashlib.sha1(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return files


def run(root: Path, args: list, output: Path | None):
    """Invoke one command; check exit 0 or one clean error line, and that nothing outside
    ``output`` changed. Returns (exit code, stdout, what to show on a failure)."""
    before = snapshot(root, output)
    result = runner.invoke(app, [str(a) for a in args])
    stderr = result.stderr
    shown = f"$ mtrec {' '.join(map(str, args))}\n{result.output}\n{stderr}"
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        shown += "".join(traceback.format_exception(result.exception))
        raise AssertionError(f"traceback:\n{shown}")
    assert result.exit_code in (0, 2), shown
    if result.exit_code == 2:
        errors = [line for line in stderr.strip().splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in result.output + stderr, shown
    assert snapshot(root, output) == before, f"a file outside {output} changed:\n{shown}"
    assert not [p for p in root.rglob("*.tmp")], f"a temporary file was left:\n{shown}"
    if os.environ.get("MTREC_FUZZ_ERRORS") and result.exit_code == 2:
        event(f"{args[0]}: {errors[0][:70]}")
    return result.exit_code, result.stdout, shown


def check_metrics(metrics: dict, tasks: list[str], shown: str) -> None:
    assert sorted(set(metrics) - {"mean"}) == sorted(tasks), shown  # the tasks whose labels the data has
    for task, values in metrics.items():
        for key in ("auc", "gauc", "ndcg"):  # NaN / None: undefined (one class, no user column)
            value = values.get(key)
            assert value is None or math.isnan(value) or 0.0 <= value <= 1.0, (task, key, value, shown)
        logloss = values.get("logloss")
        assert logloss is None or math.isnan(logloss) or (math.isfinite(logloss) and logloss >= 0), shown


def check_case(root: Path, log: pl.DataFrame, preprocess: list[str], spec: str | None, train: list[str],
               other: pl.DataFrame) -> None:
    raw, other_raw = root / "in" / "log.parquet", root / "in" / "other.parquet"
    raw.parent.mkdir()
    log.write_parquet(raw)
    other.write_parquet(other_raw)
    if spec is not None:
        (root / "in" / "spec.toml").write_text(spec)
        preprocess = [*preprocess, "--spec", root / "in" / "spec.toml"]
    data, run_dir = root / "data", root / "run"
    code, _, shown = run(root, ["preprocess", raw, *preprocess, "--out", data], data)
    event(f"preprocess exit {code}")
    if code != 0:
        assert not data.exists(), f"a failed preprocess left {data}:\n{shown}"
        return
    schema = json.loads((data / "schema.json").read_text())
    assert sum(schema["rows"].values()) == log.height, shown
    for split in ("train", "valid", "test"):
        encoded = pl.read_parquet(data / f"{split}.parquet")
        numbers = [c for c, dtype in encoded.schema.items() if dtype.is_float()]
        bad = encoded.select(pl.col(numbers).is_finite().not_().fill_null(True).sum()).row(0) if numbers else ()
        assert not any(bad), f"non-finite encoded values in {split} ({dict(zip(numbers, bad))}):\n{shown}"

    code, _, shown = run(root, ["train", data, *train, "--out", run_dir], run_dir)
    event(f"train exit {code}")
    if code != 0:
        assert not run_dir.exists() or (json.loads((run_dir / "config.json").read_text()).get("mtrec_version")
                                        and (run_dir / "schema.json").exists()), f"half-written run:\n{shown}"
        return
    config = json.loads((run_dir / "config.json").read_text())
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert (run_dir / "last.pt").exists() and [r["epoch"] for r in history] == [1], shown
    skipped = history[0]["skipped_steps"]
    event(f"train skipped {'no' if not skipped else 'all' if skipped == history[0]['step'] else 'some'} steps")
    check_metrics(history[0]["valid"], config["tasks"], shown)

    for extra, frame in (([], log), (["--raw", raw], log), (["--raw", other_raw], other)):
        code, out, shown = run(root, ["evaluate", run_dir, "--device", "cpu", "--json", *extra], None)
        event(f"evaluate {' '.join(Path(e).name for e in extra)} exit {code}")
        if code == 0:  # a raw log without some label scores the other tasks (docs/reliability.md)
            check_metrics(json.loads(out)["metrics"], [t for t in config["tasks"] if t in frame.columns], shown)
    # the same train command with --resume added and one more epoch continues the run
    again = [*train[:train.index("--epochs")], "--epochs", "2", *train[train.index("--epochs") + 2:]]
    code, _, shown = run(root, ["train", data, *again, "--out", run_dir, "--resume", run_dir], run_dir)
    event(f"train --resume exit {code}")
    if code == 0:
        history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in history] == [1, 2], shown
    # predict is checked for the invariants (exit, one line, nothing else touched, nothing half
    # written) and that it writes one row per input row
    for source in (raw, other_raw):
        predictions = root / f"predictions-{source.stem}.parquet"
        code, _, shown = run(root, ["predict", run_dir, "--raw", source, "--out", predictions, "--device", "cpu"],
                             predictions)
        event(f"predict {source.name} exit {code}")
        if code == 0:
            written = pl.read_parquet(predictions)
            assert written.height == pl.read_parquet(source).height, shown
            for task in config["tasks"]:
                p = written[f"p_{task}"]
                assert p.is_finite().all() and p.is_between(0, 1).all(), shown
        else:
            assert not predictions.exists(), f"a failed predict left {predictions}:\n{shown}"


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# A long run does not shrink unless asked (a shrink replays slow commands for minutes); the failure
# message shows the commands and their output anyway.
PHASES = [Phase.explicit, Phase.generate] + ([Phase.shrink] if not LONG or os.environ.get("MTREC_FUZZ_SHRINK") else [])


@settings(max_examples=LONG or 30, derandomize=not LONG, deadline=None, database=None, print_blob=True,
          phases=PHASES, report_multiple_bugs=False,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case())
def test_commands_exit_cleanly_and_touch_only_their_output(case):
    log, preprocess, spec, train, other = case
    with tempfile.TemporaryDirectory() as folder:
        cwd = os.getcwd()
        os.chdir(folder)  # anything written to the working directory shows up in the snapshots
        try:
            check_case(Path(folder), log, preprocess, spec, train, other)
        finally:
            os.chdir(cwd)
