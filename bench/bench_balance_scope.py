"""Step cost of the balance scope and groups (docs/balancers.md, "Groups"): one stepper per setting,
stepped in turn on the same batches (A, B, C, A, B, C ...), so that load from other work on a shared
machine falls on every setting alike; medians after warm-up, ratios to EW.

    python bench/bench_balance_scope.py                      # MMoE, 200k synthetic rows, batch 4096, CPU
    python bench/bench_balance_scope.py --steps 20 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train import TASKS, prepare, sync  # noqa: E402

from mtrec.core.config import TrainConfig  # noqa: E402
from mtrec.data.schema import Schema  # noqa: E402
from mtrec.data.tensors import load_split  # noqa: E402
from mtrec.engine.build import autocast_dtype, build_for, feature_names, make_optimizer  # noqa: E402
from mtrec.engine.step import Stepper  # noqa: E402

SETTINGS = [("ew", "shared", "tensor"),
            ("metabalance", "shared", "tensor"), ("metabalance", "all", "tensor"), ("metabalance", "all", "part"),
            ("gradcraft", "shared", "tensor"), ("gradcraft", "all", "tensor")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--model", default="mmoe")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    tasks = [TASKS[2], TASKS[0], TASKS[1]]  # share (the target), click, like
    with tempfile.TemporaryDirectory() as tmp:
        data, _ = prepare(args.rows, 0, Path(tmp))
        schema = Schema.load(data)
        categorical, numeric = feature_names(schema)
        split = load_split(data, "train", categorical, numeric, tasks).to(device)
        steppers = []
        for name, scope, groups in SETTINGS:
            cfg = TrainConfig(data=str(data), model=args.model, target=tasks[0], balancer=name, scope=scope,
                              device=device.type)
            torch.manual_seed(0)
            net, balancer = build_for(cfg, schema, tasks)
            net.to(device)
            balancer.to(device)
            steppers.append(Stepper(net, balancer, make_optimizer(net, balancer, cfg, device), scope, device,
                                    autocast_dtype(cfg, device), groups=groups))
        times: list[list[float]] = [[] for _ in SETTINGS]
        span = max(len(split) - args.batch, 1)
        for i in range(args.warmup + args.steps):
            start = (i * args.batch) % span
            idx = torch.arange(start, start + args.batch, device=device)
            batch = (split.codes[idx], split.numeric[idx], split.labels[idx])
            for k, stepper in enumerate(steppers):
                sync(device)
                t0 = time.perf_counter()
                stepper.step(*batch)
                sync(device)
                if i >= args.warmup:
                    times[k].append(time.perf_counter() - t0)
    base = statistics.median(times[0])
    for (name, scope, groups), t in zip(SETTINGS, times):
        median = statistics.median(t)
        print(f"{args.model:8s} {name:12s} {scope:7s} {groups:7s} {median * 1e3:8.1f} ms  x{median / base:.2f} EW")


if __name__ == "__main__":
    main()
