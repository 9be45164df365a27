"""Benchmark: mtrec.metrics.functional.gauc (vectorised torch) vs scikit-learn's roc_auc_score per user.

    python bench/bench_metrics.py                      # 10M predictions, 100k users, CPU
    python bench/bench_metrics.py --device cuda
    python bench/bench_metrics.py --rows 1000000 --users 10000 --hashed-ids

The scikit-learn baseline is the usual loop ``for user: roc_auc_score(y_u, s_u)`` weighted by the
user's impressions, single-class users skipped (the same convention as mtrec). Running it over
100k users takes minutes, so it is timed on a random subset of ``--sklearn-users`` users and
extrapolated linearly in the number of users (the per-call overhead dominates at ~100 rows per
user); grouping the rows by user for that loop is done beforehand and NOT timed (this favours
scikit-learn). The mtrec figure is the full computation from the raw ``[N]`` tensors, median of
``--repeats`` runs after one warm-up. Both values are also compared on the subset.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mtrec.metrics import functional as metrics  # noqa: E402


def make_data(rows: int, users: int, seed: int, hashed: bool):
    """Skewed user sizes (log-normal activity), per-user CTR ~ Beta(1, 9), float32 logits."""
    torch.manual_seed(seed)  # torch.distributions samples from the global generator
    gen = torch.Generator().manual_seed(seed)
    activity = torch.exp(torch.randn(users, generator=gen, dtype=torch.float64))
    user = torch.multinomial(activity, rows, replacement=True, generator=gen)
    ctr = torch.distributions.Beta(torch.tensor(1.0), torch.tensor(9.0)).sample((users,))
    labels = (torch.rand(rows, generator=gen) < ctr[user]).to(torch.float32)
    logits = (1.5 * labels + torch.randn(rows, generator=gen) - 2.0).to(torch.float32)
    ids = torch.randperm(users, generator=gen).to(torch.int64)
    if hashed:  # ids spread over the whole int64 range, like hashed string user ids
        ids = ids * -7046029254386353131
    return logits, labels, ids[user]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_mtrec(fn, device: str, repeats: int) -> tuple[float, list[float], float, float]:
    """(median wall s, wall s per run, value, median process CPU s: all threads, for contention)."""
    value = fn().item()  # warm-up (and CUDA init)
    sync(device)
    times, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        value = fn().item()  # .item() waits for the device
        sync(device)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(times), times, value, statistics.median(cpu)


def sklearn_gauc_subset(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray, n_users: int, seed: int):
    """(wall s of the loop, its CPU s, number of users looped, weighted AUC, row mask of the subset)."""
    from sklearn.metrics import roc_auc_score

    uniq = np.unique(groups)
    chosen = np.random.default_rng(seed).choice(uniq, size=min(n_users, len(uniq)), replace=False)
    mask = np.isin(groups, chosen)
    idx = np.flatnonzero(mask)
    idx = idx[np.argsort(groups[idx], kind="stable")]
    g_sorted = groups[idx]
    cuts = np.flatnonzero(g_sorted[1:] != g_sorted[:-1]) + 1
    per_user = [(labels[part], scores[part]) for part in np.split(idx, cuts)]  # grouping: not timed

    start, start_cpu = time.perf_counter(), time.process_time()
    num = den = 0.0
    for y, s in per_user:
        if y.min() == y.max():
            continue
        num += len(y) * roc_auc_score(y, s)
        den += len(y)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    return elapsed, cpu, len(per_user), num / den, mask


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--users", type=int, default=100_000)
    ap.add_argument("--sklearn-users", type=int, default=2_000, help="users in the timed scikit-learn subset")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hashed-ids", action="store_true", help="user ids spread over int64 (torch.unique path)")
    ap.add_argument("--ndcg", action="store_true", help="also time AUC and NDCG@10")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device available")

    logits, labels, users = make_data(args.rows, args.users, args.seed, args.hashed_ids)
    n_users = int(torch.unique(users).numel())
    dev = args.device
    s, y, g = logits.to(dev), labels.to(dev), users.to(dev)
    name = torch.cuda.get_device_name() if dev == "cuda" else f"{platform.processor() or platform.machine()}"
    print(f"data: {args.rows:,} predictions (float32 logits), {n_users:,} users "
          f"({'hashed int64' if args.hashed_ids else 'dense'} ids), positive rate {labels.mean().item():.3f}")
    print(f"device: {dev} ({name}); torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"{os.cpu_count()} cores; load average {os.getloadavg()[0]:.2f} at start")

    med, times, value, cpu = time_mtrec(lambda: metrics.gauc(s, y, g), dev, args.repeats)
    print(f"mtrec gauc:   {med:8.3f} s median of {args.repeats} "
          f"(runs {', '.join(f'{t:.3f}' for t in times)}; {cpu:.3f} CPU-s), GAUC = {value:.6f}")
    if dev == "cuda":
        print(f"              peak CUDA memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    if args.ndcg:
        for label, fn in (("auc", lambda: metrics.auc(s, y)), ("ndcg@10", lambda: metrics.ndcg_at_k(s, y, g, 10))):
            m, _, v, c = time_mtrec(fn, dev, args.repeats)
            print(f"mtrec {label:8s}{m:8.3f} s median ({c:.3f} CPU-s), value {v:.6f}")

    s_np, y_np, g_np = logits.numpy(), labels.numpy(), users.numpy()
    sk_time, sk_cpu, sk_users, sk_value, mask = sklearn_gauc_subset(s_np, y_np, g_np, args.sklearn_users, args.seed)
    sub = torch.from_numpy(mask)
    ours_sub = metrics.gauc(logits[sub], labels[sub], users[sub]).item()
    extrapolated = sk_time * n_users / sk_users
    print(f"sklearn loop: {sk_time:8.3f} s for {sk_users:,} random users "
          f"({sk_time / sk_users * 1e3:.3f} ms/user, {sk_cpu:.3f} CPU-s; grouping rows by user not timed)")
    print(f"              -> {extrapolated:8.1f} s extrapolated linearly to all {n_users:,} users")
    print(f"check on the subset: sklearn {sk_value:.9f}, mtrec {ours_sub:.9f}, |diff| {abs(sk_value - ours_sub):.1e}")
    print(f"ratio: mtrec gauc is {extrapolated / med:,.0f}x faster than the extrapolated per-user sklearn loop")
    print(f"load average {os.getloadavg()[0]:.2f} at the end (other processes skew wall times: compare CPU-s)")


if __name__ == "__main__":
    main()
