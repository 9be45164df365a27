"""Evaluation metrics for binary CTR tasks: AUC, GAUC, LogLoss, NDCG@K, positive rate.

Everything is vectorised torch: it runs on CPU or CUDA tensors, without a Python loop or a
``.item()`` per group. Every metric function returns a 0-dim ``float64`` tensor on the input's
device; only :func:`task_metrics` converts to Python floats (one device sync for all tasks).

Conventions
-----------
Labels
    Binary ``{0, 1}`` (any dtype). The ranking metrics and :func:`positive_rate` count a row as
    positive when ``label > 0.5``; :func:`logloss` uses the label value as given.
Scores
    Any real dtype; only their order matters to AUC, GAUC and NDCG, so logits and probabilities
    give the same values (unless the sigmoid rounds distinct logits to one probability, which
    creates ties). ``float16`` / ``bfloat16`` scores are widened to ``float32`` (exact: the ties
    are exactly those of the input); ``-0.0`` equals ``0.0``. If any score is NaN, AUC, GAUC and
    NDCG are NaN (scikit-learn raises instead).
Ties
    Exactly as scikit-learn. AUC is the Mann-Whitney U statistic with average ranks, i.e. a
    positive and a negative with equal scores count 1/2 (``roc_auc_score``). NDCG averages the
    gains over each run of tied scores (``ndcg_score(..., ignore_ties=False)``, its
    ``_tie_averaged_dcg``). Ties are only ever formed *within* a group: equal scores in two
    different groups never interact.
AUC
    NaN when the labels hold a single class (scikit-learn raises).
GAUC
    ``sum_g n_g * AUC_g / sum_g n_g`` over the groups (users) that hold both a positive and a
    negative row; ``n_g`` is the group's number of impressions (all its rows). Groups with a
    single class -- in particular every single-row group -- are skipped (they have no AUC). NaN
    when no group has both classes.
NDCG@K
    Binary gains (the label), discount ``1 / log2(rank + 1)`` for ranks ``1..K`` and 0 beyond,
    normalised by the ideal DCG (``sum_{r <= min(P_g, K)} 1 / log2(r + 1)``), exactly as
    ``sklearn.metrics.ndcg_score([labels_g], [scores_g], k=K)``. The result is the unweighted mean
    over the groups with at least one positive; groups without a positive (NDCG undefined) are
    not counted. A group whose rows are all positive -- including a single-row group with a
    positive -- scores 1.0 whatever the scores (scikit-learn refuses single-document queries;
    1.0 is the DCG / IDCG value). NaN when no group has a positive.
LogLoss
    Takes logits (what the models output): mean binary cross-entropy
    ``softplus(x) - y * x`` computed in float64, which is stable for any logit. It equals
    ``sklearn.metrics.log_loss(labels, sigmoid(logits))`` except where scikit-learn clips the
    probabilities to ``[eps, 1 - eps]`` (``eps`` = machine epsilon of the probability dtype,
    2.2e-16 for float64): a row whose logit has magnitude above ~36 and the wrong sign costs
    ``|x|`` here but at most ``-log(eps) ~= 36.04`` in scikit-learn. An empty input gives NaN.

Implementation
--------------
Scores become an order-preserving ``int32`` key (the IEEE bits of a ``float32`` score with the
negative range flipped; dense ranks from one extra sort for ``float64`` / integer scores). Group
ids become dense ints (``ids - min`` when their range is below 2^30, else ``torch.unique``'s
inverse -- e.g. hashed ids), and one int64 key ``group << 33 | score << 1 | label`` is sorted
(an integer sort, in place on the CPU; no gather afterwards). Runs of equal ``key >> 1`` are the
tie blocks, never spanning two groups. Only the blocks holding a positive count, so after the sort
everything is sized by the positives: their positions in the sorted keys give the positive
blocks, binary searches in the keys give each such block's bounds and its group's, and the AUC
and DCG sums are per-group cumulative-sum differences (deterministic on CUDA too). Memory: the
sorted keys (8 bytes a row) plus the score key and the dense groups (4 + 4), whatever the number of
tasks; elementwise passes over the rows go in chunks. Counts are int64 (exact U statistics),
gains float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["auc", "gauc", "logloss", "ndcg_at_k", "positive_rate", "task_metrics"]

_NAN = float("nan")
# sort key layout (int64): dense_group << 33 | score_key32 << 1 | label, the score key signed in
# [-2^31, 2^31): lexicographic (group, score, label) order for dense group ids below 2^30
_GROUP_SHIFT = 33
_MAX_GROUPS = 2**30
_CHUNK = 1 << 22  # rows per elementwise pass over row-sized arrays: bounds the temporaries


# --------------------------------------------------------------------------------------------
# helpers


def _check_1d(name: str, t: Tensor, n: int | None = None) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if n is not None and t.shape[0] != n:
        raise ValueError(f"{name} has {t.shape[0]} rows, expected {n}")


def _check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    return k


def _nan(device) -> Tensor:
    return torch.tensor(_NAN, dtype=torch.float64, device=device)


def _has_nan(scores: Tensor) -> Tensor | None:
    """0-dim bool tensor (no sync), or None for dtypes that cannot hold NaN."""
    return torch.isnan(scores).any() if scores.is_floating_point() else None


def _nan_where(value: Tensor, has_nan: Tensor | None) -> Tensor:
    return value if has_nan is None else torch.where(has_nan, torch.full_like(value, _NAN), value)


def _exclusive_cumsum(x: Tensor) -> Tensor:
    """``c`` of length ``len(x) + 1`` with ``c[i] = x[:i].sum()`` (int64 for integer / bool input)."""
    dtype = torch.float64 if x.is_floating_point() else torch.int64
    out = torch.empty(x.shape[0] + 1, dtype=dtype, device=x.device)
    out[0] = 0
    torch.cumsum(x, 0, dtype=dtype, out=out[1:])
    return out


def _score_key(scores: Tensor) -> Tensor:
    """``int32`` key with the order and the ties of ``scores`` (NaNs: unspecified, results masked)."""
    if scores.is_complex():
        raise TypeError("scores must be real")
    if scores.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.bool, torch.uint8, torch.int8,
                        torch.int16):
        f = torch.empty(scores.shape, dtype=torch.float32, device=scores.device).copy_(scores.detach())  # exact
        f += 0.0  # -0.0 becomes +0.0
        bits = f.view(torch.int32)
        # negative floats: flip all but the sign bit, so signed int order == float order
        for i in range(0, bits.shape[0], _CHUNK):
            chunk = bits[i:i + _CHUNK]
            chunk ^= (chunk >> 31) & 0x7FFFFFFF
        return bits
    # float64 / int32 / int64: dense ranks (ties -> equal rank) from one sort
    values, order = torch.sort(scores)
    change = values[1:] != values[:-1]
    ranks_sorted = torch.cat([change.new_zeros(1, dtype=torch.int32), torch.cumsum(change, 0, dtype=torch.int32)])
    return torch.empty_like(ranks_sorted).scatter_(0, order, ranks_sorted)


def _dense_groups(groups: Tensor) -> Tensor:
    """``int32`` dense group ids below 2^30 preserving the order of the ids (4 bytes a row, made in
    chunks); ``_sorted_keys`` shifts them into the keys' top bits."""
    if groups.is_floating_point() or groups.is_complex():
        raise TypeError(f"groups must be integer ids, got {groups.dtype}")
    if groups.numel() == 0:
        return groups.to(torch.int32)
    lo, hi = (int(v) for v in torch.stack(torch.aminmax(groups)).tolist())  # one sync per call
    if hi - lo < _MAX_GROUPS:
        dense = torch.empty(groups.shape, dtype=torch.int32, device=groups.device)
        for i in range(0, groups.shape[0], _CHUNK):
            dense[i:i + _CHUNK] = groups[i:i + _CHUNK].to(torch.int64) - lo
        return dense
    if groups.numel() > _MAX_GROUPS:  # e.g. hashed ids: rank them (at most N distinct)
        raise ValueError(f"at most {_MAX_GROUPS} rows are supported with sparse group ids")
    return torch.unique(groups.to(torch.int64), return_inverse=True)[1].to(torch.int32)


@dataclass
class _Blocks:
    """Tie blocks: runs of equal (group, score) among the rows sorted by group, then score.

    Only the blocks that hold a positive matter to AUC and NDCG, so per-block arrays cover just
    those (``pb_*``, ordered by group then ascending score): ``pos`` / ``cnt`` (positives /
    rows in the block), ``neg_below`` (negatives of the same group with a strictly lower score),
    ``above`` (rows of the same group with a strictly higher score). Per group -- only the groups
    holding a positive, the others have no AUC and no NDCG (with no groups: the one group, always)
    -- ``pos``, ``cnt`` and ``[pb_start, pb_end)``, its range of positive blocks.
    """

    n: int
    pb_pos: Tensor
    pb_cnt: Tensor
    pb_neg_below: Tensor
    pb_above: Tensor
    group_pos: Tensor
    group_cnt: Tensor
    group_pb_start: Tensor
    group_pb_end: Tensor

    def group_sum(self, per_pb: Tensor) -> Tensor:
        """Sum of a per-positive-block quantity within each group (deterministic: a cumsum)."""
        c = _exclusive_cumsum(per_pb)
        return c[self.group_pb_end] - c[self.group_pb_start]


def _sorted_keys(key32: Tensor, pos: Tensor, groups: Tensor | None) -> Tensor:
    """int64 ``[N]`` sorted keys ``group << 33 | score << 1 | label``: the only row-sized array the
    metrics keep (8 bytes a row). Sorted in place on the CPU (NumPy: no index array, no copy)."""
    key = key32.to(torch.int64).bitwise_left_shift_(1)
    for i in range(0, key.shape[0], _CHUNK):  # whole, the bools and group ids would widen to int64 copies
        key[i:i + _CHUNK] += pos[i:i + _CHUNK]
        if groups is not None:
            key[i:i + _CHUNK] += groups[i:i + _CHUNK].to(torch.int64).bitwise_left_shift_(_GROUP_SHIFT)
    if key.device.type == "cpu":
        key.numpy().sort()
        return key
    return torch.sort(key).values


def _positive_rows(keys: Tensor) -> Tensor:
    """Positions of the rows whose label bit is set, in chunks (no row-sized temporary)."""
    parts = [torch.nonzero(keys[i:i + _CHUNK] & 1).squeeze(1) + i for i in range(0, keys.shape[0], _CHUNK)]
    return torch.cat(parts)


def _blocks(key32: Tensor, pos: Tensor, groups: Tensor | None) -> _Blocks:
    """Tie blocks from ``_score_key`` keys, bool ``pos`` and ``_dense_groups`` (or None: one group).

    Everything beyond the sorted keys is sized by the positives: a positive block's bounds, and
    its group's, are binary searches in the sorted keys."""
    n = key32.shape[0]
    keys = _sorted_keys(key32, pos, groups)
    positive = _positive_rows(keys)
    keys >>= 1  # dense_group << 32 | score key: equal values = one tie block
    block_keys, pb_pos = torch.unique_consecutive(keys[positive], return_counts=True)  # [Pb]
    pb_start = torch.searchsorted(keys, block_keys)
    pb_end = torch.searchsorted(keys, block_keys, right=True)
    if groups is None:
        group_ids = torch.zeros(1, dtype=torch.int64, device=keys.device)
        blocks_per_group = pb_pos.new_full((1,), pb_pos.shape[0])
        group_row_start, group_row_end = group_ids, group_ids + n
    else:  # group g holds the keys [g << 32 - 2^31, (g + 1) << 32 - 2^31): the score key is signed
        group_ids, blocks_per_group = torch.unique_consecutive((block_keys + 2**31) >> (_GROUP_SHIFT - 1),
                                                            return_counts=True)
        group_row_start = torch.searchsorted(keys, (group_ids << (_GROUP_SHIFT - 1)) - 2**31)
        group_row_end = torch.searchsorted(keys, ((group_ids + 1) << (_GROUP_SHIFT - 1)) - 2**31)
    group_pb = _exclusive_cumsum(blocks_per_group)
    pb_group = torch.repeat_interleave(torch.arange(group_ids.shape[0], device=keys.device), blocks_per_group)
    cum_pos = _exclusive_cumsum(pb_pos)
    pos_before = cum_pos[:-1] - cum_pos[group_pb[:-1]][pb_group]  # positives of the group below the block
    group_start = group_row_start[pb_group]
    return _Blocks(
        n=n,
        pb_pos=pb_pos,
        pb_cnt=pb_end - pb_start,
        pb_neg_below=(pb_start - group_start) - pos_before,
        pb_above=group_row_end[pb_group] - pb_end,
        group_pos=cum_pos[group_pb[1:]] - cum_pos[group_pb[:-1]],
        group_cnt=group_row_end - group_row_start,
        group_pb_start=group_pb[:-1],
        group_pb_end=group_pb[1:],
    )


def _group_auc(b: _Blocks) -> tuple[Tensor, Tensor]:
    """(AUC per group in float64, NaN where single-class; mask of groups with both classes)."""
    # 2 * U per block: pairs (positive in block, negative below) count 1, tied pairs count 1/2
    twice_u = b.pb_pos * (2 * b.pb_neg_below + (b.pb_cnt - b.pb_pos))
    group_twice_u = b.group_sum(twice_u)
    group_neg = b.group_cnt - b.group_pos
    valid = (b.group_pos > 0) & (group_neg > 0)
    denom = (2 * b.group_pos * group_neg).to(torch.float64)
    return group_twice_u.to(torch.float64) / denom, valid  # 0/0 = NaN for single-class groups


def _gauc_from_blocks(b: _Blocks) -> Tensor:
    aucs, valid = _group_auc(b)
    w = torch.where(valid, b.group_cnt, torch.zeros_like(b.group_cnt)).to(torch.float64)
    num = (torch.where(valid, aucs, torch.zeros_like(aucs)) * w).sum()
    return num / w.sum()  # 0/0 = NaN when no group has both classes


def _ndcg_from_blocks(b: _Blocks, k: int) -> Tensor:
    device = b.pb_pos.device
    k = min(k, b.n)  # no position reaches n: a larger k changes nothing
    ranks = torch.arange(k, dtype=torch.float64, device=device)
    # disc[j] = sum of the first j discounts 1 / log2(rank + 1), rank = 1..j
    disc = _exclusive_cumsum(1.0 / torch.log2(ranks + 2.0))
    # a block occupies the 0-based positions [above, above + cnt) in descending-score order;
    # its rows share the block's mean gain (tie averaging), positions >= k weigh 0
    first = torch.clamp(b.pb_above, max=k)
    last = torch.clamp(b.pb_above + b.pb_cnt, max=k)
    mean_gain = b.pb_pos.to(torch.float64) / b.pb_cnt.to(torch.float64)
    dcg = b.group_sum(mean_gain * (disc[last] - disc[first]))
    idcg = disc[torch.clamp(b.group_pos, max=k)]
    has_pos = b.group_pos > 0
    ndcg = torch.where(has_pos, dcg / torch.where(has_pos, idcg, torch.ones_like(idcg)), torch.zeros_like(dcg))
    return ndcg.sum() / has_pos.sum().to(torch.float64)  # 0/0 = NaN when no group has a positive


def _grouped_inputs(scores: Tensor, labels: Tensor, groups: Tensor | None):
    _check_1d("scores", scores)
    _check_1d("labels", labels, scores.shape[0])
    if groups is not None:
        _check_1d("groups", groups, scores.shape[0])
    return scores.shape[0] == 0


# --------------------------------------------------------------------------------------------
# public metrics


def auc(scores: Tensor, labels: Tensor) -> Tensor:
    """ROC AUC (ties count 1/2, as ``sklearn.metrics.roc_auc_score``); NaN for a single class."""
    if _grouped_inputs(scores, labels, None):
        return _nan(scores.device)
    b = _blocks(_score_key(scores), labels > 0.5, None)
    return _nan_where(_group_auc(b)[0][0], _has_nan(scores))


def gauc(scores: Tensor, labels: Tensor, groups: Tensor) -> Tensor:
    """Impression-weighted mean of per-group AUC over the groups that hold both classes."""
    if groups is None:
        raise ValueError("gauc needs groups")
    if _grouped_inputs(scores, labels, groups):
        return _nan(scores.device)
    b = _blocks(_score_key(scores), labels > 0.5, _dense_groups(groups))
    return _nan_where(_gauc_from_blocks(b), _has_nan(scores))


def ndcg_at_k(scores: Tensor, labels: Tensor, groups: Tensor, k: int) -> Tensor:
    """Mean NDCG@k (binary gains, tie-averaged as ``sklearn.metrics.ndcg_score``) over groups with a positive."""
    k = _check_k(k)
    if groups is None:
        raise ValueError("ndcg_at_k needs groups")
    if _grouped_inputs(scores, labels, groups):
        return _nan(scores.device)
    b = _blocks(_score_key(scores), labels > 0.5, _dense_groups(groups))
    return _nan_where(_ndcg_from_blocks(b, k), _has_nan(scores))


def logloss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean binary cross-entropy of *logits* against labels, in float64 (no probability clipping)."""
    _check_1d("logits", logits)
    _check_1d("labels", labels, logits.shape[0])
    if logits.shape[0] == 0:
        return _nan(logits.device)
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    step = _CHUNK // 4  # float64 copies of a chunk and the loss's temporaries (~5 of them): 32 MiB each
    for i in range(0, logits.shape[0], step):
        total += torch.nn.functional.binary_cross_entropy_with_logits(
            logits[i:i + step].to(torch.float64), labels[i:i + step].to(torch.float64), reduction="sum")
    return total / logits.shape[0]


def positive_rate(labels: Tensor) -> Tensor:
    """Fraction of rows with ``label > 0.5`` (float64, NaN when empty)."""
    if labels.numel() == 0:
        return _nan(labels.device)
    return (labels > 0.5).sum(dtype=torch.float64) / labels.numel()


def task_metrics(logits: Tensor, labels: Tensor, groups: Tensor | None = None, k: int = 10) -> list[dict]:
    """Per task (column): ``{auc, gauc, logloss, ndcg@k, positive_rate, n}`` as Python numbers.

    ``logits`` and ``labels`` are ``[N, T]`` (or ``[N]`` for one task); ``groups`` is ``[N]``
    user ids or None, in which case ``gauc`` and ``ndcg@k`` are None. The dense group ids are
    computed once for all tasks, and GAUC and NDCG share one sort per task.
    """
    k = _check_k(k)
    if logits.dim() == 1:
        logits = logits.unsqueeze(1)
    if labels.dim() == 1:
        labels = labels.unsqueeze(1)
    if logits.dim() != 2 or logits.shape != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} must both be [N, T]")
    n, num_tasks = logits.shape
    if groups is not None:
        _check_1d("groups", groups, n)
    dense = _dense_groups(groups) if groups is not None and n > 0 else None
    rows = []
    for t in range(num_tasks):
        if n == 0:
            rows.append(torch.full((5,), _NAN, dtype=torch.float64, device=logits.device))
            continue
        s, y = logits[:, t], labels[:, t]
        key, pos, has_nan = _score_key(s), y > 0.5, _has_nan(s)
        ranking = [_group_auc(_blocks(key, pos, None))[0][0]]
        if dense is not None:
            b = _blocks(key, pos, dense)
            ranking += [_gauc_from_blocks(b), _ndcg_from_blocks(b, k)]
        else:
            ranking += [_nan(s.device), _nan(s.device)]
        rows.append(torch.cat([_nan_where(torch.stack(ranking), has_nan),
                               torch.stack([logloss(s, y), positive_rate(y)])]))
    table = torch.stack(rows).cpu().tolist() if rows else []
    grouped = groups is not None
    return [{"auc": a, "gauc": ga if grouped else None, "logloss": ll,
             f"ndcg@{k}": nd if grouped else None, "positive_rate": pr, "n": n}
            for a, ga, nd, ll, pr in table]
