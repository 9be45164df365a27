"""UPGrad, PCD, FairGrad, RLW and IMTL-L: each rule re-stated in float64 on hand-made cases (scipy
solvers on the primal problems, plain Python integers for RLW's generator), never from mtrec's own
formulas."""

import math

import numpy as np
import pytest
import torch
from scipy import optimize

from mtrec.balancers import build

# Three tasks in R^4 with conflicts (g0 . g1 < 0, g1 . g2 < 0) that the mean does not resolve
# (mean . g0 < 0).
G = np.array([[1.0, 0.5, 0.0, -0.2],
              [-1.5, 0.1, 0.3, 0.1],
              [0.3, -0.6, 0.9, 0.2]])


def as_grads(matrix, scale=1.0):
    """One balanced tensor of shape [2, 2] per task (the rule must not depend on the split)."""
    return [torch.tensor(matrix * scale, dtype=torch.float32).reshape(len(matrix), 2, 2)]


def combined(name, matrix, scale=1.0, **options):
    b = build(name, num_tasks=len(matrix), **options)
    return b.combine(as_grads(matrix, scale))[0].double().flatten().numpy(), b


def minimise(objective, x0, constraints, bounds=None):
    result = optimize.minimize(objective, x0, method="SLSQP", constraints=constraints, bounds=bounds,
                               options={"ftol": 1e-13, "maxiter": 2000})
    assert result.success, result.message
    return result.x


# --- UPGrad ---------------------------------------------------------------------------------------


def dual_cone_projection(g, J):
    """argmin_d ||d - g||^2 s.t. J d >= 0 (Quinton & Rey's Eq. 3). Its dual is a non-negative least
    squares problem, d = g + J^T lam with lam = argmin_{lam >= 0} ||J^T lam + g|| (Lawson-Hanson)."""
    lam, _ = optimize.nnls(J.T, -g)
    return g + J.T @ lam


def test_upgrad_averages_the_projections_of_each_gradient_onto_the_dual_cone():
    want = np.mean([dual_cone_projection(g, G) for g in G], 0)
    got, _ = combined("upgrad", G, reg_eps=0.0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert (G @ got >= -1e-6).all()  # conflicts with no task
    assert (G @ G.mean(0) < 0).any()  # where the mean does


def test_upgrad_default_is_the_reference_qp_with_its_regularised_gram():
    """TorchJD / LibMTL: weights sum_i argmin_{v >= e_i / T} v^T (M / tr M + 1e-4 I) v."""
    M = G @ G.T
    A = M / np.trace(M) + 1e-4 * np.eye(3)
    weights = np.zeros(3)
    for i in range(3):
        u = np.eye(3)[i] / 3
        cons = [{"type": "ineq", "fun": lambda v, k=k, u=u: v[k] - u[k]} for k in range(3)]
        weights += minimise(lambda v: v @ A @ v, u + 0.1, cons)
    got, b = combined("upgrad", G)
    np.testing.assert_allclose(b.applied.numpy(), weights, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got, weights @ G, rtol=1e-5, atol=1e-6)


def test_upgrad_leaves_non_conflicting_gradients_as_their_mean():
    aligned = np.array([[1.0, 0.2, 0.0, 0.0], [0.5, 0.5, 0.1, 0.0], [0.3, 0.0, 0.4, 0.1]])
    got, _ = combined("upgrad", aligned, reg_eps=0.0)
    np.testing.assert_allclose(got, aligned.mean(0), rtol=1e-6, atol=1e-7)


def test_upgrad_with_more_tasks_than_the_exact_solver_takes():
    """T = 12 runs the coordinate-descent sweeps: still the projections' average."""
    rng = np.random.default_rng(0)
    J = rng.normal(size=(12, 30))
    want = np.mean([dual_cone_projection(g, J) for g in J], 0)
    got = build("upgrad", num_tasks=12, reg_eps=0.0).combine([torch.tensor(J, dtype=torch.float32)])[0]
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


# --- PCD ------------------------------------------------------------------------------------------


def primary_with_guarantees(J, tau):
    """argmin_d ||d - g_0||^2 s.t. S d >= b, S the secondaries, b_j = tau ||g_j||^2: shifted by a point
    p with S p = b it is the projection of g_0 - p onto the cone {S d >= 0}."""
    S = J[1:]
    p = S.T @ np.linalg.solve(S @ S.T, tau * (S**2).sum(1))
    return p + dual_cone_projection(J[0] - p, S)


@pytest.mark.parametrize("tau", [0.0, 0.1, 0.5])
def test_pcd_is_the_closest_direction_to_the_primary_that_keeps_each_secondary_guarantee(tau):
    want = primary_with_guarantees(G, tau)
    got, b = combined("pcd", G, tau=tau)
    # The soft constraints (ridge 1e-4 ||g_j||^2) move the answer by ~1e-4 relative.
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * np.abs(want).max())
    sq = (G[1:] ** 2).sum(1)
    assert (G[1:] @ got >= (tau - 1e-3) * sq).all()
    assert tau > 0 or (G[1:] @ G[0] < 0).any()  # at tau = 0 there is still a conflict to remove
    assert float(b.applied[0]) == 1.0


def test_pcd_two_tasks_by_hand():
    """g0 = (1, 0), g1 = (-1, 1): g0 . g1 = -1, ||g1||^2 = 2. With tau = 0.25 the guarantee is 0.5, so
    lambda = (0.5 - (-1)) / (2 (1 + 1e-4)) and d = g0 + lambda g1."""
    J = np.array([[1.0, 0.0, 0.0, 0.0], [-1.0, 1.0, 0.0, 0.0]])
    got, b = combined("pcd", J, tau=0.25)
    lam = 1.5 / (2 * (1 + 1e-4))
    np.testing.assert_allclose(got, J[0] + lam * J[1], rtol=1e-6, atol=1e-7)
    # Already served: d = g0 when the secondary makes enough progress along it.
    got, _ = combined("pcd", np.array([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]]), tau=0.25)
    np.testing.assert_allclose(got, [1.0, 0.0, 0.0, 0.0], atol=1e-7)


def test_pcd_stays_bounded_when_secondaries_exclude_each_other():
    """g1 = -g2: no direction serves both. The soft constraints balance them: the step stays of the
    gradients' size (their lambdas grow, but only along g1 + g2 = 0)."""
    J = np.array([[1.0, 0.3, 0.0, 0.0], [0.2, 1.0, 0.0, 0.0], [-0.2, -1.0, 0.0, 0.0]])
    got, _ = combined("pcd", J, tau=0.1)
    assert np.isfinite(got).all() and np.linalg.norm(got) < 2 * np.linalg.norm(J, axis=1).max()


# --- FairGrad -------------------------------------------------------------------------------------


def fair_weights(J, alpha):
    """The official solver: least squares on G G^T w - w^{-1/alpha} from the uniform start, w > 0."""
    M = J @ J.T
    result = optimize.least_squares(lambda w: M @ w - np.power(1 / w, 1 / alpha), np.ones(len(J)) / len(J),
                                    bounds=(0, np.inf), xtol=1e-15, ftol=1e-15, gtol=1e-15)
    return result.x


@pytest.mark.parametrize("scale", [1.0, 1e-3])
@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_fairgrad_weights_solve_the_alpha_fair_equation(alpha, scale):
    J = G * scale
    w = fair_weights(J, alpha)
    M = J @ J.T
    assert np.abs(M @ w - w ** (-1 / alpha)).max() < 1e-6 * np.abs(w ** (-1 / alpha)).max()  # scipy converged
    got, b = combined("fairgrad", G, scale=scale, alpha=alpha)
    np.testing.assert_allclose(b.applied.numpy(), w, rtol=1e-5)
    np.testing.assert_allclose(got, w @ J, rtol=1e-5, atol=1e-6 * np.abs(w @ J).max())
    np.testing.assert_allclose(b.head_scales().double().numpy(), w, rtol=1e-5)  # heads: w_t g_t


def test_fairgrad_alpha_zero_is_the_mean_and_scaling_follows_its_exponent():
    got, _ = combined("fairgrad", G, alpha=0.0)
    np.testing.assert_allclose(got, G.mean(0), rtol=1e-6, atol=1e-7)
    for alpha in (0.5, 2.0):
        base, _ = combined("fairgrad", G, alpha=alpha)
        scaled, _ = combined("fairgrad", G, scale=10.0, alpha=alpha)
        np.testing.assert_allclose(scaled, base * 10.0 ** ((1 - alpha) / (1 + alpha)), rtol=1e-4)


def test_fairgrad_gives_a_zero_gradient_task_no_weight():
    J = G.copy()
    J[1] = 0
    got, b = combined("fairgrad", J)
    w = fair_weights(J[[0, 2]], 1.0)
    np.testing.assert_allclose(b.applied.numpy(), [w[0], 0.0, w[1]], rtol=1e-5)


# --- RLW ------------------------------------------------------------------------------------------


def py_mix32(x):
    x ^= x >> 16
    x = (x * 0x7FEB352D) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x846CA68B) & 0xFFFFFFFF
    return x ^ (x >> 16)


def py_normal(seed, counter):
    """The documented generator with Python's unbounded integers and math's float64."""
    h = py_mix32(py_mix32(seed) ^ (counter & 0xFFFFFFFF))
    h = py_mix32(h ^ (counter >> 32))
    u1 = ((py_mix32(h ^ 0x68E31DA4) >> 8) + 0.5) / 2**24
    u2 = ((py_mix32(h ^ 0xB5297A4D) >> 8) + 0.5) / 2**24
    return math.sqrt(-2 * math.log(u1)) * math.cos(2 * math.pi * u2)


def softmax(x):
    e = np.exp(np.asarray(x) - max(x))
    return e / e.sum()


def test_rlw_weighs_each_step_with_the_softmax_of_its_seeded_normals():
    b = build("rlw", num_tasks=3, seed=7)
    for step in range(4):
        losses = torch.tensor([0.5, 0.3, 0.2], requires_grad=True)
        value = b.weigh(losses)
        value.backward()
        want = softmax([py_normal(7, step * 3 + t) for t in range(3)])
        np.testing.assert_allclose(losses.grad.double().numpy(), want, rtol=1e-6)
        np.testing.assert_allclose(float(value.detach()), want @ [0.5, 0.3, 0.2], rtol=1e-6)
    assert int(b.steps) == 4
    # Counters past 2^32 use the high word too.
    b.steps.fill_(2**33 + 5)
    want = softmax([py_normal(7, (2**33 + 5) * 3 + t) for t in range(3)])
    np.testing.assert_allclose(b.weights().double().numpy(), want, rtol=1e-6)


def test_rlw_draws_are_standard_normal_and_the_seed_matters():
    from mtrec.balancers.weighting import counter_normals

    x = counter_normals(0, torch.arange(200_000), torch.float64)
    assert abs(float(x.mean())) < 0.01 and abs(float(x.std()) - 1) < 0.01
    assert abs(float((x[:-1] * x[1:]).mean())) < 0.01  # neighbouring counters uncorrelated
    assert abs(float((x.abs() > 1.959964).double().mean()) - 0.05) < 0.003  # the tails
    other = counter_normals(1, torch.arange(1000), torch.float64)
    assert not torch.allclose(x[:1000], other)


# --- IMTL-L ---------------------------------------------------------------------------------------


def test_imtl_l_scales_each_loss_by_its_learned_exponent():
    b = build("imtl-l", num_tasks=3)
    s = np.array([0.3, -0.5, 0.0])
    with torch.no_grad():
        b.log_scales.copy_(torch.tensor(s))
    L = np.array([0.6, 0.2, 0.9])
    losses = torch.tensor(L, dtype=torch.float32, requires_grad=True)
    value = b.weigh(losses)
    value.backward()
    np.testing.assert_allclose(float(value.detach()), (np.exp(s) * L - s).sum(), rtol=1e-6)
    np.testing.assert_allclose(losses.grad.double().numpy(), np.exp(s), rtol=1e-6)
    np.testing.assert_allclose(b.log_scales.grad.double().numpy(), np.exp(s) * L - 1, rtol=1e-6)


def test_imtl_l_matches_the_imtl_balancers_loss_variant():
    """One backward of the scaled losses = the sum of the scaled per-task gradients."""
    loss_level = build("imtl-l", num_tasks=3)
    grad_level = build("imtl", num_tasks=3, variant="loss")
    s = torch.tensor([0.2, -0.1, 0.4])
    with torch.no_grad():
        loss_level.log_scales.copy_(s)
        grad_level.log_scales.copy_(s)
    losses = torch.tensor([0.6, 0.2, 0.9], requires_grad=True)
    loss_level.weigh(losses).backward()
    grads = as_grads(G)
    want = grad_level.combine(grads, losses.detach())[0]
    got = torch.einsum("t,t...->...", losses.grad, grads[0])
    torch.testing.assert_close(got, want)
