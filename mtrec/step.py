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

import torch
import torch.nn.functional as F
from torch import Tensor

from mtrec.balancers.base import Balancer, GradBalancer, LossBalancer, tensor_grams
from mtrec.balancers.parts import Parts
from mtrec.objective import Objective
from mtrec.optim import embedding_tables, empty_row_grad, row_grad
from mtrec.report import err_console

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


def _no_batching_rule(err: RuntimeError) -> bool:
    """The one failure of the batched call that the loop can work around: an op vmap cannot batch."""
    text = str(err).lower()
    return not isinstance(err, torch.cuda.OutOfMemoryError) and ("vmap" in text or "batching rule" in text)


class Stepper:
    """Owns model, optimizer and balancer for the step; ``step(batch)`` returns detached losses."""

    def __init__(self, model, balancer: Balancer, optimizer: torch.optim.Optimizer, scope: str,
                 device: torch.device, autocast_dtype: torch.dtype | None, objective: Objective | None = None,
                 clip_grad: float = 0.0, groups: str | None = None):
        self.model, self.balancer, self.optimizer, self.scope = model, balancer, optimizer, scope
        # "tensor" or "part" (None: the balancer's own default, else per tensor).
        self.groups = groups or getattr(balancer, "default_groups", None) or "tensor"
        self.num_tasks = model.num_tasks
        # How logits and labels become the T losses (conditional tasks, ESMM); plain BCE by default.
        self.objective = objective or Objective([str(t) for t in range(self.num_tasks)], {})
        self.task_params = model.task_parameters()
        self.shared_params = model.shared_parameters()
        self.part_counts, self.row_starts = (
            model.parts() if self.groups == "part" and balancer.kind == "grad" and scope != "representation"
            and hasattr(model, "parts") else (None, None))  # SingleTask shares nothing, so has no parts
        # On CPU the loop of T backward passes measured 1.6x faster than the vmapped batched call
        # (MMoE, batch 4096, docs/results.md); on CUDA the batched call saves T-1 rounds of launches.
        self.grads = PerTaskGrads(self.num_tasks, batched=None if device.type == "cuda" else False)
        self.autocast = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype
                         else contextlib.nullcontext())
        self.group = None  # a distributed.Group under torchrun: gradients are summed across ranks
        self.share = 1.0  # this rank's fraction of the global batch (set by the loop)
        self.want_diagnostics = False  # set by the loop on sampled steps
        self.diagnostics: dict[str, Tensor] | None = None
        # Clipping by global norm after balancing (0: off); steps it scaled, counted on the device.
        self.clip_grad = clip_grad
        self.clipped = torch.zeros((), dtype=torch.long, device=device)

    def step(self, codes: Tensor, numeric: Tensor, labels: Tensor) -> Tensor | None:
        """One update; returns the ``[T]`` losses, or None when the losses or the gradients it would
        apply were not finite: then the step is skipped and no parameter, optimizer or balancer
        state changes (what ``weigh`` / ``combine`` changed is restored)."""
        self.optimizer.zero_grad(set_to_none=True)
        before = self.balancer.snapshot()
        if isinstance(self.balancer, LossBalancer):
            losses = self._loss_weighting(codes, numeric, labels)
        else:
            losses = self._grad_combination(codes, numeric, labels)
        if losses is None:
            self.balancer.restore(before)
            self.diagnostics = None
            return None
        if self.clip_grad:
            self._clip()
        self.optimizer.step()
        if isinstance(self.balancer, LossBalancer) and self.balancer.needs_lookahead:
            with torch.no_grad(), self.autocast:
                after = self._losses(self.model(codes, numeric), labels)
                self.balancer.after_step(self.group.global_losses(after, self.share) if self.group else after)
        return losses

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

    def _losses(self, logits: Tensor, labels: Tensor) -> Tensor:
        return self.objective.losses(logits, labels, self.group, self.share)

    def _diagnose(self, grads: list[Tensor]) -> None:
        """Per shared tensor: per-task gradient norms [K, T] and pairwise cosines [K, T, T]."""
        if not self.want_diagnostics:
            return
        gram = tensor_grams([g.detach() for g in grads])
        norms = gram.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt()
        cos = gram / (norms.unsqueeze(2) * norms.unsqueeze(1)).clamp_min(1e-30)
        self.diagnostics = {"norms": norms, "cosines": cos}

    def _finite(self, losses: Tensor, grads: list[Tensor] = ()) -> bool:
        """The step's host sync: a non-finite loss or gradient must not touch parameters or state."""
        total = losses.detach().sum().float()
        if grads:
            # One pass per tensor: a sum is non-finite iff some element is (or it overflows, ~1e38).
            total = total + torch.stack([(g._values() if g.is_sparse else g).sum(dtype=torch.float32)
                                         for g in grads]).sum()
        if self.group:  # every rank must take the same decision
            total = total.reshape(1)
            self.group.sum_([total])
        return bool(torch.isfinite(total).all())

    def _param_grads(self) -> list[Tensor]:
        """The gradients of every optimized parameter; under several processes first summed
        (share-weighted) across ranks, which needs the same list on every rank."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        if not self.group:
            return [p.grad for p in params if p.grad is not None]
        for table in embedding_tables(self.model):
            if table.sparse and table.weight.grad is None:  # sparse on every rank, even with no rows here
                table.weight.grad = empty_row_grad(table.weight)
        self.group.sum_grads_(params, self.share)
        return [p.grad for p in params]

    def _loss_weighting(self, codes, numeric, labels):
        with self.autocast:
            logits = self.model(codes, numeric)
        losses = self._losses(logits, labels)
        if self.group:
            losses = self.group.global_losses(losses, self.share)
        if self.want_diagnostics and self.shared_params:
            # Sampled steps only: what the tasks' gradients look like under this loss weighting.
            self._diagnose(self.grads(losses, self.shared_params, retain_graph=True))
        self.balancer.weigh(losses).backward()
        # One check covers the losses and every gradient the optimizer would apply.
        if not self._finite(losses, self._param_grads()):
            return None
        return losses.detach()

    def _grad_combination(self, codes, numeric, labels):
        model, T = self.model, self.num_tasks
        balancer: GradBalancer = self.balancer  # type: ignore[assignment]
        with self.autocast:
            e = model.embed(codes)
            if self.scope == "representation":
                z = model.encode(e, numeric, codes)
                leaves = [t.detach().requires_grad_() for t in z]
                logits = model.decode(tuple(leaves))
            else:
                leaves = [e.detach().requires_grad_()]
                logits = model.decode(model.encode(leaves[0], numeric, codes))
        losses = self._losses(logits, labels)
        detached = losses.detach()
        if self.scope == "representation":
            grads = self.grads(losses, leaves + self.task_params)
            if not self._finite(detached, grads):  # before the balancer updates any state
                return None
            rep_grads, task_grads = grads[:len(leaves)], grads[len(leaves):]
            combined = balancer.combine([g.float() for g in rep_grads], detached)
            head = balancer.head_scales()
            self._diagnose(rep_grads)
            torch.autograd.backward(list(z), [c.to(t.dtype) for c, t in zip(combined, z)])
            # The shared part's gradients come from this backward of the balancer's output: what
            # the optimizer would apply there is checked, not only the balancer's inputs.
            applied = [p.grad for p in model.parameters() if p.grad is not None]
            if not self._finite(detached, applied + ([] if head is None else [head])):
                return None
        else:
            shared = self.shared_params
            grads = self.grads(losses, shared + self.task_params + leaves)
            if self.group:  # the global batch's per-task gradients, before the balancer sees them
                self.group.sum_(grads[:-1], self.share)
                detached = self.group.global_losses(detached, self.share)
            if not self._finite(detached, grads):  # before the balancer updates any state
                return None
            shared_grads = grads[:len(shared)]
            task_grads = grads[len(shared):-1]
            e_grads = grads[-1]  # [T, B, F, d]
            if self.scope == "all":
                table = model.embedding.table.weight
                rows = model.embedding.rows(codes).flatten()
                touched, where = torch.unique(rows, return_inverse=True)
                row_grads = e_grads.new_zeros((T, touched.numel(), table.shape[1]))
                row_grads.index_add_(1, where, e_grads.flatten(1, 2))
                combined = balancer.combine([g.float() for g in shared_grads] + [row_grads.float()], detached,
                                            **self._parts(touched))
                head = balancer.head_scales()
                if not self._finite(detached, combined + ([] if head is None else [head])):  # what is applied
                    return None
                rows_grad = combined.pop().to(table.dtype)
                # The touched rows go to the optimizer as they are under a sparse embedding
                # optimizer; the dense table-sized gradient only for --embedding-optimizer adam.
                table.grad = (row_grad(table, touched, rows_grad) if model.embedding.table.sparse
                              else torch.zeros_like(table).index_add_(0, touched, rows_grad))
            else:
                combined = balancer.combine([g.float() for g in shared_grads], detached, **self._parts())
                head = balancer.head_scales()
                if not self._finite(detached, combined + ([] if head is None else [head])):  # what is applied
                    return None
                e.backward(e_grads.sum(0))
                if self.group:
                    self.group.sum_grads_([model.embedding.table.weight], self.share)
            self._diagnose(shared_grads)
            for p, g in zip(shared, combined):
                p.grad = g.to(p.dtype)
        for p, g in zip(self.task_params, task_grads):
            own = g.sum(0) if head is None else torch.einsum("t,t...->...", head.to(g.dtype), g)
            p.grad = own.to(p.dtype)
        return detached

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
