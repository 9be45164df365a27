"""Encoded splits larger than memory: read row group by row group, shuffled within a buffer.

An epoch is one deterministic stream of rows, a function of (seed, epoch) alone:

1. the split's row groups are visited in an order drawn from (seed, epoch);
2. consecutive row groups of that order form **buffers** of at least ``buffer_rows`` rows;
3. each buffer's rows (its row groups concatenated in file order) are permuted with a generator
   seeded by (seed, epoch, buffer index);
4. the buffers' permuted rows, one after the other, are cut into batches of ``batch_size`` (a batch
   may straddle two buffers).

So batch ``i`` of an epoch is known from (seed, epoch, i): a resumed run rebuilds the plan and
starts in the buffer holding row ``i * batch_size``, bit for bit on CPU. The generator of buffer 0
is the in-memory path's epoch permutation, so with one buffer covering the whole split the stream
*is* the in-memory path's batches. On an accelerator a background thread reads (and, for CUDA,
pins) the next buffer while the current one trains; on a CPU device buffers are read inline (see
``stream_batches``). Memory: one buffer on CPU, two on an accelerator, whatever the split's size.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from torch import Tensor

from mtrec.core.errors import UserError
from mtrec.data.tensors import Split, epoch_generator

DEFAULT_BUFFER_ROWS = 1 << 20


def available_memory() -> int:
    """Bytes of memory available now (Linux MemAvailable; else the physical memory)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class ParquetSplit:
    """An encoded split file, not loaded: row-group metadata, and reads of row groups on demand.

    Duck-types the parts of ``Split`` that scoring uses: ``len()``, ``labels`` and ``users`` (read
    alone: a few bytes per row), and ``eval_batches`` in file order.
    """

    def __init__(self, path: str | Path, categorical: list[str], numeric: list[str], tasks: list[str]):
        self.path = Path(path)
        if not self.path.exists():
            raise UserError(f"{self.path} not found: the data directory must be made by mtrec preprocess")
        try:
            self.file = pq.ParquetFile(self.path)
        except (OSError, ValueError) as err:
            raise UserError(f"cannot read {self.path} ({err}): re-run mtrec preprocess") from err
        names = set(self.file.schema_arrow.names)
        missing = [c for c in categorical + numeric + tasks if c not in names]
        if missing:
            raise UserError(f"{self.path} lacks column(s) {', '.join(missing)} the schema names: "
                            "re-run mtrec preprocess")
        self.categorical, self.numeric, self.tasks = categorical, numeric, tasks
        self.has_users = "_user" in names
        meta = self.file.metadata
        self.group_rows = np.array([meta.row_group(g).num_rows for g in range(meta.num_row_groups)], dtype=np.int64)
        if self.group_rows.sum() == 0:
            raise UserError(f"the split {self.path} is empty: use more data or other split ratios")

    def __len__(self) -> int:
        return int(self.group_rows.sum())

    @property
    def nbytes(self) -> int:
        """Bytes the split would take as tensors in memory (int32 codes, float32 values/labels)."""
        widths = sum(_width(self.file.schema_arrow.field(c).type) for c in self.categorical)
        per_row = 4 * (widths + len(self.numeric) + len(self.tasks)) + (8 if self.has_users else 0)
        return per_row * len(self)

    def read(self, groups: list[int], order: np.ndarray | None = None) -> Split:
        """The row groups' rows (in file order, then taken in ``order`` if given) as a Split without
        users. Single-threaded on purpose (Arrow without threads, NumPy gathers, no torch ops): it
        may run beside the training step, whose intra-op threads own the cores."""
        table = self.file.read_row_groups(sorted(groups), columns=[*self.categorical, *self.numeric, *self.tasks],
                                          use_threads=False)
        block = lambda columns, dtype: torch.from_numpy(_gather(table, columns, dtype, order))  # noqa: E731
        return Split(block(self.categorical, np.int32), block(self.numeric, np.float32), block(self.tasks, np.float32),
                     None)

    @property
    def labels(self) -> Tensor:
        """``[N, T]`` float32, read now and not kept (scoring asks once per validation)."""
        return torch.from_numpy(self._column_block(self.tasks, np.float32))

    @property
    def users(self) -> Tensor | None:
        """``[N]`` int64 user ids, read now and not kept; None when the split has none."""
        return torch.from_numpy(self._column_block(["_user"], np.int64)[:, 0]) if self.has_users else None

    def _column_block(self, columns: list[str], dtype) -> np.ndarray:
        """``[N, C]`` of scalar columns filled row group by row group: the only transient is one
        row group's columns (reading the whole column at once held Arrow's copy beside ours)."""
        out = np.empty((len(self), len(columns)), dtype=dtype)
        bounds = np.concatenate([[0], np.cumsum(self.group_rows)])
        for g in range(len(self.group_rows)):
            table = self.file.read_row_group(g, columns=columns, use_threads=False)
            out[bounds[g]:bounds[g + 1]] = _gather(table, columns, dtype, None)
        return out

    def eval_batches(self, batch_size: int):
        """(codes, numeric) in file order, one row group read at a time."""
        for g in range(len(self.group_rows)):
            part = self.read([g])
            for begin in range(0, len(part), batch_size):
                yield part.codes[begin:begin + batch_size], part.numeric[begin:begin + batch_size]


def _width(arrow_type) -> int:
    return getattr(arrow_type, "list_size", 1)


def _gather(table, columns: list[str], dtype, order: np.ndarray | None) -> np.ndarray:
    """``[N, C]`` block of the columns (a fixed-size list adds its elements in place), rows taken
    in ``order``: one NumPy gather per column straight into the block, no intermediate frame."""
    widths = [_width(table.schema.field(c).type) for c in columns]
    out = np.empty((table.num_rows if order is None else len(order), sum(widths)), dtype=dtype)
    j = 0
    for c, w in zip(columns, widths):
        values = table.column(c).combine_chunks()
        values = (values.flatten() if w > 1 else values).to_numpy(zero_copy_only=False).reshape(-1, w)
        out[:, j:j + w] = values if order is None else values[order]
        j += w
    return out


@dataclass
class Buffer:
    groups: list[int]
    start: int  # position of its first row in the epoch's stream
    rows: int


def plan(group_rows: np.ndarray, seed: int, epoch: int, buffer_rows: int) -> list[Buffer]:
    """The epoch's buffers: row groups in an order drawn from (seed, epoch), grouped greedily."""
    order = torch.randperm(len(group_rows), generator=epoch_generator(seed, epoch, salt=0x6A09E667)).tolist()
    buffers, current, start, rows = [], [], 0, 0
    for g in order:
        current.append(g)
        rows += int(group_rows[g])
        if rows >= buffer_rows:
            buffers.append(Buffer(current, start, rows))
            start, current, rows = start + rows, [], 0
    if current:
        buffers.append(Buffer(current, start, rows))
    return buffers


def position(buffers: list[Buffer], row: int) -> tuple[int, int]:
    """(buffer index, offset in it) of the stream's row ``row``."""
    for k, b in enumerate(buffers):
        if row < b.start + b.rows:
            return k, row - b.start
    return len(buffers), 0


def _cat(a: Split, b: Split) -> Split:
    users = None if a.users is None else torch.cat([a.users, b.users])
    return Split(torch.cat([a.codes, b.codes]), torch.cat([a.numeric, b.numeric]), torch.cat([a.labels, b.labels]),
                 users)


def _take(part: Split, idx) -> Split:
    return Split(part.codes[idx], part.numeric[idx], part.labels[idx], None)


def stream_batches(split: ParquetSplit, batch_size: int, seed: int, epoch: int, buffer_rows: int,
                   device: torch.device, start: int = 0, shard: tuple[int, int] | None = None,
                   background: bool | None = None):
    """Yield (codes, numeric, labels) on ``device`` for batches start, start+1, ... of the epoch
    (see the module docstring). ``shard=(rank, world)``: rows ``[rank::world]`` of each batch.
    ``background``: read the next buffer in a thread (default: on accelerators only)."""
    buffers = plan(split.group_rows, seed, epoch, buffer_rows)
    first, offset = position(buffers, start * batch_size)
    pin = device.type == "cuda"

    def load(k: int) -> Split:
        rows = int(split.group_rows[buffers[k].groups].sum())
        order = torch.randperm(rows, generator=epoch_generator(seed, epoch, buffer=k)).numpy()
        part = split.read(buffers[k].groups, order)
        if pin:
            part = Split(part.codes.pin_memory(), part.numeric.pin_memory(), part.labels.pin_memory(), None)
        return part

    def emit(part: Split, begin: int, end: int):
        codes, numeric, labels = part.codes[begin:end], part.numeric[begin:end], part.labels[begin:end]
        if shard:
            codes, numeric, labels = codes[shard[0]::shard[1]], numeric[shard[0]::shard[1]], labels[shard[0]::shard[1]]
        return tuple(t.to(device, non_blocking=True) for t in (codes, numeric, labels))

    def parts():
        """The buffers from ``first`` on. On a CPU device they are read inline: a reader thread beside
        the step cost far more than its reads (GIL hand-offs stall the step's small ops; measured on 2
        cores: 82-87k samples/s with the thread, 101k inline, 94k in memory -- docs/benchmarks.md).
        On an accelerator the step leaves the host idle, so the next buffer is read (and pinned) in a
        background thread meanwhile."""
        if not (device.type != "cpu" if background is None else background):
            yield from map(load, range(first, len(buffers)))
            return
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(load, first)
            for k in range(first, len(buffers)):
                part = pending.result()
                if k + 1 < len(buffers):
                    pending = pool.submit(load, k + 1)
                yield part

    carry: Split | None = None
    for k, part in enumerate(parts(), start=first):
        if k == first and offset:
            part = _take(part, slice(offset, None))
        if carry is not None:
            part = _cat(carry, part)
            carry = None
        usable = len(part) if k == len(buffers) - 1 else len(part) - len(part) % batch_size
        for begin in range(0, usable, batch_size):
            yield emit(part, begin, min(begin + batch_size, usable))
        if usable < len(part):
            carry = _take(part, slice(usable, None))
