"""Target-task quality per balancer on the synthetic log, over several seeds (mean ± std).

    python bench/quality_synthetic.py --rows 200000 --balancers ew,metabalance --seeds 1,2,3

The rare task (`share`) is the target; `click` and `like` are the denser auxiliary tasks that
share most of its signal. Reports the target's best validation AUC (model selection on valid)
and its test AUC. Runs one training at a time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mtrec.core.config import TrainConfig  # noqa: E402
from mtrec.engine.loop import train  # noqa: E402
from mtrec.serving.evaluate import evaluate_run  # noqa: E402


def run_grid(data: Path, workdir: Path, model: str, balancers: list[str], seeds: list[int], epochs: int,
             batch_size: int, target: str, opts: dict[str, dict]) -> dict[str, list[tuple[float, float]]]:
    results: dict[str, list[tuple[float, float]]] = {}
    for name in balancers:
        for seed in seeds:
            out = workdir / f"{name}-{seed}"
            cfg = TrainConfig(data=str(data), out=str(out), model=model, target=target, balancer=name,
                              balancer_opts=opts.get(name, {}), epochs=epochs, batch_size=batch_size, seed=seed,
                              diagnostics_every=0, patience=epochs)
            result = train(cfg, force=True, quiet=True)
            test = evaluate_run(out, split="test", device=cfg.device)["metrics"][target]["auc"]
            valid = result["best_score"]  # cfg.select is auc: the best epoch's target validation AUC
            results.setdefault(name, []).append((valid, test))
            print(f"{name:12s} seed {seed}: valid AUC {valid:.4f}  test AUC {test:.4f}", flush=True)
    return results


def summary(results) -> list[str]:
    lines = ["| balancer | valid AUC (mean ± std) | test AUC (mean ± std) |", "|---|---|---|"]
    for name, rows in results.items():
        valid, test = [r[0] for r in rows], [r[1] for r in rows]
        sd = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0  # noqa: E731
        lines.append(f"| {name} | {statistics.mean(valid):.4f} ± {sd(valid):.4f} | "
                     f"{statistics.mean(test):.4f} ± {sd(test):.4f} |")
    return lines


def main() -> None:
    from mtrec.data.preprocess import preprocess
    from mtrec.data.synth import write_synthetic

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--data-seed", type=int, default=7)
    ap.add_argument("--model", default="mmoe")
    ap.add_argument("--balancers", default="ew,metabalance")
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=2048)
    ap.add_argument("--target", default="share")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_synthetic(tmp / "log.parquet", rows=args.rows, seed=args.data_seed)
        preprocess([str(tmp / "log.parquet")], ["click", "like", "share"], str(tmp / "data"), user="user_id",
                   item="item_id", time="ts")
        results = run_grid(tmp / "data", tmp, args.model, args.balancers.split(","),
                           [int(s) for s in args.seeds.split(",")], args.epochs, args.batch_size, args.target, {})
    print("\n".join(summary(results)))


if __name__ == "__main__":
    main()
