"""Every balancer inside the real training step, in every scope it can run in: a few SGD updates stay
finite, the shared parameters move by exactly what the balancer decided (its combined gradient, or
the gradient of its weighted loss), and its state survives a checkpoint round trip mid-run."""

import copy

import pytest
import torch

from mtrec.balancers import build, names
from mtrec.engine.step import Stepper, task_losses
from mtrec.models import ModelConfig
from mtrec.models import build as build_model

VOCAB = [20, 30, 5]
LR = 0.05


def batch(seed, n=48):
    g = torch.Generator().manual_seed(seed)
    codes = torch.stack([torch.randint(0, v, (n,), generator=g) for v in VOCAB], 1).int()
    labels = (torch.rand(n, 3, generator=g) < 0.3).float()
    labels[:, 2] = 0  # a rare task with no positive in the batch still has a (small) gradient
    return codes, torch.randn(n, 2, generator=g), labels


def stepper_for(name, scope):
    torch.manual_seed(0)
    model = build_model("mmoe", VOCAB, 2, [0.3, 0.1, 0.05], ModelConfig(expert_sizes=[8], tower_sizes=[4]))
    balancer = build(name, num_tasks=3)
    params = [{"params": list(model.parameters())}]
    extra = [p for p in balancer.parameters() if p.requires_grad]
    if extra:
        params.append({"params": extra})
    # Plain SGD: the update of a parameter is exactly -LR times the gradient the step applied.
    opt = torch.optim.SGD(params, lr=LR)
    return model, balancer, Stepper(model, balancer, opt, scope, torch.device("cpu"), None)


CASES = [(n, s) for n in names("grad") for s in build(n, num_tasks=3).scopes] + [(n, "shared") for n in names("loss")]


def expected_shared_grads(name, scope, model, balancer, codes, numeric, labels):
    """What the balancer's decision means for the shared parameters (and, in scope all, the table),
    computed beside the step: for a gradient balancer from the output of its ``combine`` (recorded),
    for a loss weighting from a copy of the model and balancer taken before the step."""
    if balancer.kind == "loss":
        twin, twin_balancer = copy.deepcopy(model), copy.deepcopy(balancer)
        loss = twin_balancer.weigh(task_losses(twin(codes, numeric), labels))
        return torch.autograd.grad(loss, twin.shared_parameters())
    if scope == "representation":
        twin = copy.deepcopy(model)
        z = twin.encode(twin.embed(codes), numeric, codes)
        return lambda combined: torch.autograd.grad(list(z), twin.shared_parameters(), combined, allow_unused=True)
    return None  # the recorded combine output itself (shared tensors, then the touched rows in scope all)


@pytest.mark.parametrize("name,scope", CASES)
def test_shared_parameters_move_by_what_the_balancer_decided(name, scope):
    model, balancer, stepper = stepper_for(name, scope)
    outputs = []
    if balancer.kind == "grad":
        original = balancer.combine

        def recording(grads, losses=None, **kwargs):  # kwargs: the parts under --balance-groups part
            out = original(grads, losses, **kwargs)
            outputs.append(list(out))  # a copy: the step pops the touched rows off the list it gets
            return out

        balancer.combine = recording
    shared, table = model.shared_parameters(), model.embedding.table.weight
    for seed in range(3):
        codes, numeric, labels = batch(seed)
        expected = expected_shared_grads(name, scope, model, balancer, codes, numeric, labels)
        before = [p.detach().clone() for p in shared]
        table_before = table.detach().clone()
        losses = stepper.step(codes, numeric, labels)
        assert losses is not None and torch.isfinite(losses).all()
        if callable(expected):  # representation: the combined gradient w.r.t. z, pulled back to the parameters
            expected = expected(outputs[-1])
        elif expected is None:
            expected = outputs[-1]
        for k, (p, b) in enumerate(zip(shared, before)):
            g = torch.zeros_like(p) if expected[k] is None else expected[k]
            torch.testing.assert_close((b - p.detach()) / LR, g, rtol=1e-3, atol=1e-5, msg=f"{name} tensor {k}")
        if scope == "all" and balancer.kind == "grad":
            rows = model.embedding.rows(codes).flatten().unique()
            moved = (table_before - table.detach()) / LR
            torch.testing.assert_close(moved[rows], expected[-1], rtol=1e-3, atol=1e-5)
            untouched = torch.ones(table.shape[0], dtype=torch.bool)
            untouched[rows] = False
            assert torch.equal(moved[untouched], torch.zeros_like(moved[untouched]))
        # The shared part did learn: a balancer that returned zeros would fail here.
        assert any(not torch.equal(b, p) for b, p in zip(before, shared)), name
    assert all(torch.isfinite(p).all() for p in model.parameters())
    state = balancer.state_dict()
    fresh = build(name, num_tasks=3)
    fresh.load_state_dict(state)
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in state.items())
