"""Parts: the groups a per-group balancer (MetaBalance, GradVac per tensor) works on.

With ``--balance-groups tensor`` every balanced tensor is one group. With ``part`` a tensor is cut
along its first dimension (dim 1 of its ``[T, n0, ...]`` gradient) into the pieces an unfused
network would keep as separate parameters: each expert's slice of a stacked weight, each field's
rows of the fused embedding table. A ``Parts`` says, per balanced tensor, how many parts it has and
which part each slice belongs to; the reductions below then give one norm (or one T x T Gram) per
part with one kernel per tensor (a reduction, and a segment sum ``index_add`` where slices are
grouped), never a Python loop over parts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mtrec.balancers.base import exact_matmul, row_sum, rows, rows_are_split, tensor_grams, weighted_sum


@dataclass
class Parts:
    """Per balanced tensor k: ``counts[k]`` parts and ``ids[k]``, the part of each slice along the
    tensor's dim 0 (``[n0]`` long), or None: ``counts[k] == 1`` (the whole tensor is one part) or
    ``counts[k] == n0`` (slice i is part i, as the experts of a stacked weight)."""

    counts: list[int]
    ids: list[Tensor | None]

    @property
    def total(self) -> int:
        return sum(self.counts)


def _slices(g: Tensor) -> Tensor:
    """``[T, n0, ...]`` -> ``[T, n0, rest]`` fp32."""
    return g.reshape(g.shape[0], g.shape[1], -1).float()


def _by_part(per_slice: Tensor, count: int, ids: Tensor | None) -> Tensor:
    """Values per slice ``[n0, ...]`` summed into their parts: ``[count, ...]``."""
    if ids is None:
        return per_slice
    return per_slice.new_zeros((count, *per_slice.shape[1:])).index_add_(0, ids, per_slice)


def group_norms(grads: list[Tensor], parts: Parts | None = None) -> Tensor:
    """Per group, each task's gradient norm: ``[G, T]`` fp32 (G = tensors, or parts)."""
    T = grads[0].shape[0]
    if parts is None:
        norms = torch.stack([torch.linalg.vector_norm(g.reshape(T, -1), dim=1, dtype=torch.float32) for g in grads])
        # Rows split over processes: the squares are summed over the ranks (one all-reduce of G x T).
        return row_sum(norms.square()).sqrt() if rows_are_split() else norms
    out = []
    for g, count, ids in zip(grads, parts.counts, parts.ids):
        if count == 1:
            out.append(torch.linalg.vector_norm(g.reshape(1, T, -1), dim=2, dtype=torch.float32) ** 2)
        else:
            out.append(_by_part(_slices(g).square().sum(2).T, count, ids))
    return row_sum(torch.cat(out)).sqrt()


def group_grams(grads: list[Tensor], parts: Parts | None = None) -> Tensor:
    """Per group, the task Gram matrix ``[G, T, T]`` fp32."""
    if parts is None:
        return tensor_grams(grads)
    out = []
    with exact_matmul(grads[0]):
        for g, count, ids in zip(grads, parts.counts, parts.ids):
            if count == 1:
                r = rows(g)
                out.append((r @ r.T)[None])
            else:
                x = _slices(g).transpose(0, 1)  # [n0, T, rest]
                out.append(_by_part(torch.bmm(x, x.transpose(1, 2)), count, ids))
    return row_sum(torch.cat(out))


def group_weighted_sum(grads: list[Tensor], weights: Tensor, parts: Parts | None = None) -> list[Tensor]:
    """``sum_t weights[group, t] * g_t`` with one weight row per group (``[G, T]``)."""
    if parts is None:
        return weighted_sum(grads, weights)
    out, start = [], 0
    with exact_matmul(grads[0]):
        for g, count, ids in zip(grads, parts.counts, parts.ids):
            w = weights[start:start + count].to(device=g.device, dtype=torch.float32)
            start += count
            if count == 1:
                out.append((w[0] @ rows(g)).reshape(g.shape[1:]).to(g.dtype))
                continue
            per_slice = w if ids is None else w.index_select(0, ids)  # [n0, T]
            combined = torch.bmm(per_slice[:, None, :], _slices(g).transpose(0, 1))  # [n0, 1, rest]
            out.append(combined.reshape(g.shape[1:]).to(g.dtype))
    return out
