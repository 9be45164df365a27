"""TensorBoard events with the scalars of a run's metrics.jsonl and diagnostics.jsonl.

One writer for every path, so the tags are the same wherever the events come from: ``mtrec plot
RUN|DIR --tensorboard TBDIR`` replays a run's logs (a compare directory: one TensorBoard run per
cell, ``TBDIR/<cell>``), and a trainer can call ``EventLog.epoch`` / ``EventLog.diagnostics`` with
each record as it logs it.
The x axis is the global step. Tags:

- ``valid_<metric>/<task>`` (auc, gauc, logloss, ndcg) and ``train/samples_per_second``,
  ``train/skipped_steps`` per epoch; ``train_loss/<task>`` when the records carry ``train_loss``;
- ``grad_norm/tensor<k>/<task>``, ``grad_norm_ratio/tensor<k>/<task>`` (auxiliary over target) and
  ``grad_cosine/tensor<k>/<task>-<task>``, ``update_change/tensor<k>`` (the update's change from
  the plain sum of the tasks' gradients) and ``task_weight/<task>`` (where the balancer has task
  weights) per diagnostics step.

Needs the ``tensorboard`` package (``pip install 'mtrec[tensorboard]'``).
"""

from __future__ import annotations

import math
from pathlib import Path

from mtrec.core.errors import UserError
from mtrec.engine.diagnostics import cosine_series, norm_ratio_series

VALID_METRICS = ("auc", "gauc", "logloss", "ndcg")


class EventLog:
    def __init__(self, log_dir: str | Path, tasks: list[str]):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("TensorBoard events need the tensorboard package: "
                            "pip install 'mtrec[tensorboard]'") from None
        self.tasks = list(tasks)
        self.writer = SummaryWriter(log_dir=str(log_dir))
        self.count = 0

    def _scalar(self, tag: str, value, step: int) -> None:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return
        self.writer.add_scalar(tag, float(value), step)
        self.count += 1

    def epoch(self, record: dict) -> None:
        """One metrics.jsonl record: validation metrics per task, speed, skipped steps, train loss."""
        step = record["step"]
        for task in self.tasks:
            for metric in VALID_METRICS:
                self._scalar(f"valid_{metric}/{task}", record["valid"][task].get(metric), step)
            if isinstance(record.get("train_loss"), dict):
                self._scalar(f"train_loss/{task}", record["train_loss"].get(task), step)
        self._scalar("train/samples_per_second", record.get("samples_per_second"), step)
        self._scalar("train/skipped_steps", record.get("skipped_steps"), step)

    def diagnostics(self, record: dict) -> None:
        """One diagnostics.jsonl record: per shared tensor, norms, norm ratios and pairwise cosines."""
        step = record["step"]
        _, ratios = norm_ratio_series([record])
        _, pairs, cosines = cosine_series([record])
        for k, norms in enumerate(record["norms"]):
            for t, task in enumerate(self.tasks):
                self._scalar(f"grad_norm/tensor{k}/{task}", norms[t], step)
                if t > 0:
                    self._scalar(f"grad_norm_ratio/tensor{k}/{task}", ratios[k, t - 1, 0], step)
            for p, (i, j) in enumerate(pairs):
                self._scalar(f"grad_cosine/tensor{k}/{self.tasks[i]}-{self.tasks[j]}", cosines[k, p, 0], step)
        for k, change in enumerate(record.get("update_change") or []):
            self._scalar(f"update_change/tensor{k}", change, step)
        for task, weight in zip(self.tasks, record.get("weights") or []):  # where the balancer has them
            self._scalar(f"task_weight/{task}", weight, step)

    def close(self) -> None:
        self.writer.close()
