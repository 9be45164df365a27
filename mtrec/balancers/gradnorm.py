"""GradNorm (Chen et al., ICML 2018): learn loss weights that equalise the tasks' training rates."""

from __future__ import annotations

import torch
from torch import Tensor

from mtrec.balancers.base import GradBalancer, adam_step_, check_real, register_adam_state, require_losses, weighted_sum
from mtrec.balancers.parts import group_norms


class GradNorm(GradBalancer):
    """Weights ``w = T softmax(l)`` (LibMTL's parametrisation; logits l init 1, so w = 1).

    Each step, with G_t = w_t ||g_t|| (all balanced tensors, as LibMTL), Ltilde_t = L_t / L_t(0)
    and r_t = Ltilde_t / mean(Ltilde): the model gets ``sum_t sg[w_t] g_t`` (a sum; the weights
    sum to T) and the logits take one step of their own Adam (``lr``, betas 0.9/0.999, no weight
    decay) on ``sum_t |G_t - sg[mean(G) r_t^alpha]|``. L(0) is each task's first positive loss
    (the first batch; LibMTL's epoch-0 average would mean a whole epoch of EW).
    """

    name = "gradnorm"
    split_rows = True  # rows split over processes: docs/design.md, "Several processes"
    paper = "Chen et al., ICML 2018 (arXiv 1711.02257)"
    default_scope = "all"  # LibMTL's G_t is over every shared parameter (the paper: the last shared layer)
    needs_losses = True
    betas = (0.9, 0.999)
    adam_eps = 1e-8

    def __init__(self, num_tasks: int, *, alpha: float = 1.5, lr: float = 1e-3):
        super().__init__(num_tasks)
        self.alpha = check_real(self.name, "alpha", alpha, "[0, inf)")
        self.lr = check_real(self.name, "lr", lr, "(0, inf)")
        register_adam_state(self, torch.ones(num_tasks))
        self.register_buffer("initial_losses", torch.zeros(num_tasks))

    def weights(self) -> Tensor:
        return self.num_tasks * torch.softmax(self.logits, dim=0)

    def combine(self, grads: list[Tensor], losses: Tensor | None = None, parts=None) -> list[Tensor]:
        T = self.num_tasks
        losses = require_losses(self, losses)
        w = self.weights()
        self.applied = w.detach()
        combined = weighted_sum(grads, w)
        norms = group_norms(grads).norm(dim=0)  # per tensor, then over tensors
        with torch.no_grad():
            first = (self.initial_losses <= 0) & (losses > 0)
            self.initial_losses.copy_(torch.where(first, losses, self.initial_losses))
            known = self.initial_losses > 0
            rate = torch.where(known, losses / torch.where(known, self.initial_losses, 1.0), 1.0)
            r = rate / rate.mean().clamp_min(1e-12)
            G = w * norms
            target = G.mean() * r.pow(self.alpha)
            d_w = torch.sign(G - target) * norms  # d/dw_t of sum_t |G_t - target_t|
            z = torch.softmax(self.logits, dim=0)
            grad = T * z * (d_w - (z * d_w).sum())  # chain rule through w = T softmax(l)
            adam_step_(self, grad, self.betas, self.adam_eps)
        return combined
