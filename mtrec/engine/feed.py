"""The data a run trains on, where its placement puts it: the train and valid splits on the device
(batches are index slices of a shuffled permutation), in host memory (batches copied one ahead),
or streamed from disk through a shuffle buffer; and an epoch's batches from any step on."""

from __future__ import annotations

import functools
from pathlib import Path

from mtrec.data.stream import ParquetSplit, stream_batches
from mtrec.data.tensors import batches, epoch_permutation, host_batches, load_split
from mtrec.engine.build import Run, feature_names


def load_splits(run: Run) -> tuple:
    """(train, valid) for ``run.placement``: ParquetSplits to stream, else tensors in memory."""
    cfg = run.cfg
    categorical, numeric = feature_names(run.schema)
    if run.placement == "stream":
        return tuple(ParquetSplit(Path(cfg.data) / f"{name}.parquet", categorical, numeric, run.tasks)
                     for name in ("train", "valid"))
    splits = tuple(load_split(cfg.data, name, categorical, numeric, run.tasks) for name in ("train", "valid"))
    if run.placement == "device":
        splits = tuple(split.to(run.device) for split in splits)
    return splits


def epoch_batches(run: Run, split, epoch: int, start: int):
    """The epoch's batches of (codes, numeric, labels) from batch ``start`` on; under torchrun each
    rank gets its share of every global batch."""
    cfg = run.cfg
    shard = (run.group.rank, run.group.world) if run.group else None
    if run.placement == "stream":
        return stream_batches(split, cfg.batch_size, cfg.seed, epoch, cfg.shuffle_buffer, run.device,
                              start=start, shard=shard)
    on_device = run.placement == "device"
    perm = epoch_permutation(len(split), cfg.seed, epoch, run.device if on_device else "cpu")
    feed = batches if on_device else functools.partial(host_batches, device=run.device)
    return feed(split, perm, cfg.batch_size, start=start, shard=shard)
