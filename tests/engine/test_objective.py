"""Conditional tasks and ESMM: losses against float64 references, the rows a task covers, the
conditions' errors, and conditional / CTCVR metrics against scikit-learn."""

import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss, roc_auc_score

from mtrec.core.errors import UserError
from mtrec.data.tensors import Split
from mtrec.engine.objective import Objective, ctcvr_logit, parse_conditions
from mtrec.metrics.split import split_metrics
from mtrec.models import ModelConfig, build

TASKS = ["purchase", "click", "like"]


def funnel(n=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    click = (torch.rand(n, generator=g) < 0.3).float()
    purchase = click * (torch.rand(n, generator=g) < 0.4).float()
    like = click * (torch.rand(n, generator=g) < 0.5).float()
    return torch.stack([purchase, click, like], 1), torch.randn(n, 3, generator=g) * 2


@pytest.mark.parametrize("specs, needle", [
    (["purchase"], "TASK:CONDITION"),
    (["buy:click"], "unknown task 'buy'"),
    (["purchase:purchase"], "itself"),
    (["purchase:click", "purchase:like"], "two conditions"),
    (["purchase:click", "click:purchase"], "cycle"),
    (["purchase:click", "click:like", "like:purchase"], "cycle"),
])
def test_bad_conditions_are_one_line_errors(specs, needle):
    with pytest.raises(UserError, match=needle) as err:
        parse_conditions(specs, TASKS)
    assert "\n" not in str(err.value)


def test_esmm_needs_exactly_one_condition():
    with pytest.raises(UserError, match="exactly one --condition"):
        Objective(TASKS, {}, esmm=True)
    with pytest.raises(UserError, match="exactly one --condition"):
        Objective(TASKS, {"purchase": "click", "like": "click"}, esmm=True)


def test_conditional_loss_is_the_mean_over_covered_rows():
    labels, logits = funnel()
    objective = Objective(TASKS, parse_conditions(["purchase:click", "like:click"], TASKS))
    losses = objective.losses(logits, labels).double()
    x, y = logits.double().numpy(), labels.double().numpy()
    bce = np.logaddexp(0, x) - y * x
    clicked = y[:, 1] > 0.5
    expected = [bce[clicked, 0].mean(), bce[:, 1].mean(), bce[clicked, 2].mean()]
    np.testing.assert_allclose(losses.numpy(), expected, rtol=1e-5)


def test_chained_conditions_need_every_ancestor():
    labels = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    objective = Objective(TASKS, parse_conditions(["purchase:click", "click:like"], TASKS))
    mask = objective.row_mask(labels)
    # purchase needs click and like, click needs like, like is plain
    expected = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    assert torch.equal(mask, expected)


def test_labels_of_uncovered_rows_do_not_change_the_gradient():
    torch.manual_seed(0)
    model = build("mmoe", [10, 12], 1, [0.1, 0.3, 0.15], ModelConfig(expert_sizes=[8], tower_sizes=[4]))
    g = torch.Generator().manual_seed(3)
    codes = torch.stack([torch.randint(0, 10, (64,), generator=g), torch.randint(0, 12, (64,), generator=g)], 1)
    numeric = torch.randn(64, 1, generator=g)
    labels, _ = funnel(64, seed=4)
    objective = Objective(TASKS, parse_conditions(["purchase:click"], TASKS))

    def grads(y):
        model.zero_grad()
        objective.losses(model(codes, numeric), y)[0].backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    dirty = labels.clone()
    unclicked = labels[:, 1] == 0
    dirty[unclicked, 0] = 1.0 - dirty[unclicked, 0]  # purchase labels flipped where nothing was clicked
    for a, b in zip(grads(labels), grads(dirty)):
        assert torch.equal(a, b)
    no_click = labels.clone()
    no_click[:, 1] = 0.0
    assert all(torch.count_nonzero(g) == 0 for g in grads(no_click))  # no covered row: zero gradient


def test_ctcvr_logit_is_the_logit_of_the_product_in_float64():
    a = torch.linspace(-30, 30, 121)
    b = torch.linspace(25, -25, 121)
    got = ctcvr_logit(a.float(), b.float()).double()
    p = torch.sigmoid(a.double()) * torch.sigmoid(b.double())
    expected = torch.log(p) - torch.log1p(-p)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert torch.isfinite(ctcvr_logit(torch.tensor([40.0]), torch.tensor([40.0]))).all()


def test_esmm_losses_are_ctcvr_on_all_rows_and_ctr():
    labels, logits = funnel()
    objective = Objective(TASKS, parse_conditions(["purchase:click"], TASKS), esmm=True)
    losses = objective.losses(logits, labels).double().numpy()
    x, y = logits.double(), labels.double()
    p = (torch.sigmoid(x[:, 0]) * torch.sigmoid(x[:, 1])).numpy()
    both = (y[:, 0] * y[:, 1]).numpy()
    expected_ctcvr = -(both * np.log(p) + (1 - both) * np.log1p(-p)).mean()
    expected_ctr = (np.logaddexp(0, x[:, 1].numpy()) - y[:, 1].numpy() * x[:, 1].numpy()).mean()
    np.testing.assert_allclose(losses[:2], [expected_ctcvr, expected_ctr], rtol=1e-5)


class _TwoRanks:
    """Stands in for a torch.distributed group: ``sum_`` adds the other rank's tensor."""

    def __init__(self):
        self.other = None

    def sum_(self, tensors, scale=1.0):
        for t, o in zip(tensors, self.other):
            t.add_(o)


def test_conditional_losses_under_several_ranks_add_up_to_the_global_mean():
    labels, logits = funnel(301)
    objective = Objective(TASKS, parse_conditions(["purchase:click"], TASKS))
    halves = [slice(0, 150), slice(150, 301)]
    counts = [objective.row_mask(labels[h], objective.train_ancestors).sum(0) for h in halves]
    total = 0.0
    for r, h in enumerate(halves):
        group = _TwoRanks()
        group.other = [counts[1 - r]]
        share = (h.stop - h.start) / 301
        total = total + share * objective.losses(logits[h], labels[h], group, share)
    torch.testing.assert_close(total, objective.losses(logits, labels), rtol=1e-5, atol=1e-7)


def test_conditional_and_ctcvr_metrics_equal_sklearn_on_their_rows():
    labels, _ = funnel(2_000, seed=5)
    torch.manual_seed(1)
    model = build("esmm", [7], 0, [0.12, 0.3, 0.15], ModelConfig(embedding_dim=4, expert_sizes=[8], tower_sizes=[4]))
    codes = torch.randint(0, 7, (2_000, 1), generator=torch.Generator().manual_seed(2)).int()
    with torch.no_grad():  # make the scores depend on the rows
        model.embedding.table.weight.normal_()
    split = Split(codes, torch.zeros(2_000, 0), labels, None)
    objective = Objective(TASKS, parse_conditions(["purchase:click"], TASKS), esmm=True)
    result = split_metrics(model, split, objective, 512, 10)
    with torch.no_grad():
        logits = model(codes, split.numeric).double()
    y = labels.numpy()
    clicked = y[:, 1] > 0.5
    cvr = torch.sigmoid(logits[:, 0]).numpy()
    assert result["purchase"]["n"] == clicked.sum()
    assert result["purchase"]["condition"] == "click"
    assert result["purchase"]["auc"] == pytest.approx(roc_auc_score(y[clicked, 0], cvr[clicked]), abs=1e-6)
    assert result["purchase"]["logloss"] == pytest.approx(log_loss(y[clicked, 0], cvr[clicked]), rel=1e-5)
    assert result["click"]["n"] == 2_000
    pctcvr = (torch.sigmoid(logits[:, 0]) * torch.sigmoid(logits[:, 1])).numpy()
    both = y[:, 0] * y[:, 1]
    assert result["ctcvr"]["auc"] == pytest.approx(roc_auc_score(both, pctcvr), abs=1e-6)
    assert result["ctcvr"]["n"] == 2_000


@pytest.mark.parametrize("scope", ["shared", "all", "representation"])
def test_esmm_step_with_a_summing_balancer_reproduces_the_plain_backward(scope):
    from mtrec.engine.step import Stepper
    from tests.engine.test_step import Recorder

    torch.manual_seed(0)
    model = build("esmm", [10, 12], 1, [0.1, 0.3, 0.15], ModelConfig(expert_sizes=[8], tower_sizes=[4]))
    objective = Objective(TASKS, parse_conditions(["purchase:click"], TASKS), esmm=True)
    g = torch.Generator().manual_seed(3)
    codes = torch.stack([torch.randint(0, 10, (64,), generator=g), torch.randint(0, 12, (64,), generator=g)], 1)
    numeric = torch.randn(64, 1, generator=g)
    labels, _ = funnel(64, seed=4)
    model.zero_grad()
    objective.losses(model(codes, numeric), labels).sum().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    stepper = Stepper(model, Recorder(3), torch.optim.SGD(model.parameters(), lr=0.0), scope, torch.device("cpu"),
                      None, objective)
    stepper.step(codes.int(), numeric, labels)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], atol=1e-6, rtol=1e-5, msg=name)
