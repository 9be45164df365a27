"""Encoded Parquet splits as tensors, and batches as slices of a shuffled index.

Parquet -> Arrow -> NumPy -> torch, column blocks at a time, never row by row. A split that fits
lives on the training device and a batch is ``tensor[perm[i:i + B]]``; a split too large for the
device stays in host memory, and each batch is gathered there (in a background thread, one batch
ahead), pinned, and copied asynchronously. The permutation is drawn from a generator seeded by
(seed, epoch), so any position in any epoch can be reproduced on resume.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch
from torch import Tensor

from mtrec.core.errors import UserError


@dataclass
class Split:
    codes: Tensor  # [N, F_cat] int32
    numeric: Tensor  # [N, F_num] float32
    labels: Tensor  # [N, T] float32
    users: Tensor | None  # [N] int64 group ids for GAUC / NDCG

    def __len__(self) -> int:
        return self.labels.shape[0]

    @property
    def nbytes(self) -> int:
        tensors = [self.codes, self.numeric, self.labels] + ([self.users] if self.users is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def to(self, device) -> Split:
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Split(move(self.codes), move(self.numeric), move(self.labels), move(self.users))


def _block(frame: pl.DataFrame, columns: list[str], dtype) -> np.ndarray:
    """``[N, C]`` block of the columns; a fixed-size list column (an encoded sequence) adds its
    ``max_len`` element columns in place."""
    if not columns:
        return np.zeros((frame.height, 0), dtype=dtype)
    flat = [c for c in columns if not isinstance(frame.schema[c], pl.Array)]
    if len(flat) == len(columns):
        block = np.ascontiguousarray(frame.select(columns).to_numpy().astype(dtype, copy=False))
        return block if block.flags.writeable else block.copy()  # a zero-copy view of Arrow memory
    parts = []
    for c in columns:
        values = frame[c].to_numpy()
        parts.append(values.reshape(frame.height, -1).astype(dtype, copy=False))
    return np.ascontiguousarray(np.concatenate(parts, axis=1))


def frame_to_split(frame: pl.DataFrame, categorical: list[str], numeric: list[str], tasks: list[str]) -> Split:
    """``categorical``: the code columns in model order (flat categoricals, then sequences)."""
    missing = [c for c in categorical + numeric + tasks if c not in frame.columns]
    if missing:
        raise UserError(f"encoded data lacks column(s) {', '.join(missing)}: re-run mtrec preprocess")
    users = torch.from_numpy(frame["_user"].to_numpy().astype(np.int64)) if "_user" in frame.columns else None
    return Split(
        codes=torch.from_numpy(_block(frame, categorical, np.int32)),
        numeric=torch.from_numpy(_block(frame, numeric, np.float32)),
        labels=torch.from_numpy(_block(frame, tasks, np.float32)),
        users=users,
    )


def load_split(data_dir: str | Path, name: str, categorical: list[str], numeric: list[str], tasks: list[str]) -> Split:
    path = Path(data_dir) / f"{name}.parquet"
    if not path.exists():
        raise UserError(f"{path} not found: the data directory must be made by mtrec preprocess")
    try:
        frame = pl.read_parquet(path, columns=[*categorical, *numeric, *tasks,
                                               *(["_user"] if "_user" in pl.read_parquet_schema(path) else [])])
    except pl.exceptions.ColumnNotFoundError as err:
        raise UserError(f"{path} lacks a column the schema names ({err}): re-run mtrec preprocess") from err
    except (OSError, pl.exceptions.ComputeError) as err:
        raise UserError(f"cannot read {path} ({err}): re-run mtrec preprocess") from err
    if frame.height == 0:
        raise UserError(f"the {name} split in {data_dir} is empty: use more data or other split ratios")
    return frame_to_split(frame, categorical, numeric, tasks)


def epoch_generator(seed: int, epoch: int, buffer: int = 0, salt: int = 0) -> torch.Generator:
    """The CPU generator of an epoch's shuffle (and of its streaming buffers / row-group order)."""
    if buffer == 0 and salt == 0:
        return torch.Generator().manual_seed(seed * 100_003 + epoch)
    state = np.random.SeedSequence([seed, epoch, buffer, salt]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


def epoch_permutation(n: int, seed: int, epoch: int, device) -> Tensor:
    return torch.randperm(n, generator=epoch_generator(seed, epoch)).to(device)


def batches(split: Split, perm: Tensor, batch_size: int, start: int = 0, shard: tuple[int, int] | None = None):
    """Yield (codes, numeric, labels) slices for batch indices start, start+1, ... of an epoch.

    ``shard=(rank, world)``: only this rank's rows ``[rank::world]`` of each global batch.
    """
    for begin in range(start * batch_size, len(perm), batch_size):
        idx = perm[begin:begin + batch_size]
        if shard:
            idx = idx[shard[0]::shard[1]]
        yield split.codes[idx], split.numeric[idx], split.labels[idx]


def fits_on_device(split: Split, device: torch.device, fraction: float = 0.5) -> bool:
    """Whether the split may live on the device: at most ``fraction`` of its free memory."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return split.nbytes <= fraction * free


def host_batches(split: Split, perm: Tensor, batch_size: int, device: torch.device, start: int = 0,
                 shard: tuple[int, int] | None = None):
    """Like ``batches`` for a split in host memory: gathered one batch ahead in a thread (torch
    indexing releases the GIL, so it overlaps the device step), pinned, copied without blocking."""
    begins = list(range(start * batch_size, len(perm), batch_size))
    pin = device.type == "cuda"

    def gather(begin: int):
        idx = perm[begin:begin + batch_size]
        if shard:
            idx = idx[shard[0]::shard[1]]
        parts = (split.codes[idx], split.numeric[idx], split.labels[idx])
        return tuple(p.pin_memory() for p in parts) if pin else parts

    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(gather, begins[0]) if begins else None
        for i in range(len(begins)):
            parts = pending.result()
            if i + 1 < len(begins):
                pending = pool.submit(gather, begins[i + 1])
            yield tuple(p.to(device, non_blocking=True) for p in parts)


def eval_batches(split: Split, batch_size: int):
    if hasattr(split, "eval_batches"):  # a split streamed from disk (mtrec.data.stream.ParquetSplit)
        yield from split.eval_batches(batch_size)
        return
    for begin in range(0, len(split), batch_size):
        end = begin + batch_size
        yield split.codes[begin:end], split.numeric[begin:end]
