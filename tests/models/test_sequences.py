"""Sequence fields in the model: pooling against a per-row brute force, padding masked, shared rows,
DIN attention against a hand-written unit, and the step's gradient plumbing with sequences."""

import pytest
import torch

from mtrec.engine.step import Stepper
from mtrec.models import ModelConfig, SequenceField, build
from tests.engine.test_step import Recorder

VOCAB = [20, 30, 5]  # field 1 plays the item id
L = 6
CFG = ModelConfig(embedding_dim=8, expert_sizes=[16, 8], tower_sizes=[8])


def sequences(pooling="mean"):
    return [SequenceField("hist", L, pooling, share_with=1, target=1 if pooling == "attention" else None),
            SequenceField("tags", 4, "sum", vocab_size=11)]


def make(name="mmoe", pooling="mean", seed=0):
    torch.manual_seed(seed)
    return build(name, VOCAB, 2, [0.3, 0.1, 0.05], CFG, sequences(pooling))


def batch(n=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    flat = torch.stack([torch.randint(0, v, (n,), generator=g) for v in VOCAB], 1)
    lengths = torch.randint(0, L + 1, (n,), generator=g)
    lengths[:3] = 0  # empty histories
    hist = torch.randint(1, 30, (n, L), generator=g) * (torch.arange(L) < lengths[:, None])
    tags = torch.randint(1, 11, (n, 4), generator=g) * (torch.rand(n, 4, generator=g) < 0.6)
    codes = torch.cat([flat, hist, tags], 1).int()
    return codes, torch.randn(n, 2, generator=g), (torch.rand(n, 3, generator=g) < 0.3).float()


def test_pooling_equals_a_per_row_brute_force_and_empty_lists_give_zero():
    model = make()
    codes, _, _ = batch()
    pooled = model.pooling(model.embed(codes), codes)
    table = model.embedding.table.weight
    item_offset, tags_offset = int(model.embedding.offsets[1]), sum(VOCAB)
    assert pooled.shape == (32, len(VOCAB) + 2, 8)
    for b in range(32):
        hist = [int(c) for c in codes[b, 3:3 + L] if c != 0]
        tags = [int(c) for c in codes[b, 3 + L:] if c != 0]
        mean = table[torch.tensor([item_offset + c for c in hist])].mean(0) if hist else torch.zeros(8)
        total = table[torch.tensor([tags_offset + c for c in tags])].sum(0) if tags else torch.zeros(8)
        torch.testing.assert_close(pooled[b, 3], mean)
        torch.testing.assert_close(pooled[b, 4], total)
    assert torch.equal(pooled[:3, 3], torch.zeros(3, 8))  # the three empty histories


def test_history_shares_the_item_fields_rows():
    model = make()
    codes, _, _ = batch()
    e = model.embed(codes)
    codes[:, 3] = codes[:, 1]  # the first history element is the impressed item itself
    e = model.embed(codes)
    torch.testing.assert_close(e[:, 3], e[:, 1])
    assert model.embedding.table.weight.shape[0] == sum(VOCAB) + 11  # no rows of its own


@pytest.mark.parametrize("pooling", ["mean", "sum", "attention"])
def test_padding_rows_do_not_reach_the_output_or_get_gradient(pooling):
    model = make(pooling=pooling)
    codes, numeric, _ = batch()
    before = model(codes, numeric)
    item_pad_row = model.embedding.offsets[1]  # code 0 of the item field = the history's padding
    with torch.no_grad():
        model.embedding.table.weight[item_pad_row] += 5.0
    hist_only = codes.clone()
    hist_only[:, 1] = torch.where(hist_only[:, 1] == 0, 1, hist_only[:, 1])  # the item field never pads
    out = model(hist_only, numeric)
    model.zero_grad()
    out.sum().backward()
    assert torch.isfinite(before).all() and torch.isfinite(out).all()
    assert torch.equal(model.embedding.table.weight.grad[item_pad_row], torch.zeros(8))


def test_attention_is_dins_unnormalised_weighted_sum():
    model = make(pooling="attention")
    codes, _, _ = batch()
    e = model.embed(codes)
    pooled = model.pooling(e, codes)
    mlp = model.pooling.attention["0"]
    for b in (0, 5, 17):
        target = e[b, 1]
        expected = torch.zeros(8)
        for j in range(L):
            if codes[b, 3 + j] == 0:
                continue
            h = e[b, 3 + j]
            unit = torch.cat([h, target, h - target, h * target])
            hidden = torch.relu(unit @ mlp.w1 + mlp.b1)
            weight = hidden @ mlp.w2 + mlp.b2
            expected = expected + weight * h
        torch.testing.assert_close(pooled[b, 3], expected, rtol=1e-5, atol=1e-6)


def test_attention_depends_on_the_target_item():
    model = make(pooling="attention")
    codes, numeric, _ = batch()
    other = codes.clone()
    other[:, 1] = (other[:, 1] + 7) % 30
    a = model.pooling(model.embed(codes), codes)[:, 3]
    b = model.pooling(model.embed(other), other)[:, 3]
    nonempty = (codes[:, 3:3 + L] != 0).any(1)
    assert not torch.allclose(a[nonempty], b[nonempty])


def reference_grads(model, codes, numeric, labels):
    from mtrec.engine.step import task_losses

    model.zero_grad()
    task_losses(model(codes, numeric), labels).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("model_name", ["shared-bottom", "mmoe", "ple", "esmm"])
@pytest.mark.parametrize("scope", ["shared", "all", "representation"])
def test_summing_balancer_reproduces_plain_backward_with_sequences(model_name, scope):
    model = make(model_name, pooling="attention")
    stepper = Stepper(model, Recorder(3), torch.optim.SGD(model.parameters(), lr=0.0), scope, torch.device("cpu"),
                      None)
    codes, numeric, labels = batch()
    expected = reference_grads(model, codes, numeric, labels)
    stepper.step(codes, numeric, labels)
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, expected[name], atol=1e-6, rtol=1e-5, msg=name)
    if scope == "all":  # the history's rows are among the touched rows the balancer saw
        touched = model.embedding.rows(codes).flatten().unique()
        assert stepper.balancer.seen[-1].shape[1] == touched.numel()
