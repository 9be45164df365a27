"""Shared helpers: machine line, timing, subprocess runs with peak memory, table printing."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return f"load average {os.getloadavg()}"


def machine() -> str:
    import torch

    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), python {platform.python_version()}")


def header(title: str) -> None:
    print(f"== {title}")
    print(f"machine: {machine()}")
    print(f"uptime:  {uptime()}")


def peak_rss_mib() -> float:
    """Peak resident set size of this process image, MiB.

    ``VmHWM`` from /proc (the high-water mark of this address space). ``ru_maxrss`` is not used on
    Linux: across ``execve`` it keeps the parent's high-water mark (the benchmark driver's, which has
    read the data), so every worker would report at least the driver's peak.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def median_time(fn, reps: int, warmup: int = 1) -> tuple[float, int]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), reps


def adaptive_reps(fn, budget_s: float, lo: int, hi: int) -> tuple[float, int]:
    """Median over a number of repetitions chosen from one warm-up call so the total stays near budget_s."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    reps = int(max(lo, min(hi, budget_s / max(first, 1e-6))))
    return median_time(fn, reps, warmup=0)


def run_worker(args: list[str], timeout: float = 1800) -> dict:
    """Run ``compare_peers.py _worker ...`` in a fresh interpreter; its last stdout line is JSON."""
    cmd = [sys.executable, str(ROOT / "bench" / "compare_peers.py"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        return {"error": " | ".join(tail) or f"exit {proc.returncode}"}
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]) if lines else {"error": "no result line"}


def emit(result: dict) -> None:
    """Worker side: print the result JSON as the last line (peak RSS added)."""
    result.setdefault("peak_rss_mib", peak_rss_mib())
    print(json.dumps(result), flush=True)


def table(columns: list[str], rows: list[list]) -> str:
    cells = [[str(c) for c in columns]] + [[fmt(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    line = lambda r: "| " + " | ".join(v.ljust(w) for v, w in zip(r, widths)) + " |"  # noqa: E731
    out = [line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in cells[1:]]
    return "\n".join(out)


def fmt(v) -> str:
    if isinstance(v, float):
        if v != v:
            return "nan"
        a = abs(v)
        if a == 0:
            return "0"
        if a >= 1000:
            return f"{v:,.0f}"
        if a >= 10:
            return f"{v:.1f}"
        if a >= 0.01:
            return f"{v:.3f}"
        return f"{v:.2e}"
    return str(v)
