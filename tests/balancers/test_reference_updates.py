"""Each gradient balancer, run by the real training step with its default scope and groups on a small
MMoE, writes exactly the gradients of its reference update, re-stated here in float64 from the
papers / ../shared/balancers.md (numpy and scipy solvers, task-by-task loops), never from mtrec's own
formulas.

The reference works on the parameters of the *unfused* network the papers describe: each field's
embedding table, each expert's weight and bias, each numeric feature's projection are separate
tensors. The step's learning rate is 0, so the gradients it wrote stay in ``.grad`` and the model is
unchanged between the steps of the stateful methods.
"""

import copy
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import optimize

from mtrec.balancers import build, hparams
from mtrec.engine.step import Stepper
from mtrec.models import ModelConfig
from mtrec.models import build as build_model

VOCAB = [6, 9, 4]
T = 3
TABLE = "embedding.table.weight"
SHARED = ("numeric.", "experts.")  # dense shared parameters of an MMoE
HEADS = ("gates.", "towers.")  # task-specific: stacked along dim 0, one slice per task


def batch(seed, n=40):
    g = torch.Generator().manual_seed(seed)
    codes = torch.stack([torch.randint(0, v, (n,), generator=g) for v in VOCAB], 1).int()
    labels = (torch.rand(n, T, generator=g) < torch.tensor([0.5, 0.3, 0.2])).float()
    return codes, torch.randn(n, 2, generator=g), labels


def setup(name, **hparams):
    torch.manual_seed(0)
    model = build_model("mmoe", VOCAB, 2, [0.5, 0.3, 0.2],
                        ModelConfig(embedding_dim=4, expert_sizes=[8], tower_sizes=[8], num_experts=3))
    balancer = build(name, num_tasks=T, **hparams)
    params = list(model.parameters()) + [p for p in balancer.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.0)
    stepper = Stepper(model, balancer, opt, balancer.default_scope, torch.device("cpu"), None)
    return model, balancer, stepper


def step_grads(model, stepper, data):
    assert stepper.step(*data) is not None
    return {n: p.grad.detach().double().clone() for n, p in model.named_parameters()}


# --- float64 per-task gradients of the same model --------------------------------------------------


def losses64(model64, codes, numeric, labels):
    logits = model64(codes, numeric.double())
    return F.binary_cross_entropy_with_logits(logits, labels.double(), reduction="none").mean(0)


def task_grads(model, data):
    """Per task, float64 gradients of every parameter: ``{name: [T, *shape]}``, and the losses."""
    model64 = copy.deepcopy(model).double()
    losses = losses64(model64, *data)
    named = list(model64.named_parameters())
    rows = [torch.autograd.grad(losses[t], [p for _, p in named], retain_graph=True, allow_unused=True)
            for t in range(T)]
    grads = {n: torch.stack([torch.zeros_like(p) if r[i] is None else r[i] for r in rows])
             for i, (n, p) in enumerate(named)}
    return grads, losses.detach()


def balanced_names(grads, scope):
    names = [n for n in grads if n.startswith(SHARED)]
    return names + [TABLE] if scope == "all" else names


def unfused_parts(name, g):
    """The separate tensors of the unfused network that ``g`` ([T, *shape]) stands for."""
    if name == TABLE:
        bounds = np.cumsum([0] + VOCAB)
        return [g[:, a:b] for a, b in zip(bounds[:-1], bounds[1:])]  # one table per field
    if name.startswith(("experts.", "numeric.")):
        return [g[:, e] for e in range(g.shape[1])]  # one per expert / numeric feature
    return [g]


def flat(grads, names):
    return torch.cat([grads[n].reshape(T, -1) for n in names], 1)


def unflat(vector, grads, names):
    out, start = {}, 0
    for n in names:
        size = grads[n][0].numel()
        out[n] = vector[start:start + size].reshape(grads[n].shape[1:])
        start += size
    return out


def heads(grads, scale=None):
    """Task-specific parameters: task t's slice gets its own gradient, times scale[t] if given."""
    scale = torch.ones(T, dtype=torch.float64) if scale is None else scale
    return {n: torch.einsum("t,t...->...", scale, g) for n, g in grads.items() if n.startswith(HEADS)}


def plain_sum(grads, names):
    return {n: grads[n].sum(0) for n in names}


def assert_matches(got, expected, rtol=1e-4):
    scale = max(float(v.abs().max()) for v in expected.values())
    assert set(expected) == set(got), set(got) ^ set(expected)
    for n, want in expected.items():
        torch.testing.assert_close(got[n], want, rtol=rtol, atol=rtol * scale, msg=n)


def whole_vector(grads, names, coefficients):
    """``sum_t c_t g_t`` over the balanced parameters, for a list ``c`` of T numbers."""
    G = flat(grads, names)
    return unflat(torch.as_tensor(np.asarray(coefficients), dtype=torch.float64) @ G, grads, names)


# --- the references --------------------------------------------------------------------------------


def test_metabalance_per_part_of_the_unfused_network_over_two_steps():
    """MetaBalance (official code): per parameter tensor p and task t an EMA m[p][t] (beta 0.9,
    init 0) of ||g_t[p]||, then ``sum_t (r m[p][0] / m[p][t] + 1 - r) g_t[p]``; embeddings balanced."""
    model, balancer, stepper = setup("metabalance")
    relax, beta = 0.7, 0.9
    ema = {}
    for seed in (1, 2):
        data = batch(seed)
        grads, _ = task_grads(model, data)
        expected = heads(grads)
        for name in balanced_names(grads, "all"):
            pieces = []
            for k, part in enumerate(unfused_parts(name, grads[name])):
                m = ema.setdefault((name, k), [0.0] * T)
                out = torch.zeros_like(part[0])
                for t in range(T):
                    norm = float(part[t].norm())
                    if norm > 0:
                        m[t] = beta * m[t] + (1 - beta) * norm
                    s = relax * m[0] / m[t] + (1 - relax) if t > 0 and m[t] > 0 else 1.0
                    out += s * part[t]
                pieces.append(out)
            expected[name] = torch.cat(pieces) if name == TABLE else (
                torch.stack(pieces) if name.startswith(("experts.", "numeric.")) else pieces[0])
        assert_matches(step_grads(model, stepper, data), expected)
    # Per part is not per tensor: the fused table balanced as one tensor gives another update.
    assert stepper.groups == "part"


def test_metabalance_groups_tensor_balances_each_fused_tensor_as_one():
    model, balancer, stepper = setup("metabalance")
    stepper = Stepper(model, balancer, stepper.optimizer, "all", torch.device("cpu"), None, groups="tensor")
    data = batch(1)
    grads, _ = task_grads(model, data)
    expected = heads(grads)
    for name in balanced_names(grads, "all"):
        g = grads[name]
        n = g.reshape(T, -1).norm(dim=1)
        s = 0.7 * n[0] / n + 0.3  # fresh EMAs: (1 - beta) cancels in the ratio
        expected[name] = torch.einsum("t,t...->...", s, g)
    assert_matches(step_grads(model, stepper, data), expected)


def test_gradcraft_global_deconfliction_over_every_shared_parameter():
    """Magnitudes aligned to the largest (tau 1), then for each i the conflicting set C_i gets
    ``g~_i . g^_j = eps ||g^_i|| ||g^_j||`` at once; the mean of the g~_i."""
    model, _, stepper = setup("gradcraft")
    data = batch(3)
    grads, _ = task_grads(model, data)
    names = balanced_names(grads, "all")
    G = flat(grads, names).numpy()
    n = np.linalg.norm(G, axis=1)
    Gh = (1.0 * n.max() / n)[:, None] * G
    out = []
    for i in range(T):
        C = [j for j in range(T) if j != i and Gh[i] @ Gh[j] < 0]
        gi = Gh[i].copy()
        if C:
            A = Gh[C]
            z = 1e-10 * np.linalg.norm(Gh[i]) * np.linalg.norm(A, axis=1)
            gi = gi + A.T @ np.linalg.solve(A @ A.T, z - A @ Gh[i])
        out.append(gi)
    expected = {**heads(grads), **unflat(torch.tensor(np.mean(out, 0)), grads, names)}
    assert_matches(step_grads(model, stepper, data), expected)


def test_cograd_scale_free_correction_per_balanced_tensor():
    """Default ``diag-rms``: per balanced tensor (the touched rows of the table being one),
    ``z_t = g_t / rms(g_t)`` and ``sum_i g_i clamp(1 - z_i sum_{j != i} gamma z_j, 0, 2)``."""
    gamma = hparams("cograd")["gamma"]
    model, _, stepper = setup("cograd")
    assert stepper.groups == "tensor"
    data = batch(4)
    grads, _ = task_grads(model, data)
    expected = heads(grads)
    touched = torch.unique(data[0].long() + torch.tensor(np.cumsum([0] + VOCAB[:-1])))
    for name in balanced_names(grads, "all"):
        g = grads[name][:, touched] if name == TABLE else grads[name]
        rms = g.reshape(T, -1).pow(2).mean(1).sqrt()
        z = g / rms.reshape((T,) + (1,) * (g.dim() - 1))
        total = torch.zeros_like(g[0])
        for i in range(T):
            others = sum(gamma * z[j] for j in range(T) if j != i)
            total += g[i] * (1 - z[i] * others).clamp(0, 2)
        if name == TABLE:
            expected[name] = torch.zeros_like(grads[name][0]).index_copy(0, touched, total)
        else:
            expected[name] = total
    plain = plain_sum(grads, balanced_names(grads, "all"))
    assert max(float((expected[n] - plain[n]).abs().max() / plain[n].abs().max()) for n in plain) > 0.01
    assert_matches(step_grads(model, stepper, data), expected)


def test_cograd_literal_coordinated_correction_over_every_shared_parameter():
    """``diag-raw``: ``sum_i g_i (1 - g_i sum_{j != i} gamma_j g_j)``, factor clamped to [0, 2] (balancers.md 3.2)."""
    gamma = [3e4, 1e4, 2e4]  # elements of ~1e-3: large enough that the correction moves the result
    model, _, stepper = setup("cograd", gamma=gamma, hessian="diag-raw")
    data = batch(4)
    grads, _ = task_grads(model, data)
    expected = heads(grads)
    for name in balanced_names(grads, "all"):
        g = grads[name]
        total = torch.zeros_like(g[0])
        for i in range(T):
            others = sum(gamma[j] * g[j] for j in range(T) if j != i)
            total += g[i] * (1 - g[i] * others).clamp(0, 2)
        expected[name] = total
    plain = plain_sum(grads, balanced_names(grads, "all"))
    assert max(float((expected[n] - plain[n]).abs().max() / plain[n].abs().max()) for n in plain) > 0.01
    assert_matches(step_grads(model, stepper, data), expected)


def assert_some_order_matches(name, edit, include_self, seed=5):
    """Random visiting orders: the step's result must be the reference ``sum_i h_i`` for one choice
    of every task's order, where ``h_i`` starts at g_i and ``edit(h, g_j)`` visits each j in turn."""
    model, _, stepper = setup(name)
    data = batch(seed)
    grads, _ = task_grads(model, data)
    names = balanced_names(grads, "all")
    G = flat(grads, names).numpy()
    assert any(G[i] @ G[j] < 0 for i in range(T) for j in range(T))  # there is a conflict to resolve
    per_task = []
    for i in range(T):
        options = []
        for order in itertools.permutations([j for j in range(T) if include_self or j != i]):
            h = G[i].copy()
            for j in order:
                h = edit(h, G[j])
            options.append(h)
        per_task.append(options)
    got = step_grads(model, stepper, data)
    errors = []
    for combo in itertools.product(*per_task):
        expected = {**heads(grads), **unflat(torch.tensor(sum(combo)), grads, names)}
        scale = max(float(v.abs().max()) for v in expected.values())
        errors.append(max(float((got[n] - v).abs().max()) for n, v in expected.items()) / scale)
    assert min(errors) < 1e-5, min(errors)
    assert max(errors) > 1e-3  # the orders are told apart: matching one of them is not vacuous


def test_pcgrad_projects_against_the_original_gradients_in_a_shuffled_order():
    """For each i and j in its shuffled order: if h_i . g_j < 0, h_i -= (h_i . g_j) / ||g_j||^2 g_j;
    the sum of the h_i. (No 1e-8 in the denominator: it is not small next to real gradients.)"""

    def project(h, g):
        return h - (h @ g) / (g @ g) * g if h @ g < 0 else h

    assert_some_order_matches("pcgrad", project, include_self=True)


def test_gradvac_first_step_raises_negative_cosines_to_the_zero_target():
    """rho_hat = 0 at first: for j != i in shuffled order, if rho = cos(h_i, g_j) < 0,
    ``h_i += g_j ||h_i|| (0 - rho * 1) / (||g_j|| * 1)``; the sum of the h_i (LibMTL, whole model)."""

    def vaccinate(h, g):
        rho = h @ g / (np.linalg.norm(h) * np.linalg.norm(g))
        return h + g * np.linalg.norm(h) * (-rho) / np.linalg.norm(g) if rho < 0 else h

    assert_some_order_matches("gradvac", vaccinate, include_self=False)


def simplex_minimum(objective, x0=None):
    cons = [{"type": "eq", "fun": lambda w: w.sum() - 1}]
    x0 = np.full(T, 1 / T) if x0 is None else x0
    result = optimize.minimize(objective, x0, method="SLSQP", bounds=[(0, 1)] * T, constraints=cons,
                               options={"ftol": 1e-15, "maxiter": 1000})
    return result.x


def test_mgda_upper_bound_on_the_representation_with_alpha_on_the_heads():
    """MGDA-UB (authors' code): alpha = argmin_simplex ||sum_t alpha_t dL_t/dz||^2 on the shared
    representation z, then the backward of sum_t alpha_t L_t: every parameter, heads included."""
    model, balancer, stepper = setup("mgda")
    data = batch(6)
    codes, numeric, labels = data
    model64 = copy.deepcopy(model).double()
    z = [t.detach().requires_grad_() for t in model64.encode(model64.embed(codes), numeric.double(), codes)]
    logits = model64.decode(tuple(z))  # partial derivatives w.r.t. each representation tensor
    losses = F.binary_cross_entropy_with_logits(logits, labels.double(), reduction="none").mean(0)
    V = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(losses[t], z, retain_graph=True)])
                     for t in range(T)]).numpy()
    M = V @ V.T
    alpha = simplex_minimum(lambda w: w @ M @ w / np.trace(M))
    named = list(model64.named_parameters())
    total = torch.autograd.grad((torch.tensor(alpha) * losses64(model64, *data)).sum(), [p for _, p in named])
    expected = {n: g for (n, _), g in zip(named, total)}
    assert_matches(step_grads(model, stepper, data), expected)
    torch.testing.assert_close(balancer.head_scales().double(), torch.tensor(alpha), rtol=1e-4, atol=1e-6)


def test_cagrad_conflict_averse_direction_over_every_shared_parameter():
    """CAGrad (official / LibMTL): w = argmin_simplex g_w . g_0 + sqrt(phi) ||g_w||, phi = c^2 ||g_0||^2,
    then g = (g_0 + sqrt(phi) / ||g_w|| g_w) / (1 + c^2)."""
    c = 0.5
    model, _, stepper = setup("cagrad")
    data = batch(7)
    grads, _ = task_grads(model, data)
    names = balanced_names(grads, "all")
    G = flat(grads, names).numpy()
    g0 = G.mean(0)
    root_phi = c * np.linalg.norm(g0)
    scale = np.linalg.norm(g0) ** 2

    def objective(w):
        gw = w @ G
        return (gw @ g0 + root_phi * np.linalg.norm(gw)) / scale

    w = simplex_minimum(objective)
    gw = w @ G
    g = (g0 + root_phi / np.linalg.norm(gw) * gw) / (1 + c**2)
    expected = {**heads(grads), **unflat(torch.tensor(g), grads, names)}
    assert_matches(step_grads(model, stepper, data), expected)


def test_imtl_hybrid_learned_loss_scales_and_impartial_gradient():
    """IMTL (paper / LibMTL): losses e^{s_t} L_t - s_t, so every gradient of task t (heads too) is
    scaled by e^{s_t}; on the scaled shared gradients IMTL-G's ``alpha_{2..T} = g_1 U^T (D U^T)^{-1}``,
    alpha_1 = 1 - sum; the shared update ``sum_t alpha_t e^{s_t} g_t``; s gets e^{s_t} L_t - 1."""
    model, balancer, stepper = setup("imtl")
    s = torch.tensor([0.3, -0.5, 0.1])
    with torch.no_grad():
        balancer.log_scales.copy_(s)
    data = batch(8)
    grads, losses = task_grads(model, data)
    names = balanced_names(grads, "all")
    scale = s.double().exp()
    G = (scale[:, None] * flat(grads, names)).numpy()
    U = G / np.linalg.norm(G, axis=1, keepdims=True)
    D, Ud = G[0] - G[1:], U[0] - U[1:]
    rest = G[0] @ Ud.T @ np.linalg.inv(D @ Ud.T)
    alpha = np.concatenate([[1 - rest.sum()], rest])
    expected = {**heads(grads, scale), **unflat(torch.tensor(alpha) @ torch.tensor(G), grads, names)}
    assert_matches(step_grads(model, stepper, data), expected)
    torch.testing.assert_close(balancer.log_scales.grad.double(), scale * losses - 1, rtol=1e-5, atol=1e-7)
    # The impartial gradient: equal projections on every unit (scaled) task gradient.
    g = alpha @ G
    assert np.ptp(U @ g) < 1e-9 * np.abs(U @ g).max()


def test_aligned_mtl_principal_components_over_every_shared_parameter():
    """Aligned-MTL: M = V Lambda V^T, B = sqrt(lambda_min) V Lambda^{-1/2} V^T, alpha = B 1."""
    model, _, stepper = setup("aligned-mtl")
    data = batch(9)
    grads, _ = task_grads(model, data)
    names = balanced_names(grads, "all")
    G = flat(grads, names).numpy()
    values, vectors = np.linalg.eigh(G @ G.T)
    B = np.sqrt(values.min()) * vectors @ np.diag(values**-0.5) @ vectors.T
    expected = {**heads(grads), **whole_vector(grads, names, B.sum(1))}
    assert_matches(step_grads(model, stepper, data), expected)


@pytest.mark.parametrize("max_norm", [1.0, 1e-3])
def test_nash_mtl_bargaining_weights_on_every_shared_parameter_and_on_the_heads(max_norm):
    """Nash-MTL (official / LibMTL): alpha > 0 with (M / ||M||_F) alpha = 1 / alpha; the backward of
    sum_t alpha_t L_t (heads get alpha_t g_t), then clip_grad_norm_ of the shared parameters."""
    model, _, stepper = setup("nash-mtl", max_norm=max_norm)
    data = batch(10)
    grads, _ = task_grads(model, data)
    names = balanced_names(grads, "all")
    G = flat(grads, names).numpy()
    M = G @ G.T
    Mn = M / np.linalg.norm(M)
    alpha = optimize.fsolve(lambda a: Mn @ a - 1 / a, np.ones(T) / np.sqrt(np.diag(Mn)), xtol=1e-14)
    assert np.all(alpha > 0) and np.abs(Mn @ alpha - 1 / alpha).max() < 1e-10
    shared = alpha @ G
    shared = shared * min(1.0, max_norm / (np.linalg.norm(shared) + 1e-6))
    expected = {**heads(grads, torch.tensor(alpha)), **unflat(torch.tensor(shared), grads, names)}
    assert_matches(step_grads(model, stepper, data), expected)


def test_db_mtl_log_loss_gradients_and_their_moving_average_over_two_steps():
    """DB-MTL (LibMTL): gradients of log(L_t + 1e-8); buffer_t <- beta buffer_t + (1 - beta) grad_t;
    alpha_t = max_j ||buffer_j|| / ||buffer_t||; shared update sum_t alpha_t buffer_t; heads get the
    log-loss gradient. Scope shared (a buffer per coordinate): the table gets the plain sum."""
    model, _, stepper = setup("db-mtl")
    beta = 0.9
    buffer = None
    for seed in (11, 12):
        data = batch(seed)
        grads, losses = task_grads(model, data)
        names = balanced_names(grads, "shared")
        log_grads = flat(grads, names) / (losses[:, None] + 1e-8)
        buffer = (1 - beta) * log_grads if buffer is None else beta * buffer + (1 - beta) * log_grads
        norms = buffer.norm(dim=1)
        alpha = norms.max() / norms
        expected = {**heads(grads, 1 / (losses + 1e-8)), **unflat(alpha @ buffer, grads, names),
                    TABLE: grads[TABLE].sum(0)}
        assert_matches(step_grads(model, stepper, data), expected)


def test_gradnorm_weights_follow_their_first_adam_step():
    """GradNorm (LibMTL's parametrisation): w = T softmax(l), l = 1: step 1 applies sum_t g_t and
    moves l by one Adam step (lr 1e-3) on sum_t |w_t ||g_t|| - mean(G) r_t^alpha|, r_t = 1 at the
    first batch; step 2 applies sum_t w_t g_t with the new weights."""
    model, _, stepper = setup("gradnorm")
    lr, logits = 1e-3, np.ones(T)
    data1, data2 = batch(13), batch(14)
    grads1, _ = task_grads(model, data1)
    names = balanced_names(grads1, "all")
    assert_matches(step_grads(model, stepper, data1), {**heads(grads1), **plain_sum(grads1, names)})
    norms = flat(grads1, names).norm(dim=1).numpy()
    z = np.exp(logits) / np.exp(logits).sum()
    w = T * z
    G = w * norms
    d_w = np.sign(G - G.mean()) * norms  # the target is held constant
    d_logits = T * (np.diag(z) - np.outer(z, z)) @ d_w
    logits = logits - lr * d_logits / (np.abs(d_logits) + 1e-8)  # Adam's first step: m^ / sqrt(v^)
    w = T * np.exp(logits) / np.exp(logits).sum()
    grads2, _ = task_grads(model, data2)
    assert_matches(step_grads(model, stepper, data2), {**heads(grads2), **whole_vector(grads2, names, w)})
