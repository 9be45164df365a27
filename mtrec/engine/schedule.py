"""Learning-rate schedule and model selection: pure functions of the config and the step.

The schedule is a multiplier of each parameter group's base rate for the update with 0-based
index ``step`` (the global step, so a resumed run continues it exactly): a linear warmup from
``1 / warmup`` to 1 over the first ``warmup`` updates, then ``constant`` (1), ``cosine`` (half a
cosine from 1 towards 0) or ``linear`` (from 1 towards 0), reaching 0 one step after the last
planned update. The plan (``total``, the schedule's horizon) is the first run's ``epochs x steps
per epoch``, kept in the checkpoint: a run resumed with more ``--epochs`` does not re-plan (which
made a finished cosine run jump from ~0 back to half its rate); its extra updates keep the rate of
the last planned one. It is applied by setting ``group["lr"]`` on every
group of the optimizer, whatever kind of optimizer holds them; the base rate is kept in
``group["initial_lr"]`` and travels with the optimizer's state.
"""

from __future__ import annotations

import math

# The validation metric of the target task that picks best.pt and drives early stopping.
HIGHER_IS_BETTER = {"auc": True, "gauc": True, "logloss": False}


def lr_factor(schedule: str, warmup: int, step: int, total: int) -> float:
    step = min(step, max(total - 1, 0))  # past the horizon: the last planned update's rate
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress


def set_lr(optimizer, factor: float) -> None:
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
        group["lr"] = group["initial_lr"] * factor


def improves(metric: str, value: float | None, best: float | None) -> bool:
    """Whether a validation value beats the best so far (None / NaN never does)."""
    if value is None or math.isnan(value):
        return False
    if best is None:
        return True
    return value > best if HIGHER_IS_BETTER[metric] else value < best
