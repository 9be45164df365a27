"""MetaBalance (He et al., WWW 2022): per-part magnitude balancing towards a target task."""

from __future__ import annotations

import torch
from torch import Tensor

from mtrec.balancers.base import GradBalancer, check_choice, check_real, lazy_state
from mtrec.balancers.parts import group_norms, group_weighted_sum

MODES = ("both", "reduce_only", "enlarge_only")


class MetaBalance(GradBalancer):
    """Task 0 is the target. For every group p (a part of the network: each field's rows of the
    embedding table, each expert's slice of a stacked weight, by default; or each balanced tensor
    with ``--balance-groups tensor``) and task t, m[p][t] is an EMA (beta, init 0) of the norm
    ||g_t[p]||; the group's gradient is ``sum_t s[p][t] g_t[p]`` with
    ``s = relax * m[p][0] / m[p][t] + (1 - relax)`` (so s = 1 for the target; relax = 0 is the sum).

    ``mode`` applies s only to aux gradients larger (``reduce_only``) or smaller (``enlarge_only``)
    than the target's, or to all (``both``, the official code). A task whose gradient of p is all
    zero on a step keeps its EMA; an EMA that is 0, or below 1e-12 of the group's largest, gives
    s = 1 (the official code divides 0/0); the guard is relative, so scaling every gradient by c
    scales the result by exactly c.
    """

    name = "metabalance"
    split_rows = True  # rows split over processes: docs/design.md, "Several processes"
    paper = "He et al., WWW 2022 (arXiv 2203.06801)"
    default_scope = "all"  # the official code balances the embedding tables too
    default_groups = "part"  # "each part of the network": one norm per parameter tensor of an unfused model
    lazy_buffers = ("norm_ema",)

    def __init__(self, num_tasks: int, *, relax: float = 0.7, beta: float = 0.9, mode: str = "both"):
        super().__init__(num_tasks)
        self.relax = check_real(self.name, "relax", relax, "[0, 1)")
        self.beta = check_real(self.name, "beta", beta, "[0, 1)")
        self.mode = check_choice(self.name, "mode", mode, MODES)
        self.register_buffer("norm_ema", torch.zeros(0, num_tasks))  # [G, T] (groups x tasks) once sized

    def scales(self) -> Tensor:
        """``s[p][t]`` from the current EMAs, ``[G, T]``."""
        m = self.norm_ema
        target = m[:, :1]
        seen = m > 1e-12 * m.amax(1, keepdim=True)  # relative: never 1e-12 of the gradients' units
        s = self.relax * target / torch.where(seen, m, torch.ones_like(m)) + (1 - self.relax)
        apply = seen.clone()
        apply[:, 0] = False  # the target stays exactly as it is
        if self.mode == "reduce_only":
            apply = apply & (m > target)
        elif self.mode == "enlarge_only":
            apply = apply & (m < target)
        return torch.where(apply, s, torch.ones_like(s))

    def combine(self, grads: list[Tensor], losses: Tensor | None = None, parts=None) -> list[Tensor]:
        norms = group_norms(grads, parts)  # [G, T], one reduction per tensor
        ema = lazy_state(self, "norm_ema", tuple(norms.shape), norms)
        with torch.no_grad():
            ema.copy_(torch.where(norms > 0, self.beta * ema + (1 - self.beta) * norms, ema))
        return group_weighted_sum(grads, self.scales(), parts)
