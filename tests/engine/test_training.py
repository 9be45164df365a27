"""Training end to end through the real CLI process: run directory, resume after SIGKILL and after
Ctrl-C (bit for bit on CPU), non-finite batches, and flat memory over thousands of steps."""

import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
import torch

from mtrec.engine import checkpoint

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
SMALL = ["--model", "mmoe", "--target", "like", "--batch-size", "64", "--embedding-dim", "4", "--experts", "2",
         "--seed", "3", "--quiet"]


def mtrec(*args, check=True, **kwargs):
    proc = subprocess.run([sys.executable, "-m", "mtrec", *map(str, args)], env=ENV, capture_output=True,
                          text=True, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"mtrec {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def data_dir(encoded_synthetic):
    return encoded_synthetic("train", rows=12_000, seed=5) / "data"


def final_model(run: Path) -> dict:
    state, meta = checkpoint.load(run / "last.pt")
    return state["model"], meta


def test_run_directory_and_evaluate(data_dir, tmp_path):
    run = tmp_path / "run"
    mtrec("train", data_dir, *SMALL, "--epochs", "2", "--out", run)
    assert sorted(p.name for p in run.iterdir()) == ["best.pt", "config.json", "diagnostics.jsonl", "encoder.json",
                                                      "last.pt", "metrics.jsonl", "schema.json", "vocab"]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2]
    assert list(lines[0]["valid"])[:3] == ["like", "click", "share"]  # target first
    diag = json.loads((run / "diagnostics.jsonl").read_text().splitlines()[0])
    assert len(diag["norms"][0]) == 3 and len(diag["cosines"][0]) == 3
    out = json.loads(mtrec("evaluate", run, "--json").stdout)
    assert out["target"] == "like" and out["metrics"]["click"]["auc"] > 0.6
    # An existing run directory is never overwritten without --force.
    proc = mtrec("train", data_dir, *SMALL, "--epochs", "1", "--out", run, check=False)
    assert proc.returncode == 2 and "--force" in proc.stderr and "Traceback" not in proc.stderr


def _wait_for(predicate, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.005)
    return False


def _mid_epoch_checkpoint(run: Path):
    def ready():
        try:
            _, meta = checkpoint.load(run / "last.pt")
        except Exception:
            return False
        return meta["epoch"] == 0 and meta["step"] > 0
    return ready


def _kill_mid_epoch(args, killed: Path) -> dict:
    """SIGKILL a training right after its first mid-epoch checkpoint; the checkpoint's meta. On a
    fast machine the epoch may end between seeing that checkpoint and the kill, so try a few times
    to land mid-epoch."""
    for _ in range(3):
        shutil.rmtree(killed, ignore_errors=True)
        proc = subprocess.Popen([sys.executable, "-m", "mtrec", "train", *map(str, args), "--out", str(killed)],
                                env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert _wait_for(_mid_epoch_checkpoint(killed), proc), "no mid-epoch checkpoint before the run ended"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        _, meta = checkpoint.load(killed / "last.pt")
        if meta["epoch"] == 0 and 0 < meta["step"]:
            break
    return meta


def test_resume_after_sigkill_and_after_ctrl_c_is_bit_for_bit(data_dir, tmp_path):
    # The schedule, clipping and the selection metric are part of the state that must resume exactly.
    # --deterministic: CUDA's atomics would change the last bits between the run and its resume.
    args = [data_dir, *SMALL, "--epochs", "2", "--checkpoint-every", "40", "--lr-schedule", "cosine",
            "--warmup-steps", "30", "--clip-grad", "0.5", "--select", "logloss", "--deterministic"]
    mtrec("train", *args, "--out", tmp_path / "whole")
    whole, whole_meta = final_model(tmp_path / "whole")

    killed = tmp_path / "killed"
    meta = _kill_mid_epoch(args, killed)
    assert meta["epoch"] == 0 and 0 < meta["step"]
    mtrec("train", "--resume", killed, "--quiet")
    resumed, resumed_meta = final_model(killed)
    same = ("epoch", "step", "skipped_steps", "clipped_steps", "valid")  # all but the measured speed
    assert [{k: r[k] for k in same} for r in resumed_meta["history"]] == \
        [{k: r[k] for k in same} for r in whole_meta["history"]]
    assert whole_meta["history"][-1]["clipped_steps"] > 0  # clipping did happen, and was counted alike
    assert resumed_meta["best_epoch"] == whole_meta["best_epoch"]
    for name, tensor in whole.items():
        assert torch.equal(tensor, resumed[name]), name

    # Ctrl-C: stops after the current step, saves, says how to resume, exits 130.
    stopped = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, "-m", "mtrec", "train", *map(str, args), "--out", str(stopped)],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert _wait_for(_mid_epoch_checkpoint(stopped), proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert f"mtrec train --resume {stopped}" in err and "Traceback" not in err
    mtrec("train", "--resume", stopped, "--quiet")
    final, _ = final_model(stopped)
    for name, tensor in whole.items():
        assert torch.equal(tensor, final[name]), name
    valid = lambda run: [json.loads(x)["valid"] for x in (run / "metrics.jsonl").read_text().splitlines()]  # noqa
    assert valid(stopped) == valid(tmp_path / "whole") == valid(killed)


def _poison(src: Path, dst: Path, fraction: float) -> None:
    """Copy an encoded data dir with NaN numeric features in a fraction of the train rows."""
    dst.mkdir()
    for item in src.iterdir():
        if item.is_file():
            (dst / item.name).write_bytes(item.read_bytes())
    (dst / "vocab").symlink_to(src / "vocab")
    schema = json.loads((src / "schema.json").read_text())
    numeric = [f["name"] for f in schema["features"] if f["kind"] == "numeric"]
    train = pl.read_parquet(src / "train.parquet").with_row_index("_i")
    every = max(int(round(1 / fraction)), 1)
    bad = (pl.col("_i") % every) == 0
    train = train.with_columns([pl.when(bad).then(float("nan")).otherwise(pl.col(c)).cast(pl.Float32).alias(c)
                                for c in numeric]).drop("_i")
    train.write_parquet(dst / "train.parquet")


def test_non_finite_batches_are_skipped_and_counted(data_dir, tmp_path):
    _poison(data_dir, tmp_path / "some", fraction=1 / 2000)
    mtrec("train", tmp_path / "some", *SMALL, "--epochs", "1", "--out", tmp_path / "run")
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert 0 < record["skipped_steps"] < 20
    assert record["valid"]["like"]["auc"] > 0.5  # training went on around the bad batches

    _poison(data_dir, tmp_path / "all", fraction=1.0)
    proc = mtrec("train", tmp_path / "all", *SMALL, "--epochs", "1", "--max-bad-steps", "5",
                 "--out", tmp_path / "bad", check=False)
    assert proc.returncode == 2
    assert "non-finite" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def _rss_kib() -> float:
    """Resident memory after handing freed heap back to the OS (glibc ``malloc_trim``), so that RSS
    follows what is alive rather than when the allocator's arenas happen to grow."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS as it is (noisier)
        pass
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**10


# Growth allowed over steps 500..2000, once the allocator has settled. Measured on the 2-core VM:
# without a leak 44-72 KiB (up to ~370 KiB arrive in steps 0-500: caches, arenas); with a leak of
# 1 KiB a step injected into this loop, 2,100 KiB. 512 KiB catches any leak above ~0.35 KiB a step.
_GROWTH_KIB = 512


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc to read RSS")
def test_memory_stays_flat_over_2000_metabalance_steps(data_dir):
    from mtrec.core.config import TrainConfig
    from mtrec.data.schema import Schema
    from mtrec.data.tensors import batches, epoch_permutation, load_split
    from mtrec.engine.build import build_for, feature_names
    from mtrec.engine.step import Stepper

    torch.set_num_threads(1)
    schema = Schema.load(data_dir)
    tasks = ["like", "click", "share"]
    cfg = TrainConfig(data=str(data_dir), target="like", balancer="metabalance", embedding_dim=8,
                      expert_sizes=[64, 32], tower_sizes=[16])
    model, balancer = build_for(cfg, schema, tasks)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    stepper = Stepper(model, balancer, opt, "all", torch.device("cpu"), None)
    split = load_split(data_dir, "train", *feature_names(schema), tasks)
    samples, step, epoch = {}, 0, 0
    while step < 2000:
        for codes, numeric, labels in batches(split, epoch_permutation(len(split), 0, epoch, "cpu"), 128):
            stepper.step(codes, numeric, labels)
            step += 1
            if step % 100 == 0:
                samples[step] = _rss_kib()
            if step == 2000:
                break
        epoch += 1
    settled = samples[500]
    growth = {s: round(v - settled) for s, v in samples.items() if s > 500}
    assert max(growth.values()) < _GROWTH_KIB, f"RSS grew after step 500 (KiB by step): {growth}"


@pytest.fixture
def deterministic_off_after():
    """``--deterministic`` switches torch's deterministic kernels on process-wide: off again after."""
    yield
    torch.use_deterministic_algorithms(False)


def test_host_resident_split_trains_exactly_like_a_device_resident_one(data_dir, tmp_path, deterministic_off_after):
    """The streaming path (batches gathered in a thread, one ahead) yields the same batches in the
    same order: same parameters and metrics, bit for bit (on CUDA with --deterministic)."""
    from mtrec.core.config import TrainConfig
    from mtrec.engine.loop import Trainer

    results = {}
    for placement in ("device", "host", "stream"):
        # stream: one shuffle buffer over the whole split is exactly the in-memory epoch permutation
        cfg = TrainConfig(data=str(data_dir), out=str(tmp_path / placement), target="like", batch_size=300,
                          epochs=2, embedding_dim=4, expert_sizes=[16, 8], tower_sizes=[8], seed=4,
                          data_placement=placement, balancer="metabalance", shuffle_buffer=10**9,
                          deterministic=True)
        trainer = Trainer(cfg, quiet=True)
        assert torch.are_deterministic_algorithms_enabled()
        assert trainer.on_device == (placement == "device") and trainer.placement == placement
        results[placement] = (trainer.run()["history"], {k: v.clone() for k, v in trainer.model.state_dict().items()})
    for placement in ("host", "stream"):
        assert [r["valid"] for r in results[placement][0]] == [r["valid"] for r in results["device"][0]]
        for name, tensor in results["device"][1].items():
            assert torch.equal(tensor, results[placement][1][name]), (placement, name)


def test_auto_placement_streams_a_split_over_the_memory_budget(data_dir, tmp_path):
    from mtrec.core.config import TrainConfig
    from mtrec.engine.loop import Trainer

    base = dict(data=str(data_dir), target="like", embedding_dim=4, expert_sizes=[8], tower_sizes=[4], epochs=1)
    assert Trainer(TrainConfig(out=str(tmp_path / "a"), **base), quiet=True).placement == "device"
    small = Trainer(TrainConfig(out=str(tmp_path / "b"), memory_budget_gb=1e-4, **base), quiet=True)
    assert small.placement == "stream"  # ~100 KiB budget: the 9,600-row train split does not fit


@pytest.fixture(scope="module")
def small_groups(data_dir, tmp_path_factory):
    """The encoded data with 700-row row groups, so an epoch streams several shuffle buffers."""
    import pyarrow.parquet as pq

    dst = tmp_path_factory.mktemp("groups") / "data"
    shutil.copytree(data_dir, dst)
    table = pq.read_table(data_dir / "train.parquet")
    pq.write_table(table, dst / "train.parquet", row_group_size=700)
    return dst


def test_streaming_run_resumes_bit_for_bit_after_sigkill(small_groups, tmp_path):
    args = [small_groups, *SMALL, "--epochs", "2", "--checkpoint-every", "40", "--data-placement", "stream",
            "--shuffle-buffer", "2000"]
    mtrec("train", *args, "--out", tmp_path / "whole")
    whole, whole_meta = final_model(tmp_path / "whole")
    killed = tmp_path / "killed"
    meta = _kill_mid_epoch(args, killed)
    assert meta["epoch"] == 0 and meta["step"] * 64 > 2000  # killed past the first shuffle buffer
    mtrec("train", "--resume", killed, "--quiet")
    resumed, resumed_meta = final_model(killed)
    assert [r["valid"] for r in resumed_meta["history"]] == [r["valid"] for r in whole_meta["history"]]
    for name, tensor in whole.items():
        assert torch.equal(tensor, resumed[name]), name
