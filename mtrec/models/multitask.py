"""Multi-task architectures: Shared-Bottom, MMoE, PLE (CGC levels) and independent single-task nets.

Every model runs in three stages so the engine can take per-task gradients at any seam:

    embed(codes)               -> e   [B, C, d]   the fused-table rows of every code column (shared)
    encode(e, numeric, codes)  -> z   tuple of tensors, the shared representation (sequences are
                                      pooled here, so ``codes`` gives their padding masks)
    decode(z)               -> logits [B, T]        only task-specific parameters from here on

``forward`` chains them. ``shared_parameters()`` are the dense shared parameters (everything
between the embedding table and the representation, numeric projection included);
``task_parameters()`` are the parameters that one task's loss alone reaches (towers, gates, PLE's
last-level task experts); ``task_slices(t)`` says which parameter slices belong to task t (stacked
weights hold one slice per task along dim 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from mtrec.models.layers import FusedEmbedding, NumericProjection, StackedMLP, mix
from mtrec.models.sequence import SequenceField, SequencePooling


@dataclass
class ModelConfig:
    embedding_dim: int = 16
    expert_sizes: list[int] = field(default_factory=lambda: [256, 128])
    tower_sizes: list[int] = field(default_factory=lambda: [64])
    num_experts: int = 4  # MMoE experts
    shared_experts: int = 1  # PLE shared experts per level
    task_experts: int = 1  # PLE experts per task per level
    levels: int = 1  # PLE levels (1 = CGC)
    dropout: float = 0.0


def _logit(rate: float) -> float:
    rate = min(max(rate, 1e-6), 1 - 1e-6)
    return math.log(rate / (1 - rate))


class MultiTaskModel(nn.Module):
    def __init__(self, vocab_sizes: list[int], num_numeric: int, positive_rates: list[float], cfg: ModelConfig,
                 sequences: list[SequenceField] = ()):
        super().__init__()
        self.num_tasks = len(positive_rates)
        self.num_numeric = num_numeric
        self.cfg = cfg
        self.input_dim = (len(vocab_sizes) + len(sequences) + num_numeric) * cfg.embedding_dim
        self.embedding = FusedEmbedding(vocab_sizes, cfg.embedding_dim, sequences)
        self.numeric = NumericProjection(num_numeric, cfg.embedding_dim) if num_numeric else None
        self.pooling = SequencePooling(len(vocab_sizes), list(sequences), cfg.embedding_dim)

    def _towers(self, in_dim: int, positive_rates: list[float]) -> StackedMLP:
        towers = StackedMLP(self.num_tasks, [in_dim, *self.cfg.tower_sizes, 1], last_activation=False,
                            dropout=self.cfg.dropout)
        # Start every tower at its task's base rate: a rare task starting at p = 0.5 spends its
        # first epoch unlearning the bias (docs/design.md, "Models").
        with torch.no_grad():
            towers.biases[-1].copy_(torch.tensor([[_logit(r)] for r in positive_rates]))
        return towers

    # --- stages -----------------------------------------------------------------------------
    def embed(self, codes: Tensor) -> Tensor:
        return self.embedding(codes)

    def flat_input(self, e: Tensor, numeric: Tensor, codes: Tensor | None = None) -> Tensor:
        """Pooled fields and projected numerics, flattened: ``[B, input_dim]``."""
        if self.pooling.sequences:
            if codes is None:
                raise ValueError("a model with sequence fields needs the codes (padding masks) in encode")
            e = self.pooling(e, codes)
        parts = [e]
        if self.numeric is not None:
            parts.append(self.numeric(numeric).to(e.dtype))
        x = torch.cat(parts, dim=1) if len(parts) > 1 else e
        return x.flatten(1)

    def encode(self, e: Tensor, numeric: Tensor, codes: Tensor | None = None) -> tuple[Tensor, ...]:
        raise NotImplementedError

    def decode(self, z: tuple[Tensor, ...]) -> Tensor:
        raise NotImplementedError

    def forward(self, codes: Tensor, numeric: Tensor) -> Tensor:
        return self.decode(self.encode(self.embed(codes), numeric, codes))

    # --- parameter roles --------------------------------------------------------------------
    def task_modules(self) -> list[nn.Module]:
        raise NotImplementedError

    def task_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.task_modules() for p in m.parameters()]

    def shared_parameters(self) -> list[nn.Parameter]:
        """Dense shared parameters (the embedding table is not among them)."""
        # The embedding module's parameters: the fused table (none when the engine shards it).
        excluded = {id(p) for p in self.task_parameters()} | {id(p) for p in self.embedding.parameters()}
        return [p for p in self.parameters() if id(p) not in excluded]

    def task_slices(self, t: int) -> list[tuple[nn.Parameter, slice]]:
        """(parameter, slice along dim 0) pairs owned by task t."""
        return [(p, slice(t, t + 1)) for m in self.task_modules() for p in m.parameters()]

    def parts(self) -> tuple[list[int], Tensor]:
        """The parts of the shared tensors: the pieces an unfused network keeps as separate parameters
        (what MetaBalance balances one by one, ``--balance-groups part``).

        Returns, per ``shared_parameters()`` tensor, its number of parts along dim 0 (each expert of
        a stacked bank, PLE's lower-level task experts and gates included; each numeric feature's
        projection; 1 for any other tensor), and the first row of each segment of the fused embedding table (one
        segment per categorical field, and per sequence with its own vocabulary), sorted: the part
        of table row r is ``searchsorted(starts, r, right=True) - 1``.
        """
        stacked = {}
        for module in self.modules():
            if isinstance(module, StackedMLP) and module.n > 1:
                stacked.update({id(p): module.n for p in module.parameters()})
            elif isinstance(module, NumericProjection):
                stacked.update({id(p): p.shape[0] for p in module.parameters()})
        counts = [stacked.get(id(p), 1) for p in self.shared_parameters()]
        return counts, torch.unique(self.embedding.offsets)


class SharedBottom(MultiTaskModel):
    def __init__(self, vocab_sizes, num_numeric, positive_rates, cfg, sequences=()):
        super().__init__(vocab_sizes, num_numeric, positive_rates, cfg, sequences)
        self.bottom = StackedMLP(1, [self.input_dim, *cfg.expert_sizes], dropout=cfg.dropout)
        self.towers = self._towers(cfg.expert_sizes[-1], positive_rates)

    def encode(self, e, numeric, codes=None):
        return (self.bottom(self.flat_input(e, numeric, codes)).squeeze(1),)

    def decode(self, z):
        (h,) = z
        return self.towers(h.unsqueeze(1).expand(-1, self.num_tasks, -1)).squeeze(-1)

    def task_modules(self):
        return [self.towers]


class MMoE(MultiTaskModel):
    def __init__(self, vocab_sizes, num_numeric, positive_rates, cfg, sequences=()):
        super().__init__(vocab_sizes, num_numeric, positive_rates, cfg, sequences)
        self.experts = StackedMLP(cfg.num_experts, [self.input_dim, *cfg.expert_sizes], dropout=cfg.dropout)
        self.gates = StackedMLP(self.num_tasks, [self.input_dim, cfg.num_experts], last_activation=False)
        self.towers = self._towers(cfg.expert_sizes[-1], positive_rates)

    def encode(self, e, numeric, codes=None):
        x = self.flat_input(e, numeric, codes)
        return x, self.experts(x)

    def decode(self, z):
        x, experts = z
        return self.towers(mix(self.gates(x), experts)).squeeze(-1)

    def task_modules(self):
        return [self.gates, self.towers]


class PLE(MultiTaskModel):
    """Progressive Layered Extraction (Tang et al., RecSys 2020); ``levels=1`` is CGC.

    At each level, task t's experts and gate read task t's input, the shared experts read the
    shared input, and (below the last level) a shared gate mixes every expert into the next shared
    input. Lower-level task experts feed that shared gate, so they are shared; the last level's
    task experts and gates belong to their task.
    """

    def __init__(self, vocab_sizes, num_numeric, positive_rates, cfg, sequences=()):
        super().__init__(vocab_sizes, num_numeric, positive_rates, cfg, sequences)
        T, nt, ns = self.num_tasks, cfg.task_experts, cfg.shared_experts
        self.task_experts = nn.ModuleList()
        self.shared_experts = nn.ModuleList()
        self.task_gates = nn.ModuleList()
        self.shared_gates = nn.ModuleList()
        in_dim = self.input_dim
        for level in range(cfg.levels):
            self.task_experts.append(StackedMLP(T * nt, [in_dim, *cfg.expert_sizes], dropout=cfg.dropout))
            self.shared_experts.append(StackedMLP(ns, [in_dim, *cfg.expert_sizes], dropout=cfg.dropout))
            self.task_gates.append(StackedMLP(T, [in_dim, nt + ns], last_activation=False))
            if level < cfg.levels - 1:
                self.shared_gates.append(StackedMLP(1, [in_dim, T * nt + ns], last_activation=False))
            in_dim = cfg.expert_sizes[-1]
        self.towers = self._towers(in_dim, positive_rates)

    def _task_experts(self, level: int, task_inputs: Tensor) -> Tensor:
        """task_inputs [B, D] (same for all tasks) or [B, T, D] -> [B, T, nt, H]."""
        nt = self.cfg.task_experts
        if task_inputs.dim() == 3 and nt > 1:
            task_inputs = task_inputs.repeat_interleave(nt, dim=1)
        out = self.task_experts[level](task_inputs)
        return out.unflatten(1, (self.num_tasks, nt))

    def _task_mix(self, level: int, task_inputs: Tensor, own: Tensor, shared_out: Tensor) -> Tensor:
        """Each task's gate over its own experts ``own`` [B, T, nt, H] and the shared ones."""
        shared = shared_out.unsqueeze(1).expand(-1, self.num_tasks, -1, -1)
        experts = torch.cat([own, shared], dim=2)  # [B, T, nt+ns, H]
        weights = torch.softmax(self.task_gates[level](task_inputs).float(), dim=-1).to(experts.dtype)
        return torch.einsum("bte,bteh->bth", weights, experts)

    def encode(self, e, numeric, codes=None):
        x = self.flat_input(e, numeric, codes)
        task_inputs, shared_input = x, x
        for level in range(self.cfg.levels - 1):
            shared_out = self.shared_experts[level](shared_input)
            own = self._task_experts(level, task_inputs)
            all_experts = torch.cat([own.flatten(1, 2), shared_out], dim=1)
            shared_input = mix(self.shared_gates[level](shared_input), all_experts).squeeze(1)
            task_inputs = self._task_mix(level, task_inputs, own, shared_out)
        return task_inputs, self.shared_experts[-1](shared_input)

    def decode(self, z):
        task_inputs, shared_out = z
        level = self.cfg.levels - 1
        own = self._task_experts(level, task_inputs)
        return self.towers(self._task_mix(level, task_inputs, own, shared_out)).squeeze(-1)

    def task_modules(self):
        return [self.task_experts[-1], self.task_gates[-1], self.towers]

    def task_slices(self, t):
        nt = self.cfg.task_experts
        own = [(p, slice(t * nt, (t + 1) * nt)) for p in self.task_experts[-1].parameters()]
        rest = [(p, slice(t, t + 1)) for m in (self.task_gates[-1], self.towers) for p in m.parameters()]
        return own + rest


class ESMM(MultiTaskModel):
    """Entire Space Multi-task Model (Ma et al., SIGIR 2018): one MLP tower per task over shared
    embeddings. The CTCVR product pCTR x pCVR that trains the CVR tower on every impression lives
    in ``mtrec.engine.objective`` (the model outputs each tower's own logit). Towers: the expert sizes,
    then the tower sizes, as one stacked MLP."""

    def __init__(self, vocab_sizes, num_numeric, positive_rates, cfg, sequences=()):
        super().__init__(vocab_sizes, num_numeric, positive_rates, cfg, sequences)
        self.towers = StackedMLP(self.num_tasks, [self.input_dim, *cfg.expert_sizes, *cfg.tower_sizes, 1],
                                 last_activation=False, dropout=cfg.dropout)
        with torch.no_grad():
            self.towers.biases[-1].copy_(torch.tensor([[_logit(r)] for r in positive_rates]))

    def encode(self, e, numeric, codes=None):
        return (self.flat_input(e, numeric, codes),)

    def decode(self, z):
        (x,) = z
        return self.towers(x.unsqueeze(1).expand(-1, self.num_tasks, -1)).squeeze(-1)

    def task_modules(self):
        return [self.towers]


class SingleTask(nn.Module):
    """One independent network per task (embeddings, MLP, tower): the no-sharing baseline."""

    def __init__(self, vocab_sizes, num_numeric, positive_rates, cfg, sequences=()):
        super().__init__()
        self.num_tasks = len(positive_rates)
        self.nets = nn.ModuleList(SharedBottom(vocab_sizes, num_numeric, [r], cfg, sequences) for r in positive_rates)

    def forward(self, codes: Tensor, numeric: Tensor) -> Tensor:
        return torch.cat([net(codes, numeric) for net in self.nets], dim=1)

    def task_parameters(self):
        return list(self.parameters())

    def shared_parameters(self):
        return []

    def task_slices(self, t):
        return [(p, slice(None)) for p in self.nets[t].parameters()]


ARCHITECTURES = {"single": SingleTask, "shared-bottom": SharedBottom, "mmoe": MMoE, "ple": PLE, "esmm": ESMM}
