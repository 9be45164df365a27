"""DB-MTL (Lin et al., arXiv 2308.12029): dual balancing of loss scales and gradient magnitudes."""

from __future__ import annotations

import torch
from torch import Tensor

from mtrec.balancers.base import GradBalancer, check_real, require_losses, weighted_sum
from mtrec.core.errors import UserError


class DBMTL(GradBalancer):
    """Loss-scale balancing: the gradient of log(L_t + 1e-8), i.e. ``g_t / (L_t + 1e-8)`` (so it
    needs the losses, not a second backward). Gradient-magnitude balancing: an EMA
    ``ghat_t <- beta_k ghat_t + (1 - beta_k) g_t / (L_t + 1e-8)`` with ``beta_k = beta / k^beta_sigma``
    (buffers init 0, k = step), then ``alpha_t = max_j ||ghat_j|| / (||ghat_t|| + 1e-8)`` and the
    result ``sum_t alpha_t ghat_t`` (every task contributes the largest norm). The reference's
    absolute ``+ 1e-8`` on the EMA norms is replaced by leaving zero-norm tasks out (alpha_t ghat_t
    is 0 for them anyway), so the result scales exactly with the gradients. As the reference (the
    authors' LibMTL), the task-specific parameters get the gradient of log(L_t + 1e-8) too:
    ``head_scales`` = 1 / (L_t + 1e-8).

    The EMA is T x (balanced parameters) of persistent state, so DB-MTL needs a scope whose
    tensors keep their shapes: ``shared`` (not ``all``, whose touched rows change every step, nor
    ``representation``, whose rows are different samples every step). A task with an all-zero
    gradient keeps its EMA on that step.
    """

    name = "db-mtl"
    scopes = ("shared",)  # a moving average per coordinate needs tensors of a fixed shape
    paper = "Lin et al., arXiv 2308.12029"
    needs_losses = True
    lazy_buffers = ("grad_ema_",)

    def __init__(self, num_tasks: int, *, beta: float = 0.9, beta_sigma: float = 0.0):
        super().__init__(num_tasks)
        self.beta = check_real(self.name, "beta", beta, "[0, 1)")
        self.beta_sigma = check_real(self.name, "beta_sigma", beta_sigma, "[0, inf)")
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def _emas(self, grads: list[Tensor]) -> list[Tensor]:
        """The per-tensor EMA buffers ``grad_ema_<k>`` (``[T, *shape_k]`` fp32), created on the first call."""
        existing = sorted((n for n, _ in self.named_buffers(recurse=False) if n.startswith("grad_ema_")),
                          key=lambda n: int(n.rsplit("_", 1)[1]))
        if not existing:
            for k, g in enumerate(grads):
                self.register_buffer(f"grad_ema_{k}", torch.zeros(g.shape, dtype=torch.float32, device=g.device))
            existing = [f"grad_ema_{k}" for k in range(len(grads))]
        emas = [getattr(self, n) for n in existing]
        if [tuple(e.shape) for e in emas] != [tuple(g.shape) for g in grads]:
            raise UserError(f"{self.name}: the balanced tensors changed shape between steps; DB-MTL keeps a "
                            "moving average of each parameter's gradient, so use --balance-scope shared")
        return emas

    def combine(self, grads: list[Tensor], losses: Tensor | None = None, parts=None) -> list[Tensor]:
        T = self.num_tasks
        losses = require_losses(self, losses)
        emas = self._emas(grads)
        scale = 1.0 / (losses + 1e-8)
        self._head_scales = scale
        sq = torch.stack([torch.linalg.vector_norm(g.reshape(T, -1), dim=1, dtype=torch.float32) ** 2
                          for g in grads]).sum(0)
        has = sq > 0
        with torch.no_grad():
            self.steps += 1
            beta = self.beta / self.steps.float() ** self.beta_sigma
            for ema, g in zip(emas, grads):
                shape = (T,) + (1,) * (g.dim() - 1)
                new = beta * ema + (1 - beta) * g.float() * scale.view(shape)
                ema.copy_(torch.where(has.view(shape), new, ema))
        norms = torch.stack([torch.linalg.vector_norm(e.reshape(T, -1), dim=1) ** 2 for e in emas]).sum(0).sqrt()
        alpha = norms.max() / torch.where(norms > 0, norms, torch.ones_like(norms))
        return [c.to(g.dtype) for c, g in zip(weighted_sum(emas, alpha), grads)]
