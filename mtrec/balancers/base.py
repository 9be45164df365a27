"""The balancer contract (DESIGN.md section 5).

Two kinds share one registry:

- ``LossBalancer``: turns the T task losses into one scalar; the engine does one backward.
- ``GradBalancer``: ``combine(grads) -> combined``. ``grads[k]`` has shape ``[T, *shape_k]``
  (row t = task t's gradient of shared tensor k, fp32); the result is a list of tensors of
  shape ``shape_k``. The engine computes the per-task gradients for the chosen scope, calls
  ``combine`` once per step, and writes the result back before the optimizer step.

Balancers are ``torch.nn.Module``s so that all their state (moving averages, learned weights,
their own little optimizers' moments, step counters) lives in buffers and parameters, moves with
``.to(device)`` and round-trips through ``state_dict()`` / ``load_state_dict()`` and therefore
through checkpoints. Parameters of a balancer (e.g. UW's log-variances) are trained by the
engine's optimizer without weight decay. Nothing in a step may synchronise with the host
(no ``.item()``, no ``.cpu()``, no Python branching on tensor values).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor


class Balancer(torch.nn.Module):
    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""  # "loss" or "grad"
    paper: ClassVar[str] = ""
    # Scope used when the user does not pass --balance-scope ("shared", "all", "representation").
    default_scope: ClassVar[str] = "shared"
    # True when the balancer needs the current losses (GradNorm, DB-MTL, IMTL, DWA ...).
    needs_losses: ClassVar[bool] = False

    def __init__(self, num_tasks: int):
        super().__init__()
        self.num_tasks = num_tasks


class LossBalancer(Balancer):
    kind = "loss"
    # True when the balancer wants the losses re-evaluated on the same batch after the
    # optimizer step (FAMO); the engine then calls ``after_step``.
    needs_lookahead: ClassVar[bool] = False

    def weigh(self, losses: Tensor) -> Tensor:
        """losses: ``[T]`` graph-attached batch-mean losses. Returns the scalar to backward."""
        raise NotImplementedError

    def after_step(self, losses: Tensor) -> None:
        """Only called when ``needs_lookahead``: the ``[T]`` losses after the optimizer step."""


class GradBalancer(Balancer):
    kind = "grad"

    def combine(self, grads: list[Tensor], losses: Tensor | None = None) -> list[Tensor]:
        """grads[k]: ``[T, *shape_k]``; losses: detached ``[T]`` (given when ``needs_losses``)."""
        raise NotImplementedError
