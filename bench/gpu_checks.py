"""The CUDA path, checked end to end: the part of `bench/gpu.sh` that is not a speed benchmark.

    python bench/gpu_checks.py matrix  --device cuda --out OUT   # arch x balancer x scope; evaluate, predict
    python bench/gpu_checks.py agree   --device cuda --out OUT   # the same run on CPU and on the device
    python bench/gpu_checks.py syncs   --device cuda --out OUT   # host syncs per step, per scope
    python bench/gpu_checks.py all --device cpu --rows 3000 --out OUT   # the dry run (GPU_DRY=1 in gpu.sh)

Each check writes OUT/<check>.json: a header (device name, torch version, command) and one record
per case with `ok` and what was measured; a failing case is recorded with its error and the run
goes on, so one run on a lent machine reports everything it reached. Exit code 1 when any case
failed.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mtrec import balancers  # noqa: E402
from mtrec.core.config import TrainConfig  # noqa: E402
from mtrec.data.preprocess import preprocess  # noqa: E402
from mtrec.data.synth import write_synthetic  # noqa: E402
from mtrec.engine.build import build_run  # noqa: E402
from mtrec.engine.feed import epoch_batches, load_splits  # noqa: E402
from mtrec.engine.loop import train  # noqa: E402
from mtrec.serving.evaluate import evaluate_run  # noqa: E402
from mtrec.serving.predict import predict_log  # noqa: E402

ARCHITECTURES = ("shared-bottom", "mmoe", "ple", "esmm")
BALANCERS = ("ew", "metabalance", "gradcraft", "pcgrad")
SPEC = Path(__file__).resolve().parents[1] / "sample_data" / "sequence_spec.toml"  # hist_items, DIN attention
AGREE_AUC = 0.002  # the bound on |valid AUC(cpu) - valid AUC(device)|
AGREE_EVAL = 1e-4  # |evaluate(cpu) - evaluate(device)| of one checkpoint


def header(device: str, check: str) -> dict:
    cuda = device.startswith("cuda") and torch.cuda.is_available()
    name = torch.cuda.get_device_name() if cuda else (platform.processor() or "cpu")
    return {"check": check, "device": device, "device_name": name, "torch": torch.__version__,
            "command": " ".join([Path(sys.executable).name, *sys.argv])}


def make_data(work: Path, rows: int) -> Path:
    """A synthetic log with a 20-item history, encoded with the README's sequence spec."""
    write_synthetic(work / "log.parquet", rows=rows, seed=3, history=20)
    preprocess([str(work / "log.parquet")], ["click", "like", "share"], str(work / "data"), user="user_id",
               item="item_id", time="ts", spec=str(SPEC))
    return work / "data"


def small(data: Path, out: Path, device: str, **overrides) -> TrainConfig:
    settings = dict(data=str(data), out=str(out), target="share", epochs=1, batch_size=512, embedding_dim=8,
                    expert_sizes=[32, 16], tower_sizes=[8], num_experts=2, device=device, diagnostics_every=5,
                    checkpoint_every=0, seed=0)
    settings.update(overrides)
    if settings.get("model") == "esmm":
        settings.update(tasks=["share", "click"], conditions=["share:click"])
    return TrainConfig(**settings)


def run_case(records: list, what: dict, fn, *args) -> dict:
    """Run one case, ``fn(*args) -> measured values``; an error is recorded and the run goes on."""
    started = time.perf_counter()
    try:
        record = {**what, "ok": True, **fn(*args)}
    except Exception as err:  # a lent machine's run must report every case it reached
        record = {**what, "ok": False, "error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc(limit=4)}
    record["seconds"] = round(time.perf_counter() - started, 3)
    records.append(record)
    shown = {k: v for k, v in record.items() if k != "trace"}
    print(("ok   " if record["ok"] else "FAIL ") + json.dumps(shown), flush=True)
    return record


def scopes_of(name: str, num_tasks: int) -> tuple[str, ...]:
    balancer = balancers.build(name, num_tasks=num_tasks)
    return balancer.scopes if balancer.kind == "grad" else ("",)  # "": a loss weighting has no scope


# --- matrix: every architecture x balancer x scope trains; evaluate and predict ------------------
def train_case(data: Path, out: Path, device: str, model: str, balancer: str, scope: str) -> dict:
    result = train(small(data, out, device, model=model, balancer=balancer, scope=scope), quiet=True)
    last = result["history"][-1]
    return {"valid_auc": last["valid"]["share"]["auc"], "skipped": result["skipped_steps"],
            "samples_per_second": last["samples_per_second"]}


def serve_case(data: Path, run: Path, device: str, preds: Path) -> dict:
    metrics = evaluate_run(run, split="test", device=device)["metrics"]
    written = predict_log(run, [str(data.parent / "log.parquet")], preds, device=device)
    return {"test_auc": metrics["share"]["auc"], "predicted_rows": written["rows"]}


def check_matrix(data: Path, work: Path, device: str, records: list) -> None:
    for model in ARCHITECTURES:
        for name in BALANCERS:
            for scope in scopes_of(name, 2 if model == "esmm" else 3):
                out = work / f"{model}-{name}-{scope or 'loss'}"
                run_case(records, {"model": model, "balancer": name, "scope": scope or "-"}, train_case,
                         data, out, device, model, name, scope)
        run_case(records, {"model": model, "balancer": "ew", "scope": "evaluate+predict"}, serve_case,
                 data, work / f"{model}-ew-loss", device, work / f"{model}-preds.parquet")


# --- agree: the same run on CPU and on the device -------------------------------------------------
def agree_train(data: Path, work: Path, device: str, model: str, name: str) -> dict:
    aucs = {}
    # the dry run's "device" is the CPU again; device-fp32 (no bf16 autocast) tells bf16 from the rest
    for side, where, precision in (("cpu", "cpu", "auto"), ("device", device, "auto"),
                                   ("device-fp32", device, "fp32")):
        result = train(small(data, work / f"agree-{model}-{name}-{side}", where, model=model, balancer=name,
                             epochs=2, precision=precision), quiet=True)
        aucs[side] = {task: row["auc"] for task, row in result["history"][-1]["valid"].items() if task != "mean"}

    def gaps_to(side: str) -> dict:
        return {task: abs(auc - aucs[side][task]) for task, auc in aucs["cpu"].items()
                if auc is not None and aucs[side].get(task) is not None and math.isfinite(auc)}

    gaps = gaps_to("device")
    assert gaps, "no task has a defined validation AUC: use more --rows"
    worst, worst_fp32 = max(gaps.values()), max(gaps_to("device-fp32").values())
    assert worst <= AGREE_AUC, \
        f"valid AUC differs by {worst:.4g} > {AGREE_AUC} (fp32 on the device: {worst_fp32:.4g}): {gaps}"
    return {"valid_auc": aucs, "largest_gap": worst, "largest_gap_fp32": worst_fp32}


def agree_evaluate(run: Path, device: str) -> dict:
    scores = {side: evaluate_run(run, split="test", device=where)["metrics"]
              for side, where in (("cpu", "cpu"), ("device", device))}
    gaps = {f"{task}.{metric}": abs(row[metric] - scores["device"][task][metric])
            for task, row in scores["cpu"].items() for metric in ("auc", "gauc", "logloss")
            if row.get(metric) is not None and scores["device"][task].get(metric) is not None}
    worst = max(gaps.values())
    assert worst <= AGREE_EVAL, f"evaluate differs by {worst:.3g} > {AGREE_EVAL}"
    return {"largest_gap": worst}


def check_agree(data: Path, work: Path, device: str, records: list) -> None:
    """The same seed and data on CPU and on the device: valid AUCs within AGREE_AUC (bf16 autocast,
    TF32 and atomics in index_add differ), and one checkpoint evaluated on both within AGREE_EVAL
    (scoring runs in fp32 with autocast off)."""
    for model, name in (("mmoe", "ew"), ("mmoe", "metabalance"), ("esmm", "ew")):
        what = {"model": model, "balancer": name}
        run_case(records, {**what, "what": "train cpu vs device"}, agree_train, data, work, device, model, name)
        run_case(records, {**what, "what": "evaluate one checkpoint on cpu vs device"}, agree_evaluate,
                 work / f"agree-{model}-{name}-device", device)


# --- syncs: host syncs per step -------------------------------------------------------------------
def count_syncs(data: Path, out: Path, device: str, name: str, scope: str) -> dict:
    cfg = small(data, out, device, model="mmoe", balancer=name, scope=scope, diagnostics_every=0)
    run = build_run(cfg)
    train_split, _ = load_splits(run)
    stepper = run.stepper()
    batches = list(epoch_batches(run, train_split, epoch=0, start=0))[:6]
    for codes, numeric, labels in batches[:2]:  # warm-up: lazy optimizer state, autotuning
        stepper.step(codes, numeric, labels)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for codes, numeric, labels in batches[2:]:
                stepper.step(codes, numeric, labels)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    sources = [f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]
    per_step = len(sources) / (len(batches) - 2)
    assert per_step <= 1, f"{per_step:g} host syncs per step (expected 1): {sorted(set(sources))}"
    return {"syncs_per_step": per_step, "sources": sorted(set(sources))}


def check_syncs(data: Path, work: Path, device: str, records: list) -> None:
    """Host syncs per step under ``torch.cuda.set_sync_debug_mode("warn")``: the step keeps one on
    purpose (is everything it would apply finite?); each warning's source line is recorded."""
    if not device.startswith("cuda"):
        records.append({"what": "syncs", "ok": True, "skipped": "host syncs are a CUDA notion (dry run)"})
        return
    for name in BALANCERS:
        for scope in scopes_of(name, 3):
            run_case(records, {"model": "mmoe", "balancer": name, "scope": scope or "-"}, count_syncs,
                     data, work / f"sync-{name}-{scope or 'loss'}", device, name, scope)


CHECKS = {"matrix": check_matrix, "agree": check_agree, "syncs": check_syncs}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checks", nargs="+", choices=[*CHECKS, "all"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    names = list(CHECKS) if "all" in args.checks else args.checks
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = make_data(work, args.rows)
        for name in names:
            records: list[dict] = []
            CHECKS[name](data, work, args.device, records)
            failed += sum(not r["ok"] for r in records)
            (args.out / f"{name}.json").write_text(json.dumps({**header(args.device, name), "cases": records},
                                                              indent=1))
    print(f"{failed} case(s) failed" if failed else "every case passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
