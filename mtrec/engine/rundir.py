"""The run directory and its checkpoints.

``config.json`` (the resolved config), ``schema.json`` (a copy of the data's schema),
``vocab/`` (hard links to, or copies of, the data's vocabulary files) and ``encoder.json`` (their
content fingerprint, ``mtrec.data.fingerprint``): a run encodes raw logs on its own, whatever
later happens to the data folder (docs/serving.md),
``metrics.jsonl`` (one line per epoch), ``diagnostics.jsonl`` (per-task gradient norms and cosines
per shared tensor, every ``diagnostics_every`` steps), ``best.pt`` and ``last.pt`` (model,
optimizer, balancer, RNG states and the loop's position; format in ``checkpoint``). Under torchrun
only rank 0 writes.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from mtrec.core.errors import UserError
from mtrec.core.files import atomic_write_text
from mtrec.data.fingerprint import encoder_fingerprint, vocab_files
from mtrec.engine import checkpoint
from mtrec.engine.build import Run


class RunDir:
    def __init__(self, path: str | Path, main: bool = True):
        self.path, self.main = Path(path), main
        self.diagnostics = self.path / "diagnostics.jsonl"

    def check_new(self, data: str | Path, force: bool) -> None:
        """A new run may only replace (with --force) what mtrec train made: never the data, a
        parent of it, a file, or a non-empty folder without a config.json."""
        out = self.path
        if not out.exists():
            return
        if not out.is_dir():
            raise UserError(f"--out {out} is a file, not a run directory: choose another --out")
        if not any(out.iterdir()):
            return
        if not force:
            raise UserError(f"run directory {out} exists: pass --force to overwrite or --resume to continue")
        data = Path(data).resolve()
        if out.resolve() == data or out.resolve() in data.parents:
            raise UserError(f"--out {out} is the data directory or holds it: --force would delete the data; "
                            "choose another --out")
        if not (out / "config.json").exists():
            raise UserError(f"--out {out} is not an mtrec run directory (no config.json) and not empty: --force "
                            "only replaces runs of mtrec train; choose another --out")

    def check_resumable(self) -> None:
        if not (self.path / "last.pt").exists():
            raise UserError(f"nothing to resume in {self.path}: no last.pt (start a new run without --resume)")

    def create(self, schema, data: str | Path) -> None:
        """A fresh directory (what check_new allowed to replace is removed) with the schema's copy
        and the encoder's: the data's vocabulary files and their fingerprint."""
        if self.main:
            if self.path.exists():
                shutil.rmtree(self.path)
            self.path.mkdir(parents=True)
            atomic_write_text(self.path / "schema.json", json.dumps(schema.to_dict(), indent=2))
            copy_encoder(schema, Path(data) / "vocab", self.path)

    def write_config(self, cfg) -> None:
        if self.main:
            atomic_write_text(self.path / "config.json", json.dumps({**cfg.to_dict(), "mtrec_version": 1}, indent=2))

    def write_metrics(self, history: list[dict]) -> None:
        if self.main:
            atomic_write_text(self.path / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))

    def save(self, name: str, run: Run, loop: dict) -> None:
        """Write checkpoint ``name`` of the run at the loop's position ``loop`` (its counters and
        history); refuses, keeping the previous file, when a parameter is no longer finite."""
        if not self.main:
            return
        if not _all_finite(run.model.parameters()):
            raise UserError(f"the model's parameters are no longer finite: {name} was not overwritten, the last good "
                            f"checkpoint is {self.path / 'last.pt'} (lower --lr or set --clip-grad)")
        state = {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
                 "balancer": run.balancer.state_dict(), "rng_cpu": torch.get_rng_state()}
        if run.device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(run.device)
        meta = {"format": "mtrec-checkpoint", "version": 1, "tasks": run.tasks, **loop,
                "config": run.cfg.to_dict(), "scope": run.cfg.scope}
        checkpoint.save(self.path / name, state, meta)

    def restore(self, run: Run) -> dict:
        """Load ``last.pt`` into the run's model, optimizer, balancer and RNGs; returns its metadata
        (the loop's position)."""
        path = self.path / "last.pt"
        state, meta = checkpoint.load(path, map_location=run.device)
        if meta.get("tasks") != run.tasks:
            raise UserError(f"cannot resume: the run trained tasks {meta.get('tasks')}, this config gives {run.tasks}")
        try:
            run.model.load_state_dict(state["model"])
            run.optimizer.load_state_dict(state["optimizer"])
            run.balancer.load_state_dict(state["balancer"])
        except (RuntimeError, KeyError, ValueError) as err:
            raise UserError(f"cannot resume from {path}: it does not match this model/balancer ({err})") from err
        torch.set_rng_state(state["rng_cpu"].cpu())
        if "rng_cuda" in state and run.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng_cuda"].cpu(), run.device)
        return meta


ENCODER = "encoder.json"


def copy_encoder(schema, vocab_dir: Path, run_dir: Path) -> dict:
    """Hard-link (or, across file systems, copy) the vocabulary files into ``run_dir/vocab`` and
    write ``encoder.json`` with their fingerprint. preprocess never rewrites a file in place (it
    renames a new directory over the old one), so a link keeps the bytes the run trained with; a
    link costs no space, a copy the vocabularies' size."""
    target = run_dir / "vocab"
    target.mkdir()
    linked, size = True, 0
    for source in vocab_files(schema, vocab_dir):
        if not source.is_file():
            raise UserError(f"vocabulary {source} is missing: the data directory is incomplete, "
                            "re-run mtrec preprocess")
        size += source.stat().st_size
        try:
            os.link(source, target / source.name)
        except OSError:
            linked = False
            shutil.copy2(source, target / source.name)
    record = {"format": "mtrec-encoder", "version": 1, "fingerprint": encoder_fingerprint(schema, target),
              "vocab_bytes": size, "linked": linked}
    atomic_write_text(run_dir / ENCODER, json.dumps(record, indent=2) + "\n")
    return record


def _all_finite(params) -> bool:
    """Whether every parameter is finite, from each one's min and max (NaN propagates through
    both): ``isfinite(p).all()`` built an abs and masks of the whole table (+400 MiB for a 60M-value
    table, the run's peak)."""
    bounds = [torch.stack(torch.aminmax(p.detach())) for p in params if p.numel()]
    return bool(torch.isfinite(torch.cat(bounds)).all()) if bounds else True
