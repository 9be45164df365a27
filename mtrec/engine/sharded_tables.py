"""Sharded embedding tables with TorchRec (``--embedding-sharding torchrec``).

The model's fused table (``model.embedding``, one table with per-field offsets) is replaced by a
``ShardedTables`` module with the same ``forward(codes) -> e [B, C, d]``: every segment of the
fused table (a categorical field, or a sequence with its own vocabulary) becomes one TorchRec table
of an ``EmbeddingCollection``, sharded across the ranks by ``DistributedModelParallel`` (DMP) with
the plan of ``--embedding-sharding-plan`` (TorchRec's planner, or one sharding type for every table),
and updated by FBGEMM's fused optimizer inside the lookup's backward pass. Only the lookup is
wrapped in DMP: the dense part stays the project's model, with the project's balancer, optimizer
and gradient sums (``engine/distributed.py``), and the per-task gradients are taken of tensors the
model computes after the lookup (never of DMP's outputs, whose backward runs the table update).

Consequences (docs/design.md, "Sharded tables (TorchRec)"):
- there is no per-task gradient of the table: gradient balancers run in scope ``shared`` or
  ``representation``; the table gets the plain sum of the tasks' gradients (as in ``shared``);
- the owners of the rows sum the ranks' gradients in the backward all-to-all, so each rank's
  gradient of the lookup output is scaled by its share of the global batch (``grad_scale``);
- the update happens in the backward: ``--clip-grad`` covers the dense parameters only, and a step
  skipped for a non-finite value has still updated the table rows of the ranks whose gradient was
  finite (a rank's non-finite lookup gradient is replaced by zeros: rowwise Adagrad then leaves
  its rows unchanged);
- checkpoints hold the table gathered on rank 0 in the unsharded layout (``embedding.table.weight``
  and the optimizer's row accumulator ``sum``), so evaluate, predict and export read them on one
  process with the plain model.

TorchRec is optional (``pip install 'mtrec[torchrec]'`` plus torchrec itself, see ``INSTALL``); this
module imports it only when a sharded run is built.
"""

from __future__ import annotations

import contextlib
import logging
import warnings

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mtrec.core.errors import UserError
from mtrec.engine.step import Stepper

# mtrec's --embedding-optimizer -> FBGEMM's fused optimizer with the same update rule. FBGEMM's CPU
# kernels have no Adam (lazy-adam would map to OptimType.ADAM on CUDA; not wired, see the docs).
FUSED_OPTIMIZERS = {"rowwise-adagrad": "EXACT_ROWWISE_ADAGRAD"}
PLAN_TYPES = {"table-wise": ["table_wise"], "row-wise": ["row_wise"], "column-wise": ["column_wise"],
              "auto": ["table_wise", "row_wise", "column_wise"]}  # no data_parallel: it would wrap DDP
INSTALL = ("pip install 'mtrec[torchrec]' && pip install --no-deps torchrec==1.9.2 (torch 2.13 on CPU; the pins "
           "for other torch versions and for CUDA are in docs/design.md, 'Sharded tables')")
EPS = 1e-8  # mtrec's RowwiseAdagrad eps (engine/optim.py)


def require_torchrec() -> None:
    """One line naming what to install when TorchRec (or its FBGEMM kernels) cannot be imported."""
    try:
        import torchrec  # noqa: F401, I001 (torchrec first: its absence is the likelier reason)
        import fbgemm_gpu  # noqa: F401
        from torchrec.distributed.model_parallel import DistributedModelParallel  # noqa: F401
    except (ImportError, OSError) as err:  # OSError: an FBGEMM build for another torch (undefined symbol)
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"--embedding-sharding torchrec needs TorchRec and FBGEMM, which do not import here "
                        f"({reason}): {INSTALL}") from err


def check(cfg, model, balancer, scope: str) -> None:
    """Refuse, in one line each, what a sharded table cannot do (before anything is built)."""
    if not hasattr(model, "embedding") or not hasattr(model.embedding, "table"):
        raise UserError(f"--embedding-sharding torchrec shards the one fused table of shared-bottom, mmoe, ple and "
                        f"esmm; --model {cfg.model} has a table per task: use one of those, or "
                        "--embedding-sharding none")
    if model.embedding.offsets.numel() == 0:
        raise UserError("--embedding-sharding torchrec has no table to shard: the data has no categorical feature")
    if cfg.embedding_optimizer not in FUSED_OPTIMIZERS:
        raise UserError(f"--embedding-sharding torchrec updates the table with FBGEMM's fused optimizer, which has "
                        f"no {cfg.embedding_optimizer} here: pass --embedding-optimizer rowwise-adagrad (the same "
                        "update as without sharding)")
    if balancer.kind == "grad" and scope == "all":
        raise UserError(f"--embedding-sharding torchrec cannot balance in scope all (the balance scope of this run, "
                        f"{cfg.balancer}'s default unless --balance-scope says so): TorchRec's fused optimizer "
                        "updates the table inside the backward pass, so there is no per-task gradient of its rows "
                        "to balance; pass --balance-scope shared or representation")
    if getattr(balancer, "needs_hvp", False):
        raise UserError(f"{cfg.balancer} with exact Hessian-vector products needs the unsharded table: use another "
                        "hessian option, or --embedding-sharding none")


def shard(model: nn.Module, cfg, device: torch.device) -> ShardedTables:
    """Replace ``model.embedding`` (its weights are the initial values) by a sharded copy; returns it."""
    require_torchrec()
    tables = ShardedTables(model.embedding, cfg, device)
    model.embedding = tables
    return tables


def _process_group(device: torch.device) -> bool:
    """The default process group (torchrun's), or a one-process one made here (returns True then):
    without torchrun a sharded run is world size 1, everything on this process."""
    if dist.is_initialized():
        return False
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                            world_size=1)
    return True


class _Lookup(nn.Module):
    """What DMP wraps: the EmbeddingCollection alone (so DMP has no dense parameter to wrap in DDP)."""

    def __init__(self, collection: nn.Module):
        super().__init__()
        self.ec = collection

    def forward(self, features):
        return self.ec(features)


class _ScaledGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``scale`` (this rank's share of the
    global batch: the rows' owners sum the ranks' gradients) and replaces a non-finite one by zeros
    (the fused update runs before the step's finiteness decision)."""

    @staticmethod
    def forward(ctx, e: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return e.view_as(e)

    @staticmethod
    def backward(ctx, grad: Tensor):
        scaled = grad * ctx.scale if ctx.scale != 1.0 else grad
        return torch.where(torch.isfinite(grad).all(), scaled, torch.zeros_like(grad)), None


class ShardedTables(nn.Module):
    """``model.embedding`` of a sharded run: ``forward(codes) -> [B, C, d]`` like ``FusedEmbedding``.

    Segment ``i`` of the fused table (rows ``starts[i]:starts[i] + sizes[i]``) is TorchRec table
    ``t{i}``; a feature is a run of adjacent code columns that read the same segment (a categorical
    field, a sequence's elements, or a field followed by the sequence sharing its rows), looked up
    with its codes as row ids. The DMP module is kept out of ``parameters()`` and ``state_dict()``:
    its weights live in FBGEMM's fused kernels, its updates happen in the backward, and
    checkpoints get the gathered table from ``full_table`` instead.
    """

    sharded = True

    def __init__(self, embedding: nn.Module, cfg, device: torch.device):
        super().__init__()
        from fbgemm_gpu.split_embedding_configs import EmbOptimType
        from torchrec import EmbeddingCollection, EmbeddingConfig
        from torchrec.distributed.comm_ops import set_gradient_division
        from torchrec.distributed.embedding import EmbeddingCollectionSharder
        from torchrec.distributed.model_parallel import DistributedModelParallel
        from torchrec.distributed.types import ShardingEnv

        weight = embedding.table.weight.detach()
        self.rows_total, self.dim = weight.shape
        self.register_buffer("offsets", embedding.offsets.clone(), persistent=False)
        column_starts = embedding.offsets.tolist()
        self.starts = sorted(set(column_starts))
        self.sizes = [b - a for a, b in zip(self.starts, self.starts[1:] + [self.rows_total])]
        self.features = _features(column_starts)  # (name, first column, columns)
        feature_tables = [[name for name, col, _ in self.features if column_starts[col] == start]
                          for start in self.starts]
        self.table_names = [f"t{i}" for i in range(len(self.starts))]
        self.device, self.grad_scale = device, 1.0
        self.owns_group = _process_group(device)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        configs = [EmbeddingConfig(name=name, embedding_dim=self.dim, num_embeddings=size, feature_names=feats)
                   for name, size, feats in zip(self.table_names, self.sizes, feature_tables)]
        fused = {"optimizer": getattr(EmbOptimType, FUSED_OPTIMIZERS[cfg.embedding_optimizer]),
                 "learning_rate": cfg.lr, "eps": EPS}
        if cfg.weight_decay:
            from fbgemm_gpu.split_table_batched_embeddings_ops_common import WeightDecayMode

            fused.update(weight_decay=cfg.weight_decay, weight_decay_mode=WeightDecayMode.L2)
        # TorchRec divides the gradients in some backward all-to-alls by the world size (DDP's mean,
        # for a loss that is a local mean on each rank); mtrec scales each rank's by its share of the
        # global batch instead (``grad_scale``, uneven shards included), so the owners must sum.
        set_gradient_division(False)
        sharder = EmbeddingCollectionSharder(fused_params=fused)
        lookup = _Lookup(EmbeddingCollection(tables=configs, device=torch.device("meta")))
        with _quiet():
            plan = _plan(lookup, sharder, cfg.embedding_sharding_plan, self.table_names, self.world, device)
            dmp = DistributedModelParallel(lookup, env=ShardingEnv.from_process_group(dist.GroupMember.WORLD),
                                           device=device, plan=plan, sharders=[sharder])
        # TorchRec's first lookup trips torch.fx's deprecation notice about is_fx_tracing on every rank.
        logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
        object.__setattr__(self, "dmp", dmp)  # not a submodule: no parameters(), state_dict() or .to()
        state = dmp.state_dict()
        self.weights = [state[f"ec.embeddings.{name}.weight"] for name in self.table_names]  # ShardedTensors
        self.plan = plan
        self.load_table(weight)

    # --- the lookup -----------------------------------------------------------------------------
    def rows(self, codes: Tensor) -> Tensor:
        """Global row ids ``[B, C]`` of the fused layout (``FusedEmbedding.rows``)."""
        return codes.long() + self.offsets

    def forward(self, codes: Tensor) -> Tensor:
        from torchrec import KeyedJaggedTensor

        empty = codes.shape[0] == 0
        if empty:  # TorchRec cannot cut an empty batch into rows: look up one row of codes 0, drop it
            codes = codes.new_zeros((1, codes.shape[1]))
        n = codes.shape[0]
        values = torch.cat([codes[:, c:c + k].reshape(-1) for _, c, k in self.features]).long()
        lengths = torch.cat([torch.full((n,), k, dtype=torch.int32, device=codes.device)
                             for _, _, k in self.features])
        features = KeyedJaggedTensor(keys=[f for f, _, _ in self.features], values=values, lengths=lengths, stride=n)
        out = self.dmp(features)
        out = out.wait() if hasattr(out, "wait") else out
        e = torch.cat([out[f].values().view(n, k, self.dim) for f, _, k in self.features], dim=1)
        if empty:
            e = e[:0]
        return _ScaledGrad.apply(e, self.grad_scale) if torch.is_grad_enabled() else e

    # --- where the rows live ------------------------------------------------------------------
    def local_bytes(self) -> int:
        """Bytes of table weights this rank holds."""
        return sum(s.tensor.numel() * s.tensor.element_size() for w in self.weights for s in w.local_shards())

    def set_lr(self, lr: float) -> None:
        optimizer = self.dmp.fused_optimizer
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad()  # TorchRec's fused optimizers hand the group's lr to FBGEMM here

    # --- the unsharded layout (checkpoints) ------------------------------------------------------
    def load_table(self, weight: Tensor) -> None:
        """Every rank copies its shards out of the fused table ``weight`` ``[rows, d]``."""
        with torch.no_grad():
            for w, start in zip(self.weights, self.starts):
                for s in w.local_shards():
                    (r, c), (rows, cols) = s.metadata.shard_offsets, s.metadata.shard_sizes
                    s.tensor.copy_(weight[start + r:start + r + rows, c:c + cols])

    def full_table(self) -> Tensor | None:
        """The fused table ``[rows, d]`` on rank 0, in host memory (None on the others): a
        collective, every rank must call it. Rank 0 holds the whole table (and its pickled shards)."""
        pieces = [(i, *s.metadata.shard_offsets, s.tensor.detach().cpu())
                  for i, w in enumerate(self.weights) for s in w.local_shards()]
        gathered = self._gather(pieces)
        if gathered is None:
            return None
        table = torch.empty((self.rows_total, self.dim))  # in host memory: a GPU need not hold the whole table
        for i, r, c, t in gathered:
            table[self.starts[i] + r:self.starts[i] + r + t.shape[0], c:c + t.shape[1]] = t
        return table

    def _accumulators(self) -> list[tuple[int, object]]:
        """(table index, its row-accumulator ShardedTensor) for the tables with rows on this rank.
        Column-wise shards keep one accumulator per column shard: ``[S * rows]``, shard-major."""
        by_name = {}
        for per_param in self.dmp.fused_optimizer.state.values():
            for key, value in per_param.items():
                if key.endswith(".momentum1"):
                    by_name[key.rsplit(".", 1)[0]] = value
        return [(i, by_name[name]) for i, name in enumerate(self.table_names) if name in by_name]

    def _column_widths(self, i: int) -> list[int]:
        widths = {}
        for m in self.weights[i].metadata().shards_metadata:
            widths[m.shard_offsets[1]] = m.shard_sizes[1]
        return [widths[c] for c in sorted(widths)]

    def full_accumulator(self) -> Tensor | None:
        """The row accumulator ``[rows]`` of rowwise Adagrad in the unsharded layout, on rank 0 in
        host memory (a collective). Column shards' accumulators are averaged with their widths as weights, which
        is the full row's mean square exactly (each shard adds the mean over its own columns)."""
        pieces = [(i, s.metadata.shard_offsets[0], s.tensor.detach().cpu())
                  for i, acc in self._accumulators() for s in acc.local_shards()]
        gathered = self._gather(pieces)
        if gathered is None:
            return None
        flat = [torch.zeros(len(self._column_widths(i)) * size) for i, size in enumerate(self.sizes)]
        for i, offset, t in gathered:
            flat[i][offset:offset + t.numel()] = t
        rows = []
        for i, size in enumerate(self.sizes):
            widths = torch.tensor(self._column_widths(i), dtype=torch.float32)
            rows.append((flat[i].view(-1, size) * widths.unsqueeze(1)).sum(0) / widths.sum())
        return torch.cat(rows)

    def load_accumulator(self, acc: Tensor) -> None:
        """Every rank sets its accumulator shards from the unsharded ``[rows]`` (each column shard
        gets the row's value: exact for table- and row-wise plans)."""
        with torch.no_grad():
            for i, state in self._accumulators():
                for s in state.local_shards():
                    offset, count = s.metadata.shard_offsets[0], s.tensor.numel()
                    index = torch.arange(offset, offset + count) % self.sizes[i]
                    s.tensor.copy_(acc[self.starts[i] + index.to(acc.device)])

    def _gather(self, pieces: list) -> list | None:
        if self.world == 1:
            return pieces
        everyone = [None] * self.world if self.rank == 0 else None
        dist.gather_object(pieces, everyone, dst=0)
        return [p for rank_pieces in everyone for p in rank_pieces] if self.rank == 0 else None

    def close(self) -> None:
        """Destroy the one-process group this module made (torchrun's belongs to the run)."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def _features(column_starts: list[int]) -> list[tuple[str, int, int]]:
    """``(name, first column, columns)`` for each run of adjacent code columns that start at the same
    row of the fused table (read the same segment)."""
    features, col = [], 0
    while col < len(column_starts):
        end = col
        while end < len(column_starts) and column_starts[end] == column_starts[col]:
            end += 1
        features.append((f"c{col}", col, end - col))
        col = end
    return features


def _plan(lookup: nn.Module, sharder, plan_name: str, tables: list[str], world: int, device: torch.device):
    """The sharding plan: TorchRec's planner, restricted to one sharding type unless ``auto``, with
    FBGEMM's fused kernel for every table; computed on rank 0 and broadcast."""
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology

    constraints = {name: ParameterConstraints(sharding_types=PLAN_TYPES[plan_name], compute_kernels=["fused"])
                   for name in tables}
    planner = EmbeddingShardingPlanner(topology=Topology(world_size=world, compute_device=device.type),
                                       constraints=constraints, debug=False)
    return planner.collective_plan(lookup, [sharder], dist.GroupMember.WORLD)


@contextlib.contextmanager
def _quiet():
    """TorchRec's planner logs its plan and several advisory warnings on every rank: silenced."""
    logger = logging.getLogger("torchrec")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


class FusedTableOptimizer:
    """The embedding slot of ``CombinedOptimizer`` for sharded tables: FBGEMM applies the update in
    the backward, so ``step`` does nothing and ``zero_grad`` (called before each step's backward)
    hands the scheduled lr over. Its state dict has ``RowwiseAdagrad``'s layout (``sum`` of the
    whole table's rows, gathered on rank 0: a collective)."""

    def __init__(self, tables: ShardedTables, lr: float, weight_decay: float):
        self.tables = tables
        self.param_groups = [{"params": [], "lr": lr, "eps": EPS, "weight_decay": weight_decay}]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.tables.set_lr(self.param_groups[0]["lr"])

    def step(self) -> None:
        pass

    def state_dict(self) -> dict:
        acc = self.tables.full_accumulator()
        group = {**{k: v for k, v in self.param_groups[0].items() if k != "params"}, "params": [0]}
        return {"state": {0: {"sum": acc}} if acc is not None else {}, "param_groups": [group]}

    def load_state_dict(self, state: dict) -> None:
        self.param_groups[0].update({k: v for k, v in state["param_groups"][0].items() if k != "params"})
        saved = state["state"].get(0, {}).get("sum")
        if saved is not None:
            self.tables.load_accumulator(saved)


class ShardedStepper(Stepper):
    """The step with sharded tables: before each step, the lookup's gradient scale is set to this
    rank's share of the global batch, except in scope ``representation``, whose combined gradient
    already carries it (``Stepper._representation``)."""

    def step(self, codes: Tensor, numeric: Tensor, labels: Tensor, share: float = 1.0,
             diagnose: bool = False) -> Tensor | None:
        self.model.embedding.grad_scale = 1.0 if self.gradients == self._representation else share
        return super().step(codes, numeric, labels, share, diagnose)


def model_state(model: nn.Module, tables: ShardedTables) -> dict | None:
    """The model's state dict in the unsharded layout (the gathered table as
    ``embedding.table.weight``), on rank 0; None elsewhere. A collective."""
    table = tables.full_table()
    if table is None:
        return None
    return {"embedding.table.weight": table, **model.state_dict()}


def load_model_state(model: nn.Module, tables: ShardedTables, state: dict) -> None:
    """Load an unsharded-layout state dict: the table into this rank's shards, the rest strictly."""
    state = dict(state)
    table = state.pop("embedding.table.weight", None)
    if table is None or tuple(table.shape) != (tables.rows_total, tables.dim):
        raise RuntimeError(f"embedding.table.weight missing or of another shape than [{tables.rows_total}, "
                           f"{tables.dim}]")
    model.load_state_dict(state)
    tables.load_table(table)  # each shard copies its slice: the whole table never goes to the device
