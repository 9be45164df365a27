"""FairGrad (Ban & Ji, ICML 2024): alpha-fair resource allocation among the tasks."""

from __future__ import annotations

import torch
from torch import Tensor

from mtrec.balancers.base import GramBalancer, check_int, check_real, small_dtype
from mtrec.balancers.linalg import solve


class FairGrad(GramBalancer):
    """FairGrad (Ban & Ji, ICML 2024, arXiv 2402.15638): the update ``sum_t w_t g_t`` maximises the
    alpha-fair utility of the tasks' progress; its weights solve ``(G G^T) w = w^{-1/alpha}``, w > 0
    (alpha = 1 is proportional fairness, Nash-MTL's equation without its normalisation; alpha = 0
    the mean). The Gram is not normalised (official code, LibMTL), so the update's norm scales as
    ``c^{(1 - alpha) / (1 + alpha)}`` when every gradient is scaled by c.
    """

    split_rows = True  # rows split over processes: docs/design.md, "Several processes"
    name = "fairgrad"
    paper = "Ban & Ji, ICML 2024 (arXiv 2402.15638)"
    default_scope = "all"  # LibMTL balances every shared parameter
    alpha_on_heads = True  # the reference backpropagates sum_t w_t L_t

    def __init__(self, num_tasks: int, *, alpha: float = 1.0, iterations: int = 30):
        super().__init__(num_tasks)
        self.alpha = check_real(self.name, "alpha", alpha, "[0, 100]")
        self.iterations = check_int(self.name, "iterations", iterations, "[1, 1000]")

    def _objective(self, w: Tensor, M: Tensor) -> Tensor:
        """``f(w) = w^T M w / 2 - sum_t phi(w_t)`` with ``phi' = w^{-1/alpha}``; rows of ``w`` ``[N, T]``."""
        quad = 0.5 * ((w @ M) * w).sum(1)
        if self.alpha == 1:
            return quad - w.log().sum(1)
        power = 1 - 1 / self.alpha
        return quad - (w.pow(power) / power).sum(1)

    def weights(self, gram: Tensor, losses: Tensor | None = None) -> Tensor:
        T = self.num_tasks
        M = gram.to(small_dtype(gram))
        has = torch.diagonal(M) > 0
        if self.alpha == 0:  # linear scalarisation with uniform weights (paper, Section 3)
            return torch.full((T,), 1.0 / T, dtype=M.dtype, device=M.device)
        both = has[:, None] & has[None, :]
        M = torch.where(both, M, torch.zeros_like(M))
        # Solve in units where the mean diagonal is 1: if M = s N and N v = v^{-1/alpha}, then
        # w = s^{-alpha / (1 + alpha)} v solves M w = w^{-1/alpha} (the reference's unnormalised weights).
        diag = torch.diagonal(M)
        scale = torch.where(has, diag, torch.zeros_like(diag)).sum() / has.sum().clamp_min(1)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        N = M / scale
        # A ridge of 1e-9 N_tt keeps f bounded below when 0 lies in the cone of the gradients
        # (no solution exists then); tasks without a gradient get an identity row and w = 0.
        N = N + torch.diag(torch.where(has, 1e-9 * torch.diagonal(N), torch.ones_like(diag)))
        e = -1.0 / self.alpha
        v = torch.diagonal(N).pow(-self.alpha / (1 + self.alpha))  # exact for orthogonal gradients
        trials = 0.5 ** torch.arange(16, dtype=N.dtype, device=N.device)
        for _ in range(self.iterations):
            grad = N @ v - v.pow(e)
            hess = N + torch.diag(-e * v.pow(e - 1))
            step = solve(hess, grad)
            # The full Newton step and its halvings, the largest step keeping v > 0 (times 0.99),
            # and no step at all, so f never increases.
            room = torch.where(step > 0, v / torch.where(step > 0, step, torch.ones_like(step)),
                               torch.full_like(v, float("inf"))).min()
            sizes = torch.cat([trials, (0.99 * room).clamp_max(1).reshape(1), torch.zeros_like(trials[:1])])
            candidates = v - sizes[:, None] * step
            feasible = (candidates > 0).all(1)
            value = self._objective(candidates.clamp_min(1e-300), N)
            value = torch.where(feasible & torch.isfinite(value), value, torch.full_like(value, float("inf")))
            best = torch.argmin(value)
            v = candidates.index_select(0, best.view(1))[0].clamp_min(1e-300)
        w = v * scale.pow(-self.alpha / (1 + self.alpha))
        return torch.where(has, w, torch.zeros_like(w))
