"""MGDA, CAGrad, IMTL, Aligned-MTL and Nash-MTL against brute force or direct float64 formulas."""

import numpy as np
import pytest
import torch

import mtrec.balancers.simplex as simplex
from mtrec.balancers import build
from mtrec.balancers.linalg import jacobi_eigh


def grid(n=300):
    """A dense grid of the 3-task simplex, ``[P, 3]`` float64."""
    i, j = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
    keep = i + j <= n
    return np.stack([i[keep], j[keep], (n - i - j)[keep]], 1) / n


def cases_3(seed):
    rng = np.random.default_rng(seed)
    G = rng.normal(size=(3, 6)) * rng.uniform(0.1, 3, size=(3, 1))
    if seed % 3 == 1:
        G = rng.normal(size=(3, 2)) @ rng.normal(size=(2, 6))  # rank 2: the hull may contain 0
    if seed % 3 == 2:
        G[2] = G[0] + G[1]  # positively correlated: optimum on an edge or a vertex
    return G


@pytest.fixture(params=["exact", "frank-wolfe"])
def solver(request, monkeypatch):
    if request.param == "frank-wolfe":
        monkeypatch.setattr(simplex, "EXACT_MAX_TASKS", 0)
    return request.param


# --- MGDA ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_mgda_weights_minimise_the_norm_over_a_simplex_grid(seed, solver):
    G = cases_3(seed)
    M = G @ G.T
    w = build("mgda", num_tasks=3).weights(torch.tensor(M)).numpy()
    assert np.all(w >= 0) and abs(w.sum() - 1) < 1e-9
    P = grid()
    best = np.min(np.einsum("pi,ij,pj->p", P, M, P))
    assert w @ M @ w <= best + 1e-9 * np.trace(M)


def test_mgda_two_tasks_closed_form():
    rng = np.random.default_rng(0)
    for _ in range(5):
        v1, v2 = rng.normal(size=(2, 4))
        a1 = np.clip((v2 - v1) @ v2 / ((v1 - v2) @ (v1 - v2)), 0, 1)
        w = build("mgda", num_tasks=2).weights(torch.tensor(np.stack([v1, v2]) @ np.stack([v1, v2]).T))
        np.testing.assert_allclose(w.numpy(), [a1, 1 - a1], atol=1e-8)


def test_mgda_leaves_zero_gradient_tasks_off_the_simplex():
    G = np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]])
    w = build("mgda", num_tasks=3).weights(torch.tensor(G @ G.T)).numpy()
    np.testing.assert_allclose(w, [0.5, 0.0, 0.5], atol=1e-9)


def test_mgda_l2_normalisation_weights_unit_gradients():
    G = np.array([[10.0, 0.0], [0.0, 1.0]])
    w = build("mgda", num_tasks=2, normalize="l2").weights(torch.tensor(G @ G.T)).numpy()
    np.testing.assert_allclose(w, [0.5, 0.5], atol=1e-9)  # unit vectors e1, e2: the midpoint


def test_mgda_large_task_count_uses_frank_wolfe():
    rng = np.random.default_rng(1)
    G = rng.normal(size=(12, 30))
    M = G @ G.T
    w = build("mgda", num_tasks=12, iterations=400).weights(torch.tensor(M)).numpy()
    rand = rng.dirichlet(np.ones(12), size=2000)
    assert np.all(w >= 0) and abs(w.sum() - 1) < 1e-9
    assert w @ M @ w <= np.min(np.einsum("pi,ij,pj->p", rand, M, rand)) + 1e-9


# --- CAGrad --------------------------------------------------------------------------------------


def cagrad_objective(W, M, c):
    """Official objective on the raw Gram: w^T A b + c ||g_0|| sqrt(w^T A w + 1e-8 s)."""
    scale = np.trace(M) / len(M)  # mtrec's guards are relative to the mean diagonal
    A = M / scale
    b = np.full(len(M), 1 / len(M))
    radius = c * np.sqrt(b @ A @ b + 1e-8) + 1e-8
    return W @ A @ b + radius * np.sqrt(np.einsum("...i,ij,...j->...", W, A, W) + 1e-8)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("c", [0.2, 0.5, 0.8])
def test_cagrad_solves_its_problem_as_well_as_a_dense_grid(seed, c, solver):
    G = cases_3(seed)
    M = G @ G.T
    b = build("cagrad", num_tasks=3, c=c)
    w, _, _ = b.solve(torch.tensor(M))
    w = w.numpy()
    P = grid()
    values = cagrad_objective(P, M, c)
    assert cagrad_objective(w, M, c) <= values.min() + 1e-9
    # The update: g_0 + c ||g_0|| g_w / ||g_w||, rescaled by 1 + c^2.
    g0 = G.mean(0)
    gw = w @ G
    want = (g0 + c * np.linalg.norm(g0) * gw / np.linalg.norm(gw)) / (1 + c**2)
    got = b.weights(torch.tensor(M)).numpy() @ G
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_cagrad_with_c_zero_is_the_mean():
    G = cases_3(0)
    for rescale in (0, 1, 2):
        alpha = build("cagrad", num_tasks=3, c=0, rescale=rescale).weights(torch.tensor(G @ G.T)).numpy()
        np.testing.assert_allclose(alpha @ G, G.mean(0), rtol=1e-6, atol=1e-9)


def test_cagrad_rescale_options():
    G = cases_3(3)
    M = torch.tensor(G @ G.T)
    raw = build("cagrad", num_tasks=3, c=0.4, rescale=0).weights(M)
    torch.testing.assert_close(build("cagrad", num_tasks=3, c=0.4, rescale=1).weights(M), raw / 1.16)
    torch.testing.assert_close(build("cagrad", num_tasks=3, c=0.4, rescale=2).weights(M), raw / 1.4)


# --- IMTL ----------------------------------------------------------------------------------------


def imtl_reference(G):
    """alpha_{2..T} = g_1 U^T (D U^T)^{-1}, alpha_1 = 1 - sum, in float64 (task 1 as the anchor)."""
    U = G / np.linalg.norm(G, axis=1, keepdims=True)
    D = G[0] - G[1:]
    Ud = U[0] - U[1:]
    rest = G[0] @ Ud.T @ np.linalg.inv(D @ Ud.T)
    return np.concatenate([[1 - rest.sum()], rest])


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("T", [2, 3, 5])
def test_imtl_matches_the_closed_form(seed, T):
    rng = np.random.default_rng(seed)
    G = rng.normal(size=(T, 8)) * rng.uniform(0.1, 5, size=(T, 1))
    alpha = build("imtl", num_tasks=T).weights(torch.tensor(G @ G.T)).numpy()
    np.testing.assert_allclose(alpha, imtl_reference(G), rtol=1e-6, atol=1e-9)
    g = alpha @ G
    projections = G @ g / np.linalg.norm(G, axis=1)
    np.testing.assert_allclose(projections, projections[0], rtol=1e-6)  # impartial: equal projections


def test_imtl_ignores_zero_gradient_tasks():
    rng = np.random.default_rng(0)
    G = rng.normal(size=(4, 6))
    G0 = G.copy()
    G0[0] = 0
    alpha = build("imtl", num_tasks=4).weights(torch.tensor(G0 @ G0.T)).numpy()
    assert alpha[0] == 0
    np.testing.assert_allclose(alpha[1:], imtl_reference(G[1:]), rtol=1e-6, atol=1e-9)


# --- Aligned-MTL ---------------------------------------------------------------------------------


def aligned_reference(G):
    M = G @ G.T
    lam, V = np.linalg.eigh(M)
    tol = lam.max() * len(M) * np.finfo(np.float32).eps
    keep = lam > tol
    lam, V = lam[keep], V[:, keep]
    B = np.sqrt(lam.min()) * V @ np.diag(1 / np.sqrt(lam)) @ V.T
    return B.sum(0)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("rank_deficient", [False, True])
def test_aligned_mtl_matches_the_formula(seed, rank_deficient):
    rng = np.random.default_rng(seed)
    G = rng.normal(size=(4, 9)) * rng.uniform(0.1, 5, size=(4, 1))
    if rank_deficient:
        G[3] = G[0] - 2 * G[1]
    want = aligned_reference(G)
    alpha = build("aligned-mtl", num_tasks=4).weights(torch.tensor(G @ G.T)).numpy()
    np.testing.assert_allclose(alpha, want, rtol=1e-6, atol=1e-9)


def test_aligned_mtl_scales_every_principal_direction_by_the_smallest_singular_value():
    """g = G^T alpha has projection sqrt(lambda_min) v_k^T 1 on each principal direction
    u_k = G^T v_k / sqrt(lambda_k): the condition number of the combined system is 1."""
    rng = np.random.default_rng(5)
    G = rng.normal(size=(3, 7))
    alpha = build("aligned-mtl", num_tasks=3).weights(torch.tensor(G @ G.T)).numpy()
    lam, V = np.linalg.eigh(G @ G.T)
    projections = (V.T @ G @ (alpha @ G)) / np.sqrt(lam)
    np.testing.assert_allclose(projections, np.sqrt(lam.min()) * V.sum(0), rtol=1e-6, atol=1e-12)


def test_jacobi_eigh_matches_lapack():
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 5, 8):
        G = rng.normal(size=(n, 6)) * rng.uniform(0.1, 10, size=(n, 1))
        M = torch.tensor(G @ G.T)
        values, vectors = jacobi_eigh(M)
        ref = torch.linalg.eigvalsh(M)
        torch.testing.assert_close(values, ref, rtol=1e-9, atol=1e-9 * float(ref.abs().max()))
        torch.testing.assert_close(vectors @ torch.diag(values) @ vectors.T, M, rtol=1e-9,
                                   atol=1e-9 * float(M.abs().max()))


def test_aligned_mtl_jacobi_path_gives_the_same_weights(monkeypatch):
    import mtrec.balancers.gram as gram

    rng = np.random.default_rng(2)
    G = rng.normal(size=(4, 9))
    M = torch.tensor(G @ G.T)
    want = build("aligned-mtl", num_tasks=4).weights(M)
    monkeypatch.setattr(gram, "symmetric_eigh", jacobi_eigh)
    torch.testing.assert_close(build("aligned-mtl", num_tasks=4).weights(M), want, rtol=1e-8, atol=1e-10)


# --- Nash-MTL ------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("T", [2, 3, 5])
def test_nash_mtl_solves_the_bargaining_equation(seed, T):
    rng = np.random.default_rng(seed)
    G = rng.normal(size=(T, 10)) * rng.uniform(0.5, 2, size=(T, 1))
    M = G @ G.T
    alpha = build("nash-mtl", num_tasks=T).bargaining(torch.tensor(M)).numpy()
    Mn = M / np.linalg.norm(M)
    assert np.all(alpha > 0)
    residual = np.linalg.norm(Mn @ alpha - 1 / alpha) / np.linalg.norm(1 / alpha)
    assert residual < 1e-5


def test_nash_mtl_clips_the_combined_norm():
    rng = np.random.default_rng(0)
    G = 50 * rng.normal(size=(3, 10))
    b = build("nash-mtl", num_tasks=3, max_norm=1.0)
    out = b.combine([torch.tensor(G, dtype=torch.float32)])
    assert abs(float(out[0].norm()) - 1.0) < 1e-4
    alpha = build("nash-mtl", num_tasks=3, max_norm=0).weights(torch.tensor(G @ G.T)).numpy()
    np.testing.assert_allclose(alpha, b.bargaining(torch.tensor(G @ G.T)).numpy())


def test_nash_mtl_zero_gradient_task_gets_no_weight():
    rng = np.random.default_rng(1)
    G = rng.normal(size=(3, 6))
    G[1] = 0
    alpha = build("nash-mtl", num_tasks=3).bargaining(torch.tensor(G @ G.T)).numpy()
    assert alpha[1] == 0 and np.all(alpha[[0, 2]] > 0)


def test_nash_mtl_stays_bounded_when_the_gradients_cancel():
    """0 in the cone of the gradients (g2 = -g1): no bargaining solution exists; the ridge keeps
    alpha finite and the clip keeps the update at most max_norm."""
    g = np.array([1.0, -2.0, 0.5])
    G = np.stack([g, -g, np.array([0.0, 0.1, 0.3])])
    b = build("nash-mtl", num_tasks=3)
    alpha = b.bargaining(torch.tensor(G @ G.T)).numpy()
    assert np.isfinite(alpha).all() and np.all(alpha > 0)
    out = b.combine([torch.tensor(G, dtype=torch.float32)])
    assert torch.isfinite(out[0]).all() and float(out[0].norm()) <= 1.0 + 1e-5
