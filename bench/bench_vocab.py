"""What the embedding optimizer does to the step cost as the vocabulary grows, and to quality.

    python bench/bench_vocab.py                        # 1M and 20M-row logs, lazy-adam vs adam
    python bench/bench_vocab.py --rows 1000000,20000000 --optimizers lazy-adam,rowwise-adagrad,adam
    python bench/bench_vocab.py --quality              # Census and the synthetic funnel, per optimizer

Speed: shared-bottom + EW at batch 4096 (the issue's setting). Each log is written by
`mtrec synth` and encoded by `mtrec preprocess` (a 20M-row log has ~750k user and item ids),
before any timing; `--data-root DIR` keeps the encoded logs for later runs. Batches are drawn at
random from the train split as training does. Every (log, optimizer) pair is timed in each of
`--rounds` rounds, in turn, so that a change of load on a shared machine hits them all alike; the
median step gives samples/s. Prints, per optimizer, the ratio of the largest log's samples/s to
the smallest's (goal for lazy-adam: at least 0.8) and, per log, each optimizer's speed relative to
dense adam. Nothing else should run on the machine meanwhile.

Quality (--quality): MMoE + EW in the acceptance test's settings, once per optimizer: Census
(tests/e2e/test_census.py: 4 epochs, seed 0, test AUC of both tasks) and the synthetic funnel
(tests/e2e/test_synthetic_mtl.py: 100k rows, seed 7, target share, 2 epochs, batch 2048, seeds 1-3:
best validation and test AUC of share).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train import TASKS, prepare  # noqa: E402

from mtrec.core.config import TrainConfig  # noqa: E402
from mtrec.data.schema import Schema  # noqa: E402
from mtrec.data.tensors import load_split  # noqa: E402
from mtrec.engine.build import build_for, feature_names, make_optimizer  # noqa: E402
from mtrec.engine.loop import train  # noqa: E402
from mtrec.engine.step import Stepper  # noqa: E402
from mtrec.serving.evaluate import evaluate_run  # noqa: E402

CENSUS = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "census_income_kdd" / \
    "census_income_kdd_test.parquet"


TARGET_FIRST = ["share", "click", "like"]


class Runner:
    """Shared-bottom + EW with one embedding optimizer on one log; ``run(n)`` times n steps."""

    def __init__(self, data: Path, split, optimizer: str, batch: int):
        cfg = TrainConfig(data=str(data), model="shared-bottom", target="share", balancer="ew",
                          embedding_optimizer=optimizer, device="cpu")
        schema = Schema.load(data)
        torch.manual_seed(0)
        model, balancer = build_for(cfg, schema, TARGET_FIRST)
        device = torch.device("cpu")
        self.stepper = Stepper(model, balancer, make_optimizer(model, balancer, cfg, device),
                               balancer.default_scope, device, None)
        self.split, self.batch, self.times = split, batch, []
        self.table_rows = model.embedding.table.weight.shape[0]
        self.ids = sum(schema.feature(c).vocab_size for c in (schema.user, schema.item))
        self.generator = torch.Generator().manual_seed(0)

    def run(self, steps: int, timed: bool = True) -> None:
        for _ in range(steps):
            idx = torch.randint(0, len(self.split), (self.batch,), generator=self.generator)
            batch = self.split.codes[idx], self.split.numeric[idx], self.split.labels[idx]
            t0 = time.perf_counter()
            self.stepper.step(*batch)
            if timed:
                self.times.append(time.perf_counter() - t0)

    @property
    def samples_per_s(self) -> float:
        return self.batch / statistics.median(self.times)


def encoded_log(rows: int, root: Path) -> Path:
    """An encoded `mtrec synth` log of ``rows`` rows: made now, or reused from ``root/<rows>``."""
    workdir = root / str(rows)
    if not (workdir / "data" / "schema.json").exists():
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir(parents=True)
        _, rate = prepare(rows, 0, workdir)
        (workdir / "log.parquet").unlink()
        print(f"{rows:,}-row log: synth + preprocess done ({rate:,.0f} rows/s preprocess)", flush=True)
    return workdir / "data"


def speed(args) -> None:
    optimizers = args.optimizers.split(",")
    sizes = sorted(int(r) for r in args.rows.split(","))
    runners = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rows in sizes:
            data = encoded_log(rows, args.data_root or Path(tmp))
            categorical, numeric = feature_names(Schema.load(data))
            split = load_split(data, "train", categorical, numeric, TARGET_FIRST)  # in memory from here
            for name in optimizers:
                runners[rows, name] = Runner(data, split, name, args.batch)
    print(f"load average at the start: {os.getloadavg()[0]:.2f}", flush=True)
    for runner in runners.values():
        runner.run(args.warmup, timed=False)
    # Rounds that visit every (log, optimizer) in turn, so a change of load hits them all alike.
    for _ in range(args.rounds):
        for runner in runners.values():
            runner.run(args.steps)
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    print(f"shared-bottom + EW, batch {args.batch}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"median of {args.rounds} x {args.steps} steps")
    for rows in sizes:
        r = runners[rows, optimizers[0]]
        print(f"{rows:,}-row log: table {r.table_rows:,} rows ({r.ids:,} user + item ids)")
    small, large = sizes[0], sizes[-1]
    print(f"{'optimizer':16s} " + " ".join(f"{s:>14,}" for s in sizes) + f"   {large:,} / {small:,}")
    for name in optimizers:
        ratio = runners[large, name].samples_per_s / runners[small, name].samples_per_s
        print(f"{name:16s} " + " ".join(f"{runners[s, name].samples_per_s:14,.0f}" for s in sizes)
              + f"   x{ratio:.2f}")
    if "adam" in optimizers:
        for name in (n for n in optimizers if n != "adam"):
            print(f"{name} / adam: " + ", ".join(
                f"{s:,} rows x{runners[s, name].samples_per_s / runners[s, 'adam'].samples_per_s:.2f}"
                for s in sizes))


def best_valid(result: dict, task: str) -> float:
    return result["history"][result["best_epoch"] - 1]["valid"][task]["auc"]


def quality(args) -> None:
    from mtrec.data.preprocess import preprocess
    from mtrec.data.synth import write_synthetic

    optimizers = args.optimizers.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if CENSUS.exists():
            target, aux = "label_income_50k", "label_never_married"
            preprocess([str(CENSUS)], [target, aux], str(tmp / "census"), split="random", seed=0,
                       exclude=["row_id", "instance_weight", "split"])
            for name in optimizers:
                out = tmp / f"census-{name}"
                train(TrainConfig(data=str(tmp / "census"), out=str(out), model="mmoe", target=target, epochs=4,
                                  seed=0, embedding_optimizer=name, device="cpu"), quiet=True)
                m = evaluate_run(out, split="test", device="cpu")["metrics"]
                print(f"census  {name:16s} test AUC {target} {m[target]['auc']:.4f}  {aux} {m[aux]['auc']:.4f}",
                      flush=True)
        else:
            print(f"census skipped: {CENSUS} is absent")
        write_synthetic(tmp / "log.parquet", rows=100_000, seed=7)
        preprocess([str(tmp / "log.parquet")], TASKS, str(tmp / "synthetic"), user="user_id", item="item_id",
                   time="ts")
        for name in optimizers:
            valid, test = [], []
            for seed in (1, 2, 3):
                out = tmp / f"synthetic-{name}-{seed}"
                result = train(TrainConfig(data=str(tmp / "synthetic"), out=str(out), model="mmoe", target="share",
                                           epochs=2, batch_size=2048, seed=seed, patience=2, diagnostics_every=0,
                                           embedding_optimizer=name, device="cpu"), quiet=True)
                valid.append(best_valid(result, "share"))
                test.append(evaluate_run(out, split="test", device="cpu")["metrics"]["share"]["auc"])
            print(f"synthetic {name:16s} share AUC valid {statistics.mean(valid):.4f} ± {statistics.stdev(valid):.4f}"
                  f"  test {statistics.mean(test):.4f} ± {statistics.stdev(test):.4f}  (seeds 1-3)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1000000,20000000", help="comma list of synthetic log sizes")
    ap.add_argument("--optimizers", default="lazy-adam,adam", help="comma list of --embedding-optimizer values")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per round and configuration")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--data-root", type=Path, help="keep the encoded logs here and reuse them in later runs")
    ap.add_argument("--quality", action="store_true", help="measure quality instead of speed")
    args = ap.parse_args()
    quality(args) if args.quality else speed(args)


if __name__ == "__main__":
    main()
