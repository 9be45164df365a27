"""MetaBalance against a hand-written loop of the rule in balancers.md section 1.2."""

import pytest
import torch

from mtrec.balancers import build

T = 3
SHAPES = [(4, 5), (6,), (3, 2)]


def steps_of_grads(num_steps=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    steps = []
    for step in range(num_steps):
        # Different magnitudes per task and per tensor, so reduce/enlarge both happen.
        grads = [torch.randn((T, *s), generator=g, dtype=torch.float64)
                 * torch.tensor([1.0, 3.0, 0.2], dtype=torch.float64).view(T, *[1] * len(s)) for s in SHAPES]
        if step == 2:
            grads[1][2] = 0  # task 2 has no gradient on tensor 1 this step: its EMA must not move
        steps.append(grads)
    return steps


def reference(steps, relax, beta, mode):
    """The official loop, task by task (target first), EMA updated before scaling."""
    m = [[0.0] * T for _ in SHAPES]
    outputs = []
    for grads in steps:
        acc = [torch.zeros(s, dtype=torch.float64) for s in SHAPES]
        for t in range(T):
            for k, g in enumerate(grads):
                n = float(g[t].norm())
                if n > 0:
                    m[k][t] = beta * m[k][t] + (1 - beta) * n
                if m[k][t] < 1e-12:
                    s = 1.0
                else:
                    s = relax * m[k][0] / m[k][t] + (1 - relax)
                    if mode == "reduce_only" and not m[k][t] > m[k][0]:
                        s = 1.0
                    if mode == "enlarge_only" and not m[k][t] < m[k][0]:
                        s = 1.0
                acc[k] += s * g[t]
        outputs.append(acc)
    return outputs, m


@pytest.mark.parametrize("mode", ["both", "reduce_only", "enlarge_only"])
@pytest.mark.parametrize("relax,beta", [(0.7, 0.9), (0.3, 0.5)])
def test_five_steps_match_the_reference_loop(mode, relax, beta):
    steps = steps_of_grads()
    expected, m = reference(steps, relax, beta, mode)
    b = build("metabalance", num_tasks=T, relax=relax, beta=beta, mode=mode)
    for grads, want in zip(steps, expected):
        got = b.combine([g.float() for g in grads])
        for x, y in zip(got, want):
            torch.testing.assert_close(x.double(), y, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b.norm_ema.double(), torch.tensor(m, dtype=torch.float64), rtol=1e-5, atol=0)


def test_relax_zero_is_the_plain_sum():
    b = build("metabalance", num_tasks=T, relax=0)
    for grads in steps_of_grads():
        for x, g in zip(b.combine([g.float() for g in grads]), grads):
            torch.testing.assert_close(x, g.float().sum(0))


def test_target_gradient_is_never_rescaled():
    b = build("metabalance", num_tasks=T)
    for grads in steps_of_grads():
        b.combine([g.float() for g in grads])
        assert torch.all(b.scales()[:, 0] == 1)


def test_ema_ratio_moves_to_one_as_relax_goes_to_one():
    """Per tensor, the balanced aux gradient's norm over the target's approaches 1 as relax -> 1."""
    target = torch.zeros(2, 10)
    target[0, :5] = 0.1 * torch.arange(1, 6)  # tensor 0: small target
    target[1, :5] = 2.0  # tensor 1: large target
    aux = torch.zeros(2, 10)
    aux[0, 5:] = 1.0
    aux[1, 5:] = 0.05
    grads = [torch.stack([target[k], aux[k]]) for k in range(2)]
    gaps = []
    for relax in [0.0, 0.3, 0.6, 0.9, 0.99]:
        b = build("metabalance", num_tasks=2, relax=relax)
        for _ in range(4):
            out = b.combine(grads)
        ratios = torch.stack([o[5:].norm() / o[:5].norm() for o in out])  # disjoint supports
        gaps.append((ratios - 1).abs())
    gaps = torch.stack(gaps)  # [relax, tensor]
    assert torch.all(gaps[1:] < gaps[:-1])
    assert torch.all(gaps[-1] < 0.05)  # (1 - relax) * |n_aux / n_target - 1| with ratios 3 and 1/9


def test_zero_gradient_task_keeps_its_ema_and_gets_scale_one_while_unseen():
    b = build("metabalance", num_tasks=2)
    grads = [torch.tensor([[1.0, 0.0], [0.0, 0.0]])]  # aux never seen yet
    out = b.combine(grads)
    assert b.norm_ema[0, 1] == 0 and b.scales()[0, 1] == 1
    torch.testing.assert_close(out[0], torch.tensor([1.0, 0.0]))
    b.combine([torch.tensor([[1.0, 0.0], [0.0, 4.0]])])
    before = b.norm_ema.clone()
    b.combine(grads)
    assert b.norm_ema[0, 1] == before[0, 1]


def test_state_is_sized_lazily_and_checked():
    b = build("metabalance", num_tasks=2)
    assert b.norm_ema.shape == (0, 2)
    b.combine([torch.ones(2, 3), torch.ones(2, 4)])
    assert b.norm_ema.shape == (2, 2)
    from mtrec.core.errors import UserError

    with pytest.raises(UserError, match="balanced tensors changed"):
        b.combine([torch.ones(2, 3)])
