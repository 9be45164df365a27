"""Training-step throughput: samples/s per architecture, balancer and scope, with ratios to EW.

    python bench/bench_train.py                       # CPU, 1M synthetic rows, every architecture, EW
    python bench/bench_train.py --balancers all       # every registered balancer x scope, ratio to EW
    python bench/bench_train.py --device cuda --rows 10000000 --batch-sizes 4096,16384

Steps are timed one by one (CUDA-synchronised), after warm-up; the median is reported. The data is
generated with `mtrec synth` and encoded with `mtrec preprocess` in the same run (preprocessing
rows/s is printed too). Nothing else should run on the machine while this does.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mtrec import balancers  # noqa: E402
from mtrec.core.config import TrainConfig  # noqa: E402
from mtrec.data.schema import Schema  # noqa: E402
from mtrec.data.tensors import load_split  # noqa: E402
from mtrec.engine.build import autocast_dtype, build_for, feature_names, make_optimizer  # noqa: E402
from mtrec.engine.step import Stepper  # noqa: E402

TASKS = ["click", "like", "share"]


def prepare(rows: int, seed: int, workdir: Path) -> tuple[Path, float]:
    from mtrec.data.preprocess import preprocess
    from mtrec.data.synth import write_synthetic

    raw = workdir / "log.parquet"
    write_synthetic(raw, rows=rows, seed=seed)
    started = time.perf_counter()
    preprocess([str(raw)], TASKS, str(workdir / "data"), user="user_id", item="item_id", time="ts")
    return workdir / "data", rows / (time.perf_counter() - started)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(data: Path, model: str, balancer: str, scope: str, batch: int, device, steps: int, warmup: int,
               opts: dict) -> dict:
    cfg = TrainConfig(data=str(data), model=model, target="share", balancer=balancer, scope=scope,
                      balancer_opts=opts, device=device.type)
    schema = Schema.load(data)
    tasks = ["share", "click", "like"]
    categorical, numeric = feature_names(schema)
    split = load_split(data, "train", categorical, numeric, tasks).to(device)
    torch.manual_seed(0)
    net, bal = build_for(cfg, schema, tasks)
    net.to(device)
    bal.to(device)
    opt = make_optimizer(net, bal, cfg, device)
    stepper = Stepper(net, bal, opt, scope or bal.default_scope, device, autocast_dtype(cfg, device))
    n = len(split)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        start = (i * batch) % max(n - batch, 1)
        idx = torch.arange(start, start + batch, device=device)
        codes, num, labels = split.codes[idx], split.numeric[idx], split.labels[idx]
        sync(device)
        t0 = time.perf_counter()
        stepper.step(codes, num, labels)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"model": model, "balancer": balancer, "scope": scope or bal.default_scope, "batch": batch,
            "step_ms": median * 1e3, "samples_per_s": batch / median, "peak_mib": peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-sizes", default="4096,16384")
    ap.add_argument("--models", default="single,shared-bottom,mmoe,ple")
    ap.add_argument("--balancers", default="ew", help="comma list, or 'all' for every registered balancer")
    ap.add_argument("--scopes", default="shared", help="comma list of shared,all,representation")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    names = balancers.names() if args.balancers == "all" else args.balancers.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        data, prep_rate = prepare(args.rows, 0, Path(tmp))
        print(f"preprocess: {args.rows:,} rows at {prep_rate:,.0f} rows/s")
        rows = []
        for model in args.models.split(","):
            for batch in (int(b) for b in args.batch_sizes.split(",")):
                base = None
                for name in ["ew"] + [b for b in names if b != "ew"]:
                    probe = balancers.build(name, num_tasks=3)
                    kind = probe.kind
                    if model == "single" and kind == "grad":
                        continue
                    scopes = [s for s in args.scopes.split(",") if s in probe.scopes] if kind == "grad" else [""]
                    for scope in scopes:
                        r = time_steps(data, model, name, scope, batch, device, args.steps, args.warmup, {})
                        base = base or r["step_ms"]
                        r["ratio_to_ew"] = r["step_ms"] / base
                        r["scope"] = r["scope"] if kind == "grad" else "-"
                        rows.append(r)
                        print(f"{model:14s} {name:12s} {r['scope']:14s} batch {batch:6d}  {r['step_ms']:8.2f} ms  "
                              f"{r['samples_per_s']:12,.0f} samples/s  x{r['ratio_to_ew']:.2f} EW  "
                              f"peak {r['peak_mib']:.0f} MiB", flush=True)
    info = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "rows": args.rows, "preprocess_rows_per_s": prep_rate, "results": rows}
    if args.json:
        args.json.write_text(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
