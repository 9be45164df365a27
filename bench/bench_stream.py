"""Logs larger than memory: preprocess, streaming training and evaluate at scale, peak RSS per process.

    python bench/bench_stream.py --rows 100000000                 # the issue-9 run (hours on 2 cores)
    python bench/bench_stream.py --rows 10000000 --steps 3000     # a shorter run: the first 3,000 steps

One run: `mtrec synth` writes the log; `mtrec preprocess` encodes it (rows/s, peak RSS); then per
model, one epoch of `mtrec train --data-placement stream` on the whole train split against the
in-memory path (`--data-placement device`) on a subset of the train split that fits (the first
`--subset` rows, same model, batch and flags), each in its own process; last, `mtrec evaluate` on
the test split. `--steps N` stops each training after N steps (a bounded `--shuffle-buffer`
epoch costs the same per step all along, so the ratio holds; say so when quoting it). Peak RSS is
each child's own high-water mark (VmHWM, read by the child itself), never ru_maxrss. Run it alone
on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

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
        import mtrec.train as train_module
        from mtrec.config import TrainConfig

        cfg = TrainConfig(**json.loads(args[0]))
        steps = int(args[1])
        trainer = train_module.Trainer(cfg, force=True, quiet=True)
        if steps:
            _limit_steps(trainer, steps)
        trainer.run()
        record = json.loads((Path(cfg.out) / "metrics.jsonl").read_text().splitlines()[-1])
        result.update(samples_per_second=record["samples_per_second"], steps=record["step"],
                      placement=trainer.placement)
    elif kind == "evaluate":
        from mtrec.evaluate import evaluate_run

        out = evaluate_run(args[0], split="test", device="cpu", which="last")
        result.update(rows=out["metrics"]["mean"]["n"], auc=out["metrics"][out["target"]]["auc"])
    result.update(seconds=time.perf_counter() - started, peak_mib=peak_rss_mib())
    print(json.dumps(result), flush=True)


def _limit_steps(trainer, steps: int) -> None:
    """End the epoch after ``steps`` batches (the stepper stops being fed; validation still runs)."""
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
            trainer._end_epoch(progress.samples_per_second)

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
    ap.add_argument("--steps", type=int, default=0, help="steps per training (0: one full epoch)")
    ap.add_argument("--workdir", type=Path, help="keep the data here (default: a temporary directory)")
    args = ap.parse_args()
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
        if not (data / "schema.json").exists():
            r = child("preprocess", str(log), str(data))
            print(f"preprocess: {r['rows'] / r['seconds']:,.0f} rows/s ({r['seconds']:.0f} s), "
                  f"peak RSS {r['peak_mib']:,.0f} MiB", flush=True)
        subset = root / "subset"
        if not (subset / "schema.json").exists():
            import polars as pl
            import shutil

            shutil.copytree(data, subset, ignore=shutil.ignore_patterns("train.parquet"))
            pl.scan_parquet(data / "train.parquet").head(args.subset).sink_parquet(subset / "train.parquet")
        for model in args.models.split(","):
            base = dict(model=model, target="share", epochs=1, batch_size=args.batch_size, diagnostics_every=0,
                        checkpoint_every=0, device="cpu")
            rows = {}
            for name, where, placement in (("in-memory subset", subset, "device"), ("stream, full split", data,
                                                                                    "stream")):
                cfg = dict(base, data=str(where), out=str(root / f"run-{model}-{placement}"), data_placement=placement)
                rows[name] = r = child("train", json.dumps(cfg), str(args.steps))
                print(f"{model:14s} {name:20s} {r['samples_per_second']:10,.0f} samples/s  {r['steps']:,} steps  "
                      f"peak RSS {r['peak_mib']:,.0f} MiB", flush=True)
            ratio = rows["stream, full split"]["samples_per_second"] / rows["in-memory subset"]["samples_per_second"]
            print(f"{model:14s} streaming / in-memory samples/s: {ratio:.2f}", flush=True)
        r = child("evaluate", str(root / f"run-{args.models.split(',')[0]}-stream"))
        print(f"evaluate: {r['rows']:,} test rows in {r['seconds']:.1f} s, peak RSS {r['peak_mib']:,.0f} MiB",
              flush=True)


if __name__ == "__main__":
    main()
