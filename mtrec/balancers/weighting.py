"""Loss weighting: the T losses become one scalar and the engine runs one backward.

EW, fixed weights, uncertainty weighting (UW), dynamic weight average (DWA), FAMO, random loss
weighting (RLW) and IMTL-L. Weights
that are not learned by the engine's optimizer (DWA's, FAMO's) are computed from detached losses
and kept in buffers, so the returned scalar's gradient is ``sum_t w_t * grad L_t``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mtrec.balancers.base import LossBalancer, adam_step_, check_int, check_real, check_reals, register_adam_state
from mtrec.core.errors import UserError


class EW(LossBalancer):
    """Equal weighting: ``L = sum_t L_t`` (a sum, as LibMTL; the mean only rescales the step)."""

    name = "ew"
    paper = "equal weighting (baseline)"

    def weigh(self, losses: Tensor) -> Tensor:
        self.applied = torch.ones_like(losses.detach())
        return losses.sum()


class FixedWeights(LossBalancer):
    """Fixed, user-given weights: ``L = sum_t w_t L_t``. Without ``weights`` every w_t = 1 (= EW)."""

    name = "weights"
    paper = "fixed loss weights (baseline)"

    def __init__(self, num_tasks: int, *, weights: list[float] | None = None):
        super().__init__(num_tasks)
        values = [1.0] * num_tasks if weights is None else check_reals(
            self.name, "weights", weights, num_tasks, "[0, inf)")
        if not any(v > 0 for v in values):
            raise UserError(f"{self.name}: weights must not all be zero, got {weights!r}")
        self.register_buffer("task_weights", torch.tensor(values))

    def weigh(self, losses: Tensor) -> Tensor:
        self.applied = self.task_weights
        return (self.task_weights.to(losses.dtype) * losses).sum()


class UW(LossBalancer):
    """Uncertainty weighting (Kendall et al., CVPR 2018): ``L = sum_t (e^{-s_t} L_t + s_t) / 2``.

    ``s_t = log sigma_t^2`` are ``nn.Parameter``s trained by the engine's optimizer (without
    weight decay), initialised at ``init`` (LibMTL: -0.5).
    """

    name = "uw"
    paper = "Kendall et al., CVPR 2018 (arXiv 1705.07115)"

    def __init__(self, num_tasks: int, *, init: float = -0.5):
        super().__init__(num_tasks)
        init = check_real(self.name, "init", init, "[-20, 20]")
        self.log_vars = torch.nn.Parameter(torch.full((num_tasks,), init))

    def weigh(self, losses: Tensor) -> Tensor:
        s = self.log_vars.to(losses.dtype)
        self.applied = 0.5 * torch.exp(-s.detach())
        return (0.5 * torch.exp(-s) * losses + 0.5 * s).sum()


class DWA(LossBalancer):
    """Dynamic weight average (Liu et al., CVPR 2019): ``w = T softmax(r / temperature)``.

    ``r_t = Lbar_t(k-1) / Lbar_t(k-2)``, the ratio of task t's mean loss over the last two
    completed windows of ``window`` steps (the paper's epochs; one CTR epoch is often all there
    is). ``w = 1`` until two windows are complete. Weights are detached: ``L = sum_t w_t L_t``.
    """

    name = "dwa"
    paper = "Liu et al., CVPR 2019 (arXiv 1803.10704)"

    def __init__(self, num_tasks: int, *, temperature: float = 2.0, window: int = 100):
        super().__init__(num_tasks)
        self.temperature = check_real(self.name, "temperature", temperature, "(0, inf)")
        self.window = check_int(self.name, "window", window, "[1, inf)")
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("loss_sum", torch.zeros(num_tasks))
        self.register_buffer("last_mean", torch.zeros(num_tasks))  # window k-1
        self.register_buffer("before_last_mean", torch.zeros(num_tasks))  # window k-2

    def weights(self) -> Tensor:
        """The weights the next ``weigh`` applies, ``[T]``."""
        ready = self.steps >= 2 * self.window
        ratio = self.last_mean / self.before_last_mean.clamp_min(1e-12)
        dynamic = self.num_tasks * torch.softmax(ratio / self.temperature, dim=0)
        return torch.where(ready, dynamic, torch.ones_like(dynamic))

    def weigh(self, losses: Tensor) -> Tensor:
        w = self.weights()
        self.applied = w
        with torch.no_grad():
            self.loss_sum += losses.detach().float()
            self.steps += 1
            closed = self.steps % self.window == 0
            self.before_last_mean.copy_(torch.where(closed, self.last_mean, self.before_last_mean))
            self.last_mean.copy_(torch.where(closed, self.loss_sum / self.window, self.last_mean))
            self.loss_sum.copy_(torch.where(closed, torch.zeros_like(self.loss_sum), self.loss_sum))
        return (w.to(losses.dtype) * losses).sum()


class FAMO(LossBalancer):
    """Fast adaptive multitask optimisation (Liu et al., NeurIPS 2023).

    Task logits xi (buffers, init 0), z = softmax(xi), D_t = L_t + 1e-8 (L_t^min = 0 as LibMTL),
    c = sg[sum_t z_t / D_t]; the engine backpropagates ``sum_t z_t log D_t / c``. After the
    optimizer step it re-evaluates the losses on the same batch and ``after_step`` moves xi with
    its own Adam (lr 0.025, weight decay 1e-3, L2 as torch's Adam) along
    ``J_softmax(xi)^T (log D_before - log D_after)``. Its moments live in buffers.
    """

    name = "famo"
    paper = "Liu et al., NeurIPS 2023 (arXiv 2306.03792)"
    needs_lookahead = True
    betas = (0.9, 0.999)
    adam_eps = 1e-8

    def __init__(self, num_tasks: int, *, lr: float = 0.025, weight_decay: float = 1e-3):
        super().__init__(num_tasks)
        self.lr = check_real(self.name, "lr", lr, "(0, inf)")
        self.weight_decay = check_real(self.name, "weight_decay", weight_decay, "[0, inf)")
        register_adam_state(self, torch.zeros(num_tasks))
        self.register_buffer("log_d_before", torch.zeros(num_tasks))

    def weights(self) -> Tensor:
        return torch.softmax(self.logits, dim=0)

    def weigh(self, losses: Tensor) -> Tensor:
        z = self.weights().to(losses.dtype)
        self.applied = z.detach()
        d = losses + 1e-8
        # A task with no valid samples (loss 0) would make c ~ 1e8 and stall every other task:
        # it is left out of c (its own term has no gradient anyway).
        valid = losses.detach() > 0
        c = torch.where(valid, z / d.detach(), torch.zeros_like(z)).sum().clamp_min(1e-30)
        with torch.no_grad():
            self.log_d_before.copy_(torch.log(d.detach().float()))
        return (z * torch.log(d)).sum() / c

    @torch.no_grad()
    def after_step(self, losses: Tensor) -> None:
        delta = self.log_d_before - torch.log(losses.detach().float() + 1e-8)
        z = self.weights()
        grad = z * (delta - (z * delta).sum())  # J_softmax(xi)^T delta
        grad = grad + self.weight_decay * self.logits
        adam_step_(self, grad, self.betas, self.adam_eps)


# --- a counter-based normal generator for RLW -------------------------------------------------
# The draw for (seed, step, task) is a pure function of the three numbers: its whole state is the
# step counter, a buffer, so it round-trips through checkpoints, is undone with the other buffers
# when the engine skips a step, and gives the same weights on every device. 32-bit integer hash
# (lowbias32 mixing constants) in int64 arithmetic, products split so that nothing overflows.

_MASK32 = 0xFFFFFFFF


def _mul32(x: Tensor, c: int) -> Tensor:
    """``x * c mod 2^32`` for 0 <= x < 2^32 held in int64 (partial products stay below 2^49)."""
    low = x * (c & 0xFFFF)
    high = ((x * (c >> 16)) & 0xFFFF) << 16
    return (low + high) & _MASK32


def _mix32(x: Tensor) -> Tensor:
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def counter_normals(seed: int, counters: Tensor, dtype: torch.dtype) -> Tensor:
    """One standard normal per int64 counter (>= 0), from two hashed uniforms (Box-Muller)."""
    key = _mix32(torch.full_like(counters, seed & _MASK32))
    h = _mix32(key ^ (counters & _MASK32))
    h = _mix32(h ^ ((counters >> 32) & _MASK32))
    u1 = ((_mix32(h ^ 0x68E31DA4) >> 8).to(dtype) + 0.5) / 2**24
    u2 = ((_mix32(h ^ 0xB5297A4D) >> 8).to(dtype) + 0.5) / 2**24
    return (-2 * torch.log(u1)).sqrt() * torch.cos(2 * torch.pi * u2)


class RLW(LossBalancer):
    """Random loss weighting (Lin et al., TMLR 2022, arXiv 2111.10603): every step draws
    ``lambda ~ N(0, I)`` and weighs the losses with ``softmax(lambda)`` (LibMTL's default
    distribution; the weights sum to 1): ``L = sum_t w_t L_t``, weights constant for the backward.

    The draws come from a counter-based generator seeded by ``seed``: the normal for task t at step
    k is a hash of (seed, k T + t), so the only state is the step counter (a buffer).
    """

    name = "rlw"
    paper = "Lin et al., TMLR 2022 (arXiv 2111.10603, Reasonable Effectiveness of Random Weighting)"

    def __init__(self, num_tasks: int, *, seed: int = 0):
        super().__init__(num_tasks)
        self.seed = check_int(self.name, "seed", seed, "[0, 4294967295]")
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def weights(self) -> Tensor:
        """The weights the next ``weigh`` applies, ``[T]``."""
        counters = self.steps * self.num_tasks + torch.arange(self.num_tasks, device=self.steps.device)
        dtype = torch.float32 if self.steps.device.type == "mps" else torch.float64
        return torch.softmax(counter_normals(self.seed, counters, dtype), dim=0).float()

    def weigh(self, losses: Tensor) -> Tensor:
        w = self.weights().to(losses.device)
        self.applied = w
        with torch.no_grad():
            self.steps += 1
        return (w.to(losses.dtype) * losses).sum()


class IMTLL(LossBalancer):
    """IMTL-L, the loss half of impartial multi-task learning (Liu et al., ICLR 2021):
    ``L = sum_t (e^{s_t} L_t - s_t)`` with learnable s (init 0), trained by the engine's optimizer
    without weight decay; s_t tends to -log L_t, so every scaled loss tends to 1. One backward (the
    ``imtl`` balancer's ``variant="loss"`` gives the same update from T backward passes).
    """

    name = "imtl-l"
    paper = "Liu et al., ICLR 2021 (Towards Impartial Multi-task Learning), IMTL-L"

    def __init__(self, num_tasks: int):
        super().__init__(num_tasks)
        self.log_scales = torch.nn.Parameter(torch.zeros(num_tasks))

    def weigh(self, losses: Tensor) -> Tensor:
        s = self.log_scales.to(losses.dtype)
        self.applied = torch.exp(s.detach())
        return (torch.exp(s) * losses - s).sum()
