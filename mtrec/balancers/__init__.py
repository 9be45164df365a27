"""The balancer registry: ``build(name, num_tasks=T, **hparams)``, ``names()``, ``describe()``.

Two kinds (``base.py``): loss weighting (``weigh(losses) -> scalar``) and gradient combination
(``combine(grads, losses) -> list``). One file per method family; docs/balancers.md has the rules.
"""

from __future__ import annotations

import inspect
from typing import Any

from mtrec.balancers.base import Balancer, GradBalancer, LossBalancer, check_int
from mtrec.balancers.cograd import CoGrad
from mtrec.balancers.cone import PCD, UPGrad
from mtrec.balancers.dbmtl import DBMTL
from mtrec.balancers.fairgrad import FairGrad
from mtrec.balancers.gradcraft import GradCraft
from mtrec.balancers.gradnorm import GradNorm
from mtrec.balancers.gram import IMTL, AlignedMTL, NashMTL
from mtrec.balancers.metabalance import MetaBalance
from mtrec.balancers.projection import GradVac, PCGrad
from mtrec.balancers.simplex import MGDA, CAGrad
from mtrec.balancers.weighting import DWA, EW, FAMO, IMTLL, RLW, UW, FixedWeights
from mtrec.core.errors import UserError

__all__ = ["Balancer", "GradBalancer", "LossBalancer", "build", "describe", "hparams", "names"]

_CLASSES: list[type[Balancer]] = [
    EW, FixedWeights, UW, DWA, FAMO, RLW, IMTLL,
    MetaBalance, GradCraft, CoGrad, GradNorm, PCGrad, MGDA, CAGrad, IMTL, GradVac, AlignedMTL, DBMTL, NashMTL,
    UPGrad, PCD, FairGrad,
]
_REGISTRY: dict[str, type[Balancer]] = {cls.name: cls for cls in _CLASSES}


def names(kind: str | None = None) -> list[str]:
    """Registered names in table order; ``kind`` = "loss" or "grad" keeps one kind."""
    return [n for n, cls in _REGISTRY.items() if kind is None or cls.kind == kind]


def hparams(name: str) -> dict[str, Any]:
    """The hyperparameters of a balancer and their defaults (its constructor's keyword arguments)."""
    params = inspect.signature(_lookup(name).__init__).parameters.values()
    return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _lookup(name: str) -> type[Balancer]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UserError(f"unknown balancer {name!r}: choose one of {', '.join(names())}") from None


def build(name: str, num_tasks: int, **options: Any) -> Balancer:
    """A fresh balancer for ``num_tasks`` tasks; unknown names or bad hyperparameters are UserErrors."""
    cls = _lookup(name)
    num_tasks = check_int(name, "num_tasks", num_tasks, "[1, inf)")
    known = hparams(name)
    unknown = sorted(set(options) - set(known))
    if unknown:
        valid = ", ".join(known) if known else "none"
        raise UserError(f"{name}: unknown hyperparameter(s) {', '.join(unknown)} (valid: {valid})")
    return cls(num_tasks, **options)


def _needs(cls: type[Balancer]) -> str:
    if cls.kind == "loss":
        return "losses + re-forward after the step" if getattr(cls, "needs_lookahead", False) else "losses"
    what = "representation gradients" if cls.default_scope == "representation" else "per-task gradients"
    return f"{what} + losses" if cls.needs_losses else what


def describe() -> list[dict[str, Any]]:
    """One row per balancer for ``mtrec balancers``: name, kind, needs, hparams {name: default},
    paper, default scope, default groups ("-" where the method works on the whole balanced vector)
    and a one-line summary."""
    rows = []
    for name, cls in _REGISTRY.items():
        grad = cls.kind == "grad"
        rows.append({"name": name, "kind": cls.kind, "needs": _needs(cls), "hparams": hparams(name),
                     "paper": cls.paper, "default_scope": cls.default_scope if grad else "-",
                     "default_groups": (cls.default_groups or "-") if grad else "-",
                     "summary": (inspect.getdoc(cls) or "").split("\n")[0]})
    return rows
