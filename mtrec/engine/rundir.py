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
from mtrec.core.files import atomic_write_text, read_json_object
from mtrec.data.fingerprint import encoder_fingerprint, vocab_files
from mtrec.engine import checkpoint, sharded_tables
from mtrec.engine.build import Run


class RunDir:
    def __init__(self, path: str | Path, main: bool = True):
        self.path, self.main = Path(path), main
        self.diagnostics = self.path / "diagnostics.jsonl"

    def check_new(self, data: str | Path, force: bool) -> None:
        """A new run may only replace (with --force) a run of mtrec train holding nothing else: never
        the data, a parent of it, a file, a folder whose config.json mtrec train did not write (a
        project's own config.json is a common name), or a run beside foreign files."""
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
        saved = _train_config(out)
        if saved is None:
            raise UserError(f"--out {out} is not an mtrec run directory (no config.json written by mtrec train) and "
                            "not empty: --force only replaces runs of mtrec train; choose another --out")
        foreign = sorted(p.name for p in out.iterdir() if not _written_by_train(p, saved))
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise UserError(f"--out {out} is a run of mtrec train but also holds {shown}, which mtrec train did not "
                            "write: --force removes only a run's own files; move those or choose another --out")

    def check_resumable(self) -> None:
        if not (self.path / "last.pt").exists():
            raise UserError(f"nothing to resume in {self.path}: no last.pt (start a new run without --resume)")

    def create(self, schema, data: str | Path) -> None:
        """A fresh directory with the schema's copy and the encoder's (the data's vocabulary files
        and their fingerprint): of an earlier run that check_new allowed to replace, only the files
        mtrec train writes are removed (a file that appeared since stays)."""
        if self.main:
            if self.path.is_dir():
                saved = _train_config(self.path) or {}
                for entry in self.path.iterdir():
                    if _written_by_train(entry, saved):
                        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
            self.path.mkdir(parents=True, exist_ok=True)
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
        if run.tables is not None:
            # Sharded tables are gathered on rank 0, in the unsharded layout: every rank takes part.
            model, optimizer = sharded_tables.model_state(run.model, run.tables), run.optimizer.state_dict()
        elif self.main:
            model, optimizer = run.model.state_dict(), run.optimizer.state_dict()
        if not self.main:
            return
        gathered = [model["embedding.table.weight"]] if run.tables is not None else []  # in host memory
        if not (_all_finite(run.model.parameters()) and _all_finite(gathered)):
            raise UserError(f"the model's parameters are no longer finite: {name} was not overwritten, the last good "
                            f"checkpoint is {self.path / 'last.pt'} (lower --lr or set --clip-grad)")
        state = {"model": model, "optimizer": optimizer, "balancer": run.balancer.state_dict(),
                 "rng_cpu": torch.get_rng_state()}
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
            if run.tables is not None:  # each rank takes its shards of the saved table
                sharded_tables.load_model_state(run.model, run.tables, state["model"])
            else:
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


# What mtrec train writes into a run directory (and the temporary names they are written under);
# the TensorBoard folder of the run when --tensorboard pointed inside it.
RUN_FILES = ("config.json", "schema.json", "metrics.jsonl", "diagnostics.jsonl", "best.pt", "last.pt", ENCODER)
RUN_DIRS = ("vocab",)  # the encoder's vocabulary files (links or copies)
_EVENTS = "events.out.tfevents."


def _train_config(run_dir: Path) -> dict | None:
    """The run's config.json when mtrec train wrote it (its ``mtrec_version`` key), else None."""
    try:
        saved = read_json_object(run_dir / "config.json", "")
    except UserError:
        return None
    return saved if "mtrec_version" in saved else None


def _written_by_train(entry: Path, saved: dict) -> bool:
    name = entry.name
    if entry.is_file() and not entry.is_symlink():
        return name in RUN_FILES or any(name.startswith(f".{f}.") and name.endswith(".tmp") for f in RUN_FILES)
    if entry.is_dir() and not entry.is_symlink() and name in RUN_DIRS:
        return True
    events = saved.get("tensorboard")
    return (entry.is_dir() and not entry.is_symlink() and isinstance(events, str) and bool(events)
            and Path(events) == entry.resolve() and all(p.is_file() and p.name.startswith(_EVENTS)
                                                        for p in entry.iterdir()))


def _all_finite(params) -> bool:
    """Whether every parameter is finite, from each one's min and max (NaN propagates through
    both): ``isfinite(p).all()`` built an abs and masks of the whole table (+400 MiB for a 60M-value
    table, the run's peak)."""
    bounds = [torch.stack(torch.aminmax(p.detach())) for p in params if p.numel()]
    return bool(torch.isfinite(torch.cat(bounds)).all()) if bounds else True
