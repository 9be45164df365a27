"""Logs larger than memory: preprocess, streaming training and evaluate at scale, peak RSS per process.

    python bench/bench_stream.py --rows 100000000 --workdir /tmp/big     # the issue-9 run (about 1 h on 2 cores)
    python bench/bench_stream.py --rows 2000000 --pair-steps 200 --epoch-steps 300   # a quick look

One run, each measurement in its own process, run alone on the machine:

1. `mtrec synth` writes the log (once per workdir); `mtrec preprocess` encodes it (rows/s, peak RSS;
   always timed, into a fresh folder; the first run's output is kept for the training runs).
2. Speed: per model, ``--repeats`` alternating pairs of ``--pair-steps`` training steps, the
   in-memory path (`--data-placement device`) on a subset of the train split that fits (``--subset``
   rows, every k-th row of the split) against `--data-placement stream` on the whole train split; same model, batch
   and flags; samples/s of the steps only (no validation). The ratio is the median of the pairs:
   on a shared 2-core VM one run's speed drifts by +-15%, so a single pair says little.
3. Memory: per model, one epoch of `mtrec train --data-placement stream` on the whole train split,
   validation of the whole valid split included (``--epoch-steps N`` stops the epoch after N steps;
   a bounded `--shuffle-buffer` epoch costs the same per step all along, so say so when quoting it).
4. `mtrec evaluate` on the whole test split.

Peak RSS is each child's own high-water mark (VmHWM, read by the child itself), never ru_maxrss.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import polars as pl  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from peers.common import machine, peak_rss_mib, uptime  # noqa: E402

LABELS = ["click", "like", "share"]


def worker(kind: str, args: list[str]) -> None:
    """Runs in a child process; prints one JSON line with its seconds and its own peak RSS."""
    started = time.perf_counter()
    result: dict = {}
    if kind == "preprocess":
        from mtrec.data.preprocess import preprocess

        summary = preprocess([args[0]], LABELS, args[1], user="user_id", item="item_id", time="ts")
        result["rows"] = sum(summary.rows.values())
    elif kind == "train":
        import mtrec.engine.loop as train_module
        from mtrec.core.config import TrainConfig

        cfg = TrainConfig(**json.loads(args[0]))
        steps = int(args[1])
        trainer = train_module.Trainer(cfg, force=True, quiet=True)
        if steps:
            _limit_steps(trainer, steps, validate=args[2] == "validate")
        trainer.run()
        lines = (Path(cfg.out) / "metrics.jsonl").read_text().splitlines() if trainer.state.history else []
        record = json.loads(lines[-1]) if lines else {"step": trainer.state.global_step,
                                                      "samples_per_second": trainer.samples_per_second}
        result.update(samples_per_second=record["samples_per_second"], steps=record["step"],
                      placement=trainer.placement)
    elif kind == "evaluate":
        from mtrec.serving.evaluate import evaluate_run

        out = evaluate_run(args[0], split="test", device="cpu", which="last")
        result.update(rows=out["metrics"]["mean"]["n"], auc=out["metrics"][out["target"]]["auc"])
    result.update(seconds=time.perf_counter() - started, peak_mib=peak_rss_mib())
    print(json.dumps(result), flush=True)


def _limit_steps(trainer, steps: int, validate: bool) -> None:
    """End the epoch after ``steps`` batches (the stepper stops being fed); then validate and save
    as at an epoch's end, or (``validate=False``) only keep the samples/s of the steps."""
    stepper_step = trainer.stepper.step
    count = {"n": 0}

    def step(*batch):
        count["n"] += 1
        if count["n"] > steps:
            raise StopIteration
        return stepper_step(*batch)

    trainer.stepper.step = step
    original = trainer._epoch

    def epoch(progress):
        try:
            original(progress)
        except StopIteration:
            trainer.samples_per_second = progress.samples_per_second
            if validate:
                trainer._end_epoch(progress.samples_per_second)
            else:
                trainer.state.finished = True

    trainer._epoch = epoch


def child(kind: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "_worker", kind, *args], capture_output=True, text=True,
                          check=False, env={**os.environ})
    if proc.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "_worker":
        worker(sys.argv[2], sys.argv[3:])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000_000)
    ap.add_argument("--subset", type=int, default=5_000_000, help="train rows of the in-memory baseline")
    ap.add_argument("--models", default="shared-bottom,mmoe")
    ap.add_argument("--batch-size", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3, help="alternating in-memory / stream pairs per model")
    ap.add_argument("--pair-steps", default="1500,600", help="steps per speed run, per model (comma list)")
    ap.add_argument("--epoch-steps", default="0,0", help="steps of the memory epoch, per model (0: the whole epoch)")
    ap.add_argument("--workdir", type=Path, help="keep the data here (default: a temporary directory)")
    args = ap.parse_args()
    models = args.models.split(",")
    per_model = lambda text: dict(zip(models, (text.split(",") * len(models))[:len(models)]))  # noqa: E731
    pair_steps, epoch_steps = per_model(args.pair_steps), per_model(args.epoch_steps)
    print(f"== streaming at scale: {args.rows:,} rows\nmachine: {machine()}\nuptime:  {uptime()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="mtrec-bench-stream-") as tmp:
        root = args.workdir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        from mtrec.data.synth import write_synthetic

        log = root / "log.parquet"
        if not log.exists():
            started = time.perf_counter()
            write_synthetic(log, rows=args.rows, seed=0)
            print(f"synth: {args.rows:,} rows in {time.perf_counter() - started:.0f} s", flush=True)
        data = root / "data"
        fresh = data if not (data / "schema.json").exists() else Path(tempfile.mkdtemp(dir=root)) / "data"
        r = child("preprocess", str(log), str(fresh))
        print(f"preprocess: {r['rows'] / r['seconds']:,.0f} rows/s ({r['seconds']:.0f} s), "
              f"peak RSS {r['peak_mib']:,.0f} MiB", flush=True)
        if fresh != data:
            shutil.rmtree(fresh.parent)  # the bench's own timing copy
        subset = root / "subset"
        if not (subset / "schema.json").exists():
            shutil.copytree(data, subset, ignore=shutil.ignore_patterns("train.parquet"))
            every = max(1, pq.ParquetFile(data / "train.parquet").metadata.num_rows // args.subset)
            pl.scan_parquet(data / "train.parquet").gather_every(every).head(args.subset).sink_parquet(
                subset / "train.parquet", row_group_size=131_072)  # spread over the split, not its first rows
        for model in models:
            base = dict(model=model, target="share", epochs=1, batch_size=args.batch_size, diagnostics_every=0,
                        checkpoint_every=0, device="cpu")
            ratios = []
            for _ in range(args.repeats):
                speed = {}
                for where, placement in ((subset, "device"), (data, "stream")):
                    cfg = dict(base, data=str(where), out=str(root / f"run-{model}-{placement}"),
                               data_placement=placement)
                    r = child("train", json.dumps(cfg), pair_steps[model], "no-validation")
                    speed[placement] = r["samples_per_second"]
                ratios.append(speed["stream"] / speed["device"])
                print(f"{model:14s} {pair_steps[model]} steps: in-memory subset {speed['device']:9,.0f}  "
                      f"stream {speed['stream']:9,.0f} samples/s  ratio {ratios[-1]:.2f}", flush=True)
            if ratios:
                print(f"{model:14s} streaming / in-memory samples/s, median of {len(ratios)} pairs: "
                      f"{statistics.median(ratios):.2f}", flush=True)
            cfg = dict(base, data=str(data), out=str(root / f"run-{model}-stream"), data_placement="stream")
            r = child("train", json.dumps(cfg), epoch_steps[model], "validate")
            print(f"{model:14s} stream epoch ({r['steps']:,} steps, then validation): {r['samples_per_second']:,.0f} "
                  f"samples/s, {r['seconds']:.0f} s, peak RSS {r['peak_mib']:,.0f} MiB", flush=True)
        r = child("evaluate", str(root / f"run-{models[0]}-stream"))
        print(f"evaluate: {r['rows']:,} test rows in {r['seconds']:.1f} s, peak RSS {r['peak_mib']:,.0f} MiB",
              flush=True)


if __name__ == "__main__":
    main()
