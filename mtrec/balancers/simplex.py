"""Weightings found by a convex problem over the simplex: MGDA-UB and CAGrad.

Both problems are small (T unknowns) but must be solved every step on the gradients' device
without scipy, host round trips or Python branching on values. Two solvers:

- **exact** (T <= ``EXACT_MAX_TASKS``): the optimum lies in the relative interior of some face
  (support S) of the simplex, where its stationarity conditions have a closed form. All 2^T - 1
  faces are solved at once as one batched T x T solve (ridge 1e-10, identity rows outside S);
  every candidate is clipped onto the simplex and scored with the true objective, and the best
  is kept. A handful of batched kernels, exact up to the ridge.
- **Frank-Wolfe** (larger T): ``iterations`` pairwise Frank-Wolfe steps (weight moves from the
  worst task in the support to the best vertex) with an exact line search.

Both problems are invariant to scaling the Gram matrix; it is divided by its mean diagonal first,
so the small constants (1e-8 guards, ridges) are relative to the gradients' magnitude.
Tasks with an all-zero gradient (no valid sample in the batch) are kept off the simplex.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable

import torch
from torch import Tensor

from mtrec.balancers.base import GramBalancer, check_choice, check_int, check_real, require_losses, small_dtype
from mtrec.balancers.linalg import solve

NORMALIZATIONS = ("none", "l2", "loss", "loss+")
EXACT_MAX_TASKS = 10  # 2^10 - 1 faces: a [1023, 10, 10] batched solve
_FEASIBLE = -1e-6  # candidates may dip this far below 0 (ridge noise) before being clipped


def _normalised(gram: Tensor) -> tuple[Tensor, Tensor]:
    """Gram in fp64 divided by its mean diagonal, and the mask of tasks with a gradient."""
    M = gram.to(small_dtype(gram))
    diag = torch.diagonal(M)
    scale = diag.mean()
    M = M / torch.where(scale > 0, scale, torch.ones_like(scale))
    return M, diag > 0


def _uniform(active: Tensor, dtype: torch.dtype) -> Tensor:
    """Uniform weights over the active tasks (over all tasks when none is active)."""
    mask = torch.where(active.any(), active, torch.ones_like(active)).to(dtype)
    return mask / mask.sum()


@functools.lru_cache(maxsize=16)
def faces(num_tasks: int, device: torch.device) -> Tensor:
    """Every non-empty subset of the tasks as a ``[2^T - 1, T]`` bool mask (cached per device)."""
    rows = [s for s in itertools.product((False, True), repeat=num_tasks) if any(s)]
    return torch.tensor(rows, device=device)


def face_solve(A: Tensor, masks: Tensor, rhs: Tensor) -> Tensor:
    """Per face S: ``(A_SS + 1e-10 I) x_S = rhs_S`` and x = 0 outside S. rhs ``[N, T, k]`` -> ``[N, T, k]``."""
    both = masks[:, :, None] & masks[:, None, :]
    system = torch.where(both, A, torch.zeros_like(A)) + torch.diag_embed(
        torch.where(masks, 1e-10, 1.0).to(A.dtype))
    return solve(system, rhs * masks[..., None].to(A.dtype))


def pick_best(candidates: Tensor, ok: Tensor, objective: Callable[[Tensor], Tensor], fallback: Tensor) -> Tensor:
    """The feasible candidate ``[N, T]`` (clipped and renormalised onto the simplex) with the lowest
    ``objective`` (``[N, T] -> [N]``); ``fallback`` when there is none."""
    ok = ok & (candidates >= _FEASIBLE).all(1) & torch.isfinite(candidates).all(1)
    w = torch.where(ok[:, None], candidates, fallback[None, :]).clamp_min(0)
    w = w / w.sum(1, keepdim=True)
    score = torch.where(ok, objective(w), torch.full_like(w[:, 0], float("inf")))
    best = torch.argmin(score)
    return torch.where(ok.any(), w.index_select(0, best.view(1))[0], fallback)


def pairwise_frank_wolfe(A: Tensor, w: Tensor, active: Tensor, gradient: Callable[[Tensor, Tensor], Tensor],
                         line_search: Callable[..., Tensor], iterations: int) -> Tensor:
    """Minimise a convex ``F(w) = h(w, A w)`` over the simplex restricted to the ``active`` tasks.

    ``gradient(w, Aw) -> [T]``; ``line_search(w, Aw, d, Ad, step_max) -> step in [0, step_max]``
    along ``d = e_best - e_worst``. ``A w`` is updated incrementally. ``w`` starts on the simplex.
    """
    T = w.shape[0]
    tasks = torch.arange(T, device=w.device)
    inf = torch.full((), float("inf"), dtype=w.dtype, device=w.device)
    Aw = A @ w
    for _ in range(iterations):
        g = gradient(w, Aw)
        best = torch.argmin(torch.where(active, g, inf))
        worst = torch.argmax(torch.where(active & (w > 0), g, -inf))
        d = (tasks == best).to(w.dtype) - (tasks == worst).to(w.dtype)
        Ad = A @ d
        step = line_search(w, Aw, d, Ad, w.gather(0, worst.view(1)).squeeze(0))
        w = (w + step * d).clamp_min(0)
        Aw = Aw + step * Ad
    return w


class MGDA(GramBalancer):
    """MGDA-UB (Sener & Koltun, NeurIPS 2018): ``alpha = argmin_{alpha in simplex} ||sum_t alpha_t v_t||^2``.

    Runs on gradients w.r.t. the shared representation by default (the "upper bound" trick), the
    batch x dim gradient flattened as in the original code. ``normalize`` divides v_t by 1
    (``none``, LibMTL's default), ||v_t|| (``l2``), L_t (``loss``) or L_t ||v_t|| (``loss+``) before
    solving; the weights then multiply the raw gradients, as the authors' code weights the raw
    losses. Result: ``sum_t alpha_t g_t`` with sum_t alpha_t = 1. On a face S the minimiser is
    ``M_SS^{-1} 1 / (1^T M_SS^{-1} 1)``.
    """

    name = "mgda"
    split_rows = True  # rows split over processes: docs/design.md, "Several processes"
    paper = "Sener & Koltun, NeurIPS 2018 (arXiv 1810.04650)"
    default_scope = "representation"
    alpha_on_heads = True  # the authors' trainer backpropagates sum_t alpha_t L_t

    def __init__(self, num_tasks: int, *, normalize: str = "none", iterations: int = 100):
        super().__init__(num_tasks)
        self.normalize = check_choice(self.name, "normalize", normalize, NORMALIZATIONS)
        self.iterations = check_int(self.name, "iterations", iterations, "[1, 10000]")
        self.needs_losses = self.normalize.startswith("loss")

    def weights(self, gram: Tensor, losses: Tensor | None = None) -> Tensor:
        M, active = _normalised(gram)
        scale = torch.ones_like(torch.diagonal(M))
        if self.normalize in ("l2", "loss+"):
            scale = scale * torch.diagonal(M).clamp_min(0).sqrt()
        if self.normalize in ("loss", "loss+"):
            scale = scale * require_losses(self, losses).to(M.dtype)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        M = M / (scale[:, None] * scale[None, :])
        start = _uniform(active, M.dtype)
        if self.num_tasks <= EXACT_MAX_TASKS:
            masks = faces(self.num_tasks, M.device)
            u = face_solve(M, masks, torch.ones_like(masks, dtype=M.dtype)[..., None])[..., 0]
            ok = ~(masks & ~active).any(1)
            return pick_best(u / u.sum(1, keepdim=True), ok, lambda w: ((w @ M) * w).sum(1), start)

        def line_search(w, Mw, d, Md, step_max):
            slope, curvature = d @ Mw, d @ Md
            exact = torch.minimum((-slope / curvature.clamp_min(1e-300)).clamp_min(0), step_max)
            return torch.where(curvature > 0, exact, torch.where(slope < 0, step_max, torch.zeros_like(step_max)))

        return pairwise_frank_wolfe(M, start, active, lambda w, Mw: Mw, line_search, self.iterations)


class CAGrad(GramBalancer):
    """Conflict-averse gradient descent (Liu et al., NeurIPS 2021).

    With g_0 the mean gradient, A = G G^T and r = c ||g_0||: ``w = argmin_{w in simplex}
    w^T A 1/T + r sqrt(w^T A w + 1e-8)``, then ``g = g_0 + r / ||g_w|| g_w`` divided by 1
    (rescale 0), 1 + c^2 (rescale 1, LibMTL's default) or 1 + c (rescale 2). The official code's
    1e-8 guards are kept, relative to the Gram's scale. On a face S, with u = A_SS^{-1} 1,
    v = A_SS^{-1} (A 1/T)_S, s_u = 1^T u, s_v = 1^T v, p = (A 1/T)_S^T v, the stationary point is
    ``w = u / s_u + (s_v u / s_u - v) / kappa`` with
    ``kappa^2 = (r^2 + s_v^2 / s_u - p) / (1 / s_u + 1e-8)`` (docs/balancers.md derives it).
    g_0 is the mean over all T tasks; tasks with an all-zero gradient are kept off the simplex.
    """

    name = "cagrad"
    split_rows = True  # rows split over processes: docs/design.md, "Several processes"
    paper = "Liu et al., NeurIPS 2021 (arXiv 2110.14048)"
    default_scope = "all"  # the official code and LibMTL balance every shared parameter
    eps = 1e-8

    def __init__(self, num_tasks: int, *, c: float = 0.5, rescale: int = 1, iterations: int = 100):
        super().__init__(num_tasks)
        self.c = check_real(self.name, "c", c, "[0, inf)")
        self.rescale = check_int(self.name, "rescale", rescale, "[0, 2]")
        self.iterations = check_int(self.name, "iterations", iterations, "[1, 10000]")

    def _problem(self, gram: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Normalised Gram A, active mask, A 1/T and the radius r = c ||g_0|| (in A's units)."""
        A, active = _normalised(gram)
        Ab = A.mean(1)
        radius = self.c * (Ab.mean() + self.eps).sqrt() + self.eps
        return A, active, Ab, radius

    def objective(self, w: Tensor, gram: Tensor) -> Tensor:
        """``w^T A 1/T + r sqrt(w^T A w + 1e-8)`` in the normalised units (``w``: ``[T]`` or ``[N, T]``)."""
        A, _, Ab, radius = self._problem(gram)
        w = w.to(A.dtype)
        return w @ Ab + radius * (((w @ A) * w).sum(-1) + self.eps).sqrt()

    def solve(self, gram: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(w, A, r)``: the simplex weights, the normalised Gram and the radius."""
        A, active, Ab, radius = self._problem(gram)
        start = _uniform(active, A.dtype)
        eps = self.eps
        if self.num_tasks <= EXACT_MAX_TASKS:
            masks = faces(self.num_tasks, A.device)
            rhs = torch.stack([torch.ones_like(masks, dtype=A.dtype), Ab.expand(masks.shape)], -1)
            uv = face_solve(A, masks, rhs)
            u, v = uv[..., 0], uv[..., 1]
            s_u, s_v, p = u.sum(1), v.sum(1), v @ Ab
            num = radius**2 + s_v**2 / s_u - p
            kappa = (num.clamp_min(0) / (1 / s_u + eps)).sqrt()
            w = u / s_u[:, None] + (s_v[:, None] * u / s_u[:, None] - v) / kappa.clamp_min(1e-300)[:, None]
            ok = ~(masks & ~active).any(1) & (num > 0) & (s_u > 0)
            w = pick_best(w, ok, lambda w: w @ Ab + radius * (((w @ A) * w).sum(1) + eps).sqrt(), start)
            return w, A, radius

        def gradient(w, Aw):
            return Ab + radius * Aw / (w @ Aw + eps).sqrt()

        def line_search(w, Aw, d, Ad, step_max):
            # Minimise a*step + r sqrt(q0 + 2 beta step + alpha step^2) on [0, step_max]: the slope
            # increases; its root solves r^2 y^2 = a^2 (y^2 + K) / alpha with y = beta + alpha*step.
            a, beta, alpha, q0 = d @ Ab, d @ Aw, d @ Ad, w @ Aw + eps
            q1 = (q0 + (2 * beta + alpha * step_max) * step_max).clamp_min(1e-300)
            slope0 = a + radius * beta / q0.sqrt()
            slope1 = a + radius * (beta + alpha * step_max) / q1.sqrt()
            K = (alpha * q0 - beta**2).clamp_min(0)
            y = -torch.sign(a) * (a**2 * K / (radius**2 * alpha - a**2).clamp_min(1e-300)).sqrt()
            inside = torch.minimum(((y - beta) / alpha.clamp_min(1e-300)).clamp_min(0), step_max)
            zero = torch.zeros_like(step_max)
            return torch.where(slope0 >= 0, zero, torch.where(slope1 <= 0, step_max, inside))

        return pairwise_frank_wolfe(A, start, active, gradient, line_search, self.iterations), A, radius

    def weights(self, gram: Tensor, losses: Tensor | None = None) -> Tensor:
        w, A, radius = self.solve(gram)
        coef = 1.0 / self.num_tasks + radius / ((w @ A @ w).clamp_min(0).sqrt() + self.eps) * w
        return coef / (1.0, 1 + self.c**2, 1 + self.c)[self.rescale]
