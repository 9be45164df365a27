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
- ``hessian="hvp"``: the exact Hessian, ``sum_i (g_i - lam lr H_i sum_{j != i} gamma_j z_j)``: the
  virtual step along task j is the optimizer's, ``lr z_j`` (Adam moves each coordinate by about lr,
  i.e. along ``z_j = g_j / rms(g_j)`` per group), so lam (default 50) and gamma are dimensionless. The engine
  computes ``sum_i H_i v_i`` (double backward, mtrec/engine/hvp.py) and passes it as ``hvp``;
  scopes ``shared`` and ``all`` only. ``hessian="hvp-raw"``: the literal step ``lr g_j``.

The [0, 2] clamp is our safeguard, not the paper's: beyond it the correction would flip or more
than double a coordinate. The result is the EW sum of the corrected gradients, so gamma = 0 is
exactly EW. Products are formed in fp32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtrec.balancers.base import GradBalancer, check_choice, check_real, check_reals, gram_matrix, row_sum, weighted_sum
from mtrec.core.errors import UserError

HESSIANS = ("diag-rms", "diag-raw", "outer", "hvp", "hvp-raw")
HVP_FORMS = ("hvp", "hvp-raw")
# Why the exact form has no representation scope (build.py and the step say it in one line).
HVP_SCOPE_REASON = ("hessian=hvp takes Hessian-vector products w.r.t. parameters, the dense shared ones and the "
                    "touched embedding rows; scope representation balances gradients w.r.t. activations")


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


def _normalised(x: Tensor, count: int, ids: Tensor | None) -> Tensor:
    """``x / rms(x)`` per task and group (0 where the rms is 0)."""
    rms = _rms_per_slice(x, count, ids)
    return torch.where(rms > 0, x / torch.where(rms > 0, rms, torch.ones_like(rms)), torch.zeros_like(x))


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

    def __init__(self, num_tasks: int, *, gamma: float | list[float] = 0.003, hessian: str = "diag-rms",
                 lam: float = 50.0):
        super().__init__(num_tasks)
        values = check_reals(self.name, "gamma", gamma, num_tasks, "[0, inf)", scalar_ok=True)
        self.lam = check_real(self.name, "lam", lam, "[0, inf)")  # the hvp forms' strength; unused otherwise
        if hessian == "diag":
            raise UserError(f"{self.name}: hessian 'diag' was split in two: 'diag-raw' is the former literal "
                            "element-wise form (a no-op at usual gradient scales), 'diag-rms' the scale-free "
                            "default")
        self.hessian = check_choice(self.name, "hessian", hessian, HESSIANS)
        self.register_buffer("gamma", torch.tensor(values), persistent=False)
        # The exact forms need the engine's Hessian-vector products, which exist for parameters only.
        self.needs_hvp = self.hessian in HVP_FORMS
        if self.needs_hvp:
            self.scopes = ("shared", "all")
            self.scope_reason = HVP_SCOPE_REASON

    def combine(self, grads: list[Tensor], losses: Tensor | None = None, parts=None, hvp=None) -> list[Tensor]:
        """``hvp`` (the exact forms only, given by the engine): ``hvp.lr``, the optimizer's learning
        rate, and ``hvp(directions) -> [sum_i H_i directions[k][i] for each tensor k]``."""
        gamma = self.gamma.to(grads[0].device)
        if self.needs_hvp:
            return self._exact(grads, gamma, parts, hvp)
        if self.hessian == "outer":
            gram = gram_matrix(grads).to(gamma.dtype)
            others = gram * gamma[None, :]  # others[i, j] = gamma_j g_i . g_j
            transfer = others.sum(1) - torch.diagonal(others)
            return weighted_sum(grads, (1 - transfer).clamp(0, 2))
        out = []
        for g, (count, ids) in zip(grads, _groups(grads, parts)):
            x = g.float()
            z = _normalised(x, count, ids) if self.hessian == "diag-rms" else x
            others = _from_others(z, gamma)
            out.append((x * (1 - z * others).clamp(0, 2)).sum(0).to(g.dtype))
        return out

    def _exact(self, grads: list[Tensor], gamma: Tensor, parts, hvp) -> list[Tensor]:
        """``sum_i g_i - lam lr sum_i H_i v_i`` with ``v_i = sum_{j != i} gamma_j z_j`` (``g_j`` in hvp-raw)."""
        if hvp is None:
            raise ValueError(f"cograd hessian={self.hessian!r} needs the engine's Hessian-vector products: "
                             "combine(grads, hvp=...)")
        steps = [_normalised(g.float(), count, ids) if self.hessian == "hvp" else g.float()
                 for g, (count, ids) in zip(grads, _groups(grads, parts))]
        products = hvp([_from_others(s, gamma) for s in steps])
        return [(g.float().sum(0) - (self.lam * hvp.lr) * h.float()).to(g.dtype) for g, h in zip(grads, products)]


def _groups(grads: list[Tensor], parts):
    """(count, ids) per balanced tensor: its parts, or one group per tensor."""
    return zip(parts.counts, parts.ids) if parts is not None else ((1, None) for _ in grads)


def _from_others(z: Tensor, gamma: Tensor) -> Tensor:
    """``[T, ...]``: row i is ``sum_{j != i} gamma_j z_j``."""
    weighted = gamma.view((-1,) + (1,) * (z.dim() - 1)) * z
    return weighted.sum(0, keepdim=True) - weighted
