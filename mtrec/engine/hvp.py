"""Exact Hessian-vector products for CoGrad's ``hessian="hvp"`` (docs/balancers.md, CoGrad).

The balancer's rule needs ``sum_i H_i v_i`` per balanced tensor, where H_i is task i's Hessian
w.r.t. all balanced tensors together (cross-tensor curvature included) and ``v_i`` the direction
the balancer built from the other tasks' gradients. ``TaskHessians`` computes it for one batch:
a second forward of the batch, each task's gradient of the balanced tensors with
``create_graph=True`` (T backward passes), then **one** double backward of ``sum_i g_i . v_i``,
whose gradient is ``sum_i H_i v_i`` (the T products are only ever summed, so one pass does).
The graph is released by that pass. In scope ``all`` the touched rows of the embedding table are
a leaf ``[U, d]`` of the second forward, so their Hessian (and its coupling with the dense
parameters) is exact and never table-sized.

Scopes: ``shared`` and ``all``; ``representation`` balances activation gradients and is refused
(with the reason, by build.py and here), and so are several processes (the products would need
their own all-reduce; not built). The learning rate is the optimizer's current one for the dense
shared parameters (a Python float set by the schedule, or a tensor: never read on the host).
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtrec.core.errors import UserError


def check(balancer, scope: str, group) -> None:
    """Refuse, in one line, the settings where the step cannot give ``balancer`` its products."""
    if not getattr(balancer, "needs_hvp", False):
        return
    if scope not in balancer.scopes:
        raise UserError(f"{balancer.name} cannot run with --balance-scope {scope}: use "
                        f"{' or '.join(balancer.scopes)} ({balancer.scope_reason})")
    if group is not None:
        raise UserError(f"{balancer.name} hessian={balancer.hessian} runs in one process only: its Hessian-vector "
                        "products are not summed across torchrun ranks (use another hessian)")


class TaskHessians:
    """``lr`` and ``__call__(directions)`` for one batch: per balanced tensor k,
    ``sum_i H_i directions[k][i]`` (``directions[k]`` is ``[T, *shape_k]``)."""

    def __init__(self, stepper, batch, rows: tuple[Tensor, Tensor] | None = None):
        self.stepper, self.batch, self.rows = stepper, batch, rows  # rows: (touched, where) in scope all
        self.lr = _lr_of(stepper.optimizer, stepper.shared_params[0])

    def __call__(self, directions: list[Tensor]) -> list[Tensor]:
        stepper, b = self.stepper, self.batch
        model = stepper.model
        inputs = list(stepper.shared_params)
        with torch.enable_grad(), stepper.autocast:
            if self.rows is None:
                e = model.embed(b.codes)
            else:
                touched, where = self.rows
                rows = model.embedding.table.weight.detach()[touched].requires_grad_()
                e = rows[where].view(*b.codes.shape, rows.shape[1])
                inputs.append(rows)
            logits = model.decode(model.encode(e, b.numeric, b.codes))
        losses = stepper._losses(logits, b)
        total = losses.new_zeros(())
        for t in range(stepper.num_tasks):
            grads = torch.autograd.grad(losses[t], inputs, create_graph=True, allow_unused=True)
            total = total + sum((g.float() * d[t]).sum() for g, d in zip(grads, directions) if g is not None)
        # No direction reaches the graph (gamma 0): every product is 0.
        products = (torch.autograd.grad(total, inputs, allow_unused=True) if total.requires_grad
                    else [None] * len(inputs))
        return [torch.zeros_like(x) if h is None else h for h, x in zip(products, inputs)]


def _lr_of(optimizer, param) -> float | Tensor:
    """The current learning rate of the optimizer's group that holds ``param``."""
    for group in optimizer.param_groups:
        if any(p is param for p in group["params"]):
            return group["lr"]
    raise ValueError("the optimizer does not hold the balanced parameters")
