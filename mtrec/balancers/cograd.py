"""CoGrad (Yang et al., SIGIR 2023): add the gradient of one-step inter-task transference.

No official code exists; this is our reconstruction (docs/balancers.md derives it). It has not
been checked against the paper's equations: only the introduction of its source was readable. With a
virtual step alpha, the transference from task j to task i is
``L_i(theta) - L_i(theta - alpha g_j) ~ alpha g_i . g_j``; its gradient (step held constant) is
``alpha H_i g_j``. Task i's corrected gradient is ``g_i - gamma_j H_i g_j`` (summed over j != i),
with the Hessian approximated by

- ``hessian="diag-rms"`` (default): the diagonal empirical Fisher of the gradients *normalised per
  group* (each balanced tensor, or each part with ``--balance-groups part``):
  ``z_t = g_t / rms(g_t)`` (0 where the rms is 0), ``f_i = clamp(1 - z_i * sum_{j != i} gamma_j z_j, 0, 2)``,
  update ``sum_i g_i * f_i``. Gamma is dimensionless; scaling every gradient by c scales the update by c.
- ``hessian="diag-raw"``: the literal element-wise form ``g_i * clamp(1 - g_i * sum_{j != i} gamma_j g_j, 0, 2)``.
  Its correction is cubic in the gradient (relative change gamma g_i g_j per coordinate), so at
  batch-mean BCE scales (elements 1e-6 .. 1e-2) it is EW to fp32 round-off unless gamma is ~1e4.
- ``hessian="outer"``: ``H_i ~ g_i g_i^T``: ``g_i (1 - sum_{j != i} gamma_j g_i . g_j)``, clamped
  (a per-task rescaling; gamma has units 1 / g^2 as in ``diag-raw``).

The [0, 2] clamp is our safeguard, not the paper's: beyond it the correction would flip or more
than double a coordinate. The result is the EW sum of the corrected gradients, so gamma = 0 is
exactly EW. Products are formed in fp32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtrec.balancers.base import GradBalancer, check_choice, check_reals, gram_matrix, row_sum, weighted_sum
from mtrec.core.errors import UserError

HESSIANS = ("diag-rms", "diag-raw", "outer")


def _rms_per_slice(x: Tensor, count: int, ids: Tensor | None) -> Tensor:
    """Per task, the rms of the gradient over its group, broadcast to ``x``'s shape ``[T, ...]``.

    A group is the whole tensor (``count == 1``), each slice along dim 1 (``ids is None``, one part
    per slice), or the slices that share an id (a field's rows of the embedding table).
    """
    T = x.shape[0]
    if count == 1 or x.dim() < 2:
        # Sums of squares and the element count, summed over the processes holding other rows
        # (representation rows under torchrun: one all-reduce), then the mean.
        flat = x.reshape(T, -1)
        sums = row_sum(torch.cat([flat.square().sum(1), flat.new_full((1,), flat.shape[1])]))
        rms = (sums[:T] / sums[T:].clamp_min(1)).sqrt()
        return rms.view((T,) + (1,) * (x.dim() - 1))
    slices = x.reshape(T, x.shape[1], -1)
    sq = slices.square().sum(2)  # [T, n0]
    width = slices.shape[2]
    if ids is None:
        rms = (sq / width).sqrt()
    else:
        per_part = sq.new_zeros((T, count)).index_add_(1, ids, sq)
        elements = torch.zeros(count, dtype=sq.dtype, device=sq.device).index_add_(
            0, ids, torch.full_like(ids, width, dtype=sq.dtype))
        rms = (per_part / elements.clamp_min(1)).sqrt().index_select(1, ids)
    return rms.view(rms.shape + (1,) * (x.dim() - 2))


class CoGrad(GradBalancer):
    """Coordinated gradients (reconstruction): ``sum_i g_i * clamp(1 - z_i * sum_{j!=i} gamma_j z_j, 0, 2)``
    with ``z_t = g_t / rms(g_t)`` per group, so gamma is dimensionless and the update scales with g.

    Yang et al., SIGIR 2023 (arXiv 2303.05847): the gradient of one-step transference, Hessian ~ the
    diagonal Fisher; ``hessian="diag-raw"`` is the literal (unnormalised) form, a no-op at CTR scales.
    """

    name = "cograd"
    split_rows = True  # rows split over processes: docs/design.md, "Several processes"
    paper = "Yang et al., SIGIR 2023 (arXiv 2303.05847); reconstructed, no official code"
    default_scope = "all"  # the paper's shared modules include the embeddings; no code to say otherwise
    default_groups = "tensor"  # diag-rms normalises per balanced tensor (per part with --balance-groups part)

    def __init__(self, num_tasks: int, *, gamma: float | list[float] = 0.003, hessian: str = "diag-rms"):
        super().__init__(num_tasks)
        values = check_reals(self.name, "gamma", gamma, num_tasks, "[0, inf)", scalar_ok=True)
        if hessian == "diag":
            raise UserError(f"{self.name}: hessian 'diag' was split in two: 'diag-raw' is the former literal "
                            "element-wise form (a no-op at usual gradient scales), 'diag-rms' the scale-free "
                            "default")
        self.hessian = check_choice(self.name, "hessian", hessian, HESSIANS)
        self.register_buffer("gamma", torch.tensor(values), persistent=False)

    def combine(self, grads: list[Tensor], losses: Tensor | None = None, parts=None) -> list[Tensor]:
        gamma = self.gamma.to(grads[0].device)
        if self.hessian == "outer":
            gram = gram_matrix(grads).to(gamma.dtype)
            others = gram * gamma[None, :]  # others[i, j] = gamma_j g_i . g_j
            transfer = others.sum(1) - torch.diagonal(others)
            return weighted_sum(grads, (1 - transfer).clamp(0, 2))
        groups = zip(parts.counts, parts.ids) if parts is not None else ((1, None) for _ in grads)
        out = []
        for g, (count, ids) in zip(grads, groups):
            x = g.float()
            if self.hessian == "diag-rms":
                rms = _rms_per_slice(x, count, ids)
                z = torch.where(rms > 0, x / torch.where(rms > 0, rms, torch.ones_like(rms)), torch.zeros_like(x))
            else:
                z = x
            shape = (-1,) + (1,) * (x.dim() - 1)
            weighted = gamma.view(shape) * z
            others = weighted.sum(0, keepdim=True) - weighted  # sum_{j != i} gamma_j z_j
            out.append((x * (1 - z * others).clamp(0, 2)).sum(0).to(g.dtype))
        return out
