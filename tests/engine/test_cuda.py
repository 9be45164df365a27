"""CUDA-only checks (skipped without a GPU): the batched per-task gradients, no host syncs inside
a balancer's combine, and a short training run with bf16 autocast."""

import pytest
import torch

from mtrec import balancers
from mtrec.engine.step import PerTaskGrads, Stepper, task_losses
from mtrec.models import ModelConfig, build

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
VOCAB = [50, 30, 8]


def _data(n=256, device="cuda"):
    g = torch.Generator().manual_seed(0)
    codes = torch.stack([torch.randint(0, v, (n,), generator=g) for v in VOCAB], 1).int()
    numeric = torch.randn(n, 2, generator=g)
    labels = (torch.rand(n, 3, generator=g) < 0.3).float()
    return codes.to(device), numeric.to(device), labels.to(device)


def _model():
    torch.manual_seed(0)
    return build("mmoe", VOCAB, 2, [0.3, 0.1, 0.05], ModelConfig(expert_sizes=[32, 16], tower_sizes=[8])).cuda()


def test_batched_per_task_gradients_match_the_loop_on_cuda():
    model = _model()
    codes, numeric, labels = _data()
    params = model.shared_parameters()
    batched = PerTaskGrads(3, batched=None)
    out = batched(task_losses(model(codes, numeric), labels), params)
    assert batched.batched is True
    loop = PerTaskGrads(3, batched=False)(task_losses(model(codes, numeric), labels), params)
    for a, b in zip(out, loop):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", [n for n in balancers.names() if balancers.build(n, num_tasks=3).kind == "grad"])
def test_combine_does_not_synchronise_with_the_host(name):
    balancer = balancers.build(name, num_tasks=3).cuda()
    grads = [torch.randn(3, 64, 32, device="cuda"), torch.randn(3, 32, device="cuda")]
    losses = torch.rand(3, device="cuda") + 0.1
    balancer.combine(grads, losses)  # lazily sized state is created outside the checked call
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = balancer.combine(grads, losses)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(o).all() for o in out)


@pytest.mark.parametrize("scope", ["shared", "all", "representation"])
def test_bf16_training_steps_on_cuda(scope):
    model = _model()
    balancer = balancers.build("metabalance", num_tasks=3).cuda()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    stepper = Stepper(model, balancer, opt, scope, torch.device("cuda"), torch.bfloat16)
    for _ in range(5):
        assert stepper.step(*_data()) is not None
    assert all(torch.isfinite(p).all() for p in model.parameters())
