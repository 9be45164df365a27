"""Weightings in closed form (or a few Newton steps) on the Gram matrix: IMTL-G, Aligned-MTL, Nash-MTL.

Each computes task coefficients alpha [T] from ``M = G G^T`` in fp64; the shared gradient is
``sum_t alpha_t g_t`` (``GramBalancer.combine``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtrec.balancers.base import (
    GramBalancer,
    check_choice,
    check_int,
    check_real,
    gram_matrix,
    require_losses,
    small_dtype,
    weighted_sum,
)
from mtrec.balancers.linalg import solve, symmetric_eigh

IMTL_VARIANTS = ("hybrid", "gradient", "loss")


class IMTL(GramBalancer):
    """Impartial multi-task learning (Liu et al., ICLR 2021): IMTL-L's learned loss scales and
    IMTL-G's impartial gradient; the hybrid of both is the default, as the paper's IMTL and LibMTL.

    IMTL-L: each loss becomes ``e^{s_t} L_t - s_t`` with learnable s (init 0, an ``nn.Parameter``
    the engine's optimizer trains without weight decay; its gradient ``e^{s_t} L_t - 1`` is set
    here from the losses), so every gradient of task t, the task-specific parameters' included,
    is scaled by e^{s_t} (``head_scales``). IMTL-G on the (scaled) task gradients: alpha with
    sum_t alpha_t = 1 such that g = sum_t alpha_t g_t has the same projection on every unit task
    gradient u_t = g_t / ||g_t||: ``alpha_{2..T} = g_1 U^T (D U^T)^{-1}`` with rows
    ``D_t = g_1 - g_t``, ``U_t = u_1 - u_t``. Here the anchor "task 1" is the task with the largest
    norm (the solution does not depend on the choice, and it must not be a zero gradient), tasks
    with an all-zero gradient get alpha = 0, and the T x T system is solved as ridge least squares
    (delta = 1e-12 of its scale) so that collinear tasks do not break it.
    ``variant``: ``hybrid`` (default), ``gradient`` (IMTL-G alone, raw losses) or ``loss``
    (IMTL-L alone: the sum of the scaled gradients).
    """

    name = "imtl"
    split_rows = True  # rows split over processes: docs/design.md, "Several processes"
    paper = "Liu et al., ICLR 2021 (Towards Impartial Multi-task Learning)"
    default_scope = "all"  # LibMTL balances every shared parameter
    needs_losses = True  # IMTL-L's scales (the default hybrid); IMTL-G alone does not

    def __init__(self, num_tasks: int, *, variant: str = "hybrid"):
        super().__init__(num_tasks)
        self.variant = check_choice(self.name, "variant", variant, IMTL_VARIANTS)
        self.needs_losses = self.variant != "gradient"
        if self.needs_losses:
            self.log_scales = torch.nn.Parameter(torch.zeros(num_tasks))

    def combine(self, grads: list[Tensor], losses: Tensor | None = None, parts=None) -> list[Tensor]:
        if self.variant == "gradient":
            return super().combine(grads, losses)
        losses = require_losses(self, losses)
        s = self.log_scales
        scale = s.detach().exp()
        with torch.no_grad():  # d/ds_t of e^{s_t} L_t - s_t, accumulated like a backward would
            grad = scale * losses.to(scale.device) - 1
            s.grad = grad if s.grad is None else s.grad + grad
        self._head_scales = scale
        if self.variant == "loss":
            self.applied = scale
            return weighted_sum(grads, scale)
        gram = gram_matrix(grads)
        alpha = self.weights(gram * (scale[:, None] * scale[None, :]).to(gram.dtype))
        self.applied = (alpha * scale.to(alpha.dtype)).detach()
        return weighted_sum(grads, alpha * scale.to(alpha.dtype))

    def weights(self, gram: Tensor, losses: Tensor | None = None) -> Tensor:
        T = self.num_tasks
        M = gram.to(small_dtype(gram))
        norms = torch.diagonal(M).clamp_min(0).sqrt()
        has = norms > 0
        anchor = (torch.arange(T, device=M.device) == torch.argmax(norms)).to(M.dtype)
        inv = torch.where(has, 1 / torch.where(has, norms, torch.ones_like(norms)), torch.zeros_like(norms))
        # Row t: g . (u_anchor - u_t) = 0 with g = sum_s alpha_s g_s, i.e. B[t, s] alpha_s summed = 0.
        B = (M @ anchor)[None, :] * (inv * anchor).sum() - M * inv[:, None]
        top = norms.max()
        B = B / torch.where(top > 0, top, torch.ones_like(top))
        eye = torch.eye(T, dtype=M.dtype, device=M.device)
        B = torch.where(anchor[:, None] > 0, torch.ones_like(B), torch.where(has[:, None], B, eye))
        BtB = B.T @ B
        ridge = 1e-12 * torch.diagonal(BtB).sum() / T
        alpha = solve(BtB + ridge * eye, B.T @ anchor)
        return torch.where(has, alpha, torch.zeros_like(alpha))


class AlignedMTL(GramBalancer):
    """Aligned-MTL (Senushkin et al., CVPR 2023): align the principal components of G.

    ``M = V diag(lambda) V^T``; eigenvalues <= lambda_max * T * eps_fp32 are dropped (rank
    truncation); ``B = sqrt(lambda_min) V Lambda^{-1/2} V^T`` over the kept ones and
    ``alpha = B 1``. No hyperparameters. Off the CPU the eigen-decomposition is a fixed number of
    Jacobi sweeps (``torch.linalg.eigh`` waits for the host on CUDA).
    """

    name = "aligned-mtl"
    split_rows = True  # rows split over processes: docs/design.md, "Several processes"
    paper = "Senushkin et al., CVPR 2023 (arXiv 2305.19000)"
    default_scope = "all"  # LibMTL balances every shared parameter

    def weights(self, gram: Tensor, losses: Tensor | None = None) -> Tensor:
        T = self.num_tasks
        M = gram.to(small_dtype(gram))
        values, vectors = symmetric_eigh(M)
        keep = values > values.max() * T * torch.finfo(torch.float32).eps
        inf = torch.full_like(values, float("inf"))
        smallest = torch.where(keep, values, inf).min()
        smallest = torch.where(keep.any(), smallest, torch.zeros_like(smallest))
        inv_sqrt = torch.where(keep, values.clamp_min(1e-300).rsqrt(), torch.zeros_like(values))
        B = smallest.sqrt() * (vectors * inv_sqrt[None, :]) @ vectors.T
        return B.sum(0)


class NashMTL(GramBalancer):
    """Nash-MTL (Navon et al., ICML 2022): the bargaining solution ``(M / ||M||_F) alpha = 1 / alpha``.

    alpha > 0 minimises the convex ``f(a) = a^T M a / 2 - sum_t log a_t`` (its stationarity
    condition is exactly the bargaining equation): ``iterations`` Newton steps, each trying the
    full step, its halvings and the always-feasible ``1 / (1 + Newton decrement)`` at once and
    keeping the best feasible one; the start is the solution for orthogonal gradients, rescaled
    so that ``a^T M a = T`` (true at the solution). The official code runs up to 20 cvxpy/ECOS
    convex-concave iterations on the CPU towards the same fixed point. A ridge of 1e-9 M_tt per
    task keeps f bounded when 0 lies in the cone of the gradients; zero-gradient tasks get
    alpha = 0. As the official trainer, the combined gradient's norm is clipped to ``max_norm``
    (0 turns clipping off), and the task-specific parameters get ``alpha_t g_t`` unclipped (the
    reference backpropagates ``sum_t alpha_t L_t`` and clips the shared parameters only).
    """

    name = "nash-mtl"
    split_rows = True  # rows split over processes: docs/design.md, "Several processes"
    paper = "Navon et al., ICML 2022 (arXiv 2202.01017)"
    default_scope = "all"  # the official code and LibMTL balance every shared parameter

    def __init__(self, num_tasks: int, *, max_norm: float = 1.0, iterations: int = 20):
        super().__init__(num_tasks)
        self.max_norm = check_real(self.name, "max_norm", max_norm, "[0, inf)")
        self.iterations = check_int(self.name, "iterations", iterations, "[1, 1000]")

    def bargaining(self, gram: Tensor) -> Tensor:
        """alpha solving ``(M / ||M||_F) alpha = 1 / alpha`` over the tasks with a gradient."""
        T = self.num_tasks
        M = gram.to(small_dtype(gram))
        has = torch.diagonal(M) > 0
        both = has[:, None] & has[None, :]
        M = torch.where(both, M, torch.zeros_like(M))
        frobenius = torch.linalg.matrix_norm(M)
        M = M / torch.where(frobenius > 0, frobenius, torch.ones_like(frobenius))
        # Ridge relative to each task's own scale (the problem is invariant to rescaling a task:
        # alpha_t just scales inversely); inactive tasks get an identity row and are dropped.
        diag = torch.diagonal(M)
        M = M + torch.diag(torch.where(has, 1e-9 * diag, torch.ones_like(diag)))
        a = torch.diagonal(M).rsqrt()
        a = a * (T / (a @ M @ a)).sqrt()
        # Step sizes tried at once: the full step, halvings, and 1 / (1 + decrement), which is
        # always feasible and decreases f (self-concordance); the best feasible one is taken.
        trials = 0.5 ** torch.arange(12, dtype=M.dtype, device=M.device)
        for _ in range(self.iterations):
            grad = M @ a - 1 / a
            step = solve(M + torch.diag(a.pow(-2)), grad)
            decrement = (grad @ step).clamp_min(0).sqrt()
            sizes = torch.cat([trials, (1 / (1 + decrement)).reshape(1)])
            candidates = a - sizes[:, None] * step
            feasible = (candidates > 0).all(1)
            safe = candidates.clamp_min(1e-300)
            value = 0.5 * ((safe @ M) * safe).sum(1) - safe.log().sum(1)
            best = torch.argmin(torch.where(feasible, value, torch.full_like(value, float("inf"))))
            a = candidates.index_select(0, best.view(1))[0].clamp_min(1e-300)
        return torch.where(has, a, torch.zeros_like(a))

    def clipped(self, alpha: Tensor, gram: Tensor) -> Tensor:
        """alpha scaled so that ``||sum_t alpha_t g_t|| <= max_norm`` (torch's ``clip_grad_norm_``)."""
        if self.max_norm > 0:
            norm = (alpha @ gram.to(alpha.dtype) @ alpha).clamp_min(0).sqrt()
            alpha = alpha * (self.max_norm / (norm + 1e-6)).clamp_max(1.0)
        return alpha

    def weights(self, gram: Tensor, losses: Tensor | None = None) -> Tensor:
        return self.clipped(self.bargaining(gram), gram)

    def combine(self, grads: list[Tensor], losses: Tensor | None = None, parts=None) -> list[Tensor]:
        gram = gram_matrix(grads)
        alpha = self.bargaining(gram)
        self._head_scales = alpha.float()
        self.applied = alpha.detach()
        return weighted_sum(grads, self.clipped(alpha, gram))
