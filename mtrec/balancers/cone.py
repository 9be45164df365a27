"""Projections onto cones of the task gradients: UPGrad and PCD.

Both reduce to the same small problem on the (normalised) T x T Gram matrix, a quadratic over the
non-negative orthant: ``x = argmin_{x >= 0} x^T A x / 2 + q^T x``, for a few right-hand sides q.

- UPGrad projects each task gradient g_i onto the dual cone of all of them,
  ``{d : d . g_j >= 0 for all j}``. With ``d = G^T v`` the projection of ``G^T u`` is
  ``G^T argmin_{v >= u} v^T M v`` (Quinton & Rey 2024, Proposition 1); ``v = u + x``.
- PCD keeps the primary task's gradient g_0 as far as the secondary tasks' guarantees allow:
  ``d = argmin ||d - g_0||^2`` s.t. ``d . g_j >= tau ||g_j||^2``; its dual gives
  ``d = g_0 + sum_j lambda_j g_j`` with lambda the orthant problem above.

Solver (``orthant_qp``): for T <= ``EXACT_MAX_TASKS`` every face of the orthant (the set S of
positive coordinates, the empty set included) is solved at once, ``A_SS x_S = -q_S``, as one
batched solve; the candidates are clipped to x >= 0 and scored with the true objective, and the
best is kept (the optimum is the stationary point of its own face, so it is among them). Beyond,
a fixed number of projected coordinate-descent sweeps. No host synchronisation either way.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtrec.balancers.base import GramBalancer, check_real, small_dtype
from mtrec.balancers.simplex import EXACT_MAX_TASKS, face_solve, faces


def orthant_qp(A: Tensor, q: Tensor, sweeps: int = 200) -> Tensor:
    """``argmin_{x >= 0} x^T A x / 2 + q^T x`` for each column of ``q`` (``[n, k]`` -> ``[n, k]``).

    ``A`` is symmetric positive semi-definite (a small ridge is added per face); fp64 expected.
    """
    n, k = q.shape
    if n <= EXACT_MAX_TASKS:
        masks = faces(n, A.device)  # [F, n], every non-empty face
        x = face_solve(A, masks, -q.expand(masks.shape[0], n, k)).clamp_min(0)
        x = torch.cat([x, torch.zeros_like(x[:1])])  # the empty face: x = 0
        x = torch.where(torch.isfinite(x), x, torch.zeros_like(x))
        value = 0.5 * (x * (A @ x)).sum(1) + (x * q).sum(1)  # [F + 1, k]
        best = torch.argmin(value, dim=0)  # per column
        return torch.take_along_dim(x, best[None, None, :], dim=0)[0]
    diag = torch.diagonal(A)
    safe = torch.where(diag > 0, diag, torch.ones_like(diag))
    x = torch.zeros_like(q)
    for _ in range(sweeps):
        for j in range(n):
            step = (A[j] @ x + q[j]) / safe[j]
            x[j] = torch.where(diag[j] > 0, (x[j] - step).clamp_min(0), torch.zeros_like(step))
    return x


class UPGrad(GramBalancer):
    """Unconflicting projection of gradients (Quinton & Rey 2024, arXiv 2406.16232; TorchJD).

    Each g_i is projected onto the dual cone of all task gradients (so the projection conflicts
    with none of them) and the projections are averaged: ``sum_i G^T v_i / T`` with
    ``v_i = argmin_{v >= e_i} v^T M v``, M the Gram matrix normalised by its trace plus
    ``reg_eps`` I (TorchJD's and LibMTL's defaults).
    """

    split_rows = True  # rows split over processes: docs/design.md, "Several processes"
    name = "upgrad"
    paper = "Quinton & Rey, 2024 (arXiv 2406.16232, Jacobian Descent for Multi-Objective Optimization)"
    default_scope = "all"  # TorchJD's mtl_backward and LibMTL aggregate every shared parameter

    def __init__(self, num_tasks: int, *, reg_eps: float = 1e-4):
        super().__init__(num_tasks)
        self.reg_eps = check_real(self.name, "reg_eps", reg_eps, "[0, 1]")

    def weights(self, gram: Tensor, losses: Tensor | None = None) -> Tensor:
        T = self.num_tasks
        M = gram.to(small_dtype(gram))
        trace = torch.diagonal(M).sum()
        M = M / torch.where(trace > 0, trace, torch.ones_like(trace))
        M = M + self.reg_eps * torch.eye(T, dtype=M.dtype, device=M.device)
        u = torch.eye(T, dtype=M.dtype, device=M.device) / T  # column i: the mean's share of task i
        x = orthant_qp(M, M @ u)  # v_i = u_i + x_i
        return (u + x).sum(1)


class PCD(GramBalancer):
    """PCD, reconstructed: one primary objective, every secondary one guaranteed a fraction tau of
    progress.

    Our reading of TorchJD 0.18's PCD (arXiv 2606.29521; neither was readable here). Task 0 is the
    primary task: ``d = argmin ||d - g_0||^2`` subject to ``d . g_j >= tau ||g_j||^2`` for every
    secondary task j (each keeps a fraction tau of the progress its own gradient would make). Dual:
    ``d = g_0 + sum_j lambda_j g_j``, lambda >= 0 from a T - 1 variable QP.
    """

    split_rows = True  # rows split over processes: docs/design.md, "Several processes"
    name = "pcd"
    paper = "reconstruction of TorchJD 0.18's PCD (arXiv 2606.29521, not readable here)"
    default_scope = "all"  # as UPGrad: every shared parameter

    # Secondary constraints are soft with a penalty of 1 / (ridge ||g_j||^2): mutually exclusive
    # secondaries (g_1 = -g_2) would make the hard problem infeasible. Feasible constraints then
    # hold to a relative ridge * lambda_j.
    ridge = 1e-4

    def __init__(self, num_tasks: int, *, tau: float = 0.1):
        super().__init__(num_tasks)
        self.tau = check_real(self.name, "tau", tau, "[0, 1]")

    def weights(self, gram: Tensor, losses: Tensor | None = None) -> Tensor:
        M = gram.to(small_dtype(gram))
        first = torch.ones(1, dtype=M.dtype, device=M.device)
        if self.num_tasks == 1:
            return first
        scale = torch.diagonal(M).mean()
        M = M / torch.where(scale > 0, scale, torch.ones_like(scale))
        K = M[1:, 1:]
        sq = torch.diagonal(K)
        A = K + torch.diag(self.ridge * sq)
        q = M[1:, 0] - self.tau * sq  # d . g_j at lambda = 0, minus the guarantee
        lam = orthant_qp(A, q[:, None])[:, 0]
        return torch.cat([first, lam])
