"""What a behaviour sequence costs the training step: samples/s flat vs a 50-element history.

    python bench/bench_sequences_train.py                  # CPU, 1M rows, history 50, batch 4096
    python bench/bench_sequences_train.py --device cuda --rows 10000000

One `mtrec synth --history N` log, preprocessed three ways in the same run: `flat` (the history
and tag lists excluded: the 12 flat features), `mean` (history mean-pooled, its own vocabulary)
and `attention` (DIN attention, `share_with = "item_id"`); tags are mean-pooled in both. Step
times come from `bench_train.time_steps` (median after warm-up); the ratio is to `flat` for the
same model. Run it alone on the machine (e.g. under `flock /tmp/mtrec-cpu.lock`).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train import time_steps  # noqa: E402

from mtrec.data.preprocess import preprocess  # noqa: E402
from mtrec.data.synth import write_synthetic  # noqa: E402

SPECS = {
    "mean": '[features.hist_items]\nkind = "sequence"\nmax_len = {n}\n',
    "attention": '[features.hist_items]\nkind = "sequence"\nmax_len = {n}\npooling = "attention"\n'
                 'share_with = "item_id"\n',
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--history", type=int, default=50)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--models", default="shared-bottom,mmoe")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="mtrec-bench-seqtrain-") as tmp:
        root = Path(tmp)
        raw = root / "log.parquet"
        write_synthetic(raw, rows=args.rows, seed=0, history=args.history)
        common = dict(user="user_id", item="item_id", time="ts")
        data = {"flat": root / "flat"}
        preprocess([str(raw)], ["click", "like", "share"], str(data["flat"]), exclude=["hist_items", "tags"], **common)
        for name, spec in SPECS.items():
            (root / f"{name}.toml").write_text(spec.format(n=args.history))
            data[name] = root / name
            preprocess([str(raw)], ["click", "like", "share"], str(data[name]), spec=str(root / f"{name}.toml"),
                       **common)
        print(f"{args.rows:,} rows, history {args.history}, batch {args.batch}, {device}, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads")
        for model in args.models.split(","):
            base = None
            for name, path in data.items():
                r = time_steps(path, model, "ew", "", args.batch, device, args.steps, args.warmup, {})
                base = base or r["step_ms"]
                print(f"{model:14s} {name:10s} {r['step_ms']:8.2f} ms  {r['samples_per_s']:10,.0f} samples/s  "
                      f"x{r['step_ms'] / base:.2f} of flat", flush=True)


if __name__ == "__main__":
    main()
