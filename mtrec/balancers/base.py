"""The balancer contract (docs/balancers.md, "Two kinds").

Two kinds share one registry:

- ``LossBalancer``: turns the T task losses into one scalar; the engine does one backward.
- ``GradBalancer``: ``combine(grads) -> combined``. ``grads[k]`` has shape ``[T, *shape_k]``
  (row t = task t's gradient of shared tensor k, fp32); the result is a list of tensors of
  shape ``shape_k``. The engine computes the per-task gradients for the chosen scope, calls
  ``combine`` once per step, and writes the result back before the optimizer step.

Balancers are ``torch.nn.Module``s so that all their state (moving averages, learned weights,
their own little optimizers' moments, step counters) lives in buffers and parameters, moves with
``.to(device)`` and round-trips through ``state_dict()`` / ``load_state_dict()`` and therefore
through checkpoints. Parameters of a balancer (e.g. UW's log-variances) are trained by the
engine's optimizer without weight decay. Nothing in a step may synchronise with the host
(no ``.item()``, no ``.cpu()``, no Python branching on tensor values).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import ClassVar

import torch
from torch import Tensor

from mtrec.core.errors import UserError


class Balancer(torch.nn.Module):
    name: ClassVar[str] = ""
    kind: ClassVar[str] = ""  # "loss" or "grad"
    paper: ClassVar[str] = ""
    # Scope used when the user does not pass --balance-scope ("shared", "all", "representation").
    default_scope: ClassVar[str] = "shared"
    # Scopes the method can run in (DB-MTL keeps per-coordinate state, so only fixed shapes).
    scopes: ClassVar[tuple[str, ...]] = ("shared", "all", "representation")
    # Why a scope outside ``scopes`` is refused, said with the refusal (CoGrad's exact Hessian form).
    scope_reason: ClassVar[str] = ""
    # True when the balancer needs the current losses (GradNorm, DB-MTL, IMTL, DWA ...).
    needs_losses: ClassVar[bool] = False

    # Prefixes of buffers sized at the first combine (one EMA per shared tensor ...).
    lazy_buffers: ClassVar[tuple[str, ...]] = ()
    # The task weights the last weigh / combine applied, [T], where the method has them (loss
    # weights; the Gram methods' alpha; None for MetaBalance, GradCraft's ... per-tensor rules).
    # Logged with the diagnostics and plotted; never read by the step.
    applied: Tensor | None = None

    def __init__(self, num_tasks: int):
        super().__init__()
        self.num_tasks = num_tasks

    def snapshot(self) -> dict[str, Tensor]:
        """Copies of every buffer, taken before a step so that ``restore`` can undo what ``weigh`` /
        ``combine`` changed when the engine then skips the step (non-finite gradients)."""
        return {name: buf.clone() for name, buf in self.named_buffers()}

    def restore(self, snapshot: dict[str, Tensor]) -> None:
        """Put the buffers back as ``snapshot`` holds them; buffers made since (lazily sized state
        created by the skipped step) are removed, so the balancer is exactly as before."""
        for name in [n for n, _ in self.named_buffers()]:
            owner, _, leaf = name.rpartition(".")
            module = self.get_submodule(owner)
            if name in snapshot:
                module._buffers[leaf] = snapshot[name]
            else:
                del module._buffers[leaf]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A fresh balancer has not sized its lazy buffers yet: take their shapes from the checkpoint.
        _materialise_lazy_buffers(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class LossBalancer(Balancer):
    kind = "loss"
    # True when the balancer wants the losses re-evaluated on the same batch after the
    # optimizer step (FAMO); the engine then calls ``after_step``.
    needs_lookahead: ClassVar[bool] = False

    def weigh(self, losses: Tensor) -> Tensor:
        """losses: ``[T]`` graph-attached batch-mean losses. Returns the scalar to backward."""
        raise NotImplementedError

    def after_step(self, losses: Tensor) -> None:
        """Only called when ``needs_lookahead``: the ``[T]`` losses after the optimizer step."""


class GradBalancer(Balancer):
    kind = "grad"
    # Granularity of a per-group method when the user does not pass --balance-groups: "part" (each
    # expert's slice, each field's rows: ``combine`` then gets ``parts``) or "tensor". None: the
    # method works on the whole balanced vector at once, so grouping does not apply.
    default_groups: ClassVar[str | None] = None
    # True when ``combine`` gives each row the same result while the rows of its gradients (dim 1,
    # the samples in scope ``representation``) are split over processes: it reads the rows only
    # through the sums over them that the helpers below form (``gram_matrix``, ``tensor_grams``,
    # ``parts.group_norms`` / ``group_grams``), which ``rows_split`` sums over the ranks, and
    # otherwise row by row (a weighted sum of the tasks, an elementwise rule). False: such a
    # balancer runs in scope representation in one process only (the engine refuses it).
    split_rows: ClassVar[bool] = False
    # True when ``combine`` needs the engine's Hessian-vector products (CoGrad's exact form): the
    # engine then passes ``hvp=`` (mtrec/engine/hvp.py), with the batch's graph and the optimizer's lr.
    needs_hvp: ClassVar[bool] = False

    def combine(self, grads: list[Tensor], losses: Tensor | None = None, parts=None) -> list[Tensor]:
        """grads[k]: ``[T, *shape_k]``; losses: detached ``[T]`` (given when ``needs_losses``);
        parts: a ``parts.Parts`` when the engine balances per part (per tensor when None)."""
        raise NotImplementedError

    def head_scales(self) -> Tensor | None:
        """Per-task factors ``[T]`` for the task-specific parameters' gradients, from the last
        ``combine``, where the method's reference scales them (Nash-MTL's and MGDA's alpha_t,
        IMTL-L's e^{s_t}, DB-MTL's log-loss gradient); None: each head gets its own raw gradient."""
        return getattr(self, "_head_scales", None)


# --- helpers shared by the balancers ------------------------------------------------------


def _materialise_lazy_buffers(module: Balancer, state_dict, prefix: str) -> None:
    """Create the lazily-sized buffers a checkpoint holds but a fresh balancer has not made yet.

    Buffers whose shape depends on the gradients (one EMA per shared tensor ...) are created on
    the first ``combine``; a fresh balancer that loads a checkpoint takes their shapes from it.
    Only names starting with one of ``module.lazy_buffers`` are created, and only while the
    balancer's own copy is missing or still empty (a shape clash otherwise stays torch's error).
    """
    device = next((b.device for b in module.buffers(recurse=False)), None)
    for key, value in state_dict.items():
        name = key[len(prefix):]
        if not key.startswith(prefix) or "." in name:
            continue
        if not any(name.startswith(p) for p in module.lazy_buffers):
            continue
        current = module._buffers.get(name)
        if current is None or current.numel() == 0:
            dtype = current.dtype if current is not None else value.dtype
            module.register_buffer(name, torch.zeros(value.shape, dtype=dtype, device=device or value.device))


def lazy_state(balancer: Balancer, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """The lazily-sized buffer ``name`` (``[0, ...]`` until the first combine) with ``shape``."""
    buf = getattr(balancer, name)
    if buf.shape[0] == 0:
        buf = torch.zeros(shape, dtype=buf.dtype, device=like.device)
        setattr(balancer, name, buf)
    elif buf.shape != shape:
        raise UserError(f"{balancer.name}: its state {name} has shape {tuple(buf.shape)} but these gradients "
                        f"need {shape}: the balanced tensors changed (resume with the same model and scope)")
    return buf


def require_losses(balancer: Balancer, losses: Tensor | None) -> Tensor:
    if losses is None:
        raise ValueError(f"balancer {balancer.name!r} needs the task losses: call combine(grads, losses)")
    return losses.detach().float()


def register_adam_state(balancer: Balancer, logits: Tensor) -> None:
    """The buffers ``adam_step_`` trains: ``logits`` (initial values given) and Adam's moments."""
    balancer.register_buffer("logits", logits)
    balancer.register_buffer("exp_avg", torch.zeros_like(logits))
    balancer.register_buffer("exp_avg_sq", torch.zeros_like(logits))
    balancer.register_buffer("steps", torch.zeros((), dtype=torch.long))


def adam_step_(balancer: Balancer, grad: Tensor, betas=(0.9, 0.999), eps: float = 1e-8) -> None:
    """One Adam step on ``balancer.logits`` with ``grad``, moments in the balancer's buffers
    ``exp_avg``, ``exp_avg_sq``, ``steps`` (so they live in its state_dict). GradNorm and FAMO
    train their task weights this way, beside the engine's optimizer."""
    beta1, beta2 = betas
    balancer.steps += 1
    balancer.exp_avg.mul_(beta1).add_((1 - beta1) * grad)
    balancer.exp_avg_sq.mul_(beta2).add_((1 - beta2) * grad * grad)
    t = balancer.steps.float()
    m_hat = balancer.exp_avg / (1 - beta1**t)
    v_hat = balancer.exp_avg_sq / (1 - beta2**t)
    balancer.logits.sub_(balancer.lr * m_hat / (v_hat.sqrt() + eps))


# --- Gram matrix and aggregation -------------------------------------------------------------
# Every Gram-based method is a *weighting* (T x T Gram -> T task coefficients) followed by the
# same *aggregation* (sum_t alpha_t g_t per tensor). Norms, Grams and solves run in fp32 or fp64,
# whatever the gradients' dtype; the combined gradient comes back in the gradients' dtype.


@contextlib.contextmanager
def exact_matmul(x: Tensor) -> Iterator[None]:
    """TF32 off while we form Gram matrices and combinations (the engine turns it on for the
    model on CUDA; a 10-bit mantissa would flip the sign of near-orthogonal inner products)."""
    if not x.is_cuda:
        yield
        return
    matmul = torch.backends.cuda.matmul
    previous = matmul.allow_tf32
    matmul.allow_tf32 = False
    try:
        yield
    finally:
        matmul.allow_tf32 = previous


def rows(g: Tensor) -> Tensor:
    """``[T, *shape]`` -> ``[T, N]`` in fp32 (no copy when already fp32 and contiguous)."""
    return g.reshape(g.shape[0], -1).float()


_GRAM_CHUNK = 8192


def _gram(r: Tensor) -> Tensor:
    """``r @ r.T`` for a wide ``[T, N]`` matrix. A T x T result from one long reduction runs far
    below memory bandwidth on CPU; as a batch of chunk products summed it measured 2.2-2.6x faster
    (N = 0.5M and 5M, T = 3, docs/benchmarks.md)."""
    T, N = r.shape
    chunks = N // _GRAM_CHUNK
    if chunks < 2:
        return r @ r.T
    head = r[:, : chunks * _GRAM_CHUNK].reshape(T, chunks, _GRAM_CHUNK).transpose(0, 1)
    out = torch.bmm(head, head.transpose(1, 2)).sum(0)
    tail = r[:, chunks * _GRAM_CHUNK:]
    return out.addmm_(tail, tail.T) if tail.shape[1] else out


# Rows split over processes (scope representation under torchrun): each rank holds its samples'
# rows of the gradients. Inside ``rows_split(reduce)`` the helpers that sum over rows (Grams,
# squared norms) pass their result through ``reduce`` (an all-reduce: T^2 or T numbers per
# tensor), so a balancer with ``split_rows`` sees the global batch's statistics on every rank.
_ROW_SUM: ContextVar[Callable[[Tensor], Tensor] | None] = ContextVar("mtrec_row_sum", default=None)


@contextlib.contextmanager
def rows_split(reduce: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """While inside, ``row_sum`` sums a statistic over the processes that hold the other rows."""
    token = _ROW_SUM.set(reduce)
    try:
        yield
    finally:
        _ROW_SUM.reset(token)


def rows_are_split() -> bool:
    """Whether the rows are split over processes (inside ``rows_split``)."""
    return _ROW_SUM.get() is not None


def row_sum(stat: Tensor) -> Tensor:
    """A sum over this process's rows made the sum over every process's rows (itself in one process)."""
    reduce = _ROW_SUM.get()
    return stat if reduce is None else reduce(stat)


def tensor_grams(grads: list[Tensor]) -> Tensor:
    """Per shared tensor k, the task Gram matrix ``G_k G_k^T``: ``[K, T, T]`` fp32."""
    with exact_matmul(grads[0]):
        return row_sum(torch.stack([_gram(r) for r in map(rows, grads)]))


def gram_matrix(grads: list[Tensor]) -> Tensor:
    """``G G^T`` of the flattened, concatenated gradients, as a sum over tensors (no concat)."""
    with exact_matmul(grads[0]):
        total = None
        for r in map(rows, grads):
            total = _gram(r) if total is None else total.add_(_gram(r))
        return row_sum(total)


def weighted_sum(grads: list[Tensor], weights: Tensor) -> list[Tensor]:
    """``sum_t weights[t] * grads[k][t]`` per tensor; ``weights`` is ``[T]`` or per tensor ``[K, T]``."""
    out = []
    with exact_matmul(grads[0]):
        for k, g in enumerate(grads):
            w = (weights if weights.dim() == 1 else weights[k]).to(device=g.device, dtype=torch.float32)
            out.append((w @ rows(g)).reshape(g.shape[1:]).to(g.dtype))
    return out


def small_dtype(x: Tensor) -> torch.dtype:
    """dtype for the T x T algebra (solves, eigen-decompositions): fp64 where the device has it."""
    return torch.float32 if x.device.type == "mps" else torch.float64


class GramBalancer(GradBalancer):
    """A weighting of the T x T Gram matrix, aggregated as ``sum_t alpha_t g_t`` per tensor.

    Subclasses implement ``weights(gram, losses) -> alpha [T]``; the Gram is formed once per step
    (one ``[T, N] @ [N, T]`` product per tensor), never a T^2 loop over tensors.
    ``alpha_on_heads``: the reference backpropagates ``sum_t alpha_t L_t``, so the task-specific
    parameters get ``alpha_t g_t`` too (``head_scales``).
    """

    alpha_on_heads: ClassVar[bool] = False

    def weights(self, gram: Tensor, losses: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def combine(self, grads: list[Tensor], losses: Tensor | None = None, parts=None) -> list[Tensor]:
        alpha = self.weights(gram_matrix(grads), losses)
        self.applied = alpha.detach()
        if self.alpha_on_heads:
            self._head_scales = alpha.float()
        return weighted_sum(grads, alpha)


# --- hyperparameter checking -----------------------------------------------------------------
# build() receives values already typed by the config reader (TOML literals): numbers, strings,
# lists. Ints are accepted where floats are expected; bools never count as numbers. Intervals
# are written as in the messages: "[0, 1)", "[0, inf)", "(0, inf)".


def _in_interval(x: float, interval: str) -> bool:
    low, high = (float(part) for part in interval[1:-1].split(","))
    above = low <= x if interval[0] == "[" else low < x
    below = x <= high if interval[-1] == "]" else x < high
    return math.isfinite(x) and above and below


def _number(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def check_real(owner: str, name: str, value: object, interval: str) -> float:
    """``value`` as a float inside ``interval``, else a UserError naming the range."""
    x = _number(value)
    if x is None or not _in_interval(x, interval):
        raise UserError(f"{owner}: {name} must be a number in {interval}, got {value!r}")
    return x


def check_int(owner: str, name: str, value: object, interval: str) -> int:
    x = _number(value)
    if x is None or not _in_interval(x, interval) or x != int(x):
        raise UserError(f"{owner}: {name} must be an integer in {interval}, got {value!r}")
    return int(x)


def check_choice(owner: str, name: str, value: object, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise UserError(f"{owner}: {name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def check_reals(owner: str, name: str, value: object, length: int, interval: str,
                scalar_ok: bool = False) -> list[float]:
    """``length`` numbers in ``interval`` (one per task); a scalar is broadcast when ``scalar_ok``.

    A comma-separated string (``"1,0.5,0.5"``) counts as a list.
    """
    if isinstance(value, str) and "," in value:
        value = [part.strip() for part in value.split(",")]
    if scalar_ok and _number(value) is not None:
        value = [value] * length
    what = f"{'a number or ' if scalar_ok else ''}a list of {length} numbers (one per task) in {interval}"
    if not isinstance(value, (list, tuple)) or len(value) != length:
        raise UserError(f"{owner}: {name} must be {what}, got {value!r}")
    xs = [_number(v) for v in value]
    if any(x is None or not _in_interval(x, interval) for x in xs):
        raise UserError(f"{owner}: {name} must be {what}, got {value!r}")
    return [float(x) for x in xs]  # type: ignore[arg-type]
