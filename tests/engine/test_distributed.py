"""Data parallelism: `torchrun --nproc_per_node 2 -m mtrec train` (gloo, CPU) ends where one process
with the same global batch ends, for a loss-weighting and a gradient-combination balancer."""

import json
import os
import subprocess
import sys

import pytest
import torch

from mtrec.engine import checkpoint

# Loopback only: gloo would otherwise pick an interface from the hostname, which a sandbox may lack.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo", "MASTER_ADDR": "127.0.0.1"}
ARGS = ["--model", "mmoe", "--target", "like", "--batch-size", "1201", "--epochs", "1", "--embedding-dim", "4",
        "--experts", "2", "--seed", "3", "--quiet", "--device", "cpu"]


@pytest.fixture(scope="module")
def data_dir(encoded_synthetic):
    import pyarrow.parquet as pq

    data = encoded_synthetic("ddp", rows=6_000, seed=2) / "data"
    pq.write_table(pq.read_table(data / "train.parquet"), data / "train.parquet", row_group_size=700)
    return data


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
@pytest.mark.parametrize("balancer, placement", [("uw", "auto"), ("metabalance", "auto"), ("metabalance", "stream")])
def test_two_processes_match_one_process(data_dir, tmp_path, balancer, placement, unused_port):
    one, two = tmp_path / "one", tmp_path / "two"
    # stream: 3 shuffle buffers of 2,000 rows over 700-row row groups (see the fixture)
    base = [str(data_dir), *ARGS, "--balancer", balancer, "--balance-scope", "shared", "--data-placement", placement,
            "--shuffle-buffer", "2000"]  # scope all is not distributed yet (docs/design.md)
    subprocess.run([sys.executable, "-m", "mtrec", "train", *base, "--out", str(one)], env=ENV, check=True,
                   capture_output=True)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(unused_port),
                           "-m", "mtrec", "train", *base, "--out", str(two)],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, _ = checkpoint.load(one / "last.pt")
    b, _ = checkpoint.load(two / "last.pt")
    # Four steps (the last global batch splits 599 / 598 rows): only the order of float sums
    # differs (~1e-7). Over many steps Adam amplifies that noise where sqrt(v) is tiny (rare
    # embedding rows, dead units: up to 1e-4 after 19 steps), so the run is kept short.
    for name, tensor in a["model"].items():
        torch.testing.assert_close(b["model"][name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    for key in a["balancer"]:
        torch.testing.assert_close(b["balancer"][key], a["balancer"][key], rtol=1e-4, atol=1e-6)
    valid = lambda run: json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["valid"]  # noqa: E731
    assert valid(two)["like"]["auc"] == pytest.approx(valid(one)["like"]["auc"], abs=1e-4)


@pytest.fixture
def unused_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
