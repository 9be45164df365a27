"""Streaming an encoded split from disk: every row once per epoch, orders per (seed, epoch), resume
from any batch, one buffer == the in-memory path, shards, and scoring in file order."""

import numpy as np
import polars as pl
import pytest
import torch

from mtrec.data.stream import ParquetSplit, plan, stream_batches
from mtrec.data.tensors import batches, epoch_permutation, eval_batches, load_split

N, GROUP = 1_037, 100
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def split_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("stream") / "train.parquet"
    rng = np.random.default_rng(0)
    frame = pl.DataFrame({
        "rid": np.arange(N, dtype=np.int32),  # a code column that names the row
        "f": rng.integers(0, 9, N).astype(np.int32),
        "x": rng.normal(size=N).astype(np.float32),
        "a": (rng.random(N) < 0.3).astype(np.uint8),
        "b": (rng.random(N) < 0.1).astype(np.uint8),
        "_user": rng.integers(0, 50, N),
    })
    frame.write_parquet(path, row_group_size=GROUP)
    return path


def open_split(path):
    return ParquetSplit(path, ["rid", "f"], ["x"], ["a", "b"])


def rows_of(stream):
    return torch.cat([codes[:, 0] for codes, _, _ in stream]).tolist()


def test_every_row_once_per_epoch_and_orders_depend_on_seed_and_epoch(split_file):
    split = open_split(split_file)
    assert len(split.group_rows) == 11 and len(split) == N
    epoch0 = rows_of(stream_batches(split, 64, seed=1, epoch=0, buffer_rows=250, device=CPU))
    assert sorted(epoch0) == list(range(N))
    assert epoch0 == rows_of(stream_batches(split, 64, seed=1, epoch=0, buffer_rows=250, device=CPU))
    assert epoch0 != rows_of(stream_batches(split, 64, seed=1, epoch=1, buffer_rows=250, device=CPU))
    assert epoch0 != rows_of(stream_batches(split, 64, seed=2, epoch=0, buffer_rows=250, device=CPU))
    buffers = plan(split.group_rows, 1, 0, 250)
    assert all(b.rows >= 250 for b in buffers[:-1]) and sum(b.rows for b in buffers) == N
    # rows mix within a buffer only: the first 250+ rows of the stream come from the first buffer's groups
    first = buffers[0]
    assert {r // GROUP for r in epoch0[:first.rows]} == set(first.groups)


def test_batches_are_full_except_the_last_and_straddle_buffers(split_file):
    split = open_split(split_file)
    sizes = [len(labels) for _, _, labels in stream_batches(split, 64, 1, 0, 250, CPU)]
    assert sizes == [64] * (N // 64) + [N % 64]


@pytest.mark.parametrize("start", [1, 4, 7, 16])
def test_resuming_at_any_batch_continues_the_same_stream(split_file, start):
    split = open_split(split_file)
    whole = list(stream_batches(split, 64, 3, 2, 250, CPU))
    resumed = list(stream_batches(split, 64, 3, 2, 250, CPU, start=start))
    assert len(resumed) == len(whole) - start
    for a, b in zip(whole[start:], resumed):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_one_buffer_over_the_whole_split_is_the_in_memory_path(split_file):
    split = open_split(split_file)
    memory = load_split(split_file.parent, "train", ["rid", "f"], ["x"], ["a", "b"])
    perm = epoch_permutation(N, 5, 3, "cpu")
    expected = list(batches(memory, perm, 100))
    got = list(stream_batches(split, 100, 5, 3, buffer_rows=N, device=CPU))
    assert len(got) == len(expected)
    for a, b in zip(expected, got):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_shards_split_each_global_batch(split_file):
    split = open_split(split_file)
    whole = list(stream_batches(split, 64, 1, 0, 250, CPU))
    ranks = [list(stream_batches(split, 64, 1, 0, 250, CPU, shard=(r, 2))) for r in range(2)]
    for i, (codes, _, _) in enumerate(whole):
        assert torch.equal(ranks[0][i][0], codes[0::2]) and torch.equal(ranks[1][i][0], codes[1::2])


def test_scoring_reads_in_file_order_with_labels_and_users(split_file):
    split = open_split(split_file)
    memory = load_split(split_file.parent, "train", ["rid", "f"], ["x"], ["a", "b"])
    codes = torch.cat([c for c, _ in eval_batches(split, 64)])
    assert torch.equal(codes, memory.codes)
    assert torch.equal(split.labels, memory.labels) and torch.equal(split.users, memory.users)
    assert split.nbytes == memory.nbytes


def test_a_buffer_read_with_its_order_equals_the_loaded_rows_taken_in_that_order(tmp_path):
    """The streaming reader gathers Arrow columns itself (no frame): sequence columns keep their
    elements in place, several row groups concatenate in file order, and the order is applied."""
    rng = np.random.default_rng(1)
    n = 350
    frame = pl.DataFrame({
        "rid": np.arange(n, dtype=np.int32),
        "hist": pl.Series(rng.integers(0, 20, (n, 3)).astype(np.int32)).cast(pl.Array(pl.Int32, 3)),
        "x": rng.normal(size=n),  # float64 on disk: cast to float32 like the loader does
        "a": (rng.random(n) < 0.3).astype(np.uint8),
    })
    path = tmp_path / "train.parquet"
    frame.write_parquet(path, row_group_size=100)
    split = ParquetSplit(path, ["rid", "hist"], ["x"], ["a"])
    memory = load_split(tmp_path, "train", ["rid", "hist"], ["x"], ["a"])
    rows = torch.arange(300, 350).tolist() + torch.arange(100, 200).tolist()  # row groups 3 and 1, file order 1, 3
    order = np.random.default_rng(2).permutation(150)
    got = split.read([3, 1], order)
    in_file_order = torch.tensor(sorted(rows))[torch.from_numpy(order)]
    assert got.codes.shape == (150, 4) and got.codes.dtype == torch.int32
    assert torch.equal(got.codes, memory.codes[in_file_order])
    assert torch.equal(got.numeric, memory.numeric[in_file_order]) and got.numeric.dtype == torch.float32
    assert torch.equal(got.labels, memory.labels[in_file_order])
    assert torch.equal(split.read([0]).codes, memory.codes[:100])


@pytest.mark.parametrize("start", [0, 7])
def test_reading_ahead_in_a_thread_yields_the_same_batches_as_reading_inline(split_file, start):
    """CUDA reads the next buffer in a background thread, a CPU device inline: same stream."""
    split = open_split(split_file)
    inline = list(stream_batches(split, 64, 2, 1, 250, CPU, start=start, background=False))
    ahead = list(stream_batches(split, 64, 2, 1, 250, CPU, start=start, background=True))
    assert len(inline) == len(ahead) == -(-N // 64) - start
    for a, b in zip(inline, ahead):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
