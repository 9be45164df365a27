"""Where `mtrec preprocess` spends its time and memory: seconds and peak RSS of each pass.

    python bench/bench_preprocess.py LOG [LOG ...]            # e.g. a `mtrec synth` log
    python bench/bench_preprocess.py /tmp/big/log.parquet --out /tmp/pp/data

Each log is preprocessed (time split, user / item known, labels click, like, share) in a fresh
interpreter. The passes are the stages `preprocess` announces (`on_stage`): label check, split
cuts, fit, encode + sink, measure. The peak of a pass is the process's VmHWM, reset at the start
of the pass (`/proc/self/clear_refs`, Linux), so memory that the allocator kept from an earlier
pass counts in the next one. Run it alone on the machine (e.g. under `flock /tmp/mtrec-cpu.lock`).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from peers.common import uptime  # noqa: E402

LABELS = ["click", "like", "share"]


def _hwm_mib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1]) >> 10
    return 0


def worker(raw: str, out: str) -> None:
    from mtrec.data.preprocess import preprocess

    passes: list[list] = [["setup", time.perf_counter(), 0]]

    def stage(text: str) -> None:
        passes[-1][2] = _hwm_mib()
        Path("/proc/self/clear_refs").write_text("5")
        passes.append([text, time.perf_counter(), 0])

    started = time.perf_counter()
    summary = preprocess([raw], LABELS, out, user="user_id", item="item_id", time="ts", force=True, on_stage=stage)
    ended = time.perf_counter()
    passes[-1][2] = _hwm_mib()
    ends = [p[1] for p in passes[1:]] + [ended]
    print(json.dumps({"rows": sum(summary.rows.values()), "seconds": ended - started,
                      "passes": [(name, end - start, peak) for (name, start, peak), end in zip(passes, ends)]}))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        worker(sys.argv[2], sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logs", nargs="+")
    parser.add_argument("--out", type=Path, help="the encoded output (default: a temporary directory)")
    args = parser.parse_args()
    print(f"uptime: {uptime()}")
    with tempfile.TemporaryDirectory(prefix="mtrec-bench-pp-") as tmp:
        out = args.out or Path(tmp) / "data"
        for log in args.logs:
            proc = subprocess.run([sys.executable, __file__, "_worker", log, str(out)], capture_output=True, text=True,
                                  check=False)
            if proc.returncode != 0:
                raise SystemExit(f"preprocess failed: {proc.stderr.strip().splitlines()[-1:]}")
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"== {log}: {result['rows']:,} rows, {result['seconds']:.2f} s, "
                  f"{result['rows'] / result['seconds']:,.0f} rows/s, peak {max(p[2] for p in result['passes']):,} MiB")
            for name, seconds, peak in result["passes"]:
                print(f"  {name:<56} {seconds:7.2f} s  peak {peak:6,} MiB")


if __name__ == "__main__":
    main()
