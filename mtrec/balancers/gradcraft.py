"""GradCraft (Bai et al., KDD 2024): magnitude alignment, then global (one-vs-all) deconfliction."""

from __future__ import annotations

import torch
from torch import Tensor

from mtrec.balancers.base import GramBalancer, check_real, small_dtype
from mtrec.balancers.linalg import solve


class GradCraft(GramBalancer):
    """1. ``ghat_i = (tau * max_j ||g_j|| / ||g_i|| + 1 - tau) g_i`` (current norms, the official b = 0).
    2. For each i, with C_i = {j : ghat_i . ghat_j < 0}: solve ``(G_C G_C^T) w = z - G_C ghat_i``,
    ``z_j = eps ||ghat_i|| ||ghat_j||``, and set ``gtilde_i = ghat_i + G_C^T w``, so that
    ``gtilde_i . ghat_j = eps ||ghat_i|| ||ghat_j||`` for every j in C_i at once.
    3. The shared gradient is the mean of the gtilde_i (as the paper).

    Everything is done on the T x T Gram matrix: gtilde_i = sum_j coef[i, j] g_j. The conflict
    sets are masks, each solve a ridge-regularised T x T system (delta = 1e-10 trace / |C_i| on the
    conflicting block, identity rows elsewhere) in fp64, so collinear conflicting tasks do not
    explode as the official ``torch.inverse`` does. A zero-gradient task is in no conflict set.
    """

    name = "gradcraft"
    split_rows = True  # rows split over processes: docs/design.md, "Several processes"
    paper = "Bai et al., KDD 2024 (arXiv 2407.19682)"
    default_scope = "all"  # the official code flattens every parameter, embeddings included

    def __init__(self, num_tasks: int, *, tau: float = 1.0, eps: float = 1e-10):
        super().__init__(num_tasks)
        self.tau = check_real(self.name, "tau", tau, "[0, 1]")
        self.eps = check_real(self.name, "eps", eps, "[0, inf)")

    def adjusted(self, gram: Tensor) -> Tensor:
        """The magnitude factors c_i (``ghat_i = c_i g_i``), ``[T]``."""
        norms = torch.diagonal(gram).clamp_min(0).sqrt()
        has = norms > 0
        ratio = norms.max() / torch.where(has, norms, torch.ones_like(norms))
        return torch.where(has, self.tau * ratio + (1 - self.tau), torch.ones_like(norms))

    def resolved(self, gram: Tensor) -> Tensor:
        """``coef [T, T]`` with ``gtilde_i = sum_j coef[i, j] g_j`` (rows: deconflicted task gradients)."""
        T = self.num_tasks
        M = gram.to(small_dtype(gram))
        c = self.adjusted(M)
        Mh = c[:, None] * M * c[None, :]  # Gram of the adjusted gradients
        nh = torch.diagonal(Mh).clamp_min(0).sqrt()
        eye = torch.eye(T, dtype=torch.bool, device=M.device)
        conflict = (Mh < 0) & ~eye  # conflict[i, j]: j in C_i
        block = conflict[:, :, None] & conflict[:, None, :]
        size = conflict.sum(1).clamp_min(1)
        ridge = 1e-10 * (torch.diagonal(Mh)[None, :] * conflict).sum(1) / size
        A = torch.where(block, Mh.expand(T, T, T), torch.zeros_like(Mh)) + torch.diag_embed(
            torch.where(conflict, ridge[:, None].expand(T, T), torch.ones_like(Mh)))
        rhs = torch.where(conflict, self.eps * nh[:, None] * nh[None, :] - Mh, torch.zeros_like(Mh))
        w = solve(A, rhs.unsqueeze(-1)).squeeze(-1)  # w[i, j], zero outside C_i
        return (torch.eye(T, dtype=M.dtype, device=M.device) + w) * c[None, :]

    def weights(self, gram: Tensor, losses: Tensor | None = None) -> Tensor:
        return self.resolved(gram).mean(0)
