"""Every balancer inside the real training step, for every scope: a few updates stay finite and move
the parameters, and the balancer's state survives a checkpoint round trip mid-run."""

import pytest
import torch

from mtrec.balancers import build, names
from mtrec.errors import UserError
from mtrec.models import ModelConfig
from mtrec.models import build as build_model
from mtrec.step import Stepper

VOCAB = [20, 30, 5]
SCOPES = ["shared", "all", "representation"]


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
        params.append({"params": extra, "weight_decay": 0.0})
    opt = torch.optim.Adam(params, lr=1e-2)
    return model, balancer, Stepper(model, balancer, opt, scope, torch.device("cpu"), None)


CASES = [(n, s) for n in names("grad") for s in SCOPES] + [(n, "shared") for n in names("loss")]


@pytest.mark.parametrize("name,scope", CASES)
def test_a_few_steps_stay_finite_and_move_the_model(name, scope):
    model, balancer, stepper = stepper_for(name, scope)
    before = [p.detach().clone() for p in model.parameters()]
    if name == "db-mtl" and scope == "all":  # its per-parameter EMA cannot follow changing rows
        stepper.step(*batch(0))
        with pytest.raises(UserError, match="balance-scope shared"):
            stepper.step(*batch(1, n=40))
        return
    for seed in range(3):
        losses = stepper.step(*batch(seed))
        assert losses is not None and torch.isfinite(losses).all()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    state = balancer.state_dict()
    fresh = build(name, num_tasks=3)
    fresh.load_state_dict(state)
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in state.items())
