"""What each task is trained and scored on: plain tasks, conditional tasks and ESMM's CTCVR.

- A plain task: binary cross-entropy over every row of the batch.
- A **conditional** task (``--condition purchase:click``): its loss is the mean over the rows where
  its condition holds (``click = 1``; chains ``a:b``, ``b:c`` need both), and its metrics cover
  only those rows. A batch without such a row gives the task a zero loss and a zero gradient.
- **ESMM** (Ma et al., SIGIR 2018; ``--model esmm``, one condition ``cvr:ctr``): the CVR tower is
  never trained on clicked rows alone. Its training target is pCTCVR = pCTR x pCVR against
  ``ctr AND cvr`` over *all* impressions (the loss of task ``cvr`` in the balancer's eyes), next to
  the plain CTR loss. Scoring reports CVR over the clicked rows (pCVR), CTR, and ``ctcvr`` over all
  rows.

The model always outputs one logit per task (for ESMM the CVR tower's own logit); this module
turns logits and labels into losses and into scored columns, so models, step and metrics stay
ignorant of conditions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mtrec.core.errors import UserError

CTCVR = "ctcvr"


def parse_conditions(specs: list[str], tasks: list[str]) -> dict[str, str]:
    """``["purchase:click", ...]`` -> {task: condition task}, checked against the trained tasks."""
    conditions: dict[str, str] = {}
    for spec in specs:
        task, sep, given = (part.strip() for part in str(spec).partition(":"))
        if not sep or not task or not given:
            raise UserError(f"--condition expects TASK:CONDITION like purchase:click, got {spec!r}")
        for name in (task, given):
            if name not in tasks:
                raise UserError(f"--condition {spec}: unknown task {name!r} (trained tasks: {', '.join(tasks)})")
        if task == given:
            raise UserError(f"--condition {spec}: a task cannot be conditional on itself")
        if task in conditions:
            raise UserError(f"--condition gives {task!r} two conditions ({conditions[task]}, {given}): give one")
        conditions[task] = given
    for task in conditions:
        seen, current = [task], task
        while current in conditions:
            current = conditions[current]
            if current in seen:
                raise UserError(f"--condition forms a cycle ({' -> '.join(seen + [current])}): remove one")
            seen.append(current)
    return conditions


@dataclass
class Column:
    """One scored column: a name, its logits ``[N]``, its labels ``[N]`` and the rows it covers
    (``rows`` None: every row)."""

    name: str
    logits: Tensor
    labels: Tensor
    rows: Tensor | None = None
    condition: str | None = None


class Objective:
    def __init__(self, tasks: list[str], conditions: dict[str, str], esmm: bool = False):
        self.tasks = list(tasks)
        self.conditions = dict(conditions)
        T = len(tasks)
        index = {t: i for i, t in enumerate(tasks)}
        # ancestors[t, a] = 1 when task a must be positive for a row to count for task t.
        ancestors = torch.zeros(T, T)
        for task in conditions:
            current = task
            while current in conditions:
                current = conditions[current]
                ancestors[index[task], index[current]] = 1.0
        self.ancestors = ancestors
        self.esmm: tuple[int, int] | None = None
        if esmm:
            if len(conditions) != 1:
                raise UserError("--model esmm needs exactly one --condition CVR_TASK:CTR_TASK, e.g. purchase:click "
                                f"(got {len(conditions)})")
            (cvr, ctr), = conditions.items()
            self.esmm = (index[cvr], index[ctr])
        # Rows that count for each task's *training* loss: ESMM trains its CVR task on all rows.
        self.train_ancestors = ancestors.clone()
        if self.esmm:
            self.train_ancestors[self.esmm[0]] = 0.0
        self.masked = bool(self.train_ancestors.any())
        self.unscored: set[str] = set()  # tasks whose labels a log lacks: not scored, nor what needs them

    def row_mask(self, labels: Tensor, ancestors: Tensor | None = None) -> Tensor:
        """``[B, T]`` 1.0 where every ancestor's label is positive (no loop, no sync)."""
        ancestors = self.ancestors if ancestors is None else ancestors
        missing = (labels <= 0.5).to(labels.dtype) @ ancestors.to(labels.device, labels.dtype).T
        return (missing == 0).to(labels.dtype)

    def train_logits_labels(self, logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """What the losses compare: ESMM's CVR column becomes the CTCVR logit and label."""
        logits = logits.float()
        if self.esmm is None:
            return logits, labels
        cvr, ctr = self.esmm
        columns, targets = list(logits.unbind(1)), list(labels.unbind(1))
        columns[cvr] = ctcvr_logit(columns[cvr], columns[ctr])
        targets[cvr] = targets[cvr] * targets[ctr]
        return torch.stack(columns, 1), torch.stack(targets, 1)

    def losses(self, logits: Tensor, labels: Tensor, group=None, share: float = 1.0) -> Tensor:
        """``[T]`` fp32 training losses of a batch. Under torchrun (``group``), a conditional task's
        loss is scaled so that the share-weighted sum over ranks is the global batch's mean over its
        covered rows (one extra all-reduce of ``T`` counts)."""
        logits, labels = self.train_logits_labels(logits, labels)
        bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
        if not self.masked:
            # A rank may get no row of a short last batch: its losses are 0 (share 0), not NaN.
            return bce.mean(0) if bce.shape[0] else bce.sum(0)
        mask = self.row_mask(labels, self.train_ancestors)
        counts = mask.sum(0)
        if group is not None:
            total = counts.detach().clone()
            group.sum_([total])
            return (bce * mask).sum(0) / total.clamp_min(1.0) * (1 / share if share else 0.0)
        return (bce * mask).sum(0) / counts.clamp_min(1.0)

    def columns(self, logits: Tensor, labels: Tensor | None) -> list[Column]:
        """The scored columns of a split: one per task (conditional ones over their covered rows),
        plus ``ctcvr`` for ESMM. ``labels`` None (unlabelled logs): rows are not restricted."""
        logits = logits.float()
        mask = None if labels is None or not bool(self.ancestors.any()) else self.row_mask(labels) > 0
        out = []
        for t, task in enumerate(self.tasks):
            if self._needs_unscored(task):
                continue
            conditional = task in self.conditions
            rows = mask[:, t] if conditional and mask is not None else None
            out.append(Column(task, logits[:, t], None if labels is None else labels[:, t], rows,
                              self.conditions.get(task)))
        if self.esmm and not self._needs_unscored(self.tasks[self.esmm[0]]):
            cvr, ctr = self.esmm
            both = None if labels is None else labels[:, cvr] * labels[:, ctr]
            out.append(Column(CTCVR, ctcvr_logit(logits[:, cvr], logits[:, ctr]), both))
        return out


    def _needs_unscored(self, task: str) -> bool:
        """Whether scoring ``task`` needs a label that is absent (its own or a condition's)."""
        while task is not None:
            if task in self.unscored:
                return True
            task = self.conditions.get(task)
        return False


def ctcvr_logit(cvr_logit: Tensor, ctr_logit: Tensor) -> Tensor:
    """logit(sigmoid(a) * sigmoid(b)), stable: log p = logsigmoid(a) + logsigmoid(b), and
    log(1 - p) = log(-expm1(log p)) (p < 1 always; clamped so a saturated pair stays finite)."""
    log_p = (F.logsigmoid(cvr_logit) + F.logsigmoid(ctr_logit)).clamp_max(-1e-7)
    return log_p - torch.log(-torch.expm1(log_p))
