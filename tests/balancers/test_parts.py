"""Per-part groups: a balancer given ``Parts`` behaves exactly as if every part were its own tensor
(the unfused network), for whole-tensor parts, one part per slice (experts) and segments of rows
(the fields of the fused table)."""

import pytest
import torch

from mtrec.balancers import build
from mtrec.balancers.parts import Parts, group_grams, group_norms

T = 3


def example(seed):
    """An expert-stacked weight [4, 3, 2] (4 parts), a plain tensor [5] (1 part) and touched rows
    [7, 2] belonging to 3 fields in no particular order."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([1.0, 4.0, 0.3])
    grads = [torch.randn(T, *shape, generator=g) * scale.view(T, *[1] * len(shape))
             for shape in [(4, 3, 2), (5,), (7, 2)]]
    fields = torch.tensor([2, 0, 0, 1, 2, 2, 0])
    return grads, Parts(counts=[4, 1, 3], ids=[None, None, fields])


def as_tensors(grads, parts):
    """Each part as a separate ``[T, ...]`` tensor, in group order."""
    out = []
    for g, count, ids in zip(grads, parts.counts, parts.ids):
        if count == 1:
            out.append(g)
        elif ids is None:
            out.extend(g[:, i] for i in range(count))
        else:
            out.extend(g[:, ids == p] for p in range(count))
    return out


def reassemble(pieces, grads, parts):
    """Part results back into the tensors' shapes."""
    out, it = [], iter(pieces)
    for g, count, ids in zip(grads, parts.counts, parts.ids):
        if count == 1:
            out.append(next(it))
        elif ids is None:
            out.append(torch.stack([next(it) for _ in range(count)]))
        else:
            whole = torch.empty(g.shape[1:])
            for p in range(count):
                whole[ids == p] = next(it)
            out.append(whole)
    return out


def test_norms_and_grams_per_part_are_those_of_the_parts_as_tensors():
    grads, parts = example(0)
    separate = as_tensors(grads, parts)
    want_norms = torch.stack([p.reshape(T, -1).norm(dim=1) for p in separate])
    want_grams = torch.stack([p.reshape(T, -1) @ p.reshape(T, -1).T for p in separate])
    torch.testing.assert_close(group_norms(grads, parts), want_norms)
    torch.testing.assert_close(group_grams(grads, parts), want_grams)
    assert group_norms(grads, parts).shape == (parts.total, T)


@pytest.mark.parametrize("name,options", [("metabalance", {}), ("metabalance", {"mode": "reduce_only"}),
                                          ("gradvac", {"group": "tensor"})])
def test_a_balancer_given_parts_equals_it_on_the_parts_as_separate_tensors(name, options):
    by_part, by_tensor = build(name, num_tasks=T, **options), build(name, num_tasks=T, **options)
    for step in range(3):  # the state (EMAs, targets) is one entry per part as well
        grads, parts = example(step)
        torch.manual_seed(step)
        got = by_part.combine(grads, parts=parts)
        torch.manual_seed(step)
        want = reassemble(by_tensor.combine(as_tensors(grads, parts)), grads, parts)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for key, value in by_part.state_dict().items():
        torch.testing.assert_close(value, by_tensor.state_dict()[key], rtol=1e-5, atol=1e-7)


def test_parts_change_metabalance_where_the_parts_differ_in_scale():
    """One norm per expert is not one norm for the stacked tensor: with experts of different
    gradient scales the per-part result differs from the per-tensor one."""
    grads, parts = example(1)
    grads[0][1:, 0] *= 50  # the aux tasks' gradients of expert 0 are much larger
    per_part = build("metabalance", num_tasks=T).combine(grads, parts=parts)
    per_tensor = build("metabalance", num_tasks=T).combine(grads)
    assert not torch.allclose(per_part[0], per_tensor[0], rtol=1e-2)
    torch.testing.assert_close(per_part[1], per_tensor[1])  # a one-part tensor is the same either way


def test_what_a_part_is_for_every_shared_tensor():
    """Experts (MMoE's, PLE's shared and lower-level task experts) and PLE's lower-level task gates one
    part each, numeric features one each, anything else whole; the table one segment per field and
    per sequence with its own vocabulary (a sequence sharing a field's rows is that field's part)."""
    from mtrec.models import ModelConfig, SequenceField
    from mtrec.models import build as build_model

    vocab = [5, 7, 3]
    sequences = [SequenceField("hist_items", 4, share_with=1), SequenceField("tags", 2, vocab_size=6)]
    cfg = ModelConfig(embedding_dim=4, expert_sizes=[8, 4], num_experts=3, shared_experts=2, task_experts=2, levels=2)
    mmoe = build_model("mmoe", vocab, 2, [0.5, 0.3], cfg, sequences)
    counts, starts = mmoe.parts()
    names = [n for n, p in mmoe.named_parameters() if any(p is q for q in mmoe.shared_parameters())]
    assert dict(zip(names, counts)) == {"numeric.weight": 2, "numeric.bias": 2, "experts.weights.0": 3,
                                        "experts.biases.0": 3, "experts.weights.1": 3, "experts.biases.1": 3}
    assert starts.tolist() == [0, 5, 12, 15]  # fields 0, 1 (its rows also the history's), 2, then tags
    ple = build_model("ple", vocab, 0, [0.5, 0.3], cfg)
    counts, _ = ple.parts()
    shared = {n: c for (n, p), c in zip(((n, p) for n, p in ple.named_parameters()
                                         if any(p is q for q in ple.shared_parameters())), counts)}
    assert {n.rsplit(".", 2)[0]: c for n, c in shared.items()} == {
        "shared_experts.0": 2, "task_experts.0": 4, "task_gates.0": 2, "shared_gates.0": 1, "shared_experts.1": 2}
