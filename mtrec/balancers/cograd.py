"""CoGrad (Yang et al., SIGIR 2023): add the gradient of one-step inter-task transference.

No official code exists; this is our reconstruction (docs/balancers.md derives it). It has not
been checked against the paper's equations: only the introduction of its source was readable. With a
virtual step alpha, the transference from task j to task i is
``L_i(theta) - L_i(theta - alpha g_j) ~ alpha g_i . g_j``; its gradient (step held constant) is
``alpha H_i g_j``. Task i's corrected gradient ``g_i - gamma_j H_i g_j`` (summed over j != i)
with the Hessian approximated by

- ``hessian="diag"`` (default): the diagonal empirical Fisher ``H_i ~ diag(g_i * g_i)``:
  ``ghat_i = g_i * (1 - g_i * sum_{j != i} gamma_j g_j)`` element-wise;
- ``hessian="outer"``: ``H_i ~ g_i g_i^T``: ``ghat_i = g_i (1 - sum_{j != i} gamma_j g_i . g_j)``.

The factor in brackets is clamped to [0, 2] (our safeguard, not the paper's): beyond it the
correction would flip or more than double a coordinate. The result is ``sum_i ghat_i`` (EW sum),
so gamma = 0 is exactly EW. Products are formed in fp32 (g^3 underflows in half precision).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtrec.balancers.base import GradBalancer, check_choice, check_reals, gram_matrix, weighted_sum

HESSIANS = ("diag", "outer")


class CoGrad(GradBalancer):
    """Coordinated gradients: ``sum_i g_i * clamp(1 - g_i * sum_{j!=i} gamma_j g_j, 0, 2)``."""

    name = "cograd"
    split_rows = True  # rows split over processes: docs/design.md, "Several processes"
    paper = "Yang et al., SIGIR 2023 (arXiv 2303.05847); reconstructed, no official code"
    default_scope = "all"  # the paper's shared modules include the embeddings; no code to say otherwise

    def __init__(self, num_tasks: int, *, gamma: float | list[float] = 0.01, hessian: str = "diag"):
        super().__init__(num_tasks)
        values = check_reals(self.name, "gamma", gamma, num_tasks, "[0, inf)", scalar_ok=True)
        self.hessian = check_choice(self.name, "hessian", hessian, HESSIANS)
        self.register_buffer("gamma", torch.tensor(values), persistent=False)

    def combine(self, grads: list[Tensor], losses: Tensor | None = None, parts=None) -> list[Tensor]:
        gamma = self.gamma.to(grads[0].device)
        if self.hessian == "outer":
            gram = gram_matrix(grads).to(gamma.dtype)
            others = gram * gamma[None, :]  # others[i, j] = gamma_j g_i . g_j
            transfer = others.sum(1) - torch.diagonal(others)
            return weighted_sum(grads, (1 - transfer).clamp(0, 2))
        out = []
        for g in grads:
            x = g.float()
            shape = (-1,) + (1,) * (x.dim() - 1)
            weighted = gamma.view(shape) * x
            others = weighted.sum(0, keepdim=True) - weighted  # sum_{j != i} gamma_j g_j
            out.append((x * (1 - x * others).clamp(0, 2)).sum(0).to(g.dtype))
        return out
