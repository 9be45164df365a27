"""Sharded embedding tables with TorchRec (``--embedding-sharding torchrec``, engine/sharded_tables.py).

- The refusals (no TorchRec, scope ``all``, an optimizer FBGEMM has no fused kernel for) are one
  line each, exit code 2; they run without TorchRec.
- Step level, 2 gloo processes, table-wise plan: each rank holds about half of the table's bytes,
  and after every step (uneven shards, a rank without a row) the parameters, the gathered table
  and its row accumulators equal one unsharded process's with ``rowwise-adagrad`` (the same update
  as FBGEMM's fused EXACT_ROWWISE_ADAGRAD) on the same global batches, for loss weighting and the
  two scopes a sharded table allows.
- Run level: ``mtrec train`` sharded over 2 processes ends with the validation metrics of one
  unsharded process, and ``mtrec evaluate`` on one process reads its checkpoint to the same metrics.

The workers are this file run as a script (``python test_torchrec.py MODE ...``), as in
tests/engine/test_distributed.py, whose launcher and step helpers are reused.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_distributed import ENV, SIZES  # noqa: E402

from mtrec.core.config import TrainConfig  # noqa: E402
from mtrec.core.errors import UserError  # noqa: E402

# Four tables of equal size: a table-wise plan over 2 ranks puts two on each, half of the bytes.
VOCAB = [24, 24, 24, 24]
# (balancer, scope): loss weighting, and a gradient balancer in each scope a sharded table allows.
COMBOS = [("ew", "shared"), ("pcgrad", "shared"), ("mgda", "representation")]
STEPS = 5  # global batches of 13, 2, 11, 1 (rank 1 without a row) and 16 rows
LR = 1e-2  # test_distributed's: larger rates let dense Adam amplify the order of float sums


@pytest.fixture
def torchrec():
    return pytest.importorskip("torchrec")


@pytest.fixture
def unused_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(mode: str, world: int, port: int, out: Path, *args: str, timeout: float = 300) -> list[str]:
    """Run ``world`` workers of ``mode``; fail with the first failing rank's stderr; their stdouts."""
    env = {**ENV, "MASTER_PORT": str(port), "WORLD_SIZE": str(world), "MKL_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, __file__, mode, str(out), *args],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(world)]
    try:
        results = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for rank, (p, (_, err)) in enumerate(zip(procs, results)):
        assert p.returncode == 0, f"rank {rank}: {err[-3000:]}"
    return [out for out, _ in results]


# --- refusals (no TorchRec needed) -------------------------------------------------------------------


def global_batch(step: int):
    """test_distributed's global batches (uneven over 2 ranks; 1 row leaves rank 1 without one)."""
    g = torch.Generator().manual_seed(100 + step)
    n = SIZES[step % len(SIZES)]
    codes = torch.stack([torch.randint(0, v, (n,), generator=g) for v in VOCAB], 1).int()
    return codes, torch.randn(n, 2, generator=g), (torch.rand(n, 3, generator=g) < 0.4).float()


def small_model():
    from mtrec.models import ModelConfig, build

    torch.manual_seed(0)
    return build("mmoe", VOCAB, 2, [0.4, 0.3, 0.4], ModelConfig(embedding_dim=4, expert_sizes=[8], tower_sizes=[4],
                                                               num_experts=2))


def test_scope_all_and_unfused_optimizers_are_refused_in_one_line():
    from mtrec import balancers
    from mtrec.engine.sharded_tables import check
    from mtrec.models import ModelConfig, build

    cfg = TrainConfig(balancer="metabalance", embedding_sharding="torchrec", embedding_optimizer="rowwise-adagrad")
    model, metabalance = small_model(), balancers.build("metabalance", num_tasks=3)
    with pytest.raises(UserError, match="cannot balance in scope all .*no per-task gradient of its rows.*"
                                        "--balance-scope shared or representation"):
        check(cfg, model, metabalance, "all")
    check(cfg, model, metabalance, "shared")  # accepted
    check(cfg, model, balancers.build("ew", num_tasks=3), "all")  # loss weighting has no scope to refuse
    for optimizer in ("lazy-adam", "adam"):
        with pytest.raises(UserError, match=f"no {optimizer} here: pass --embedding-optimizer rowwise-adagrad"):
            check(TrainConfig(embedding_optimizer=optimizer), model, metabalance, "shared")
    single = build("single", VOCAB, 2, [0.4, 0.3], ModelConfig(embedding_dim=4))
    with pytest.raises(UserError, match="--model single has a table per task"):
        check(TrainConfig(model="single", embedding_optimizer="rowwise-adagrad"), single,
              balancers.build("ew", num_tasks=2), "shared")
    with pytest.raises(UserError, match="--embedding-sharding must be none or torchrec"):
        TrainConfig(embedding_sharding="fsdp").validate()
    with pytest.raises(UserError, match="--embedding-sharding-plan must be auto, table-wise"):
        TrainConfig(embedding_sharding_plan="diagonal").validate()


@pytest.fixture(scope="module")
def data_dir(encoded_synthetic):
    return encoded_synthetic("torchrec", rows=6_000, seed=2) / "data"


def test_without_torchrec_train_says_what_to_install(data_dir, tmp_path, monkeypatch):
    import builtins

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cli"))
    from test_cli_errors import assert_user_error, invoke

    real_import = builtins.__import__

    def no_torchrec(name, *args, **kwargs):
        if name.split(".")[0] in ("torchrec", "fbgemm_gpu"):
            raise ImportError(f"No module named {name.split('.')[0]!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torchrec)
    code, output = invoke("train", data_dir, "--target", "like", "--epochs", "1", "--quiet", "--device", "cpu",
                          "--embedding-sharding", "torchrec", "--embedding-optimizer", "rowwise-adagrad",
                          "--out", tmp_path / "run")
    assert_user_error(code, output, "--embedding-sharding torchrec needs torchrec", "No module named 'torchrec'",
                      "pip install 'mtrec[torchrec]'", "pip install --no-deps torchrec==1.9.2")
    code, output = invoke("train", data_dir, "--target", "like", "--epochs", "1", "--quiet", "--device", "cpu",
                          "--embedding-sharding", "torchrec", "--embedding-optimizer", "rowwise-adagrad",
                          "--balancer", "metabalance", "--out", tmp_path / "run2")
    assert_user_error(code, output, "cannot balance in scope all")
    assert not (tmp_path / "run").exists() and not (tmp_path / "run2").exists()


# --- step level ----------------------------------------------------------------------------------------


def stepper_for(name: str, scope: str, sharded: bool, plan: str = "table-wise", group=None):
    """test_distributed's MMoE with a rowwise-adagrad table, its embedding sharded by TorchRec or not."""
    from mtrec import balancers
    from mtrec.engine.build import make_optimizer
    from mtrec.engine.sharded_tables import ShardedStepper, shard
    from mtrec.engine.step import Stepper

    cfg = TrainConfig(balancer=name, scope=scope, lr=LR, embedding_optimizer="rowwise-adagrad",
                      embedding_sharding="torchrec" if sharded else "none", embedding_sharding_plan=plan)
    model, balancer = small_model(), balancers.build(name, num_tasks=3)
    tables = shard(model, cfg, torch.device("cpu")) if sharded else None
    optimizer = make_optimizer(model, balancer, cfg, torch.device("cpu"), tables)
    kind = ShardedStepper if sharded else Stepper
    return kind(model, balancer, optimizer, scope, torch.device("cpu"), None, group=group), tables


def snapshot(stepper, tables) -> dict[str, torch.Tensor]:
    """The model in the unsharded layout and the table's row accumulators (rank 0; None elsewhere)."""
    from mtrec.engine.sharded_tables import model_state

    state = model_state(stepper.model, tables) if tables else stepper.model.state_dict()
    embedding = stepper.optimizer.state_dict()["embedding"]["state"]
    if state is None:
        return None
    return {**{k: v.clone() for k, v in state.items()}, "accumulator": embedding[0]["sum"].clone()}


def run_steps(name: str, scope: str, sharded: bool, group=None):
    stepper, tables = stepper_for(name, scope, sharded, group=group)
    rank, world = (group.rank, group.world) if group else (0, 1)
    for step in range(STEPS):
        codes, numeric, labels = global_batch(step)
        torch.manual_seed(1000 + step)  # the task orders PCGrad draws: the same everywhere
        losses = stepper.step(codes[rank::world], numeric[rank::world], labels[rank::world],
                              labels[rank::world].shape[0] / labels.shape[0])
        assert losses is not None, f"{name}/{scope}: step {step} was skipped"
        yield losses, snapshot(stepper, tables), tables


def step_worker(out: str, expected: str) -> None:
    import torch.distributed as dist

    from mtrec.engine.distributed import Group

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    group, report = Group(dist.get_rank(), dist.get_world_size()), {}
    one = torch.load(expected)
    for name, scope in COMBOS:
        worst = 0.0
        for (losses, got, _), (want_losses, want) in zip(run_steps(name, scope, True, group), one[name],
                                                              strict=True):
            torch.testing.assert_close(losses, want_losses, rtol=1e-5, atol=1e-6, msg=name)
            if got is not None:
                assert set(got) == set(want), (sorted(got), sorted(want))
                ratios = {k: float(((got[k] - v).abs() / (1e-6 + 1e-4 * v.abs())).max()) for k, v in want.items()}
                worst = max(worst, *ratios.values())
        tables = stepper_for(name, scope, True, group=group)[1]  # a fresh one: the plan is deterministic
        report[name] = {"worst": worst, "local_bytes": tables.local_bytes(),
                        "table_bytes": tables.rows_total * tables.dim * 4}
    Path(out, f"rank{group.rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


def test_two_ranks_table_wise_hold_half_the_table_and_step_like_one_unsharded_process(torchrec, tmp_path,
                                                                                     unused_port):
    expected = tmp_path / "one.pt"
    torch.set_num_threads(1)
    one = {name: [(losses, state) for losses, state, _ in run_steps(name, scope, False)] for name, scope in COMBOS}
    torch.save(one, expected)
    launch("steps", 2, unused_port, tmp_path, str(expected))
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    print(reports)
    for name, _ in COMBOS:
        # Four tables of 24 rows x 4 floats: two on each rank, half of the 1,536 bytes each.
        held = [r[name]["local_bytes"] for r in reports]
        assert held == [2 * 24 * 16, 2 * 24 * 16] and sum(held) == reports[0][name]["table_bytes"], held
        worst = reports[0][name]["worst"]
        assert worst <= 1.0, f"{name}: rank 0's state differs from one process beyond 1e-6 + 1e-4 |x|: {worst}"


if __name__ == "__main__":
    {"steps": step_worker}[sys.argv[1]](*sys.argv[2:])
