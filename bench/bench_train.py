"""Training-step throughput: samples/s per architecture, balancer and scope, with ratios to EW.

    python bench/bench_train.py                       # CPU, 1M synthetic rows, every architecture, EW
    python bench/bench_train.py --balancers all       # every registered balancer x scope, ratio to EW
    python bench/bench_train.py --device cuda --rows 10000000 --batch-sizes 4096,16384
    python bench/bench_train.py --device cuda --fields 26 --models mmoe --compile --placements device,host,stream

After warm-up, ``--steps`` steps run back to back and are timed as a block (one synchronisation at
the end, as in training; the step keeps its own one host sync), so a figure is the steady-state
samples/s of the step on batches already sliced. ``--placements`` times the training loop's own
feed (engine.feed: index slices on the device, pinned host batches copied one ahead, or the Parquet
stream reader) with the same step. ``--compile`` also times the network's forward under
``torch.compile`` (compile time reported). The data is generated with `mtrec synth` (``--fields``
adds integer categorical columns up to that many feature fields) and encoded with `mtrec
preprocess` in the same run, or reused from ``--data``. Nothing else should run on the machine
while this does.
"""

from __future__ import annotations

import argparse
import json
import resource
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


SYNTH_FIELDS = 11  # the synthetic log's feature columns: user, item, 7 side features, 2 numeric


def prepare(rows: int, seed: int, workdir: Path, fields: int = SYNTH_FIELDS) -> tuple[Path, float]:
    """Synthesize and encode ``rows``; ``fields`` beyond the synthetic log's own are integer columns
    of 10 to 100,000 distinct values (a Criteo-like spread), drawn in one vectorised pass."""
    import numpy as np
    import polars as pl

    from mtrec.data.preprocess import preprocess
    from mtrec.data.synth import write_synthetic

    raw = workdir / "log.parquet"
    write_synthetic(raw, rows=rows, seed=seed)
    if fields > SYNTH_FIELDS:
        rng = np.random.default_rng(seed)
        extra = {f"c{i:02d}": rng.integers(0, 10 ** (1 + i % 5), rows, dtype=np.int32)
                 for i in range(fields - SYNTH_FIELDS)}
        pl.read_parquet(raw).with_columns(**{k: pl.Series(v) for k, v in extra.items()}).write_parquet(raw)
    started = time.perf_counter()
    preprocess([str(raw)], TASKS, str(workdir / "data"), user="user_id", item="item_id", time="ts")
    return workdir / "data", rows / (time.perf_counter() - started)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_block(step, batches: list, device, warmup: int) -> float:
    """Seconds per step of ``step(*batch)`` over ``batches[warmup:]``, run back to back."""
    for batch in batches[:warmup]:
        step(*batch)
    sync(device)
    started = time.perf_counter()
    for batch in batches[warmup:]:
        step(*batch)
    sync(device)
    return (time.perf_counter() - started) / max(len(batches) - warmup, 1)


def peak_mib(device) -> float:
    return (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def print_profile(step, batches: list, device, table: bool = True) -> dict:
    """Where a step's time goes: the profiler's top operators by host time, and the device's busy
    time against the wall time (a launch-bound step keeps the device idle)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    started = time.perf_counter()
    with profile(activities=activities) as prof:
        for batch in batches:
            step(*batch)
        sync(device)
    wall = (time.perf_counter() - started) / len(batches)
    events = prof.key_averages()
    busy = sum(e.self_device_time_total for e in events) / 1e6 / len(batches) if device.type == "cuda" else 0.0
    print(f"profile: {wall * 1e3:.2f} ms per step under the profiler, device busy {busy * 1e3:.2f} ms "
          f"({busy / wall:.0%}); {sum(e.count for e in events if e.device_type.name == 'CPU') / len(batches):.0f} "
          "host operator calls per step")
    if table:
        print(events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=48))
    return {"profiled_ms": wall * 1e3, "device_busy_ms": busy * 1e3}


def time_steps(data: Path, model: str, balancer: str, scope: str, batch: int, device, steps: int, warmup: int,
               opts: dict, compile: bool = False, profile: bool = False) -> dict:
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
    compile_s = None
    if compile:  # the network's forward only: the balancer's per-task gradients stay eager
        net.forward = torch.compile(net.forward, dynamic=False)
    stepper = Stepper(net, bal, opt, scope or bal.default_scope, device, autocast_dtype(cfg, device))
    n = len(split)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    batches = []
    for i in range(warmup + steps):
        start = (i * batch) % max(n - batch, 1)
        batches.append((split.codes[start:start + batch], split.numeric[start:start + batch],
                        split.labels[start:start + batch]))
    if compile:
        started = time.perf_counter()
        stepper.step(*batches[0])
        sync(device)
        compile_s = time.perf_counter() - started
    seconds = timed_block(stepper.step, batches, device, warmup)
    profiled = print_profile(stepper.step, batches[:warmup], device, table=balancer == "ew") if profile else {}
    return {**profiled, "model": model, "balancer": balancer, "scope": scope or bal.default_scope, "batch": batch,
            "compiled": compile, "compile_s": compile_s, "step_ms": seconds * 1e3, "samples_per_s": batch / seconds,
            "peak_mib": peak_mib(device)}


def time_placement(data: Path, model: str, batch: int, device, placement: str, steps: int, warmup: int) -> dict:
    """The training loop's own feed for ``placement`` and its step (EW), timed as a block."""
    from mtrec.engine.build import build_run
    from mtrec.engine.feed import epoch_batches, load_splits

    cfg = TrainConfig(data=str(data), out=str(data.parent / f"run-{placement}"), model=model, target="share",
                      batch_size=batch, device=device.type, data_placement=placement)
    run = build_run(cfg)
    train_split, _ = load_splits(run)
    stepper = run.stepper()
    feed = epoch_batches(run, train_split, epoch=0, start=0)
    batches = (b for _, b in zip(range(warmup + steps), feed))  # drawn as the steps run, as in training
    for _, b in zip(range(warmup), batches):
        stepper.step(*b)
    sync(device)
    started = time.perf_counter()
    done = 0
    for b in batches:
        stepper.step(*b)
        done += 1
    sync(device)
    seconds = (time.perf_counter() - started) / max(done, 1)
    return {"model": model, "placement": placement, "batch": batch, "steps": done, "step_ms": seconds * 1e3,
            "samples_per_s": batch / seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--fields", type=int, default=SYNTH_FIELDS, help="feature fields (extra integer columns)")
    ap.add_argument("--data", type=Path, help="encoded data to reuse, or where to keep the data this run makes")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-sizes", default="4096,16384")
    ap.add_argument("--models", default="single,shared-bottom,mmoe,ple")
    ap.add_argument("--balancers", default="ew", help="comma list, or 'all' for every registered balancer")
    ap.add_argument("--scopes", default="shared", help="comma list of shared,all,representation")
    ap.add_argument("--compile", action="store_true", help="also time EW with the forward under torch.compile")
    ap.add_argument("--placements", default="", help="also time the loop's feed: comma list of device,host,stream")
    ap.add_argument("--profile", action="store_true", help="where a step's time goes (torch.profiler)")
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
        if args.data and (args.data / "schema.json").exists():
            data, prep_rate = args.data, None
        else:
            workdir = args.data.parent if args.data else Path(tmp)
            data, prep_rate = prepare(args.rows, 0, workdir, args.fields)
            print(f"preprocess: {args.rows:,} rows, {args.fields} fields at {prep_rate:,.0f} rows/s", flush=True)
        rows, placed = [], []
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
                        r = time_steps(data, model, name, scope, batch, device, args.steps, args.warmup, {},
                                       profile=args.profile)
                        base = base or r["step_ms"]
                        r["ratio_to_ew"] = r["step_ms"] / base
                        r["scope"] = r["scope"] if kind == "grad" else "-"
                        rows.append(r)
                        print(f"{model:14s} {name:12s} {r['scope']:14s} batch {batch:6d}  {r['step_ms']:8.2f} ms  "
                              f"{r['samples_per_s']:12,.0f} samples/s  x{r['ratio_to_ew']:.2f} EW  "
                              f"peak {r['peak_mib']:.0f} MiB", flush=True)
                if args.compile:
                    r = time_steps(data, model, "ew", "", batch, device, args.steps, args.warmup, {}, compile=True)
                    r["ratio_to_ew"], r["scope"] = r["step_ms"] / base, "-"
                    rows.append(r)
                    print(f"{model:14s} ew compiled    -              batch {batch:6d}  {r['step_ms']:8.2f} ms  "
                          f"{r['samples_per_s']:12,.0f} samples/s  x{r['ratio_to_ew']:.2f} EW  "
                          f"(compile {r['compile_s']:.1f} s)", flush=True)
                for placement in filter(None, args.placements.split(",")):
                    r = time_placement(data, model, batch, device, placement, args.steps, args.warmup)
                    first = placed[0]["samples_per_s"] if placed and placed[0]["batch"] == batch else None
                    r["ratio_to_first"] = r["samples_per_s"] / first if first else 1.0
                    placed.append(r)
                    print(f"{model:14s} placement {placement:7s} batch {batch:6d}  {r['step_ms']:8.2f} ms  "
                          f"{r['samples_per_s']:12,.0f} samples/s  x{r['ratio_to_first']:.2f} of "
                          f"{args.placements.split(',')[0]}", flush=True)
    info = {"device": str(device), "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": args.rows,
            "fields": args.fields, "preprocess_rows_per_s": prep_rate, "results": rows, "placements": placed}
    if args.json:
        args.json.write_text(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
