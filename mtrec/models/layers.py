"""Building blocks: the fused embedding, MLPs, and task-stacked / expert-stacked MLPs.

Experts and per-task parts are stored as stacked weights ``[N, in, out]`` and run as one batched
matmul per layer, so an MMoE with 4 experts and 3 towers costs a handful of kernels, not dozens.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class FusedEmbedding(nn.Module):
    """One table for every categorical field and sequence, with per-column offsets: one lookup kernel.

    Code columns are the categorical fields, then each sequence's ``length`` element columns. A
    sequence has its own segment of the table, or uses the rows of the field it shares them with
    (``share_with``), so an item id and the same id in a history are one embedding row.
    Code 0 (null) and 1 (out of vocabulary) of each field are ordinary learned rows: "missing" and
    "rare" carry signal in click logs (padding elements of sequences are masked by the pooling).
    """

    def __init__(self, vocab_sizes: list[int], dim: int, sequences=()):
        super().__init__()
        segments = list(vocab_sizes) + [s.vocab_size for s in sequences if s.share_with is None]
        starts = [0]
        for size in segments[:-1]:
            starts.append(starts[-1] + size)
        columns, own = list(starts[:len(vocab_sizes)]), len(vocab_sizes)
        for s in sequences:
            if s.share_with is None:
                start, own = starts[own], own + 1
            else:
                start = starts[s.share_with]
            columns += [start] * s.length
        self.register_buffer("offsets", torch.tensor(columns, dtype=torch.long), persistent=False)
        self.table = nn.Embedding(max(sum(segments), 1), dim)
        nn.init.normal_(self.table.weight, std=1e-2)

    def rows(self, codes: Tensor) -> Tensor:
        """Global row ids ``[B, C]`` of the fused table for per-column codes ``[B, C]``."""
        return codes.long() + self.offsets

    def forward(self, codes: Tensor) -> Tensor:
        return self.table(self.rows(codes))


class NumericProjection(nn.Module):
    """Each numeric feature x_f becomes x_f * w_f + b_f, a vector of the embedding width."""

    def __init__(self, num_features: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_features, dim) * 1e-2)
        self.bias = nn.Parameter(torch.zeros(num_features, dim))

    def forward(self, values: Tensor) -> Tensor:
        return values.unsqueeze(-1) * self.weight + self.bias


def _init_stacked(weight: Tensor, bias: Tensor) -> None:
    # Same fan-in uniform init as nn.Linear, per stacked slice.
    bound = 1.0 / math.sqrt(weight.shape[-2])
    nn.init.uniform_(weight, -bound, bound)
    nn.init.uniform_(bias, -bound, bound)


class StackedMLP(nn.Module):
    """N independent MLPs with the same layer sizes, run as batched matmuls.

    ``shared_input=True``: input ``[B, in]`` is read by all N networks (experts of one bank).
    Otherwise the input is ``[B, N, in]`` (one input per network, e.g. towers).
    Output ``[B, N, out]``. ReLU after every layer except the last when ``last_activation=False``.
    """

    def __init__(self, n: int, sizes: list[int], last_activation: bool = True, dropout: float = 0.0):
        super().__init__()
        self.n = n
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            w = nn.Parameter(torch.empty(n, fan_in, fan_out))
            b = nn.Parameter(torch.empty(n, fan_out))
            _init_stacked(w, b)
            self.weights.append(w)
            self.biases.append(b)
        self.last_activation = last_activation
        self.dropout = dropout

    def forward(self, x: Tensor) -> Tensor:
        depth = len(self.weights)
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            if x.dim() == 2:
                x = torch.einsum("bi,nio->bno", x, w) + b
            else:
                x = torch.einsum("bni,nio->bno", x, w) + b
            if i < depth - 1 or self.last_activation:
                x = torch.relu(x)
                if self.dropout and self.training:
                    x = nn.functional.dropout(x, self.dropout)
        return x


def mix(gate_logits: Tensor, experts: Tensor) -> Tensor:
    """Softmax-gated mixture: gate logits ``[B, N, E]`` over experts ``[B, E, H]`` -> ``[B, N, H]``."""
    weights = torch.softmax(gate_logits.float(), dim=-1).to(experts.dtype)
    return torch.bmm(weights, experts)
