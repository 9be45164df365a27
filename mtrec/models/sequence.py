"""Sequence and multi-hot fields: per row a fixed block of element codes, pooled to one field vector.

The encoded split stores a sequence as ``max_len`` int32 codes per row (0 = padding, left-aligned;
docs/data-format.md). The loader appends those columns to the categorical codes, so one fused
lookup embeds everything (``e`` is ``[B, F + sum(L), d]``) and the scope ``all`` balancers see the
sequence rows among the touched rows like any other. Pooling turns each sequence's ``L`` vectors
into one, padding masked:

- ``mean`` / ``sum``: over the non-padding elements (an empty or null list gives the zero vector);
- ``attention``: DIN's target attention (Zhou et al., KDD 2018): weight ``a_j = MLP([h_j, t,
  h_j - t, h_j * t])`` for each history vector ``h_j`` against the target field's vector ``t``
  (the field named by ``share_with``), output ``sum_j a_j h_j`` over non-padding elements. As in
  the paper the weights are not normalised by a softmax, so the output keeps the intensity of the
  match; an empty history again gives the zero vector.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

POOLINGS = ("mean", "sum", "attention")
ATTENTION_HIDDEN = 36  # DIN's activation unit uses a small MLP; 36 as in its public configs


@dataclass(frozen=True)
class SequenceField:
    """One sequence feature as the model sees it.

    ``vocab_size``: rows of its own table segment (0 when it shares rows); ``share_with``: index
    of the categorical field whose rows (and codes) it uses; ``target``: index of the categorical
    field that attention pooling compares against (the shared id field).
    """

    name: str
    length: int
    pooling: str = "mean"
    vocab_size: int = 0
    share_with: int | None = None
    target: int | None = None


class TargetAttention(nn.Module):
    """DIN's activation unit ``MLP([h, t, h - t, h * t]) -> weight``, one hidden ReLU layer.

    The first layer is applied without building the ``[B, L, 4d]`` concatenation: with
    ``W = [W_h; W_t; W_d; W_p]``, ``[h, t, h-t, h*t] W = h (W_h + W_d) + t (W_t - W_d) + (h*t) W_p``,
    and the target's term is computed once per row instead of once per element (on CPU at L = 50
    this cut the attention unit's share of a Shared-Bottom step by about half).
    """

    def __init__(self, dim: int, hidden: int = ATTENTION_HIDDEN):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(4 * dim, hidden))
        self.b1 = nn.Parameter(torch.empty(hidden))
        self.w2 = nn.Parameter(torch.empty(hidden, 1))
        self.b2 = nn.Parameter(torch.empty(1))
        for w, b in ((self.w1, self.b1), (self.w2, self.b2)):
            bound = 1.0 / math.sqrt(w.shape[0])  # nn.Linear's fan-in init
            nn.init.uniform_(w, -bound, bound)
            nn.init.uniform_(b, -bound, bound)

    def forward(self, history: Tensor, target: Tensor) -> Tensor:
        """history ``[B, L, d]``, target ``[B, d]`` -> weights ``[B, L, 1]``."""
        w_h, w_t, w_d, w_p = self.w1.to(history.dtype).chunk(4, dim=0)
        per_row = (target @ (w_t - w_d) + self.b1.to(history.dtype)).unsqueeze(1)  # [B, 1, H]
        hidden = torch.relu(history @ (w_h + w_d) + (history * target.unsqueeze(1)) @ w_p + per_row)
        return hidden @ self.w2.to(history.dtype) + self.b2.to(history.dtype)


class SequencePooling(nn.Module):
    """``(e [B, F + sum(L), d], codes) -> [B, F + S, d]``: categorical fields kept, each sequence pooled."""

    def __init__(self, num_categorical: int, sequences: list[SequenceField], dim: int):
        super().__init__()
        self.num_categorical = num_categorical
        self.sequences = list(sequences)
        starts, begin = [], num_categorical
        for s in self.sequences:
            if s.pooling not in POOLINGS:
                raise ValueError(f"pooling {s.pooling!r} of {s.name!r} is not one of {POOLINGS}")
            if s.pooling == "attention" and s.target is None:
                raise ValueError(f"attention pooling of {s.name!r} needs a target field")
            starts.append(begin)
            begin += s.length
        self.starts = starts
        self.attention = nn.ModuleDict({
            str(k): TargetAttention(dim) for k, s in enumerate(self.sequences) if s.pooling == "attention"})

    def forward(self, e: Tensor, codes: Tensor) -> Tensor:
        if not self.sequences:
            return e
        fields = [e[:, :self.num_categorical]]
        for k, s in enumerate(self.sequences):
            begin = self.starts[k]
            history = e[:, begin:begin + s.length]  # [B, L, d]
            mask = (codes[:, begin:begin + s.length] != 0).unsqueeze(-1).to(history.dtype)  # [B, L, 1]
            if s.pooling == "attention":
                weights = self.attention[str(k)](history, e[:, s.target])
                pooled = (weights * mask * history).sum(1)
            elif s.pooling == "sum":
                pooled = (mask * history).sum(1)
            else:
                pooled = (mask * history).sum(1) / mask.sum(1).clamp_min(1.0)
            fields.append(pooled.unsqueeze(1))
        return torch.cat(fields, dim=1)
