"""Step cost of the balance scope and groups (docs/balancers.md, "Groups"): one stepper per setting,
stepped in turn on the same batches (A, B, C, A, B, C ...), so that load from other work on a shared
machine falls on every setting alike; medians after warm-up, ratios to EW (and, for an option of a
method, to the method's default). The last step is a diagnostics step, not timed: it prints how
far each setting moved the update from the plain sum of the task gradients.

    python bench/bench_balance_scope.py                      # MMoE, 200k synthetic rows, batch 4096, CPU
    python bench/bench_balance_scope.py --steps 20 --threads 1
    python bench/bench_balance_scope.py --set cograd --threads 1   # CoGrad's default vs hessian=hvp vs EW
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

# (balancer, scope, groups, balancer options); the first of each set is the baseline of the ratios.
SETS = {
    "scope": [("ew", "shared", "tensor", {}),
              ("metabalance", "shared", "tensor", {}), ("metabalance", "all", "tensor", {}),
              ("metabalance", "all", "part", {}), ("gradcraft", "shared", "tensor", {}),
              ("gradcraft", "all", "tensor", {})],
    # CoGrad's default (diag-rms) against its exact form (a second forward, T backward passes with
    # create_graph and one double backward), in both scopes the exact form supports.
    "cograd": [("ew", "shared", "tensor", {}),
               ("cograd", "shared", "tensor", {}), ("cograd", "shared", "tensor", {"hessian": "hvp"}),
               ("cograd", "all", "tensor", {}), ("cograd", "all", "tensor", {"hessian": "hvp"})],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--model", default="mmoe")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--set", choices=sorted(SETS), default="scope", help="which settings to time")
    args = ap.parse_args()
    settings = SETS[args.set]
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
        for name, scope, groups, options in settings:
            cfg = TrainConfig(data=str(data), model=args.model, target=tasks[0], balancer=name, scope=scope,
                              device=device.type, balancer_opts=options)
            torch.manual_seed(0)
            net, balancer = build_for(cfg, schema, tasks)
            net.to(device)
            balancer.to(device)
            steppers.append(Stepper(net, balancer, make_optimizer(net, balancer, cfg, device), scope, device,
                                    autocast_dtype(cfg, device), groups=groups))
        times: list[list[float]] = [[] for _ in settings]
        changes: list[list[float]] = [[] for _ in settings]
        span = max(len(split) - args.batch, 1)
        for i in range(args.warmup + args.steps):
            start = (i * args.batch) % span
            idx = torch.arange(start, start + args.batch, device=device)
            batch = (split.codes[idx], split.numeric[idx], split.labels[idx])
            last = i == args.warmup + args.steps - 1
            for k, stepper in enumerate(steppers):
                sync(device)
                t0 = time.perf_counter()
                stepper.step(*batch, diagnose=last)  # the diagnostics (update change) on the last step only
                sync(device)
                if i >= args.warmup and not last:
                    times[k].append(time.perf_counter() - t0)
                if last and stepper.diagnostics is not None:
                    changes[k] = stepper.diagnostics["update_change"].tolist()
    base = statistics.median(times[0])
    plain = {}  # per scope, the median of the setting without options (the method's default form)
    for (name, scope, groups, options), t in zip(settings, times):
        median = statistics.median(t)
        form = ",".join(f"{k}={v}" for k, v in options.items()) or "default"
        versus = ""
        if options and (name, scope) in plain:
            versus = f"  x{median / plain[name, scope]:.2f} {name} default"
        elif not options:
            plain[name, scope] = median
        print(f"{args.model:8s} {name:12s} {scope:7s} {groups:7s} {form:12s} {median * 1e3:8.1f} ms  "
              f"x{median / base:.2f} EW{versus}")
    # How far each setting moved the update from the plain sum on the last batch, per shared tensor.
    for (name, scope, groups, options), change in zip(settings, changes):
        form = ",".join(f"{k}={v}" for k, v in options.items()) or "default"
        if change:
            print(f"update change {name} {scope} {groups} {form}: min {min(change):.2e} median "
                  f"{statistics.median(change):.2e} max {max(change):.2e} over {len(change)} shared tensors")


if __name__ == "__main__":
    main()
