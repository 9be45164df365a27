"""What a behaviour-sequence column costs `mtrec preprocess`: rows/s and peak memory, flat vs history.

    python bench/bench_preprocess_sequences.py                       # 1M rows, history 50
    python bench/bench_preprocess_sequences.py --rows 10000000 --history 50 --reps 2

Writes two `mtrec synth` logs of the same rows and seed, one without history and one with
`--history N` (adds `hist_items`, up to N item ids, and `tags`, 0-5 tags), then runs
`preprocess` (time split, user / item known) in a fresh interpreter per run, so each peak is that
process's own high-water mark (`VmHWM`). Three configurations, in one run:

- `flat`: the log without history (11 features);
- `history`: the history log, both lists inferred as sequences with their own vocabularies
  (max_len 50);
- `history, shared`: the same with `hist_items` sharing `item_id`'s vocabulary (`share_with`).

rows/s = input rows / wall time of the whole job (read, split, fit, encode, write); the median over
`--reps` runs. Run it alone on the machine (e.g. under `flock /tmp/mtrec-cpu.lock`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from peers.common import peak_rss_mib, uptime  # noqa: E402

LABELS = ["click", "like", "share"]
SHARED_SPEC = '[features.hist_items]\nshare_with = "item_id"\n'


def worker(raw: str, out: str, spec: str | None) -> None:
    from mtrec.data.preprocess import preprocess

    start = time.perf_counter()
    summary = preprocess([raw], LABELS, out, user="user_id", item="item_id", time="ts", spec=spec, force=True)
    seconds = time.perf_counter() - start
    size = sum(p.stat().st_size for p in Path(out).rglob("*.parquet"))
    print(json.dumps({"seconds": seconds, "rows": sum(summary.rows.values()), "peak_mib": peak_rss_mib(),
                      "out_mib": size / 2**20, "features": len(summary.schema.features)}))


def run(raw: Path, out: Path, spec: Path | None) -> dict:
    cmd = [sys.executable, __file__, "_worker", str(raw), str(out), str(spec) if spec else ""]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    if proc.returncode != 0:
        raise SystemExit(f"preprocess failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        worker(sys.argv[2], sys.argv[3], sys.argv[4] or None)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--history", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reps", type=int, default=1)
    args = parser.parse_args()

    from mtrec.data.synth import write_synthetic

    print(f"== preprocess with and without a {args.history}-element history, {args.rows:,} rows")
    print(f"machine: {os.cpu_count()} cores; uptime: {uptime()}")
    with tempfile.TemporaryDirectory(prefix="mtrec-bench-seq-") as tmp:
        root = Path(tmp)
        logs = {}
        for name, history in (("flat", 0), ("history", args.history)):
            start = time.perf_counter()
            logs[name] = write_synthetic(root / f"{name}.parquet", rows=args.rows, seed=args.seed, history=history)
            print(f"synth {name}: {time.perf_counter() - start:.1f} s, "
                  f"{logs[name].stat().st_size / 2**20:.0f} MiB on disk")
        spec = root / "shared.toml"
        spec.write_text(SHARED_SPEC)
        configs = [("flat", logs["flat"], None), ("history", logs["history"], None),
                   ("history, shared", logs["history"], spec)]
        print(f"{'config':<17} {'features':>8} {'seconds':>8} {'rows/s':>11} {'peak MiB':>9} {'output MiB':>10}")
        for name, raw, config_spec in configs:
            results = [run(raw, root / "out", config_spec) for _ in range(args.reps)]
            seconds = statistics.median(r["seconds"] for r in results)
            peak = max(r["peak_mib"] for r in results)
            first = results[0]
            print(f"{name:<17} {first['features']:>8} {seconds:>8.2f} {first['rows'] / seconds:>11,.0f} "
                  f"{peak:>9.0f} {first['out_mib']:>10.0f}")


if __name__ == "__main__":
    main()
