"""Every architecture: logits [B, T], towers read only their own path, shared/task split is right."""

import math

import pytest
import torch

from mtrec.models import ModelConfig, build, names

VOCAB = [6, 9, 4]
RATES = [0.1, 0.02, 0.005]
CONFIGS = {
    "single": ModelConfig(expert_sizes=[16, 8], tower_sizes=[8]),
    "shared-bottom": ModelConfig(expert_sizes=[16, 8], tower_sizes=[8]),
    "mmoe": ModelConfig(expert_sizes=[16, 8], tower_sizes=[8], num_experts=3),
    "ple": ModelConfig(expert_sizes=[16, 8], tower_sizes=[8], task_experts=2, shared_experts=2, levels=1),
    "ple-2": ModelConfig(expert_sizes=[16, 8], tower_sizes=[8], task_experts=2, shared_experts=1, levels=2),
}


def make(key):
    torch.manual_seed(0)
    return build(key.split("-2")[0] if key == "ple-2" else key, VOCAB, 2, RATES, CONFIGS[key])


def batch(n=32):
    g = torch.Generator().manual_seed(1)
    codes = torch.stack([torch.randint(0, v, (n,), generator=g) for v in VOCAB], 1).int()
    return codes, torch.randn(n, 2, generator=g)


@pytest.mark.parametrize("key", list(CONFIGS))
def test_logits_shape_and_base_rate_bias(key):
    model = make(key)
    codes, numeric = batch()
    logits = model(codes, numeric)
    assert logits.shape == (32, len(RATES))
    # Tower output biases start at the task's base-rate logit, so mean predictions sit near it.
    mean_prob = torch.sigmoid(logits).mean(0)
    for p, rate in zip(mean_prob.tolist(), RATES):
        assert abs(math.log(p / (1 - p)) - math.log(rate / (1 - rate))) < 0.5


@pytest.mark.parametrize("key", list(CONFIGS))
def test_perturbing_task_parameters_changes_only_that_logit(key):
    model = make(key)
    codes, numeric = batch()
    with torch.no_grad():
        before = model(codes, numeric)
        for t in range(len(RATES)):
            saved = [(p, p.detach().clone()) for p, _ in model.task_slices(t)]
            for p, sl in model.task_slices(t):
                p[sl] += 0.5 * torch.randn_like(p[sl])
            after = model(codes, numeric)
            changed = (after - before).abs().amax(0)
            assert changed[t] > 1e-4, f"task {t}'s parameters do not reach its logit"
            others = [k for k in range(len(RATES)) if k != t]
            assert torch.all(changed[others] == 0), f"task {t}'s parameters leak into other logits"
            for p, value in saved:
                p.copy_(value)


@pytest.mark.parametrize("key", [k for k in CONFIGS if k != "single"])
def test_shared_parameters_receive_every_task_and_task_parameters_one(key):
    model = make(key)
    codes, numeric = batch()
    logits = model(codes, numeric)
    shared, task = model.shared_parameters(), model.task_parameters()
    assert {id(p) for p in shared}.isdisjoint(id(p) for p in task)
    assert len(shared) + len(task) + 1 == len(list(model.parameters()))  # + the embedding table
    for t in range(len(RATES)):
        grads = torch.autograd.grad(logits[:, t].sum(), shared, retain_graph=True, allow_unused=True)
        assert all(g is not None and g.abs().sum() > 0 for g in grads), "a shared tensor misses a task"
        task_grads = torch.autograd.grad(logits[:, t].sum(), task, retain_graph=True, allow_unused=True)
        for p, g in zip(task, task_grads):
            if g is None:
                continue
            owned = torch.zeros_like(p, dtype=torch.bool)
            for q, sl in model.task_slices(t):
                if q is p:
                    owned[sl] = True
            assert torch.all(g[~owned] == 0), "a task parameter gets gradient from another task"


def test_ple_task_experts_belong_to_their_task_only_at_the_last_level():
    model = make("ple-2")
    last = {id(p) for p in model.task_experts[-1].parameters()}
    lower = {id(p) for p in model.task_experts[0].parameters()}
    task = {id(p) for p in model.task_parameters()}
    assert last <= task
    assert lower.isdisjoint(task)  # read by the shared gate of level 1, so shared


def test_representation_round_trip_equals_forward():
    for key in ("shared-bottom", "mmoe", "ple", "ple-2"):
        model = make(key)
        codes, numeric = batch()
        z = model.encode(model.embed(codes), numeric)
        assert torch.allclose(model.decode(z), model(codes, numeric))


def test_unknown_model_is_a_user_error():
    from mtrec.core.errors import UserError

    with pytest.raises(UserError, match="mmoe"):
        build("transformer", VOCAB, 2, RATES)
    assert names() == ["single", "shared-bottom", "mmoe", "ple", "esmm"]
