"""Sparse embedding optimizers (mtrec/optim.py): lazy Adam and row-wise Adagrad against a float64
brute-force reference over steps that touch different rows, dense Adam where every row is touched,
state round trips, and the step handing the touched rows to them for every scope."""

import io

import numpy as np
import pytest
import torch

from mtrec import balancers
from mtrec.core.config import TrainConfig
from mtrec.core.errors import UserError
from mtrec.engine.optim import CombinedOptimizer, LazyAdam, RowwiseAdagrad, build_optimizer, row_grad
from mtrec.engine.step import Stepper, task_losses
from mtrec.models import ModelConfig, build

ROWS, DIM, LR, EPS = 8, 3, 0.05, 1e-8
# Row ids looked up at each step (duplicates sum). Row 7 is never touched; row 2 only at steps 1
# and 5, so it sits out k = 3 steps; row 0 every step.
SCHEDULE = [[0, 2, 2, 5], [0, 1, 3], [0, 3, 3, 3], [0, 1, 6], [0, 2, 4, 6]]


def lookups(seed=0):
    """Per step: looked-up row ids and one gradient per lookup, float64."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.tensor(ids), torch.randn(len(ids), DIM, generator=g, dtype=torch.float64)) for ids in SCHEDULE]


def run(optimizer_cls, dtype, weight_decay=0.0, steps=SCHEDULE, **kwargs):
    torch.manual_seed(0)
    table = torch.nn.Parameter(torch.randn(ROWS, DIM, dtype=torch.float64).to(dtype))
    opt = optimizer_cls([table], lr=LR, weight_decay=weight_decay, **kwargs)
    for ids, grads in lookups()[:len(steps)]:
        # Uncoalesced, as nn.Embedding(sparse=True) makes it.
        table.grad = torch.sparse_coo_tensor(ids.unsqueeze(0), grads.to(dtype), table.shape, check_invariants=False)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return table.detach(), opt


def reference(rule, weight_decay=0.0, b1=0.9, b2=0.999):
    """Row by row, step by step, in float64 with numpy: the documented update of each rule.
    Returns the table and the optimizer state it should have."""
    torch.manual_seed(0)
    w = torch.randn(ROWS, DIM, dtype=torch.float64).numpy().copy()
    m, v, acc = np.zeros_like(w), np.zeros_like(w), np.zeros(ROWS)
    for t, (ids, grads) in enumerate(lookups(), start=1):
        for r in sorted(set(ids.tolist())):
            g = grads.numpy()[ids.numpy() == r].sum(0) + weight_decay * w[r]
            if rule == "lazy-adam":
                m[r] = b1 * m[r] + (1 - b1) * g
                v[r] = b2 * v[r] + (1 - b2) * g * g
                w[r] -= LR * (m[r] / (1 - b1 ** t)) / (np.sqrt(v[r] / (1 - b2 ** t)) + EPS)
            else:
                acc[r] += np.mean(g * g)
                w[r] -= LR * g / (np.sqrt(acc[r]) + EPS)
    state = {"exp_avg": m, "exp_avg_sq": v} if rule == "lazy-adam" else {"sum": acc}
    return torch.from_numpy(w), {k: torch.from_numpy(x) for k, x in state.items()}


OPTIMIZERS = {"lazy-adam": LazyAdam, "rowwise-adagrad": RowwiseAdagrad}


@pytest.mark.parametrize("rule", OPTIMIZERS)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_row_optimizers_match_the_float64_reference(rule, weight_decay, dtype, tol):
    w, expected = reference(rule, weight_decay)
    table, opt = run(OPTIMIZERS[rule], dtype, weight_decay)
    state = opt.state[opt.param_groups[0]["params"][0]]
    torch.testing.assert_close(table.double(), w, rtol=tol, atol=tol)
    for key, value in expected.items():
        torch.testing.assert_close(state[key].double(), value, rtol=tol, atol=tol * 1e-3, msg=key)
        assert not state[key][7].any(), key  # never touched: no state
    if rule == "lazy-adam":
        assert state["step"] == len(SCHEDULE)  # the global step count drives the bias correction
    else:
        assert state["sum"].shape == (ROWS,)  # one value per row
    # Never touched: the initial value, even with weight decay.
    torch.manual_seed(0)
    assert torch.equal(table[7], torch.randn(ROWS, DIM, dtype=torch.float64).to(dtype)[7])


def test_a_row_untouched_for_k_steps_does_not_move_then_resumes_from_its_old_moments():
    after_first, _ = run(LazyAdam, torch.float64, steps=SCHEDULE[:1])
    after_four, opt = run(LazyAdam, torch.float64, steps=SCHEDULE[:4])
    assert torch.equal(after_first[2], after_four[2])  # steps 2-4 did not touch row 2
    # Step 5 starts from step 1's moments, not decayed by b1^3: the reference agrees (above); here
    # the moments themselves are checked to be unchanged over the gap.
    state = opt.state[opt.param_groups[0]["params"][0]]
    _, opt_one = run(LazyAdam, torch.float64, steps=SCHEDULE[:1])
    first = opt_one.state[opt_one.param_groups[0]["params"][0]]
    assert torch.equal(state["exp_avg"][2], first["exp_avg"][2])
    assert torch.equal(state["exp_avg_sq"][2], first["exp_avg_sq"][2])


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_lazy_adam_is_dense_adam_when_every_row_is_touched(weight_decay):
    torch.manual_seed(1)
    start = torch.randn(ROWS, DIM)
    lazy_table, dense_table = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    lazy = LazyAdam([lazy_table], lr=LR, weight_decay=weight_decay)
    dense = torch.optim.Adam([dense_table], lr=LR, weight_decay=weight_decay)
    every = torch.arange(ROWS)
    for _ in range(6):
        g = torch.randn(ROWS, DIM)
        lazy_table.grad = row_grad(lazy_table, every, g)
        dense_table.grad = g.clone()
        lazy.step()
        dense.step()
    assert torch.equal(lazy_table, dense_table)


@pytest.mark.parametrize("cls", [LazyAdam, RowwiseAdagrad])
def test_state_round_trips_through_a_weights_only_checkpoint(cls):
    whole, _ = run(cls, torch.float32)
    torch.manual_seed(0)
    table = torch.nn.Parameter(torch.randn(ROWS, DIM, dtype=torch.float64).float())
    opt = cls([table], lr=LR)
    steps = lookups()
    for ids, grads in steps[:3]:
        table.grad = torch.sparse_coo_tensor(ids.unsqueeze(0), grads.float(), table.shape, check_invariants=False)
        opt.step()
    buffer = io.BytesIO()
    torch.save({"table": table.detach(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    table = torch.nn.Parameter(saved["table"])
    opt = cls([table], lr=LR)
    opt.load_state_dict(saved["opt"])
    for ids, grads in steps[3:]:
        table.grad = torch.sparse_coo_tensor(ids.unsqueeze(0), grads.float(), table.shape, check_invariants=False)
        opt.step()
    assert torch.equal(table.detach(), whole)


def test_dense_gradients_are_refused():
    table = torch.nn.Parameter(torch.zeros(ROWS, DIM))
    table.grad = torch.ones(ROWS, DIM)
    with pytest.raises(RuntimeError, match="sparse"):
        LazyAdam([table]).step()


# --- the optimizer in the trainer's step ---------------------------------------------------------
VOCAB = [20, 30, 5]


def model_and_data(name="mmoe", n=64):
    torch.manual_seed(0)
    model = build(name, VOCAB, 2, [0.3, 0.1, 0.05], ModelConfig(expert_sizes=[16, 8], tower_sizes=[8]))
    g = torch.Generator().manual_seed(1)
    codes = torch.stack([torch.randint(0, v, (n,), generator=g) for v in VOCAB], 1).int()
    return model, (codes, torch.randn(n, 2, generator=g), (torch.rand(n, 3, generator=g) < 0.3).float())


def test_build_optimizer_routes_the_tables():
    model, _ = model_and_data()
    table = model.embedding.table
    dense = build_optimizer(model, [], "adam", 1e-3, 0.0)
    assert isinstance(dense, torch.optim.Adam) and not table.sparse
    assert any(p is table.weight for g in dense.param_groups for p in g["params"])
    for name, cls in [("lazy-adam", LazyAdam), ("rowwise-adagrad", RowwiseAdagrad)]:
        opt = build_optimizer(model, [], name, 1e-3, 0.0)
        assert isinstance(opt, CombinedOptimizer) and isinstance(opt.embedding, cls) and table.sparse
        assert not any(p is table.weight for g in opt.dense.param_groups for p in g["params"])
        assert [p for g in opt.embedding.param_groups for p in g["params"]] == [table.weight]
    single, _ = model_and_data("single")
    opt = build_optimizer(single, [], "lazy-adam", 1e-3, 0.0)
    assert len(opt.embedding.param_groups[0]["params"]) == 3  # one table per task


@pytest.mark.parametrize("balancer_name,scope", [("ew", ""), ("uw", ""), ("metabalance", "shared"),
                                                 ("metabalance", "all"), ("metabalance", "representation")])
def test_the_step_gives_the_table_a_sparse_gradient_of_the_touched_rows(balancer_name, scope):
    """Same gradients as the dense path; only the touched rows reach the optimizer."""
    results = {}
    for name in ("adam", "lazy-adam"):
        model, batch = model_and_data()
        balancer = balancers.build(balancer_name, num_tasks=3)
        opt = build_optimizer(model, [p for p in balancer.parameters() if p.requires_grad], name, 1e-2, 0.0)
        stepper = Stepper(model, balancer, opt, scope or balancer.default_scope, torch.device("cpu"), None)
        assert stepper.step(*batch) is not None
        results[name] = model.embedding.table.weight.grad, dict(model.named_parameters())
    dense_grad, dense_params = results["adam"]
    sparse_grad, sparse_params = results["lazy-adam"]
    codes = batch[0]
    rows = model.embedding.rows(codes).flatten().unique()
    assert not dense_grad.is_sparse and sparse_grad.is_sparse
    assert torch.equal(sparse_grad.coalesce().indices()[0], rows)
    torch.testing.assert_close(sparse_grad.to_dense(), dense_grad, rtol=1e-5, atol=1e-7)
    # One step of lazy Adam on the touched rows equals dense Adam there (a first step moves every
    # row with a non-zero gradient by the same rule); untouched rows stay at their initial values.
    table = "embedding.table.weight"
    torch.testing.assert_close(sparse_params[table][rows], dense_params[table][rows], rtol=1e-5, atol=1e-7)
    untouched = torch.ones(sparse_params[table].shape[0], dtype=torch.bool)
    untouched[rows] = False
    model, _ = model_and_data()
    assert torch.equal(sparse_params[table][untouched], model.embedding.table.weight[untouched])
    for key, p in sparse_params.items():
        if key != table:
            torch.testing.assert_close(p, dense_params[key], rtol=1e-5, atol=1e-7, msg=key)


def test_summing_balancer_still_reproduces_plain_backward_with_sparse_tables():
    model, batch = model_and_data("ple")
    model.zero_grad()
    task_losses(model(*batch[:2]), batch[2]).sum().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    for scope in ("shared", "all", "representation"):
        model.zero_grad()
        opt = build_optimizer(model, [], "lazy-adam", 0.0, 0.0)  # lr 0: the grads are inspected
        Stepper(model, _summing(), opt, scope, torch.device("cpu"), None).step(*batch)
        for name, p in model.named_parameters():
            grad = p.grad.to_dense() if p.grad.is_sparse else p.grad
            torch.testing.assert_close(grad, expected[name], atol=1e-6, rtol=1e-5, msg=f"{scope} {name}")


def _summing():
    from mtrec.balancers.base import GradBalancer

    class Summing(GradBalancer):
        name = "summing"

        def combine(self, grads, losses=None):
            return [g.sum(0) for g in grads]

    return Summing(3)


def test_unknown_embedding_optimizer_is_a_user_error():
    with pytest.raises(UserError, match="--embedding-optimizer must be lazy-adam, rowwise-adagrad or adam"):
        TrainConfig(embedding_optimizer="sgd").validate()


@pytest.mark.parametrize("optimizer,balancer_name,scope", [
    ("lazy-adam", "ew", ""), ("rowwise-adagrad", "uw", ""), ("lazy-adam", "metabalance", "shared"),
    ("lazy-adam", "metabalance", "all"), ("lazy-adam", "metabalance", "representation"), ("adam", "ew", "")])
def test_a_sparse_step_allocates_nothing_the_size_of_the_table(optimizer, balancer_name, scope):
    """The per-step cost does not grow with the vocabulary: after the first step (which allocates
    the optimizer's state), no allocation of a step is as large as the table; dense adam's is."""
    from torch.profiler import ProfilerActivity, profile

    vocab = [100_000, 30, 5]
    torch.manual_seed(0)
    model = build("mmoe", vocab, 2, [0.3, 0.1, 0.05], ModelConfig(expert_sizes=[16, 8], tower_sizes=[8]))
    balancer = balancers.build(balancer_name, num_tasks=3)
    opt = build_optimizer(model, [p for p in balancer.parameters() if p.requires_grad], optimizer, 1e-3, 0.0)
    stepper = Stepper(model, balancer, opt, scope or balancer.default_scope, torch.device("cpu"), None)
    g = torch.Generator().manual_seed(1)

    def batch(n=256):
        codes = torch.stack([torch.randint(0, v, (n,), generator=g) for v in vocab], 1).int()
        return codes, torch.randn(n, 2, generator=g), (torch.rand(n, 3, generator=g) < 0.3).float()

    assert stepper.step(*batch()) is not None
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        assert stepper.step(*batch()) is not None
    largest = max(e.self_cpu_memory_usage for e in prof.events())
    table_bytes = model.embedding.table.weight.numel() * 4
    if optimizer == "adam":
        assert largest >= table_bytes  # the dense gradient: the check can see it
    else:
        assert largest < table_bytes / 20, (largest, table_bytes)


def test_fixed_shape_touched_rows_update_exactly_like_the_unique_rows(monkeypatch):
    """The CUDA path (no host sync: sorted runs, padded with copies of the last run) leaves the
    table and the optimizer state where the unique-rows path does, up to the order of float sums."""
    import mtrec.engine.optim
    from mtrec.engine.optim import LazyAdam, RowwiseAdagrad, _touched_fixed_shape, touched

    g = torch.Generator().manual_seed(0)
    index = torch.randint(0, 40, (300,), generator=g)
    values = torch.randn(300, 4, generator=g)
    rows, sums = _touched_fixed_shape(index, values)
    unique_rows, unique_sums = touched(torch.sparse_coo_tensor(index[None], values, (50, 4)))
    assert rows.shape == (300,) and set(rows.tolist()) == set(unique_rows.tolist())
    for r, s in zip(rows.tolist(), sums):
        torch.testing.assert_close(s, unique_sums[unique_rows.tolist().index(r)], rtol=1e-6, atol=1e-6)
    fixed = lambda grad: _touched_fixed_shape(grad._indices()[0], grad._values())  # noqa: E731
    for make in (LazyAdam, RowwiseAdagrad):
        results = []
        for path in (touched, fixed):
            monkeypatch.setattr(mtrec.engine.optim, "touched", path)
            table = torch.nn.Parameter(torch.randn(50, 4, generator=torch.Generator().manual_seed(1)))
            opt = make([table], lr=0.1)
            for step in range(3):
                table.grad = torch.sparse_coo_tensor(index[None], values * (step + 1), (50, 4))
                opt.step()
            state = [v.clone() for v in opt.state[table].values() if torch.is_tensor(v)]
            results.append((table.detach().clone(), state))
        torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-6)
        for a, b in zip(results[0][1], results[1][1]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_fixed_unique_is_torch_unique_padded_to_the_input_size():
    from mtrec.engine.optim import fixed_unique

    g = torch.Generator().manual_seed(2)
    for n, high in ((1, 5), (7, 3), (500, 40), (64, 10_000)):
        index = torch.randint(0, high, (n,), generator=g)
        rows, where, valid = fixed_unique(index)
        unique, inverse = torch.unique(index, return_inverse=True)
        u = unique.numel()
        assert rows.shape == where.shape == valid.shape == (n,) and int(valid.sum()) == u
        assert torch.equal(rows[:u], unique) and torch.equal(where, inverse) and valid[:u].all()
        assert (rows[u:] == unique[-1]).all()  # the unused slots repeat the last row


@pytest.mark.parametrize("optimizer", ["lazy-adam", "adam"])
@pytest.mark.parametrize("balancer_name,groups", [("metabalance", None), ("gradcraft", None), ("pcgrad", None),
                                                  ("cagrad", None), ("metabalance", "part")])
def test_scope_all_steps_alike_with_fixed_shape_rows_and_with_unique_rows(monkeypatch, optimizer, balancer_name,
                                                                          groups):
    """Scope ``all`` on CUDA takes the touched rows in the batch's fixed shape (no host sync): the
    unused slots hold zero gradients, which change no norm or product a balancer takes, and add
    nothing to the table. Forced here on CPU, three steps equal the ``torch.unique`` path."""
    from mtrec.engine.optim import fixed_unique

    results = []
    for fixed in (False, True):
        if fixed:
            monkeypatch.setattr(Stepper, "_touched_rows", lambda self, rows: fixed_unique(rows))
        model, batch = model_and_data(n=48)
        balancer = balancers.build(balancer_name, num_tasks=3)
        opt = build_optimizer(model, [p for p in balancer.parameters() if p.requires_grad], optimizer, 1e-2, 0.0)
        stepper = Stepper(model, balancer, opt, "all", torch.device("cpu"), None, groups=groups)
        torch.manual_seed(3)  # PCGrad's random task order
        for step in range(3):
            assert stepper.step(batch[0], batch[1] * (step + 1), batch[2]) is not None
        results.append({k: v.detach().clone() for k, v in model.named_parameters()})
    for key, value in results[0].items():
        torch.testing.assert_close(results[1][key], value, rtol=1e-5, atol=1e-6, msg=key)
    moved = results[0]["embedding.table.weight"] - model_and_data(n=48)[0].embedding.table.weight
    assert moved.abs().amax() > 1e-4  # the rows did train


def _sum_sparse_on_rank(rank, world, init, out):
    """One rank of the test below: rank r's table gradient touches rows ROWS_OF[r] (none on rank 1
    for the second table), plus a dense parameter."""
    import torch.distributed as dist

    from mtrec.engine.distributed import Group
    from mtrec.engine.optim import empty_row_grad

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    table, other, dense = (torch.nn.Parameter(torch.zeros(ROWS, DIM)) for _ in range(3))
    ids, grads = lookups(seed=rank)[rank]
    table.grad = torch.sparse_coo_tensor(ids.unsqueeze(0), grads.float(), table.shape, check_invariants=False)
    other.grad = empty_row_grad(other) if rank == 1 else torch.sparse_coo_tensor(
        torch.tensor([[6, 6]]), torch.ones(2, DIM), other.shape, check_invariants=False)
    dense.grad = torch.full((ROWS, DIM), float(rank + 1))
    Group(rank, world).sum_grads_([table, other, dense], scale=0.5)
    torch.save({k: p.grad for k, p in (("table", table), ("other", other), ("dense", dense))}, f"{out}/{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_ranks_sum_sparse_row_gradients_over_the_union_of_their_rows(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_sum_sparse_on_rank, args=(2, f"file://{tmp_path}/store", str(tmp_path)), nprocs=2)
    expected_table = torch.zeros(ROWS, DIM)
    for rank in range(2):
        ids, grads = lookups(seed=rank)[rank]
        expected_table.index_add_(0, ids, 0.5 * grads.float())
    union = torch.tensor(sorted(set(SCHEDULE[0]) | set(SCHEDULE[1])))
    for rank in range(2):
        got = torch.load(tmp_path / f"{rank}.pt", weights_only=True)
        assert got["table"].is_sparse and torch.equal(got["table"].indices()[0], union)
        torch.testing.assert_close(got["table"].to_dense(), expected_table)
        assert torch.equal(got["other"].indices()[0], torch.tensor([6]))  # rank 1 had no rows there
        torch.testing.assert_close(got["other"].to_dense()[6], torch.ones(DIM))  # 0.5 * (1 + 1)
        torch.testing.assert_close(got["dense"], torch.full((ROWS, DIM), 1.5))


def test_a_run_saved_before_the_flag_resumes_with_the_dense_optimizer_it_trained_with(tmp_path):
    import json

    from mtrec.cli.train import _saved_config

    (tmp_path / "config.json").write_text(json.dumps({**TrainConfig(data=str(tmp_path), out=str(tmp_path)).to_dict(),
                                                      "embedding_optimizer": "rowwise-adagrad"}))
    assert _saved_config(str(tmp_path))["embedding_optimizer"] == "rowwise-adagrad"
    old = TrainConfig(data=str(tmp_path), out=str(tmp_path)).to_dict()
    del old["embedding_optimizer"]
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert _saved_config(str(tmp_path))["embedding_optimizer"] == "adam"
