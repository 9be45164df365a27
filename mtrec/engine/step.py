"""One training step: forward, per-task losses, gradients (balanced for the chosen scope), update.

Scopes (docs/design.md, "The step"):
- ``shared``: per-task gradients of the dense shared parameters are balanced; the embedding table
  gets the plain sum of the tasks' gradients.
- ``all``: as ``shared`` plus the embedding rows the batch touched (never a dense per-task copy of
  the table: the per-task gradients of the looked-up vectors are summed into the touched rows).
- ``representation``: per-task gradients w.r.t. the shared representation ``z`` (the tensors the
  task-specific parts read) are balanced, then one backward of the combined gradient runs through
  the shared part (cheapest).
Task-specific parameters get their own task's gradient: each task's loss is the only one that
reaches them, so the sum over tasks of their per-task gradients is exactly that; where the method's
reference scales it (``GradBalancer.head_scales``: Nash-MTL's and MGDA's alpha_t, IMTL-L's e^{s_t},
DB-MTL's log-loss gradient), task t's gradient is multiplied by that factor.

Groups (``--balance-groups``): with ``part``, per-group balancers get a ``Parts`` with each balanced
tensor cut into the pieces an unfused network keeps as separate parameters (each expert's slice of
a stacked weight, each numeric feature's projection; in scope ``all`` each field's touched rows of
the fused table, mapped by one ``searchsorted``), so they reduce one norm per part per kernel.
Representation tensors are always one group each.

On CUDA all per-task gradients come from one batched autograd call (``is_grads_batched``), falling
back to a loop of ``autograd.grad`` calls when an op has no batching rule; on CPU the loop is
faster. Either way the graph is freed by the last call and the optimizer steps only after every
gradient exists.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mtrec.balancers.base import Balancer, LossBalancer, rows_split, tensor_grams
from mtrec.balancers.parts import Parts
from mtrec.core.console import err_console
from mtrec.engine import hvp
from mtrec.engine.objective import Objective
from mtrec.engine.optim import embedding_tables, empty_row_grad, fixed_unique, row_grad

SCOPES = ("shared", "all", "representation")


def task_losses(logits: Tensor, labels: Tensor) -> Tensor:
    """Batch-mean binary cross-entropy per task, ``[T]``, in fp32."""
    return F.binary_cross_entropy_with_logits(logits.float(), labels, reduction="none").mean(0)


class PerTaskGrads:
    """``grads(losses, inputs)`` -> per input a ``[T, *shape]`` tensor of per-task gradients."""

    def __init__(self, num_tasks: int, batched: bool | None = None):
        self.num_tasks = num_tasks
        # None: try the batched call on the first step and keep it if it works; False: loop.
        self.batched = batched

    def __call__(self, losses: Tensor, inputs: list[Tensor], retain_graph: bool = False) -> list[Tensor]:
        T = self.num_tasks
        if self.batched is not False:
            eye = torch.eye(T, device=losses.device, dtype=losses.dtype)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # vmap's notices about slow fallback ops
                    # The first call keeps the graph so the loop below can still run if it fails.
                    grads = torch.autograd.grad(losses, inputs, grad_outputs=eye, is_grads_batched=True,
                                                allow_unused=True,
                                                retain_graph=retain_graph or self.batched is None)
                self.batched = True
                return [torch.zeros((T, *x.shape), device=x.device, dtype=x.dtype) if g is None else g
                        for g, x in zip(grads, inputs)]
            except RuntimeError as err:
                if not _no_batching_rule(err):
                    raise  # out of memory, a real bug: never hidden behind the slower path
                self.batched = False
                err_console.print(f"warning: the batched per-task gradient call is not supported by this model "
                                  f"({str(err).splitlines()[0]}); using a loop of {T} backward passes",
                                  markup=False, highlight=False, soft_wrap=True)
        rows = []
        for t in range(T):
            gs = torch.autograd.grad(losses[t], inputs, retain_graph=retain_graph or t < T - 1, allow_unused=True)
            rows.append([torch.zeros_like(x) if g is None else g for g, x in zip(gs, inputs)])
        return [torch.stack(per_input) for per_input in zip(*rows)]


def update_change(grads: list[Tensor], update: list[Tensor]) -> Tensor:
    """``[K]``: ``||update_k - sum_t grads[k][t]|| / ||sum_t grads[k][t]||`` in fp32, on the device."""
    plain = [g.detach().float().sum(0) for g in grads]
    diff = torch.stack([torch.linalg.vector_norm(u.detach().float() - s) for u, s in zip(update, plain)])
    base = torch.stack([torch.linalg.vector_norm(s) for s in plain])
    return torch.where(diff == 0, torch.zeros_like(diff), diff / base)


def _no_batching_rule(err: RuntimeError) -> bool:
    """The one failure of the batched call that the loop can work around: an op vmap cannot batch."""
    text = str(err).lower()
    return not isinstance(err, torch.cuda.OutOfMemoryError) and ("vmap" in text or "batching rule" in text)


@dataclass
class Batch:
    codes: Tensor
    numeric: Tensor
    labels: Tensor
    share: float = 1.0  # this rank's fraction of the global batch (1 without torchrun)


class Stepper:
    """Owns model, optimizer and balancer for the step; ``step(batch)`` returns detached losses.

    Built with everything that is fixed for a run (scope, groups, the torchrun ``group``); a step
    gets what varies per batch (the rank's batch share, whether to sample diagnostics) as
    arguments. Each scope is one short function that sets the parameters' gradients and returns
    the losses and a device flag: is everything the update would apply finite?
    """

    def __init__(self, model, balancer: Balancer, optimizer: torch.optim.Optimizer, scope: str,
                 device: torch.device, autocast_dtype: torch.dtype | None, objective: Objective | None = None,
                 clip_grad: float = 0.0, groups: str | None = None, group=None):
        self.model, self.balancer, self.optimizer, self.scope = model, balancer, optimizer, scope
        self.group = group  # a distributed.Group under torchrun: gradients are summed across ranks
        # "tensor" or "part" (None: the balancer's own default, else per tensor).
        self.groups = groups or getattr(balancer, "default_groups", None) or "tensor"
        hvp.check(balancer, scope, group)
        self.num_tasks = model.num_tasks
        # How logits and labels become the T losses (conditional tasks, ESMM); plain BCE by default.
        self.objective = objective or Objective([str(t) for t in range(self.num_tasks)], {})
        self.task_params = model.task_parameters()
        self.shared_params = model.shared_parameters()
        self.part_counts, self.row_starts = (
            model.parts() if self.groups == "part" and balancer.kind == "grad" and scope != "representation"
            and hasattr(model, "parts")
            else (None, None))
        # On CPU the loop of T backward passes measured 1.6x faster than the vmapped batched call
        # (MMoE, batch 4096, docs/results.md); on CUDA the batched call saves T-1 rounds of launches.
        self.grads = PerTaskGrads(self.num_tasks, batched=None if device.type == "cuda" else False)
        self.autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype
                         else contextlib.nullcontext())
        self.gradients = (self._loss_weighting if isinstance(balancer, LossBalancer) else
                          {"shared": self._shared, "all": self._all, "representation": self._representation}[scope])
        self.diagnostics: dict[str, Tensor] | None = None  # the last sampled step's, for the loop to log
        # Clipping by global norm after balancing (0: off); steps it scaled, counted on the device.
        self.clip_grad = clip_grad
        self.clipped = torch.zeros((), dtype=torch.long, device=device)

    def step(self, codes: Tensor, numeric: Tensor, labels: Tensor, share: float = 1.0,
             diagnose: bool = False) -> Tensor | None:
        """One update; returns the ``[T]`` losses, or None when the losses or the gradients it would
        apply were not finite: then the step is skipped and no parameter, optimizer or balancer
        state changes (what ``weigh`` / ``combine`` changed is restored)."""
        batch = Batch(codes, numeric, labels, share)
        self.optimizer.zero_grad(set_to_none=True)
        self.diagnostics = None
        before = self.balancer.snapshot()
        losses, finite = self.gradients(batch, diagnose)
        if not bool(finite):  # the step's one host sync
            self.balancer.restore(before)
            self.diagnostics = None
            return None
        if diagnose and self.diagnostics is not None and self.balancer.applied is not None:
            self.diagnostics["weights"] = self.balancer.applied.detach().float().clone()
        if self.clip_grad:
            self._clip()
        self.optimizer.step()
        if isinstance(self.balancer, LossBalancer) and self.balancer.needs_lookahead:
            with torch.no_grad(), self.autocast:
                after = self._losses(self.model(codes, numeric), batch)
                self.balancer.after_step(self.group.global_losses(after, share) if self.group else after)
        return losses

    # --- the three scopes and loss weighting: set .grad, return (losses, device flag "all finite") ---
    def _loss_weighting(self, b: Batch, diagnose: bool):
        with self.autocast:
            logits = self.model(b.codes, b.numeric)
        losses = self._losses(logits, b)
        if self.group:
            losses = self.group.global_losses(losses, b.share)
        # Sampled steps only: what the tasks' gradients look like under this loss weighting.
        per_task = (self.grads(losses, self.shared_params, retain_graph=True) if diagnose and self.shared_params
                    else None)
        self.balancer.weigh(losses).backward()
        if per_task is not None:
            self._diagnose(per_task, [torch.zeros_like(p) if p.grad is None else p.grad for p in self.shared_params])
        return losses.detach(), self._finite(losses, self._param_grads(b.share))

    def _representation(self, b: Batch, diagnose: bool):
        model = self.model
        with self.autocast:
            z = model.encode(model.embed(b.codes), b.numeric, b.codes)
            leaves = [t.detach().requires_grad_() for t in z]
            logits = model.decode(tuple(leaves))
        losses = self._losses(logits, b)
        grads = self.grads(losses, leaves + self.task_params)
        rep_grads, task_grads = grads[:len(leaves)], grads[len(leaves):]
        losses = losses.detach()
        if self.group:
            # Each rank keeps its own samples' rows, scaled to the global batch's mean; the balancer's
            # sums over rows are summed over the ranks (``_combine``), the parameters' gradients below.
            rep_grads = [g * b.share for g in rep_grads]
            task_grads = [g * b.share for g in task_grads]
            losses = self.group.global_losses(losses, b.share)
        combined, inputs_finite = self._combine(rep_grads, losses, split_rows=self.group is not None)
        if diagnose:
            self._diagnose(rep_grads, combined)  # under torchrun: rank 0's rows (the loop samples on rank 0 only)
        torch.autograd.backward(list(z), [c.to(t.dtype) for c, t in zip(combined, z)])
        heads = self._set_task_grads(task_grads)
        if self.group:  # each rank's rows reached the shared part: one all-reduce of every gradient
            self._sum_model_grads()
        # The shared part's gradients come from this backward of the balancer's output: what the
        # optimizer would apply there is checked, not only the balancer's inputs.
        applied = [p.grad for p in model.parameters() if p.grad is not None]
        return losses, inputs_finite & self._finite(losses, task_grads + combined + applied + heads)

    def _shared(self, b: Batch, diagnose: bool):
        e, losses, shared_grads, task_grads, e_grads = self._per_task(b)
        if self.group:  # the global batch's per-task gradients, before the balancer sees them
            self.group.sum_(shared_grads + task_grads, b.share)
            losses = self.group.global_losses(losses, b.share)
        combined, inputs_finite = self._combine(shared_grads, losses, **self._parts(), **self._hvp(b))
        e.backward(e_grads.sum(0))  # the embedding rows get the plain sum of the tasks' gradients
        if self.group:
            self.group.sum_grads_([t.weight for t in embedding_tables(self.model)], b.share)  # none if sharded
        self._set_shared_grads(combined, shared_grads, diagnose)
        heads = self._set_task_grads(task_grads)
        return losses, inputs_finite & self._finite(losses, [e_grads, *task_grads, *combined, *heads])

    def _all(self, b: Batch, diagnose: bool):
        _, losses, shared_grads, task_grads, e_grads = self._per_task(b)
        table = self.model.embedding.table.weight
        # Per-task gradients of the touched rows [T, U, d]: never a dense per-task copy of the table.
        touched, where, valid = self._touched_rows(self.model.embedding.rows(b.codes).flatten())
        if self.group:
            # The rows one process with the global batch touches: the union of every rank's (padded
            # all-gathers); each rank adds its rows' gradients at their place in it, and one
            # all-reduce sums them with the dense per-task gradients.
            union = self.group.union(touched)
            where = torch.searchsorted(union, touched)[where]
            touched = union
        row_grads = e_grads.new_zeros((self.num_tasks, touched.numel(), table.shape[1]))
        row_grads.index_add_(1, where, e_grads.flatten(1, 2))
        if self.group:
            self.group.sum_(shared_grads + task_grads + [row_grads], b.share)
            losses = self.group.global_losses(losses, b.share)
        combined, inputs_finite = self._combine(shared_grads + [row_grads], losses, **self._parts(touched),
                                                **self._hvp(b, (touched, where)))
        rows_grad = combined[-1].to(table.dtype)
        if valid is not None:  # fixed-shape rows: the unused slots (copies of the last row) add nothing
            rows_grad = rows_grad * valid.unsqueeze(1).to(rows_grad.dtype)
        # The touched rows go to a sparse embedding optimizer as they are; a dense table-sized
        # gradient only for --embedding-optimizer adam.
        table.grad = (row_grad(table, touched, rows_grad, coalesced=valid is None) if self.model.embedding.table.sparse
                      else torch.zeros_like(table).index_add_(0, touched, rows_grad))
        self._set_shared_grads(combined[:-1], shared_grads, diagnose)
        heads = self._set_task_grads(task_grads)
        return losses, inputs_finite & self._finite(losses, [*task_grads, *combined, *heads])

    def _touched_rows(self, rows: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(touched, where, valid)``: the batch's unique table rows and each lookup's index into
        them. On one CUDA device in the fixed shape of the batch's lookups (``fixed_unique``: no host
        sync; ``valid`` marks the used slots, whose zero rows change no norm or product the
        balancers take); elsewhere ``torch.unique`` (``valid`` None): under torchrun the union of
        the ranks' rows is gathered anyway, and CoGrad's exact Hessian products take unique rows."""
        if rows.device.type != "cuda" or self.group or getattr(self.balancer, "needs_hvp", False):
            return (*torch.unique(rows, return_inverse=True), None)
        return fixed_unique(rows)

    # --- pieces the scopes share -----------------------------------------------------------------
    def _per_task(self, b: Batch):
        """Forward with the lookup output as a leaf: (the lookup output, the detached losses, and the
        per-task gradients of the shared parameters, of the task parameters and of the looked-up
        rows), this rank's under torchrun."""
        model = self.model
        with self.autocast:
            e = model.embed(b.codes)
            leaf = e.detach().requires_grad_()
            logits = model.decode(model.encode(leaf, b.numeric, b.codes))
        losses = self._losses(logits, b)
        grads = self.grads(losses, self.shared_params + self.task_params + [leaf])
        k = len(self.shared_params)
        return e, losses.detach(), grads[:k], grads[k:-1], grads[-1]

    def _combine(self, inputs: list[Tensor], losses: Tensor, split_rows: bool = False,
                 **parts) -> tuple[list[Tensor], Tensor]:
        """The balancer's output, and a device flag: were its inputs finite? Non-finite inputs are
        replaced by zeros for the balancer (which every method handles), so no solver sees NaN and
        the skip is decided once, after the step's gradients exist; the state a skipped step
        changed is restored by ``step``. ``split_rows``: the inputs' rows are this rank's share
        of the global batch's, and the balancer's sums over rows are summed over the ranks."""
        finite = self._finite(losses, inputs)
        zero = torch.zeros((), device=losses.device)
        safe = [torch.where(finite, g.float(), zero) for g in inputs]
        with rows_split(self.group.summed) if split_rows else contextlib.nullcontext():
            return self.balancer.combine(safe, torch.where(finite, losses, 1.0), **parts), finite

    def _set_shared_grads(self, combined: list[Tensor], shared_grads: list[Tensor], diagnose: bool) -> None:
        if diagnose:
            self._diagnose(shared_grads, combined)
        for p, g in zip(self.shared_params, combined):
            p.grad = g.to(p.dtype)

    def _set_task_grads(self, task_grads: list[Tensor]) -> list[Tensor]:
        """Each task's own gradient on the task-specific parameters (scaled where the method's
        reference does); returns the head scales, if any, for the finiteness check."""
        head = self.balancer.head_scales()
        for p, g in zip(self.task_params, task_grads):
            own = g.sum(0) if head is None else torch.einsum("t,t...->...", head.to(g.dtype), g)
            p.grad = own.to(p.dtype)
        return [] if head is None else [head]

    def _losses(self, logits: Tensor, b: Batch) -> Tensor:
        return self.objective.losses(logits, b.labels, self.group, b.share)

    def _clip(self) -> None:
        """Scale every gradient the optimizer applies by ``min(1, clip_grad / global norm)`` (fp32
        norm; a sparse gradient counts by its coalesced values), without a host sync."""
        grads = [p.grad for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        values = [g.coalesce().values() if g.is_sparse else g for g in grads]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(v, dtype=torch.float32)
                                                     for v in values]))
        scale = (self.clip_grad / (norm + 1e-6)).clamp_max(1.0)
        for g in grads:
            g.mul_(scale.to(g.dtype))
        self.clipped += norm > self.clip_grad

    def _diagnose(self, grads: list[Tensor], update: list[Tensor]) -> None:
        """Per shared tensor: per-task gradient norms [K, T], pairwise cosines [K, T, T], and how far
        the update the step applies is from the plain sum, ``||update - sum_t g_t|| / ||sum_t g_t||``
        [K] (0 where the balancer left the sum as it was; inf where only the sum is 0)."""
        gram = tensor_grams([g.detach() for g in grads])
        norms = gram.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt()
        cos = gram / (norms.unsqueeze(2) * norms.unsqueeze(1)).clamp_min(1e-30)
        self.diagnostics = {"norms": norms, "cosines": cos, "update_change": update_change(grads, update)}

    def _finite(self, losses: Tensor, tensors: list[Tensor]) -> Tensor:
        """A 0-dim device flag (no host sync): the losses and every tensor are finite (one sum per
        tensor is non-finite iff an element is, or it overflows, ~1e38). Under torchrun the flag is
        the same on every rank (one all-reduce), so every rank skips the same steps."""
        total = losses.detach().sum().float()
        if tensors:
            total = total + torch.stack([(g._values() if g.is_sparse else g).sum(dtype=torch.float32)
                                         for g in tensors]).sum()
        if self.group:
            total = total.reshape(1)
            self.group.sum_([total])
        return torch.isfinite(total).reshape(())

    def _sum_model_grads(self) -> None:
        """Scope ``representation`` under torchrun: every model parameter's gradient summed over the
        ranks (each holds its rows' part of the global batch's gradient, already scaled)."""
        for table in embedding_tables(self.model):
            if table.sparse and table.weight.grad is None:  # sparse on every rank, even with no rows here
                table.weight.grad = empty_row_grad(table.weight)
        self.group.sum_grads_(list(self.model.parameters()))

    def _param_grads(self, share: float) -> list[Tensor]:
        """The gradients of every optimized parameter; under several processes first summed
        (share-weighted) across ranks, which needs the same list on every rank."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        if not self.group:
            return [p.grad for p in params if p.grad is not None]
        for table in embedding_tables(self.model):
            if table.sparse and table.weight.grad is None:  # sparse on every rank, even with no rows here
                table.weight.grad = empty_row_grad(table.weight)
        self.group.sum_grads_(params, share)
        return [p.grad for p in params]

    def _hvp(self, b: Batch, rows: tuple[Tensor, Tensor] | None = None) -> dict:
        """``{"hvp": TaskHessians}`` for a balancer that needs exact Hessian-vector products (CoGrad's
        hessian=hvp, engine/hvp.py), else nothing; ``rows``: the touched rows and their inverse map."""
        return {"hvp": hvp.TaskHessians(self, b, rows)} if getattr(self.balancer, "needs_hvp", False) else {}

    def _parts(self, touched: Tensor | None = None) -> dict:
        """``{"parts": Parts}`` for ``combine`` under ``--balance-groups part`` (else nothing): the
        dense shared tensors' expert / feature slices, then the touched rows' fields."""
        if self.part_counts is None:
            return {}
        counts, ids = list(self.part_counts), [None] * len(self.part_counts)
        if touched is not None:
            counts.append(self.row_starts.numel())
            ids.append(torch.searchsorted(self.row_starts.to(touched.device), touched, right=True) - 1)
        return {"parts": Parts(counts, ids)}
