"""Checkpoints: tensors plus JSON metadata, written atomically, loaded without running code.

A checkpoint is one file holding ``{"state": {...tensors, lists, numbers...}, "meta": "<json>"}``
saved with ``torch.save`` to a temporary name in the same directory, fsynced, then renamed over
the target, so a process killed at any moment leaves the previous checkpoint whole. Loading uses
``torch.load(weights_only=True)``: its unpickler accepts tensors and plain containers only and
refuses any other object, so a file crafted to run code on load is rejected before anything runs.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

import torch

from mtrec.core.errors import UserError
from mtrec.core.files import atomic_write


def save(path: Path, state: dict, meta: dict) -> None:
    payload = {"state": state, "meta": json.dumps(meta)}
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load(path: Path, map_location="cpu") -> tuple[dict, dict]:
    path = Path(path)
    if not path.exists():
        raise UserError(f"no checkpoint at {path}: train first, or point to a run directory made by mtrec train")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise UserError(f"refused to load {path}: it holds objects other than tensors and plain data "
                        "(possibly code); only load checkpoints written by mtrec") from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        raise UserError(f"checkpoint {path} is corrupt or truncated ({type(err).__name__}); "
                        "use the other checkpoint of the run (best.pt / last.pt) or retrain") from err
    if not isinstance(payload, dict) or "state" not in payload or "meta" not in payload:
        raise UserError(f"{path} is not an mtrec checkpoint")
    return payload["state"], json.loads(payload["meta"])
