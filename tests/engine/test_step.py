"""The step's gradient plumbing: for every scope, a summing balancer reproduces (sum of losses).backward(),
per-task gradients are each task's own, and task parameters get their own task's gradient."""

import pytest
import torch

from mtrec.balancers.base import GradBalancer
from mtrec.engine.step import PerTaskGrads, Stepper, task_losses
from mtrec.models import ModelConfig, build

VOCAB = [20, 30, 5]


class Recorder(GradBalancer):
    """Sums the tasks (EW) and keeps what it was given, to check the engine's inputs."""

    name = "recorder"

    def combine(self, grads, losses=None):
        self.seen = [g.clone() for g in grads]
        return [g.sum(0) for g in grads]


def setup(model_name, scope, seed=0):
    torch.manual_seed(seed)
    model = build(model_name, VOCAB, 2, [0.3, 0.1, 0.05], ModelConfig(expert_sizes=[16, 8], tower_sizes=[8]))
    balancer = Recorder(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: parameters stay, grads are inspected
    return model, balancer, Stepper(model, balancer, opt, scope, torch.device("cpu"), None)


def data(n=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    codes = torch.stack([torch.randint(0, v, (n,), generator=g) for v in VOCAB], 1).int()
    return codes, torch.randn(n, 2, generator=g), (torch.rand(n, 3, generator=g) < 0.3).float()


def reference_grads(model, codes, numeric, labels):
    model.zero_grad()
    task_losses(model(codes, numeric), labels).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("model_name", ["shared-bottom", "mmoe", "ple"])
@pytest.mark.parametrize("scope", ["shared", "all", "representation"])
def test_summing_balancer_reproduces_plain_backward(model_name, scope):
    model, balancer, stepper = setup(model_name, scope)
    codes, numeric, labels = data()
    expected = reference_grads(model, codes, numeric, labels)
    stepper.step(codes, numeric, labels)
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.allclose(p.grad, expected[name], atol=1e-6, rtol=1e-5), name


@pytest.mark.parametrize("scope", ["shared", "all"])
def test_balancer_sees_each_tasks_own_gradient(scope):
    model, balancer, stepper = setup("mmoe", scope)
    codes, numeric, labels = data()
    stepper.step(codes, numeric, labels)
    shared = model.shared_parameters()
    for t in range(3):
        model.zero_grad()
        task_losses(model(codes, numeric), labels)[t].backward()
        for k, p in enumerate(shared):
            assert torch.allclose(balancer.seen[k][t], p.grad, atol=1e-7, rtol=1e-5)
        if scope == "all":
            # The last tensor is the touched rows' gradient, never a dense table copy.
            rows = model.embedding.rows(codes).flatten().unique()
            table_grad = model.embedding.table.weight.grad
            assert balancer.seen[-1].shape == (3, rows.numel(), 16)
            assert torch.allclose(balancer.seen[-1][t], table_grad[rows], atol=1e-7, rtol=1e-5)


def test_loop_fallback_matches_batched_call():
    model, _, _ = setup("mmoe", "shared")
    codes, numeric, labels = data()
    params = model.shared_parameters()
    batched = PerTaskGrads(3)(task_losses(model(codes, numeric), labels), params)
    looped = PerTaskGrads(3)
    looped.batched = False
    loop = looped(task_losses(model(codes, numeric), labels), params)
    for a, b in zip(batched, loop):
        assert torch.allclose(a, b, atol=1e-7, rtol=1e-5)


def test_non_finite_loss_skips_the_step_without_touching_parameters_or_state():
    from mtrec import balancers

    model, _, _ = setup("mmoe", "shared")
    balancer = balancers.build("metabalance", num_tasks=3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    stepper = Stepper(model, balancer, optimizer, "shared", torch.device("cpu"), None)
    assert stepper.step(*data()) is not None  # one good step: moving averages and Adam moments exist
    codes, numeric, labels = data(seed=2)
    numeric[3, 0] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    state = {k: v.clone() for k, v in balancer.state_dict().items()}
    moments = [v.clone() for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    # The balancer runs on the poisoned gradients (the skip is decided by the step's one sync, after
    # it), and what it changed is restored.
    assert stepper.step(codes, numeric, labels) is None
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(torch.equal(state[k], v) for k, v in balancer.state_dict().items())
    after = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    assert all(torch.equal(a, b) for a, b in zip(moments, after))


@pytest.mark.parametrize("model_name", ["shared-bottom", "mmoe", "ple"])
def test_batched_per_task_gradients_work_for_every_architecture(model_name):
    """The batched call (used on CUDA) must not fall back to the loop for our models."""
    model, balancer, stepper = setup(model_name, "shared")
    stepper.grads.batched = None
    codes, numeric, labels = data()
    expected = reference_grads(model, codes, numeric, labels)
    stepper.step(codes, numeric, labels)
    assert stepper.grads.batched is True
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, expected[name], atol=1e-6, rtol=1e-5), name


@pytest.mark.parametrize("balancer_name", ["ew", "metabalance"])
def test_non_finite_gradient_with_finite_loss_skips_the_step(balancer_name):
    from mtrec import balancers

    model, _, _ = setup("mmoe", "shared")
    balancer = balancers.build(balancer_name, num_tasks=3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    stepper = Stepper(model, balancer, opt, "shared", torch.device("cpu"), None)
    codes, numeric, labels = data()
    stepper.step(codes, numeric, labels)  # one good step so the balancer has state
    params = [p.detach().clone() for p in model.parameters()]
    state = {k: v.clone() for k, v in balancer.state_dict().items()}
    hook = model.experts.weights[0].register_hook(lambda g: torch.full_like(g, float("inf")))
    assert stepper.step(codes, numeric, labels) is None
    hook.remove()
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    assert all(torch.equal(state[k], v) for k, v in balancer.state_dict().items())
    assert stepper.step(codes, numeric, labels) is not None


@pytest.mark.parametrize("balancer_name", ["metabalance", "gradcraft", "cograd", "mgda"])
def test_bf16_autocast_step_keeps_fp32_gradients_and_finite_state(balancer_name):
    from mtrec import balancers

    torch.manual_seed(0)
    model = build("mmoe", VOCAB, 2, [0.3, 0.1, 0.05], ModelConfig(expert_sizes=[16, 8], tower_sizes=[8]))
    balancer = balancers.build(balancer_name, num_tasks=3)
    seen = []
    original = balancer.combine
    balancer.combine = lambda grads, losses=None, **kw: seen.append([g.dtype for g in grads]) or original(
        grads, losses, **kw)  # kw: the parts under --balance-groups part
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    stepper = Stepper(model, balancer, opt, balancer.default_scope, torch.device("cpu"), torch.bfloat16)
    for _ in range(3):
        assert stepper.step(*data()) is not None
    assert all(dtype == torch.float32 for dtypes in seen for dtype in dtypes)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(v).all() for v in balancer.state_dict().values() if v.is_floating_point())


def test_diagnostics_hold_each_tasks_gradient_norms_and_cosines():
    model, balancer, stepper = setup("mmoe", "shared")
    stepper.step(*data(), diagnose=True)
    norms, cos = stepper.diagnostics["norms"], stepper.diagnostics["cosines"]
    for k, g in enumerate(balancer.seen):
        flat = g.flatten(1)
        torch.testing.assert_close(norms[k], flat.norm(dim=1), rtol=1e-4, atol=1e-8)
        expected = torch.nn.functional.cosine_similarity(flat.unsqueeze(1), flat.unsqueeze(0), dim=2)
        torch.testing.assert_close(cos[k], expected, rtol=1e-3, atol=1e-5)


def _stepper_with(balancer_name, scope=None):
    from mtrec import balancers

    torch.manual_seed(0)
    model = build("mmoe", VOCAB, 2, [0.3, 0.1, 0.05], ModelConfig(expert_sizes=[16, 8], tower_sizes=[8]))
    balancer = balancers.build(balancer_name, num_tasks=3)
    groups = [{"params": list(model.parameters())}]
    if any(p.requires_grad for p in balancer.parameters()):
        groups.append({"params": [p for p in balancer.parameters() if p.requires_grad]})
    opt = torch.optim.Adam(groups, lr=1e-2)
    scope = scope or (balancer.default_scope if balancer.kind == "grad" else "shared")
    return model, balancer, opt, Stepper(model, balancer, opt, scope, torch.device("cpu"), None)


def _frozen(model, balancer, opt):
    """Everything a skipped step must leave as it was: parameters, optimizer and balancer state."""
    return ([p.detach().clone() for p in model.parameters()],
            {k: v.clone() for k, v in balancer.state_dict().items()},
            {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()})


def _assert_unchanged(frozen, model, balancer, opt):
    params, state, opt_state = frozen
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    now = balancer.state_dict()
    assert sorted(now) == sorted(state)
    assert all(torch.equal(state[k], v) for k, v in now.items())
    assert {id(p): sorted(s) for p, s in opt.state.items()} == {k: sorted(v) for k, v in opt_state.items()}
    assert all(torch.equal(opt_state[id(p)][k], v) for p, s in opt.state.items() for k, v in s.items())


def _names():
    from mtrec import balancers

    return balancers.names()


@pytest.mark.parametrize("balancer_name", _names())
def test_a_skipped_step_changes_no_state_for_every_balancer(balancer_name):
    """A non-finite gradient of a shared parameter (found before the balancer in scope shared,
    after it in scope representation, after weigh for loss weighting) leaves parameters, the
    optimizer and the balancer exactly as they were; the next good step goes through."""
    model, balancer, opt, stepper = _stepper_with(balancer_name)
    codes, numeric, labels = data()
    for seed in (1, 2):
        assert stepper.step(*data(seed=seed)) is not None  # the balancer has state by now
    frozen = _frozen(model, balancer, opt)
    hook = model.experts.weights[0].register_hook(lambda g: torch.full_like(g, float("inf")))
    assert stepper.step(codes, numeric, labels) is None
    hook.remove()
    _assert_unchanged(frozen, model, balancer, opt)
    assert stepper.step(codes, numeric, labels) is not None


@pytest.mark.parametrize("scope", ["shared", "all", "representation"])
def test_a_balancer_output_that_is_not_finite_skips_the_step(scope):
    """The balancer's inputs are finite but what it returns is not (a solver that blew up): the
    step is skipped, nothing reaches Adam, and what combine changed in its state is undone."""
    model, balancer, opt, stepper = _stepper_with("metabalance", scope)
    assert stepper.step(*data(seed=2)) is not None
    frozen = _frozen(model, balancer, opt)
    original = balancer.combine
    balancer.combine = lambda grads, losses=None, **kw: [g * float("nan") for g in original(grads, losses, **kw)]
    assert stepper.step(*data()) is None
    _assert_unchanged(frozen, model, balancer, opt)
    balancer.combine = original
    assert stepper.step(*data()) is not None


def test_clip_grad_scales_the_balanced_gradients_to_the_norm_and_counts_the_steps():
    model, balancer, stepper = setup("mmoe", "all")
    codes, numeric, labels = data()
    expected = reference_grads(model, codes, numeric, labels)
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in expected.values()])).item()
    stepper.clip_grad = norm / 4
    stepper.step(codes, numeric, labels)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name] / 4, rtol=1e-4, atol=1e-8)
    assert stepper.clipped.item() == 1
    stepper.clip_grad = norm * 2  # above the norm: gradients untouched, not counted
    stepper.step(codes, numeric, labels)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-5, atol=1e-7)
    assert stepper.clipped.item() == 1


def test_batched_call_falls_back_only_when_vmap_cannot_batch(monkeypatch, capsys):
    model, _, _ = setup("mmoe", "shared")
    codes, numeric, labels = data()
    params = model.shared_parameters()
    real = torch.autograd.grad

    def failing(message):
        def grad(*args, **kwargs):
            if kwargs.get("is_grads_batched"):
                raise RuntimeError(message)
            return real(*args, **kwargs)
        return grad

    monkeypatch.setattr(torch.autograd, "grad", failing("Batching rule not implemented for aten::foo"))
    grads = PerTaskGrads(3)
    expected = PerTaskGrads(3, batched=False)(task_losses(model(codes, numeric), labels), params)
    got = grads(task_losses(model(codes, numeric), labels), params)
    assert grads.batched is False and all(torch.equal(a, b) for a, b in zip(got, expected))
    assert "using a loop of 3 backward passes" in capsys.readouterr().err
    monkeypatch.setattr(torch.autograd, "grad", failing("CUDA out of memory. Tried to allocate 2.00 GiB"))
    with pytest.raises(RuntimeError, match="out of memory"):
        PerTaskGrads(3)(task_losses(model(codes, numeric), labels), params)


@pytest.mark.parametrize("balancer_name, scope", [("ew", None), ("uw", None), ("metabalance", "shared"),
                                                  ("pcgrad", "representation")])
def test_one_host_sync_per_step(monkeypatch, balancer_name, scope):
    """The skip decision is the step's only read of a device value (a Python bool/item/list of a
    tensor); CUDA runs check the same with torch.cuda.set_sync_debug_mode (tests/engine/test_cuda.py)."""
    from mtrec import balancers

    model, _, _ = setup("mmoe", "shared")
    balancer = balancers.build(balancer_name, num_tasks=3)
    # SGD: torch's CPU Adam reads its step counters with .item() (CUDA's fused Adam does not)
    opt = torch.optim.SGD(list(model.parameters()) + list(balancer.parameters()), lr=1e-3)
    stepper = Stepper(model, balancer, opt, scope or balancer.default_scope, torch.device("cpu"), None)
    stepper.step(*data())  # lazily sized state exists now
    assert host_reads(monkeypatch, stepper) == ["__bool__"]


def host_reads(monkeypatch, stepper) -> list[str]:
    """The reads of device values (a Python bool/item/list of a tensor) during one good step."""
    reads = []
    for name in ("__bool__", "item", "tolist", "__int__", "__float__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name,
                            lambda self, *a, _o=original, _n=name, **k: reads.append(_n) or _o(self, *a, **k))
    assert stepper.step(*data(seed=3)) is not None
    monkeypatch.undo()
    return reads


def test_sampled_steps_log_the_task_weights_the_balancer_applied():
    from mtrec import balancers

    # UW: the loss weights 0.5 e^{-s} of the step (before the optimizer moved s).
    model, _, _ = setup("mmoe", "shared")
    uw = balancers.build("uw", num_tasks=3)
    stepper = Stepper(model, uw, torch.optim.SGD(list(model.parameters()) + list(uw.parameters()), lr=0.1),
                      "shared", torch.device("cpu"), None)
    expected = 0.5 * torch.exp(-uw.log_vars.detach().clone())
    stepper.step(*data(), diagnose=True)
    torch.testing.assert_close(stepper.diagnostics["weights"], expected)
    # MGDA: the shared gradient applied is sum_t alpha_t g_t with the logged alpha.
    model, _, _ = setup("mmoe", "shared")
    mgda = balancers.build("mgda", num_tasks=3)
    stepper = Stepper(model, mgda, torch.optim.SGD(model.parameters(), lr=0.0), "shared", torch.device("cpu"), None)
    codes, numeric, labels = data()
    stepper.step(codes, numeric, labels, diagnose=True)
    alpha = stepper.diagnostics["weights"]
    assert alpha.shape == (3,) and torch.all(alpha >= 0) and abs(float(alpha.sum()) - 1) < 1e-5  # on the simplex
    applied = {id(p): p.grad.clone() for p in model.shared_parameters()}
    per_task = []
    for t in range(3):
        model.zero_grad()
        task_losses(model(codes, numeric), labels)[t].backward()
        per_task.append({id(p): p.grad.clone() for p in model.shared_parameters()})
    for p in model.shared_parameters():
        expected = sum(alpha[t] * per_task[t][id(p)] for t in range(3))
        torch.testing.assert_close(applied[id(p)], expected, rtol=1e-4, atol=1e-7)
    # MetaBalance has no task weights: nothing is logged.
    model, _, _ = setup("mmoe", "shared")
    stepper = Stepper(model, balancers.build("metabalance", num_tasks=3), torch.optim.SGD(model.parameters(), lr=0.0),
                      "shared", torch.device("cpu"), None)
    stepper.step(*data(), diagnose=True)
    assert "weights" not in stepper.diagnostics


def test_update_change_is_the_hand_computed_ratio_for_pcgrad_on_two_conflicting_gradients():
    """g1 = [1, 0], g2 = [-1, 1] conflict (g1 . g2 = -1): PCGrad gives g1 + g2/2 = [0.5, 0.5] and
    g2 + g1 = [0, 1], update [0.5, 1.5] against the plain sum [0, 1]: ||[0.5, 0.5]|| / 1 = 1/sqrt(2).
    A second tensor where the tasks agree is left as the sum: 0."""
    from mtrec import balancers
    from mtrec.engine.step import update_change

    grads = [torch.tensor([[1.0, 0.0], [-1.0, 1.0]]), torch.tensor([[1.0, 2.0], [2.0, 1.0]])]
    conflicting = balancers.build("pcgrad", num_tasks=2).combine(grads[:1])
    torch.testing.assert_close(conflicting[0], torch.tensor([0.5, 1.5]))
    torch.testing.assert_close(update_change(grads, conflicting + [grads[1].sum(0)]),
                               torch.tensor([2**-0.5, 0.0]))


def test_diagnostics_log_the_realised_update_change_of_every_kind_of_balancer():
    """EW (one backward of the summed loss) and CoGrad with gamma 0 log 0; CoGrad's default logs
    ||applied - sum_t g_t|| / ||sum_t g_t|| with the per-task gradients from separate backward passes."""
    from mtrec import balancers

    codes, numeric, labels = data()
    model, _, _ = setup("mmoe", "shared")
    stepper = Stepper(model, balancers.build("ew", num_tasks=3), torch.optim.SGD(model.parameters(), lr=0.0),
                      "shared", torch.device("cpu"), None)
    stepper.step(codes, numeric, labels, diagnose=True)
    change = stepper.diagnostics["update_change"]
    assert change.shape == (len(model.shared_parameters()),) and torch.all(change < 1e-6)  # fp32 summation order
    for scope in ("shared", "all", "representation"):
        model, _, _ = setup("mmoe", scope)
        stepper = Stepper(model, balancers.build("cograd", num_tasks=3, gamma=0.0),
                          torch.optim.SGD(model.parameters(), lr=0.0), scope, torch.device("cpu"), None)
        stepper.step(codes, numeric, labels, diagnose=True)
        assert torch.equal(stepper.diagnostics["update_change"], torch.zeros_like(stepper.diagnostics["norms"][:, 0]))
    model, _, _ = setup("mmoe", "all")
    stepper = Stepper(model, balancers.build("cograd", num_tasks=3, gamma=0.1),
                      torch.optim.SGD(model.parameters(), lr=0.0), "all", torch.device("cpu"), None)
    stepper.step(codes, numeric, labels, diagnose=True)
    applied = [p.grad.clone() for p in model.shared_parameters()]
    plain = [torch.zeros_like(p) for p in model.shared_parameters()]
    for t in range(3):
        model.zero_grad()
        task_losses(model(codes, numeric), labels)[t].backward()
        plain = [s + p.grad for s, p in zip(plain, model.shared_parameters())]
    expected = torch.stack([(a - s).norm() / s.norm() for a, s in zip(applied, plain)])
    torch.testing.assert_close(stepper.diagnostics["update_change"], expected, rtol=1e-3, atol=1e-6)
    assert torch.all(expected > 1e-3)
