"""Properties every balancer must have, written once and parametrised over ``names()``."""

import io

import pytest
import torch

from mtrec import balancers
from mtrec.balancers import build, names

T = 3
SHAPES = [(4, 5), (7,), (2, 3, 2)]
LOSSES = torch.tensor([0.7, 0.4, 0.2])
GRAD = names("grad")
LOSS = names("loss")
# Balancers whose result depends on the task order (a target task, or random visiting orders).
ORDER_DEPENDENT = {"metabalance", "pcgrad", "gradvac", "pcd"}


def make_grads(seed=0, num_tasks=T, scale=1.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [(scale * torch.randn((num_tasks, *s), generator=g)).to(dtype) for s in SHAPES]


def test_registry_has_every_method():
    assert set(names()) == {"ew", "weights", "uw", "dwa", "famo", "rlw", "imtl-l", "metabalance", "gradcraft",
                            "cograd", "gradnorm", "pcgrad", "mgda", "cagrad", "imtl", "gradvac", "aligned-mtl",
                            "db-mtl", "nash-mtl", "upgrad", "pcd", "fairgrad"}
    assert set(GRAD) | set(LOSS) == set(names()) and not set(GRAD) & set(LOSS)


@pytest.mark.parametrize("name", GRAD)
def test_output_shapes_and_dtype(name):
    b = build(name, num_tasks=T)
    for dtype in (torch.float32, torch.bfloat16):
        grads = make_grads(dtype=dtype)
        out = b.combine(grads, LOSSES)
        assert [tuple(o.shape) for o in out] == [s for s in SHAPES]
        assert all(o.dtype == dtype and torch.isfinite(o.float()).all() for o in out)


@pytest.mark.parametrize("name", GRAD)
def test_finite_when_one_task_has_no_gradient(name):
    b = build(name, num_tasks=T)
    for step in range(3):
        grads = make_grads(seed=step)
        for g in grads:
            g[1] = 0
        out = b.combine(grads, LOSSES)
        assert all(torch.isfinite(o).all() for o in out), name
    # A whole step of zeros (every task masked) must not poison the state either.
    b.combine([torch.zeros((T, *s)) for s in SHAPES], LOSSES)
    out = b.combine(make_grads(seed=9), LOSSES)
    assert all(torch.isfinite(o).all() for o in out), name


def expected_for_identical(name, g, total_norm):
    """What each balancer returns when every task has the same gradient g (fresh state);
    ``total_norm`` is ||g|| over all balanced tensors.

    Sum-reduced methods give T g; mean/convex-combination methods give g; CAGrad gives
    (1 + c) / (1 + c^2) g with its defaults (c = 0.5, rescale 1); DB-MTL gives its first EMA step
    T (1 - beta) g / (L + 1e-8); CoGrad damps agreeing coordinates by 1 - (T-1) gamma z^2 with
    z = g / rms(g) per tensor; UPGrad and PCD leave g as it is (it conflicts with nothing); FairGrad
    (alpha 1) solves T ||g||^2 w = 1 / w, so T w g = sqrt(T) g / ||g||.
    """
    scale = {"metabalance": T, "gradcraft": 1, "gradnorm": T, "pcgrad": T, "mgda": 1, "cagrad": 1.5 / 1.25,
             "imtl": 1, "gradvac": T, "aligned-mtl": T, "nash-mtl": T, "upgrad": 1, "pcd": 1}
    if name == "cograd":
        gamma = build("cograd", num_tasks=T).gamma[0]
        z = g / g.square().mean().sqrt()
        return T * g * (1 - (T - 1) * gamma * z * z).clamp(0, 2)
    if name == "db-mtl":
        return T * 0.1 * g / (1.0 + 1e-8)
    if name == "fairgrad":
        return T**0.5 * g / total_norm
    return scale[name] * g


@pytest.mark.parametrize("name", GRAD)
def test_identical_task_gradients_give_that_gradient_up_to_scale(name):
    b = build(name, num_tasks=T)
    base = make_grads(scale=0.05)  # small: Nash-MTL's clip at norm 1 stays inactive
    grads = [g[:1].expand_as(g).clone() for g in base]
    out = b.combine(grads, torch.ones(T))
    total_norm = torch.cat([g[0].flatten() for g in base]).norm()
    for o, g in zip(out, base):
        torch.testing.assert_close(o, expected_for_identical(name, g[0], total_norm), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name", [n for n in GRAD if n not in ORDER_DEPENDENT])
def test_task_order_does_not_matter(name):
    grads = make_grads(seed=3)
    perm = torch.tensor([2, 0, 1])
    out = build(name, num_tasks=T).combine(grads, LOSSES)
    out_perm = build(name, num_tasks=T).combine([g[perm] for g in grads], LOSSES[perm])
    for a, b in zip(out, out_perm):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def _round_trip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)  # as a checkpoint does: tensors only, loadable with weights_only
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("name", GRAD)
def test_state_dict_round_trip_continues_identically(name):
    first = build(name, num_tasks=T)
    for step in range(3):
        first.combine(make_grads(seed=step), LOSSES * (1 + 0.1 * step))
    fresh = build(name, num_tasks=T)
    fresh.load_state_dict(_round_trip(first.state_dict()))
    for key, value in first.state_dict().items():
        assert torch.equal(value, fresh.state_dict()[key]), key
    torch.manual_seed(7)
    expected = first.combine(make_grads(seed=5), LOSSES)
    torch.manual_seed(7)
    got = fresh.combine(make_grads(seed=5), LOSSES)
    for a, b in zip(expected, got):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("name", LOSS)
def test_loss_balancer_state_round_trip(name):
    first = build(name, num_tasks=T, **({"window": 1} if name == "dwa" else {}))
    for step in range(3):
        losses = LOSSES * (1 + 0.1 * step)
        first.weigh(losses)
        first.after_step(losses * 0.9)
    fresh = build(name, num_tasks=T, **({"window": 1} if name == "dwa" else {}))
    fresh.load_state_dict(_round_trip(first.state_dict()))
    for a, b in ((first, fresh),):
        x = LOSSES.clone().requires_grad_()
        y = LOSSES.clone().requires_grad_()
        va, vb = a.weigh(x), b.weigh(y)
        assert torch.equal(va.detach(), vb.detach())
        va.backward()
        vb.backward()
        assert torch.equal(x.grad, y.grad)


@pytest.mark.parametrize("name", LOSS)
def test_loss_balancers_give_finite_scalars_with_a_zero_loss(name):
    b = build(name, num_tasks=T)
    losses = torch.tensor([0.5, 0.0, 0.3], requires_grad=True)
    value = b.weigh(losses)
    value.backward()
    assert value.dim() == 0 and torch.isfinite(value) and torch.isfinite(losses.grad).all()
    b.after_step(torch.tensor([0.4, 0.0, 0.3]))
    assert all(torch.isfinite(t).all() for t in b.state_dict().values())


@pytest.fixture
def no_host_sync(monkeypatch):
    """Any host round trip on a tensor raises: .item(), .tolist(), bool(), float(), int(), .cpu(), .numpy()."""

    def refuse(*args, **kwargs):
        raise AssertionError("host synchronisation inside a balancer step")

    for method in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, method, refuse)


@pytest.mark.parametrize("name", GRAD)
def test_combine_never_synchronises_with_the_host(name, no_host_sync):
    b = build(name, num_tasks=T)
    zero = make_grads(seed=3)
    for g in zero:
        g[2] = 0
    for grads in (make_grads(seed=0), make_grads(seed=1), zero):
        b.combine(grads, LOSSES)


@pytest.mark.parametrize("name", LOSS)
def test_weigh_never_synchronises_with_the_host(name, no_host_sync):
    b = build(name, num_tasks=T, **({"window": 1} if name == "dwa" else {}))
    for _ in range(3):
        b.weigh(LOSSES)
        b.after_step(LOSSES * 0.9)


def test_describe_lists_every_balancer_with_its_defaults():
    rows = {r["name"]: r for r in balancers.describe()}
    assert list(rows) == names()
    assert rows["metabalance"]["hparams"] == {"relax": 0.7, "beta": 0.9, "mode": "both"}
    assert rows["mgda"]["needs"] == "representation gradients" and rows["mgda"]["default_scope"] == "representation"
    assert rows["ew"]["kind"] == "loss" and rows["cograd"]["kind"] == "grad"
    assert rows["famo"]["needs"].startswith("losses")
    assert rows["gradnorm"]["needs"] == "per-task gradients + losses"
    for r in rows.values():
        assert r["paper"] and set(r) >= {"name", "kind", "needs", "hparams", "paper"}


# Methods whose rule fixes the update's norm in absolute terms, so scaling keeps only the direction:
# Nash-MTL clips to max_norm; FairGrad's weights solve G G^T w = w^{-1/alpha} on the raw Gram.
DIRECTION_ONLY = {"nash-mtl", "fairgrad"}


@pytest.mark.parametrize("scale", [1e-6, 1e-3, 1e3])
@pytest.mark.parametrize("name", GRAD)
def test_gradients_scaled_by_any_factor_give_the_same_direction(name, scale):
    """No absolute epsilon decides anything: over three steps (state included), gradients scaled by
    c give c times the result (PCGrad's former absolute 1e-8 on ||g_j||^2 failed this at 1e-6;
    CoGrad's literal form, gamma in units of 1 / g^2, failed it until its default became
    scale-free); DIRECTION_ONLY methods keep the direction."""
    unscaled, scaled = build(name, num_tasks=T), build(name, num_tasks=T)
    for step in range(3):
        grads = make_grads(seed=step)
        torch.manual_seed(step)  # the same random orders (PCGrad, GradVac)
        want = torch.cat([o.flatten() for o in unscaled.combine(grads, LOSSES)]).double()
        torch.manual_seed(step)
        got = torch.cat([o.flatten() for o in scaled.combine([g * scale for g in grads], LOSSES)]).double() / scale
        assert float(want @ got / (want.norm() * got.norm())) > 1 - 1e-6, (name, step)
        if name not in DIRECTION_ONLY:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
