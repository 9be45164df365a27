"""CoGrad's exact form (hessian="hvp"): the engine's Hessian-vector products against a float64
finite-difference Hessian, gamma = 0 and lam = 0 give EW's sum exactly, the refused settings, and
no host sync added to the step."""

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from test_step import host_reads

from mtrec import balancers
from mtrec.balancers.base import GradBalancer
from mtrec.core.errors import UserError
from mtrec.engine import hvp
from mtrec.engine.build import balance_scope
from mtrec.engine.step import Stepper
from mtrec.models import ModelConfig, build

VOCAB = [20, 30, 5]
LR = 0.05


def tiny_model(seed=0, name="mmoe"):
    torch.manual_seed(seed)
    return build(name, VOCAB, 2, [0.3, 0.1, 0.05], ModelConfig(expert_sizes=[8, 4], tower_sizes=[4]))


def data(n=48, seed=1):
    g = torch.Generator().manual_seed(seed)
    codes = torch.stack([torch.randint(0, v, (n,), generator=g) for v in VOCAB], 1).int()
    return codes, torch.randn(n, 2, generator=g), (torch.rand(n, 3, generator=g) < 0.4).float()


def stepped(balancer, scope, batch, name="mmoe"):
    """The model before the step and what the step applied: the gradients of the shared parameters
    and, in scope all, the touched rows' gradient (SGD with lr LR: the .grad it is given stays)."""
    model = tiny_model(name=name)
    before = copy.deepcopy(model)
    stepper = Stepper(model, balancer, torch.optim.SGD(model.parameters(), lr=LR), scope, torch.device("cpu"), None)
    assert stepper.step(*batch) is not None
    touched = model.embedding.rows(batch[0]).flatten().unique()
    applied = [p.grad.clone() for p in model.shared_parameters()]
    if scope == "all":
        applied.append(model.embedding.table.weight.grad[touched].clone())
    return before, applied, touched


def f64_task_grads(model, batch, scope, touched):
    """Per task, float64 gradients of the balanced tensors (shared parameters, then the touched rows)."""
    codes, numeric, labels = batch
    logits = model(codes, numeric.double())
    losses = F.binary_cross_entropy_with_logits(logits, labels.double(), reduction="none").mean(0)
    params = model.shared_parameters() + [model.embedding.table.weight]
    out = []
    for t in range(len(losses)):
        gs = torch.autograd.grad(losses[t], params, retain_graph=True)
        out.append(list(gs[:-1]) + ([gs[-1][touched]] if scope == "all" else []))
    return out


def normalised(g):
    rms = g.pow(2).mean().sqrt()
    return g / rms if rms > 0 else torch.zeros_like(g)  # a task that does not reach the tensor: 0


def finite_difference_update(model, batch, scope, touched, gamma, lam, hessian, eps=1e-6):
    """sum_i g_i - lam lr sum_i H_i v_i, H_i v_i = (grad L_i(theta + eps v_i) - grad L_i(theta - eps v_i)) / 2 eps
    in float64; v_i = sum_{j != i} gamma_j s_j, s_j = g_j / rms(g_j) per tensor (hvp; 0 where the rms
    is 0) or g_j (hvp-raw)."""
    model = copy.deepcopy(model).double()
    params = model.shared_parameters() + ([model.embedding.table.weight] if scope == "all" else [])
    grads = f64_task_grads(model, batch, scope, touched)
    T = len(grads)
    steps = [[normalised(g) if hessian == "hvp" else g for g in grads[t]] for t in range(T)]
    update = [sum(grads[t][k] for t in range(T)) for k in range(len(grads[0]))]
    for i in range(T):
        v = [sum(gamma[j] * steps[j][k] for j in range(T) if j != i) for k in range(len(update))]
        shifted = []
        for sign in (1.0, -1.0):
            with torch.no_grad():
                for p, d in zip(params, v):
                    if p is model.embedding.table.weight:
                        p[touched] += sign * eps * d
                    else:
                        p += sign * eps * d
            shifted.append(f64_task_grads(model, batch, scope, touched)[i])
            with torch.no_grad():
                for p, d in zip(params, v):
                    if p is model.embedding.table.weight:
                        p[touched] -= sign * eps * d
                    else:
                        p -= sign * eps * d
        for k in range(len(update)):
            update[k] = update[k] - lam * LR * (shifted[0][k] - shifted[1][k]) / (2 * eps)
    return update, [sum(grads[t][k] for t in range(T)) for k in range(len(update))]


@pytest.mark.parametrize("scope", ["shared", "all"])
@pytest.mark.parametrize("hessian, gamma", [("hvp", [0.02, 0.05, 0.03]), ("hvp-raw", [40.0, 100.0, 60.0])])
def test_exact_form_matches_a_float64_finite_difference_hessian(scope, hessian, gamma):
    """The correction the step applies, update - sum_i g_i (fp32, double backward), equals
    -lam lr sum_i H_i v_i from central differences of float64 gradients, tensor by tensor (the
    touched rows included in scope all, with their coupling to the dense parameters). Shared-Bottom:
    MMoE's gates take their softmax in fp32 even in a float64 model, which would cap the reference."""
    batch = data()
    cograd = balancers.build("cograd", num_tasks=3, gamma=gamma, hessian=hessian, lam=2.0)
    before, applied, touched = stepped(cograd, scope, batch, "shared-bottom")
    want, plain = finite_difference_update(before, batch, scope, touched, gamma, 2.0, hessian)
    assert len(applied) == len(want) == len(before.shared_parameters()) + (scope == "all")
    total_change = 0.0
    for got, w, s in zip(applied, want, plain):
        correction, want_correction = got.double() - s, w - s
        scale = want_correction.norm() + 1e-3 * s.norm()
        assert (correction - want_correction).norm() <= 1e-4 * scale, (correction.norm(), want_correction.norm())
        total_change += float(want_correction.norm() / s.norm())
    assert total_change / len(want) > 0.01  # the correction is not negligible: the comparison means something


class Sum(GradBalancer):
    name = "sum"

    def combine(self, grads, losses=None, parts=None):
        return [g.sum(0) for g in grads]


@pytest.mark.parametrize("scope", ["shared", "all"])
@pytest.mark.parametrize("options", [dict(gamma=0.0), dict(lam=0.0)])
def test_gamma_zero_or_lam_zero_is_ew_exactly(scope, options):
    batch = data(seed=4)
    _, want, _ = stepped(Sum(3), scope, batch)
    _, got, _ = stepped(balancers.build("cograd", num_tasks=3, hessian="hvp", **options), scope, batch)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    _, moved, _ = stepped(balancers.build("cograd", num_tasks=3, hessian="hvp", gamma=0.05), scope, batch)
    assert not all(torch.equal(a, b) for a, b in zip(moved, want))  # the default lam does move it


def test_representation_scope_and_torchrun_are_refused_in_one_line():
    cograd = balancers.build("cograd", num_tasks=3, hessian="hvp")
    model = tiny_model()
    with pytest.raises(UserError) as err:
        Stepper(model, cograd, torch.optim.SGD(model.parameters(), lr=LR), "representation", torch.device("cpu"), None)
    message = str(err.value)
    assert "\n" not in message and "use shared or all" in message and "activations" in message
    cfg = SimpleNamespace(scope="representation", balancer="cograd")
    with pytest.raises(UserError, match="w.r.t. activations") as err:
        balance_scope(cfg, model, cograd, None)  # refused while the run is built, before any data is read
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="one process only"):
        hvp.check(cograd, "shared", group=object())
    hvp.check(balancers.build("cograd", num_tasks=3), "representation", None)  # the diagonal forms run there
    with pytest.raises(ValueError, match="needs the engine's Hessian-vector products"):
        cograd.combine([torch.randn(3, 4)])


def test_the_exact_form_adds_no_host_sync(monkeypatch):
    """The step's one read of a device value stays its only one: lr is read from the optimizer's
    group as it is, never through .item()."""
    model = tiny_model()
    cograd = balancers.build("cograd", num_tasks=3, hessian="hvp")
    stepper = Stepper(model, cograd, torch.optim.SGD(model.parameters(), lr=LR), "shared", torch.device("cpu"), None)
    stepper.step(*data())
    assert host_reads(monkeypatch, stepper) == ["__bool__"]
