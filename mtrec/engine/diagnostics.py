"""The diagnostics log of a run: per shared tensor, every task's gradient norm and the pairwise
cosines (the imbalance the balancers act on), the realised change of the update from the plain sum
of the tasks' gradients (``update_change``, ``||update - sum g|| / ||sum g||``: 0 when the balancer
did nothing), and the balancer's task weights where it has them,
one ``diagnostics.jsonl`` record every ``diagnostics_every`` steps. The writer, and the series that
plots and TensorBoard read back from the records."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


class DiagnosticsLog:
    """Appends the stepper's diagnostics to ``diagnostics.jsonl`` (and to TensorBoard events)."""

    def __init__(self, path: Path, scope: str, events=None):
        self.path, self.scope, self.events = Path(path), scope, events

    def write(self, step: int, diagnostics: dict) -> None:
        record = {"step": step, "scope": self.scope,
                  "norms": diagnostics["norms"].tolist(), "cosines": diagnostics["cosines"].tolist()}
        if "update_change" in diagnostics:
            record["update_change"] = diagnostics["update_change"].tolist()
        if "weights" in diagnostics:  # the balancer's task weights on this step, where it has them
            record["weights"] = diagnostics["weights"].tolist()
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.events:
            self.events.diagnostics(record)


def norm_ratio_series(records: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """steps [S] and ratios [K, T-1, S]: per shared tensor k, ‖g_t‖ / ‖g_0‖ of each auxiliary task t
    (task 0 is the target) at each logged step; NaN where the target's norm is 0."""
    steps = np.array([r["step"] for r in records])
    norms = np.array([r["norms"] for r in records], dtype=np.float64)  # [S, K, T]
    target = np.broadcast_to(norms[:, :, :1], norms[:, :, 1:].shape)
    ratios = np.divide(norms[:, :, 1:], target, out=np.full(target.shape, np.nan), where=target > 0)
    return steps, ratios.transpose(1, 2, 0)


def weight_series(records: list[dict]) -> tuple[np.ndarray, np.ndarray] | None:
    """steps [S] and the balancer's task weights [T, S] from the diagnostics records that carry
    them (``weights``); None when none does (MetaBalance, GradCraft ... have no task weights)."""
    records = [r for r in records if r.get("weights") is not None]
    if not records:
        return None
    return np.array([r["step"] for r in records]), np.array([r["weights"] for r in records], dtype=np.float64).T


def update_change_series(records: list[dict]) -> tuple[np.ndarray, np.ndarray] | None:
    """steps [S] and the realised update change [K, S] per shared tensor from the records that carry
    it; None when none does (runs logged before it existed)."""
    records = [r for r in records if r.get("update_change") is not None]
    if not records:
        return None
    return np.array([r["step"] for r in records]), np.array([r["update_change"] for r in records], dtype=np.float64).T


def cosine_series(records: list[dict]) -> tuple[np.ndarray, list[tuple[int, int]], np.ndarray]:
    """steps [S], the task pairs (i < j) and cosines [K, P, S] of the pairs' gradients per shared tensor."""
    steps = np.array([r["step"] for r in records])
    cosines = np.array([r["cosines"] for r in records], dtype=np.float64)  # [S, K, T, T]
    rows, cols = np.triu_indices(cosines.shape[-1], 1)
    return steps, list(zip(rows.tolist(), cols.tolist())), cosines[:, :, rows, cols].transpose(1, 2, 0)
