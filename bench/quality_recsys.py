"""Quality of the issue-8 features on synthetic logs, over seeds (test AUC, mean ± std):

    python bench/quality_recsys.py esmm --rows 200000 --seeds 0,1,2
    python bench/quality_recsys.py history --rows 200000 --seeds 0,1,2

- ``esmm``: ESMM (``--condition share:click``) against the same network (one tower per task over
  shared embeddings) trained with a plain, unconditional ``share`` task, on all impressions: ESMM's
  pCTCVR AUC vs the plain task's AUC (``share`` implies a click in this log, so both rank the same
  label ``click AND share``).
- ``history``: ``mtrec synth --history 20`` log, MMoE with the behaviour sequence (DIN attention on
  the item id, tags mean-pooled) vs the same model with both sequence columns excluded.
One training at a time; run it alone on the machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mtrec.engine.build  # noqa: E402
import mtrec.engine.loop  # noqa: E402
import mtrec.serving.evaluate  # noqa: E402
from mtrec.core.config import TrainConfig  # noqa: E402
from mtrec.data.preprocess import preprocess  # noqa: E402
from mtrec.data.synth import write_synthetic  # noqa: E402
from mtrec.engine.objective import Objective  # noqa: E402
from mtrec.serving.evaluate import evaluate_run  # noqa: E402

SMALL = dict(epochs=2, batch_size=1024, embedding_dim=16, expert_sizes=[64], tower_sizes=[32], num_experts=2,
             diagnostics_every=0, device="cpu")
HISTORY_SPEC = Path(__file__).resolve().parents[1] / "sample_data" / "sequence_spec.toml"  # the README's


def _test_auc(cfg: TrainConfig, column: str) -> float:
    mtrec.engine.loop.train(cfg, force=True, quiet=True)
    return evaluate_run(cfg.out, split="test", device="cpu")["metrics"][column]["auc"]


def esmm(work: Path, rows: int, seeds: list[int]) -> dict[str, list[float]]:
    write_synthetic(work / "log.parquet", rows=rows, seed=7)
    preprocess([str(work / "log.parquet")], ["click", "like", "share"], str(work / "data"), user="user_id",
               item="item_id", time="ts")
    results: dict[str, list[float]] = {"esmm ctcvr": [], "plain share": []}
    modules = (mtrec.engine.build, mtrec.serving.evaluate)  # every place that builds the objective
    real = mtrec.engine.build.objective_for
    for seed in seeds:
        base = dict(data=str(work / "data"), model="esmm", target="share", tasks=["share", "click"],
                    conditions=["share:click"], seed=seed, **SMALL)
        results["esmm ctcvr"].append(_test_auc(TrainConfig(out=str(work / f"esmm-{seed}"), **base), "ctcvr"))
        for module in modules:  # the same network, plain losses
            module.objective_for = lambda cfg, tasks: Objective(tasks, {})
        try:
            results["plain share"].append(_test_auc(TrainConfig(out=str(work / f"plain-{seed}"), **base), "share"))
        finally:
            for module in modules:
                module.objective_for = real
        print({k: round(v[-1], 4) for k, v in results.items()}, flush=True)
    return results


def history(work: Path, rows: int, seeds: list[int]) -> dict[str, list[float]]:
    write_synthetic(work / "log.parquet", rows=rows, seed=7, history=20)
    common = dict(user="user_id", item="item_id", time="ts")
    preprocess([str(work / "log.parquet")], ["click", "like", "share"], str(work / "with"), spec=str(HISTORY_SPEC),
               **common)
    preprocess([str(work / "log.parquet")], ["click", "like", "share"], str(work / "without"),
               exclude=["hist_items", "tags"], **common)
    results: dict[str, list[float]] = {}
    for seed in seeds:
        for name in ("with", "without"):
            for target in ("click", "share"):
                cfg = TrainConfig(data=str(work / name), out=str(work / f"{name}-{target}-{seed}"), model="mmoe",
                                  target=target, seed=seed, **SMALL)
                results.setdefault(f"{target} {name} history", []).append(_test_auc(cfg, target))
        print({k: round(v[-1], 4) for k, v in results.items()}, flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=["esmm", "history"])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--seeds", default="0,1,2")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        results = (esmm if args.what == "esmm" else history)(Path(tmp), args.rows, seeds)
    print(f"\n{args.what}, {args.rows:,} rows, seeds {args.seeds}: test AUC")
    for name, values in results.items():
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"  {name:24s} {statistics.mean(values):.4f} ± {spread:.4f}   {[round(v, 4) for v in values]}")


if __name__ == "__main__":
    main()
