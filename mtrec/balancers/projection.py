"""Sequential pairwise projections: PCGrad and GradVac.

Both edit each task gradient h_i = g_i against the other tasks' *original* gradients, one task at a
time in a random order. Every h_i stays a combination ``sum_j C[i, j] g_j`` of the task gradients,
so the whole procedure runs on the T x T Gram matrix: ``h_i . g_j = (C M)[i, j]`` and
``||h_i||^2 = (C M C^T)[i, i]``. The T tasks are processed in parallel (one order per task), which
is T - 1 (GradVac) or T (PCGrad) small steps per combine, whatever the model size.

The orders come from the global torch RNG of the gradients' device (drawn there, so no
host-to-device copy), whose state the engine checkpoints.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtrec.balancers.base import (
    GradBalancer,
    GramBalancer,
    check_choice,
    check_real,
    gram_matrix,
    lazy_state,
    small_dtype,
)
from mtrec.balancers.parts import group_grams, group_weighted_sum

REDUCTIONS = ("sum", "mean")
GROUPS = ("model", "tensor")


def random_orders(num_tasks: int, include_self: bool, device: torch.device) -> Tensor:
    """``[steps, T, T]`` one-hot: ``orders[s, i]`` is the task that task i visits at step s.

    Each task gets its own shuffled order (as PCGrad's and GradVac's reference code); without
    ``include_self`` task i is left out of its own order.
    """
    keys = torch.rand(num_tasks, num_tasks, device=device)
    if not include_self:
        keys.fill_diagonal_(2.0)  # sorts last, then dropped
    order = torch.argsort(keys, dim=1)[:, : num_tasks if include_self else num_tasks - 1]
    return order.T[:, :, None] == torch.arange(num_tasks, device=device)[None, None, :]


class PCGrad(GramBalancer):
    """Projecting conflicting gradients (Yu et al., NeurIPS 2020).

    For each i, for j in a shuffled order of all tasks: if ``h_i . g_j < 0`` then
    ``h_i -= (h_i . g_j) / ||g_j||^2 g_j``. The result is ``sum_i h_i`` (LibMTL;
    ``reduction="mean"`` gives the original port's average). No epsilon on ||g_j||^2 (as LibMTL): an
    absolute 1e-8 there, as mtrec once added, is not small next to CTR gradients (squared norms of
    1e-9 .. 1e-7 at batch 4096), and none is needed (``h_i . g_j < 0`` implies ``g_j != 0``), so the
    result scales exactly with the gradients.
    """

    name = "pcgrad"
    split_rows = True  # rows split over processes: docs/design.md, "Several processes"
    paper = "Yu et al., NeurIPS 2020 (arXiv 2001.06782)"
    default_scope = "all"  # the reference projects every shared parameter (LibMTL: the whole encoder)

    def __init__(self, num_tasks: int, *, reduction: str = "sum"):
        super().__init__(num_tasks)
        self.reduction = check_choice(self.name, "reduction", reduction, REDUCTIONS)

    def resolved(self, gram: Tensor) -> Tensor:
        """``coef [T, T]`` with ``h_i = sum_j coef[i, j] g_j`` after all projections."""
        T = self.num_tasks
        M = gram.to(small_dtype(gram))
        sq = torch.diagonal(M)
        C = torch.eye(T, dtype=M.dtype, device=M.device)
        for visit in random_orders(T, include_self=True, device=M.device).to(M.dtype):
            dot = ((C @ M) * visit).sum(1)  # h_i . g_j for each i's current j
            sq_j = (visit * sq[None, :]).sum(1)
            conflict = dot < 0
            safe = torch.where(conflict, sq_j, torch.ones_like(sq_j))  # a conflict implies g_j != 0
            step = torch.where(conflict, dot / safe, torch.zeros_like(dot))
            C = C - step[:, None] * visit
        return C

    def weights(self, gram: Tensor, losses: Tensor | None = None) -> Tensor:
        C = self.resolved(gram)
        return C.sum(0) if self.reduction == "sum" else C.mean(0)


class GradVac(GradBalancer):
    """Gradient vaccine (Wang et al., ICLR 2021).

    Targets rho_hat[i, j] (per group, init 0). For i, then j != i in shuffled order:
    ``rho = cos(h_i, g_j)``; if ``rho < rho_hat``,
    ``h_i += g_j ||h_i|| (rho_hat sqrt(1-rho^2) - rho sqrt(1-rho_hat^2)) / (||g_j|| sqrt(1-rho_hat^2) + 1e-8)``;
    always ``rho_hat <- (1 - beta) rho_hat + beta rho``. Result ``sum_i h_i``. Groups: the whole
    shared vector (``group="model"``, LibMTL's default) or each group of the engine
    (``"tensor"``: each balanced tensor, or each part with ``--balance-groups part``). Pairs with
    a zero gradient are neither adjusted nor averaged into rho_hat on that step. The reference's
    absolute ``+ 1e-8`` in the denominator is taken relative to ``||g_j||`` (it only bounds the
    step as rho_hat -> 1), so the result scales exactly with the gradients.
    """

    name = "gradvac"
    split_rows = True  # rows split over processes: docs/design.md, "Several processes"
    paper = "Wang et al., ICLR 2021 (arXiv 2010.05874)"
    default_scope = "all"  # LibMTL balances the whole encoder
    lazy_buffers = ("rho_hat",)

    def __init__(self, num_tasks: int, *, beta: float = 0.5, group: str = "model"):
        super().__init__(num_tasks)
        self.beta = check_real(self.name, "beta", beta, "(0, 1]")
        self.group = check_choice(self.name, "group", group, GROUPS)
        self.register_buffer("rho_hat", torch.zeros(0, num_tasks, num_tasks))  # [groups, T, T]

    def resolved(self, grams: Tensor) -> Tensor:
        """``coef [K, T, T]`` per group from per-group Grams ``[K, T, T]``; updates rho_hat."""
        T = self.num_tasks
        M = grams.to(small_dtype(grams))
        rho_hat = lazy_state(self, "rho_hat", tuple(M.shape), M)
        target = rho_hat.to(M.dtype)
        sq = torch.diagonal(M, dim1=1, dim2=2)  # [K, T]
        C = torch.eye(T, dtype=M.dtype, device=M.device).expand_as(M).clone()
        for visit in random_orders(T, include_self=False, device=M.device).to(M.dtype):
            hg = ((C @ M) * visit).sum(2)  # [K, T]: h_i . g_j
            hh = torch.diagonal(C @ M @ C.transpose(1, 2), dim1=1, dim2=2).clamp_min(0)
            gg = (visit * sq[:, None, :]).sum(2)
            goal = (target * visit).sum(2)  # rho_hat[i, j]
            valid = (hh > 0) & (gg > 0)
            rho = (hg / (hh * gg).clamp_min(1e-300).sqrt()).clamp(-1, 1)
            adjust = valid & (rho < goal)
            w = hh.sqrt() * (goal * (1 - rho**2).sqrt() - rho * (1 - goal**2).clamp_min(0).sqrt()) / (
                gg.sqrt() * ((1 - goal**2).clamp_min(0).sqrt() + 1e-8)).clamp_min(1e-300)
            C = C + torch.where(adjust, w, torch.zeros_like(w))[..., None] * visit
            moved = (1 - self.beta) * goal + self.beta * rho
            target = torch.where((valid[..., None] & (visit > 0)), moved[..., None], target)
        with torch.no_grad():
            rho_hat.copy_(target.to(rho_hat.dtype))
        return C

    def combine(self, grads: list[Tensor], losses: Tensor | None = None, parts=None) -> list[Tensor]:
        if self.group == "model":
            return group_weighted_sum(grads, self.resolved(gram_matrix(grads)[None]).sum(1)[0], None)
        coef = self.resolved(group_grams(grads, parts)).sum(1)  # [groups, T]: sum_i h_i
        return group_weighted_sum(grads, coef, parts)
