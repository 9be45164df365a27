"""Data parallelism (gloo, CPU) equals one process with the same global batch.

- Step level: every balancer in every scope it runs in, 2 and 3 processes, uneven shards and a
  global batch smaller than the number of processes (a rank with no row), against one process's
  ``Stepper`` on the same global batches: parameters, balancer state and losses. CI runs
  ``CI_STEPS`` steps; ``MTREC_DIST_STEPS=20`` runs the 20-step check of issue 21.
- Run level: ``mtrec train`` under 2 processes (MetaBalance, its default scope ``all``) ends where
  one process ends, with a last batch of one row (one rank empty, ``--max-bad-steps 1``) and the
  ranks' own free memory pointing ``--data-placement auto`` two ways (rank 1's says stream).

The workers are this file run as a script (``python test_distributed.py MODE ...``).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parents[2]
# Loopback only: gloo would otherwise pick an interface from the hostname, which a sandbox may lack.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "MASTER_ADDR": "127.0.0.1",
       "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
VOCAB = [20, 30, 5]
# Global batch sizes: uneven over 2 and 3 ranks; 2 and 1 rows leave a rank (or two) without a row.
SIZES = [13, 2, 11, 1, 16, 12, 14, 10, 13, 7, 2, 15, 11, 13, 1, 12, 9, 14, 10, 13]
CI_STEPS = 4  # the sizes 13, 2, 11, 1
STEPS = int(os.environ.get("MTREC_DIST_STEPS", CI_STEPS))
needs_dist = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")


def launch(mode: str, world: int, port: int, out: Path, *args: str, timeout: float = 300, script: str = __file__,
           env: dict | None = None) -> list[str]:
    """Run ``world`` workers of ``mode`` (``script`` run as ``python script MODE OUT ARGS``, with
    ``env`` added); fail with the first failing rank's stderr; their stdouts."""
    env = {**ENV, **(env or {}), "MASTER_PORT": str(port), "WORLD_SIZE": str(world)}
    procs = [subprocess.Popen([sys.executable, script, mode, str(out), *args],
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


# --- step level -------------------------------------------------------------------------------------


VARIANTS = {"gradvac": [{}, {"group": "tensor"}]}  # per-tensor Grams (tensor_grams) beside the total one


def combos() -> dict[str, tuple[str, dict, str]]:
    """``{"name[opts]/scope": (name, opts, scope)}``: every balancer in every scope it supports."""
    from mtrec import balancers

    out = {}
    for name in balancers.names():
        cls = balancers._lookup(name)
        for opts in VARIANTS.get(name, [{}]):
            label = name + "".join(f"[{k}={v}]" for k, v in opts.items())
            for scope in ["shared"] if cls.kind == "loss" else cls.scopes:
                out[f"{label}/{scope}"] = (name, opts, scope)
    return out


def global_batch(step: int):
    g = torch.Generator().manual_seed(100 + step)
    n = SIZES[step % len(SIZES)]
    codes = torch.stack([torch.randint(0, v, (n,), generator=g) for v in VOCAB], 1).int()
    return codes, torch.randn(n, 2, generator=g), (torch.rand(n, 3, generator=g) < 0.4).float()


def stepper_for(name: str, scope: str, group=None, opts: dict | None = None):
    from mtrec import balancers
    from mtrec.engine.optim import build_optimizer
    from mtrec.engine.step import Stepper
    from mtrec.models import ModelConfig, build

    torch.manual_seed(0)
    model = build("mmoe", VOCAB, 2, [0.4, 0.3, 0.4], ModelConfig(embedding_dim=4, expert_sizes=[8], tower_sizes=[4],
                                                               num_experts=2))
    balancer = balancers.build(name, num_tasks=3, **(opts or {}))
    optimizer = build_optimizer(model, [p for p in balancer.parameters() if p.requires_grad], "lazy-adam", 1e-2, 0.0)
    return Stepper(model, balancer, optimizer, scope, torch.device("cpu"), None, group=group)


def state(stepper) -> Tensor:
    """Parameters and balancer buffers as one flat fp64 vector."""
    parts = [p.detach().reshape(-1) for p in stepper.model.parameters()]
    parts += [p.detach().reshape(-1) for p in stepper.balancer.parameters()]
    parts += [b.detach().reshape(-1).float() for b in stepper.balancer.buffers() if b.is_floating_point()]
    return torch.cat(parts).double()


def run_steps(name: str, opts: dict, scope: str, steps: int, group=None):
    """(losses, state) after each of ``steps`` steps; under ``group`` on this rank's rows of each
    global batch (``rows[rank::world]``, as the feed shards them)."""
    stepper = stepper_for(name, scope, group, opts)
    rank, world = (group.rank, group.world) if group else (0, 1)
    for step in range(steps):
        codes, numeric, labels = global_batch(step)
        torch.manual_seed(1000 + step)  # the orders PCGrad and GradVac draw: the same everywhere
        losses = stepper.step(codes[rank::world], numeric[rank::world], labels[rank::world],
                              labels[rank::world].shape[0] / labels.shape[0])
        assert losses is not None, f"{name} {opts} {scope}: step {step} ({labels.shape[0]} rows) was skipped"
        yield losses, state(stepper)


def step_worker(out: str, expected: str, steps: str) -> None:
    """Every combination's distributed steps, each compared with one process's (``expected``)."""
    import torch.distributed as dist

    from mtrec.engine.distributed import Group

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    group, report = Group(dist.get_rank(), dist.get_world_size()), {}
    one = torch.load(expected)
    for key, (name, opts, scope) in combos().items():
        worst = 0.0
        for (losses, got), (want_losses, want) in zip(run_steps(name, opts, scope, int(steps), group), one[key],
                                                      strict=True):
            torch.testing.assert_close(losses, want_losses, rtol=1e-5, atol=1e-6, msg=key)
            # Within float tolerance: |a - b| <= 1e-6 + 1e-4 |b| (the ratio must stay <= 1).
            worst = max(worst, float(((got - want).abs() / (1e-6 + 1e-4 * want.abs())).max()))
        report[key] = worst
    Path(out, f"rank{group.rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """One process's (losses, state) after each step, for every combination (shared by 2 and 3 ranks)."""
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("one") / "steps.pt"
    torch.save({key: list(run_steps(*combo, STEPS)) for key, combo in combos().items()}, path)
    return path


# PCD's soft-constrained QP (ridge 1e-4: condition number up to 1e4) amplifies the fp32 Gram's
# round-off, which depends on the order in which the ranks' rows are summed (measured: 2.5x the
# bound in scope all on 3 ranks, every other balancer <= 0.54x).
LOOSER = {"pcd": 10.0}


@needs_dist
@pytest.mark.parametrize("world", [2, 3])
def test_every_balancer_and_scope_matches_one_process(world, one_process, tmp_path, unused_port):
    launch("steps", world, unused_port, tmp_path, str(one_process), str(STEPS), timeout=600)
    for rank in range(world):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert set(report) == set(combos())
        print(f"world {world} rank {rank}: worst |a - b| / (1e-6 + 1e-4 |b|) over {STEPS} steps:", report)
        bad = {k: v for k, v in report.items() if not v <= LOOSER.get(k.split("/")[0], 1.0)}
        assert not bad, f"rank {rank}: state differs from one process beyond 1e-6 + 1e-4 |x|: {bad}"


def test_representation_refuses_a_balancer_that_reads_rows_beyond_their_sums():
    from mtrec.balancers.base import GradBalancer
    from mtrec.core.config import TrainConfig
    from mtrec.core.errors import UserError
    from mtrec.engine.build import balance_scope
    from mtrec.engine.distributed import Group

    class RowMedian(GradBalancer):
        name = "row-median"

    cfg = TrainConfig(balancer="row-median", scope="representation")
    model = stepper_for("ew", "shared").model
    assert balance_scope(cfg, model, RowMedian(3), None) == "representation"
    with pytest.raises(UserError, match="row-median cannot run with --balance-scope representation across"):
        balance_scope(cfg, model, RowMedian(3), Group(0, 2))
    assert balance_scope(TrainConfig(balancer="row-median", scope="all"), model, RowMedian(3), Group(0, 2)) == "all"


# --- run level ---------------------------------------------------------------------------------------

TRAIN_ROWS, BATCH = 4801, 1200  # 5 steps; the last global batch has 1 row: rank 1 gets none
ARGS = ["--model", "mmoe", "--target", "like", "--batch-size", str(BATCH), "--epochs", "1", "--embedding-dim", "4",
        "--experts", "2", "--seed", "3", "--quiet", "--device", "cpu", "--max-bad-steps", "1",
        "--data-placement", "auto", "--shuffle-buffer", "2000"]


@pytest.fixture(scope="module")
def data_dir(encoded_synthetic):
    import pyarrow.parquet as pq

    data = encoded_synthetic("ddp", rows=7_000, seed=2) / "data"
    table = pq.read_table(data / "train.parquet")
    assert table.num_rows >= TRAIN_ROWS
    # 700-row row groups: streaming (3 buffers of >= 2,000 rows) would walk another order than memory.
    pq.write_table(table.slice(0, TRAIN_ROWS), data / "train.parquet", row_group_size=700)
    return data


def train_worker(out: str, *args: str) -> None:
    """``mtrec train`` as torchrun starts it, with this rank's free memory made to disagree: rank 0
    has plenty (memory), rank 1 almost none (its own decision would be to stream)."""
    import mtrec.engine.build

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    mtrec.engine.build.available_memory = lambda: 2**40 if rank == 0 else 1
    run_train_cli(out, *args)


def run_train_cli(out: str, *args: str) -> None:
    """``mtrec train ARGS --out OUT`` in this process, as torchrun starts it (a clean exit passes)."""
    import runpy

    sys.argv = ["mtrec", "train", *args, "--out", out]
    try:
        runpy.run_module("mtrec", run_name="__main__")
    except SystemExit as stop:
        if stop.code:
            raise


@needs_dist
def test_two_processes_train_an_epoch_like_one(data_dir, tmp_path, unused_port):
    from mtrec.engine import checkpoint

    one, two = tmp_path / "one", tmp_path / "two"
    base = [str(data_dir), *ARGS, "--balancer", "metabalance"]  # its default scope: all, groups: part
    subprocess.run([sys.executable, "-m", "mtrec", "train", *base, "--out", str(one)], env=ENV, check=True,
                   capture_output=True)
    launch("train", 2, unused_port, two, *base)
    a, meta_a = checkpoint.load(one / "last.pt")
    b, meta_b = checkpoint.load(two / "last.pt")
    assert json.loads((two / "config.json").read_text())["scope"] == "all"
    # Five steps: only the order of float sums differs (~1e-7); Adam amplifies it where sqrt(v)
    # is tiny (rare embedding rows), so the run is kept short.
    for name, tensor in a["model"].items():
        torch.testing.assert_close(b["model"][name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    for key in a["balancer"]:
        torch.testing.assert_close(b["balancer"][key], a["balancer"][key], rtol=1e-4, atol=1e-6)
    last = lambda run: json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])  # noqa: E731
    assert last(two)["step"] == last(one)["step"] == 5 and last(two)["skipped_steps"] == 0
    print("largest parameter difference:", max(float((b["model"][k] - v).abs().max()) for k, v in a["model"].items()),
          "valid AUC one / two:", {t: (m["auc"], last(two)["valid"][t]["auc"]) for t, m in last(one)["valid"].items()})
    for task, metrics in last(one)["valid"].items():
        assert last(two)["valid"][task]["auc"] == pytest.approx(metrics["auc"], abs=1e-4), task
        assert last(two)["valid"][task]["logloss"] == pytest.approx(metrics["logloss"], rel=1e-4), task


if __name__ == "__main__":
    {"steps": step_worker, "train": train_worker}[sys.argv[1]](*sys.argv[2:])
