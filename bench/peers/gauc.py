"""GAUC over 10M predictions and 100k users: mtrec.metrics.functional.gauc vs a scikit-learn per-user loop
and FuxiCTR's gAUC (``fuxictr.metrics.evaluate_metrics(..., ["gAUC"], group_id=...)``).

The two peers need minutes to hours on all users, so each is timed on a random subset of users and
extrapolated linearly in the number of users (their cost is per-user calls). For the sklearn loop,
grouping the rows by user is done before the clock starts (favours sklearn). FuxiCTR is timed as
called, from the flat arrays (it partitions by group itself and sends each group to a
multiprocessing pool of ``cpu_count() // 2`` workers). mtrec is timed on everything, from the raw
``[N]`` tensors; median of 3 after a warm-up. All three values are compared on the subset.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from mtrec.metrics import functional as metrics

from bench_metrics import make_data as _bench_metrics_data  # bench/ is on sys.path (compare_peers.py)
from bench_metrics import sklearn_gauc_subset

from .common import header, table


def make_data(rows: int, users: int, seed: int):
    """The data of bench/bench_metrics.py (dense user ids), so both benchmarks score the same rows."""
    return _bench_metrics_data(rows, users, seed, hashed=False)


def subset(groups: np.ndarray, n_users: int, seed: int) -> np.ndarray:
    uniq = np.unique(groups)
    chosen = np.random.default_rng(seed).choice(uniq, size=min(n_users, len(uniq)), replace=False)
    return np.isin(groups, chosen)


def fuxictr_gauc(scores, labels, groups) -> tuple[float, float]:
    from fuxictr.metrics import evaluate_metrics

    prob = 1 / (1 + np.exp(-scores.astype(np.float64)))
    start = time.perf_counter()
    value = evaluate_metrics(labels, prob, ["gAUC"], group_id=groups)["gAUC"]
    return time.perf_counter() - start, float(value)


def run(quick: bool) -> None:
    header("GAUC: mtrec vs scikit-learn per-user loop vs FuxiCTR gAUC")
    rows, users = (1_000_000, 10_000) if quick else (10_000_000, 100_000)
    sub_users = 500 if quick else 2_000
    s, y, g = make_data(rows, users, seed=0)
    n_users = int(torch.unique(g).numel())
    print(f"data: {rows:,} predictions, {n_users:,} users, positive rate {y.mean().item():.3f}")
    value = metrics.gauc(s, y, g).item()  # warm-up
    times = []
    for _ in range(3):
        start = time.perf_counter()
        value = metrics.gauc(s, y, g).item()
        times.append(time.perf_counter() - start)
    t_ours = statistics.median(times)

    s_np, y_np, g_np = s.numpy(), y.numpy(), g.numpy()
    t_sk, _, _, v_sk, mask = sklearn_gauc_subset(s_np, y_np, g_np, sub_users, seed=0)
    ours_sub = metrics.gauc(s[torch.from_numpy(mask)], y[torch.from_numpy(mask)], g[torch.from_numpy(mask)]).item()
    out = [["mtrec metrics.gauc", f"all {n_users:,}", t_ours, t_ours, 1.0, value, ""]]
    ext_sk = t_sk * n_users / sub_users
    out.append(["sklearn roc_auc_score per user", f"{sub_users:,} (extrapolated)", t_sk, ext_sk, ext_sk / t_ours,
                v_sk, f"{abs(v_sk - ours_sub):.1e}"])
    try:
        fux_users = sub_users
        fmask = subset(g_np, fux_users, seed=1)
        fours = metrics.gauc(s[torch.from_numpy(fmask)], y[torch.from_numpy(fmask)], g[torch.from_numpy(fmask)]).item()
        t_fx, v_fx = fuxictr_gauc(s_np[fmask], y_np[fmask], g_np[fmask])
        ext_fx = t_fx * n_users / fux_users
        out.append(["FuxiCTR evaluate_metrics gAUC", f"{fux_users:,} (extrapolated)", t_fx, ext_fx, ext_fx / t_ours,
                    v_fx, f"{abs(v_fx - fours):.1e}"])
    except Exception as err:  # noqa: BLE001
        out.append(["FuxiCTR gAUC", "fails", f"{type(err).__name__}: {err}"[:80], "", "", "", ""])
    print(table(["implementation", "users timed", "measured s", "s for all users", "x mtrec time", "GAUC (users timed)",
                 "|diff| vs mtrec on same users"], out))
    print(f"mtrec runs: {', '.join(f'{t:.3f}' for t in times)} s (median {t_ours:.3f} s)")
