"""CoGrad (reconstructed): reduction to EW, the scale-free default, the literal element-wise form, the clamp,
the outer variant."""

import pytest
import torch

from mtrec.balancers import build
from mtrec.core.errors import UserError


def grads(seed=0, T=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(T, 4, 3, generator=g), torch.randn(T, 5, generator=g)]


def reference(gs, gamma, hessian):
    """ghat_i = g_i - sum_{j != i} gamma_j H_i g_j, with the factor on g_i clamped to [0, 2]; in
    diag-rms the factor uses z_t = g_t / rms(g_t) over the tensor instead of g_t."""
    out = []
    T = gs[0].shape[0]
    flat = torch.cat([g.reshape(T, -1) for g in gs], 1).double()
    for g in gs:
        g = g.double()
        z = g / g.reshape(T, -1).pow(2).mean(1).sqrt().reshape((T,) + (1,) * (g.dim() - 1))
        total = torch.zeros_like(g[0])
        for i in range(T):
            if hessian == "diag-raw":
                transfer = sum(gamma[j] * g[i] * g[j] for j in range(T) if j != i)
            elif hessian == "diag-rms":
                transfer = sum(gamma[j] * z[i] * z[j] for j in range(T) if j != i)
            else:
                transfer = sum(gamma[j] * (flat[i] @ flat[j]) for j in range(T) if j != i)
            total += g[i] * (1 - transfer).clamp(0, 2)
        out.append(total)
    return out


def test_gamma_zero_is_ew_sum():
    for hessian in ("diag-rms", "diag-raw", "outer"):
        b = build("cograd", num_tasks=3, gamma=0, hessian=hessian)
        for x, g in zip(b.combine(grads()), grads()):
            torch.testing.assert_close(x, g.sum(0))


@pytest.mark.parametrize("hessian", ["diag-rms", "diag-raw", "outer"])
@pytest.mark.parametrize("gamma", [0.3, [0.5, 0.1, 2.0]])
def test_matches_the_reference_formula(hessian, gamma):
    gs = grads(1)
    gamma_list = [gamma] * 3 if not isinstance(gamma, list) else gamma
    want = reference(gs, gamma_list, hessian)
    got = build("cograd", num_tasks=3, gamma=gamma, hessian=hessian).combine(gs)
    for x, y in zip(got, want):
        torch.testing.assert_close(x.double(), y, rtol=1e-5, atol=1e-6)


def test_two_tasks_equal_gamma_is_a_per_coordinate_factor():
    """(g1 + g2) * (1 - gamma g1 g2): agreeing coordinates are damped, conflicting ones amplified."""
    g1 = torch.tensor([0.5, -0.5, 0.2, 0.0])
    g2 = torch.tensor([0.4, 0.3, -0.6, 1.0])
    gamma = 0.5
    out = build("cograd", num_tasks=2, gamma=gamma, hessian="diag-raw").combine([torch.stack([g1, g2])])[0]
    torch.testing.assert_close(out, (g1 + g2) * (1 - gamma * g1 * g2))
    assert out[0].abs() < (g1 + g2)[0].abs()  # agreeing: damped
    assert out[1].abs() > (g1 + g2)[1].abs()  # conflicting: amplified


def test_clamp_keeps_the_factor_in_zero_two():
    g = torch.tensor([[2.0, -2.0], [2.0, 1.0]])  # factors 1 - 10 g1 g2: -39 and 21
    out = build("cograd", num_tasks=2, gamma=10.0, hessian="diag-raw").combine([g])[0]
    torch.testing.assert_close(out, torch.tensor([0.0, 2 * -2.0 + 2 * 1.0]))  # clamped to 0, and to 2


def test_gamma_list_must_match_the_tasks():
    with pytest.raises(UserError, match="gamma must be a number or a list of 3"):
        build("cograd", num_tasks=3, gamma=[0.1, 0.2])
    with pytest.raises(UserError, match=r"\[0, inf\)"):
        build("cograd", num_tasks=2, gamma=[0.1, -0.2])


def test_hand_computed_gamma_indexed_by_source_task():
    """Numbers worked by hand: ghat_1 = g1 - gamma_2 g1*g1*g2, ghat_2 = g2 - gamma_1 g2*g2*g1."""
    g = torch.tensor([[1.0, 0.5], [0.5, -1.0]])  # g1, g2 (one 2-element shared tensor)
    out = build("cograd", num_tasks=2, gamma=[0.2, 0.4], hessian="diag-raw").combine([g])[0]
    # ghat_1 = [1 * (1 - 0.4 * 0.5), 0.5 * (1 + 0.4 * 0.5)] = [0.8, 0.6]
    # ghat_2 = [0.5 * (1 - 0.2 * 0.5), -1 * (1 + 0.2 * 0.5)] = [0.45, -1.1]
    torch.testing.assert_close(out, torch.tensor([1.25, -0.5]))


def test_hand_computed_outer_variant():
    """hessian="outer": ghat_i = g_i (1 - sum_{j != i} gamma_j g_i . g_j); here g1 . g2 = 1."""
    g = torch.tensor([[1.0, 0.5], [0.5, 1.0]])
    out = build("cograd", num_tasks=2, gamma=[0.2, 0.4], hessian="outer").combine([g])[0]
    # ghat_1 = 0.6 * g1 = [0.6, 0.3]; ghat_2 = 0.8 * g2 = [0.4, 0.8]
    torch.testing.assert_close(out, torch.tensor([1.0, 1.1]))


def relative_change_from_ew(gs, **options):
    out = build("cograd", num_tasks=gs[0].shape[0], **options).combine(gs)
    ew = torch.cat([g.sum(0).flatten() for g in gs]).double()
    got = torch.cat([o.flatten() for o in out]).double()
    return float((got - ew).norm() / ew.norm())


def test_default_acts_at_ctr_gradient_scales_where_the_literal_form_is_ew():
    """Per-tensor gradient norms of 1e-4 (elements ~1e-5, as batch-mean BCE gives): the default
    (scale-free) form changes the update by more than 1e-3 relative to EW; the literal element-wise
    form with the same gamma changes it by the cubic term's ~1e-10, below fp32 round-off."""
    gs = [g / g.reshape(3, -1).norm(dim=1).reshape(3, 1, *([1] * (g.dim() - 2))) * 1e-4 for g in grads(2)]
    assert relative_change_from_ew(gs) > 1e-3
    assert relative_change_from_ew(gs, hessian="diag-raw") < 1e-6


def test_hand_computed_diag_rms():
    """Two tasks, one 2-element tensor: rms(g1) = rms([3, 1]) = sqrt(5), rms(g2) = rms([1, -1]) = 1,
    so z1 = [3, 1] / sqrt(5), z2 = [1, -1]; with gamma = 0.5 the factors are 1 - 0.5 z1 z2 on both."""
    g = torch.tensor([[3.0, 1.0], [1.0, -1.0]])
    out = build("cograd", num_tasks=2, gamma=0.5).combine([g])[0]
    f = 1 - 0.5 * torch.tensor([3.0, -1.0]) / 5**0.5  # z1 * z2
    torch.testing.assert_close(out, (g[0] + g[1]) * f)


def test_diag_rms_normalises_each_part_with_balance_groups_part():
    """With parts, rms is taken per part (an expert's slice, a field's rows), not over the tensor:
    the same result as the parts balanced as separate tensors."""
    from mtrec.balancers.parts import Parts

    g = torch.Generator().manual_seed(4)
    experts = torch.randn(3, 2, 4, generator=g) * torch.tensor([1.0, 100.0])[None, :, None]  # two experts
    rows = torch.randn(3, 5, 2, generator=g) * torch.tensor([1.0, 1.0, 50.0, 50.0, 1.0])[None, :, None]
    ids = torch.tensor([0, 0, 1, 1, 0])  # two fields' rows, interleaved
    b = build("cograd", num_tasks=3, gamma=0.2)
    got = b.combine([experts, rows], parts=Parts([2, 2], [None, ids]))
    want_experts = torch.stack([b.combine([experts[:, e]])[0] for e in range(2)])
    want_rows = torch.zeros(5, 2)
    for field in (0, 1):
        mask = ids == field
        want_rows[mask] = b.combine([rows[:, mask]])[0]
    torch.testing.assert_close(got[0], want_experts)
    torch.testing.assert_close(got[1], want_rows)
    whole = b.combine([experts, rows])
    assert not torch.allclose(whole[0], got[0])  # per tensor is another update


def test_diag_rms_leaves_a_zero_gradient_task_out_of_the_correction():
    gs = grads(3)
    for g in gs:
        g[1] = 0
    out = build("cograd", num_tasks=3, gamma=0.3).combine(gs)
    want = reference([g[[0, 2]] for g in gs], [0.3, 0.3], "diag-rms")
    for x, y in zip(out, want):
        torch.testing.assert_close(x.double(), y, rtol=1e-5, atol=1e-6)
