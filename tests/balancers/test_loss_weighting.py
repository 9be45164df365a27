"""Loss weighting (EW, fixed weights, UW, DWA, FAMO) and the stateful GradNorm / DB-MTL."""

import math

import pytest
import torch

from mtrec.balancers import build


def attached(values):
    return torch.tensor(values, dtype=torch.float32, requires_grad=True)


def test_ew_is_the_sum():
    losses = attached([0.3, 0.5, 0.9])
    value = build("ew", num_tasks=3).weigh(losses)
    value.backward()
    torch.testing.assert_close(value, torch.tensor(1.7))
    torch.testing.assert_close(losses.grad, torch.ones(3))


def test_fixed_weights():
    losses = attached([0.3, 0.5, 0.9])
    value = build("weights", num_tasks=3, weights=[1, 0.5, 0]).weigh(losses)
    value.backward()
    torch.testing.assert_close(value, torch.tensor(0.55))
    torch.testing.assert_close(losses.grad, torch.tensor([1.0, 0.5, 0.0]))
    torch.testing.assert_close(build("weights", num_tasks=2).weigh(torch.tensor([1.0, 2.0])), torch.tensor(3.0))


def test_uncertainty_weighting_formula_and_learnable_log_variances():
    b = build("uw", num_tasks=2)
    assert [p.shape for p in b.parameters()] == [(2,)]
    losses = attached([0.4, 1.2])
    value = b.weigh(losses)
    s = -0.5
    want = sum(0.5 * math.exp(-s) * L + 0.5 * s for L in (0.4, 1.2))
    assert abs(float(value.detach()) - want) < 1e-6
    value.backward()
    # d/ds_t = (1 - e^{-s_t} L_t) / 2, the engine's optimizer follows it.
    torch.testing.assert_close(b.log_vars.grad, torch.tensor([(1 - math.exp(0.5) * L) / 2 for L in (0.4, 1.2)]))


def test_dwa_weights_after_two_windows():
    b = build("dwa", num_tasks=3, temperature=2.0, window=2)
    history = [[1.0, 2.0, 3.0], [1.0, 2.0, 1.0],  # window 1 means (1, 2, 2)
               [0.5, 2.0, 3.0], [0.5, 2.4, 3.0]]  # window 2 means (0.5, 2.2, 3)
    for losses in history:
        torch.testing.assert_close(b.weights(), torch.ones(3))  # until two windows are complete
        b.weigh(torch.tensor(losses))
    ratio = torch.tensor([0.5 / 1.0, 2.2 / 2.0, 3.0 / 2.0])
    want = 3 * torch.softmax(ratio / 2.0, 0)
    torch.testing.assert_close(b.weights(), want)
    losses = attached([1.0, 1.0, 1.0])
    b.weigh(losses).backward()
    torch.testing.assert_close(losses.grad, want)  # weights are constants for the backward


def test_famo_one_step_against_a_hand_calculation():
    b = build("famo", num_tasks=2, lr=0.025, weight_decay=1e-3)
    before = [0.8, 0.2]
    losses = attached(before)
    value = b.weigh(losses)
    z = [0.5, 0.5]
    c = sum(zt / (L + 1e-8) for zt, L in zip(z, before))
    assert abs(float(value.detach()) - sum(zt * math.log(L + 1e-8) for zt, L in zip(z, before)) / c) < 1e-6
    value.backward()
    torch.testing.assert_close(losses.grad, torch.tensor([zt / (c * (L + 1e-8)) for zt, L in zip(z, before)]))
    after = [0.6, 0.19]
    b.after_step(torch.tensor(after))
    delta = [math.log(x + 1e-8) - math.log(y + 1e-8) for x, y in zip(before, after)]
    mean = sum(zt * d for zt, d in zip(z, delta))
    grad = [zt * (d - mean) for zt, d in zip(z, delta)]  # J_softmax^T delta (+ decay * xi, xi = 0)
    # Adam's first step: m_hat = g, v_hat = g^2.
    want = [-0.025 * g / (abs(g) + 1e-8) for g in grad]
    torch.testing.assert_close(b.logits, torch.tensor(want))
    # The task whose loss fell less in relative terms (task 1) gains weight.
    assert b.weights()[1] > b.weights()[0]


def test_gradnorm_raises_the_weight_of_the_task_that_trains_slowest():
    T = 3
    b = build("gradnorm", num_tasks=T, alpha=1.5)
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(1, 6, generator=g).expand(T, 6).clone()]  # equal gradient norms
    torch.testing.assert_close(b.weights(), torch.ones(T))
    out = b.combine(grads, torch.tensor([0.7, 0.7, 0.7]))  # sets L(0); all rates equal: no move
    torch.testing.assert_close(out[0], T * grads[0][0])
    torch.testing.assert_close(b.weights(), torch.ones(T))
    b.combine(grads, torch.tensor([0.7, 0.35, 0.35]))  # task 0 has the largest L/L(0)
    w = b.weights()
    assert w[0] > 1 > w[1] and torch.isclose(w[1], w[2]) and torch.isclose(w.sum(), torch.tensor(3.0))


def test_db_mtl_ema_of_log_loss_gradients_and_max_norm_scaling():
    beta = 0.9
    b = build("db-mtl", num_tasks=2, beta=beta)
    g1 = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    g2 = torch.tensor([[2.0, 0.0], [0.0, 0.0]])  # task 1 has no gradient on step 2
    L1, L2 = torch.tensor([0.5, 2.0]), torch.tensor([0.25, 1.0])
    b.combine([g1], L1)
    out = b.combine([g2], L2)
    e1 = (1 - beta) * g1 / (L1[:, None] + 1e-8)
    e2 = beta * e1 + (1 - beta) * g2 / (L2[:, None] + 1e-8)
    e2[1] = e1[1]  # the zero-gradient task keeps its EMA
    torch.testing.assert_close(b.grad_ema_0, e2)
    norms = e2.norm(dim=1)
    want = (norms.max() / (norms + 1e-8))[:, None] * e2
    torch.testing.assert_close(out[0], want.sum(0))


def test_db_mtl_refuses_changing_shapes():
    from mtrec.core.errors import UserError

    b = build("db-mtl", num_tasks=2)
    b.combine([torch.ones(2, 3)], torch.ones(2))
    with pytest.raises(UserError, match="balance-scope shared"):
        b.combine([torch.ones(2, 4)], torch.ones(2))


def test_db_mtl_state_loads_into_a_fresh_instance():
    b = build("db-mtl", num_tasks=2)
    b.combine([torch.ones(2, 3), torch.ones(2, 2, 2)], torch.ones(2))
    fresh = build("db-mtl", num_tasks=2)
    fresh.load_state_dict(b.state_dict())
    assert fresh.grad_ema_1.shape == (2, 2, 2) and torch.equal(fresh.grad_ema_1, b.grad_ema_1)
