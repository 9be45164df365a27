"""mtrec.metrics.functional against scikit-learn (and brute-force per-group loops) on data with many ties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss, ndcg_score, roc_auc_score

from mtrec.metrics import functional as M

TOL = 1e-6

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# ---------------------------------------------------------------------------------------------
# data and brute-force references


def make_data(seed: int, decimals: int, n_groups: int = 400):
    """Groups of varying sizes (many single-row groups), per-group positive rates from a Beta so
    that all-positive and all-negative groups occur, scores rounded to ``decimals`` (many ties,
    within and across groups) and group ids that are large, negative and non-contiguous."""
    rng = np.random.default_rng(seed)
    sizes = rng.choice([1, 1, 1, 2, 3, 4, 7, 12, 30, 80], size=n_groups)
    ids = rng.choice(np.arange(-(2**40), 2**40, 2**27, dtype=np.int64), size=n_groups, replace=False)
    groups = np.repeat(ids, sizes)
    rates = np.repeat(rng.beta(0.6, 1.2, size=n_groups), sizes)
    labels = (rng.random(groups.shape[0]) < rates).astype(np.float32)
    # informative but noisy scores, then rounded: lots of exact ties
    raw = 1 / (1 + np.exp(-(1.2 * labels + rng.normal(size=labels.shape[0]))))
    scores = np.round(raw, decimals).astype(np.float32)
    perm = rng.permutation(groups.shape[0])  # rows of a group are not contiguous
    return scores[perm], labels[perm], groups[perm]


def _memo(fn):
    """Cache a reference by the bytes of its array arguments (the loops dominate the test time)."""
    cache = {}

    def wrapped(*args):
        key = tuple(a.tobytes() + str(a.dtype).encode() if isinstance(a, np.ndarray) else a for a in args)
        if key not in cache:
            cache[key] = fn(*args)
        return cache[key]

    return wrapped


@_memo
def ref_gauc(scores, labels, groups):
    num = den = 0.0
    for g in np.unique(groups):
        m = groups == g
        y = labels[m]
        if y.min() == y.max():
            continue  # single class (incl. single-row groups): skipped
        num += m.sum() * roc_auc_score(y, scores[m])
        den += m.sum()
    return num / den


@_memo
def ref_ndcg(scores, labels, groups, k):
    vals = []
    for g in np.unique(groups):
        m = groups == g
        y = labels[m]
        if y.sum() == 0:
            continue  # no positive: not counted
        if m.sum() == 1:
            vals.append(1.0)  # sklearn refuses one document; DCG / IDCG = 1
        else:
            vals.append(ndcg_score([y], [scores[m].astype(np.float64)], k=k))
    return float(np.mean(vals))


def t(x, device="cpu"):
    return torch.as_tensor(x, device=device)


CASES = [(0, 1), (1, 2), (2, 1)]


@pytest.fixture(scope="module", params=CASES, ids=[f"seed{s}-dec{d}" for s, d in CASES])
def data(request):
    s, y, g = make_data(*request.param)
    # the data really exercises the tie / skip paths
    assert len(np.unique(s)) < len(s) // 10
    counts = {u: c for u, c in zip(*np.unique(g, return_counts=True))}
    assert sum(c == 1 for c in counts.values()) > 50
    per_group_rate = {u: y[g == u].mean() for u in counts if counts[u] > 1}
    assert any(r == 0 for r in per_group_rate.values()) and any(r == 1 for r in per_group_rate.values())
    return s, y, g


# ---------------------------------------------------------------------------------------------
# against scikit-learn on random tied data


@pytest.mark.parametrize("device", DEVICES)
def test_auc_matches_sklearn(data, device):
    s, y, g = data
    got = M.auc(t(s, device), t(y, device))
    assert got.dtype == torch.float64 and got.dim() == 0 and got.device.type == device
    assert abs(got.item() - roc_auc_score(y, s)) < TOL


def test_ties_matter_in_this_data(data):
    # guard: a good share of (positive, negative) pairs are tied, overall and within groups, so an
    # implementation that scored ties as 0 or 1 instead of 1/2 would be off by far more than TOL
    s, y, g = data

    def tied_share(keys):
        _, inv = np.unique(keys, axis=0, return_inverse=True)
        pos, neg = np.bincount(inv, weights=y), np.bincount(inv, weights=1 - y)
        return (pos * neg).sum()

    p, n = y.sum(), len(y) - y.sum()
    assert tied_share(s[:, None]) / (p * n) > 0.005
    assert tied_share(np.stack([s.astype(np.float64), g.astype(np.float64)], 1)) > 100


def test_logloss_matches_sklearn():
    rng = np.random.default_rng(3)
    logits = (rng.normal(size=5000) * 4).astype(np.float32)  # moderate: |x| < ~20, no sklearn clipping
    y = (rng.random(5000) < 0.3).astype(np.float32)
    got = M.logloss(t(logits), t(y))
    assert got.dtype == torch.float64
    ref = log_loss(y, 1 / (1 + np.exp(-logits.astype(np.float64))))
    assert abs(got.item() - ref) < TOL


def test_logloss_stable_for_large_logits():
    got = M.logloss(torch.tensor([200.0, -200.0, 0.0]), torch.tensor([0.0, 1.0, 1.0]))
    assert abs(got.item() - (200 + 200 + math.log(2)) / 3) < 1e-9


@pytest.mark.parametrize("device", DEVICES)
def test_gauc_matches_bruteforce(data, device):
    s, y, g = data
    got = M.gauc(t(s, device), t(y, device), t(g, device))
    assert got.dtype == torch.float64 and got.device.type == device
    assert abs(got.item() - ref_gauc(s, y, g)) < TOL


@pytest.mark.parametrize("k", [1, 3, 10])
@pytest.mark.parametrize("device", DEVICES)
def test_ndcg_matches_sklearn(data, k, device):
    s, y, g = data
    got = M.ndcg_at_k(t(s, device), t(y, device), t(g, device), k)
    assert got.dtype == torch.float64 and got.device.type == device
    assert abs(got.item() - ref_ndcg(s, y, g, k)) < TOL


def test_row_order_does_not_matter(data):
    s, y, g = data
    perm = np.random.default_rng(9).permutation(len(s))
    for fn in (lambda *a: M.gauc(*a), lambda *a: M.ndcg_at_k(*a, 3)):
        a = fn(t(s), t(y), t(g)).item()
        b = fn(t(s[perm]), t(y[perm]), t(g[perm])).item()
        assert abs(a - b) < 1e-12


# ---------------------------------------------------------------------------------------------
# hand-made cases and edge cases


def test_auc_single_class_is_nan():
    s = torch.tensor([0.1, 0.4, 0.4])
    assert math.isnan(M.auc(s, torch.zeros(3)).item())
    assert math.isnan(M.auc(s, torch.ones(3)).item())
    assert math.isnan(M.auc(torch.tensor([]), torch.tensor([])).item())


def test_auc_ties_count_half():
    # one positive tied with one negative, above another negative: (1 + 0.5) / 2
    assert M.auc(torch.tensor([0.3, 0.3, 0.1]), torch.tensor([1, 0, 0])).item() == 0.75
    assert M.auc(torch.tensor([0.3, 0.3]), torch.tensor([1.0, 0.0])).item() == 0.5


def test_gauc_weighting_and_skipped_groups():
    # group 7: 3 rows, AUC 1; group 9: 2 rows, AUC 0  -> impression-weighted (3*1 + 2*0) / 5
    s = [0.1, 0.2, 0.3, 0.9, 0.1]
    y = [0, 1, 1, 0, 1]
    g = [7, 7, 7, 9, 9]
    base = M.gauc(t(s), t(y), t(g)).item()
    assert abs(base - 0.6) < 1e-12
    # a single-row group (either class) and an all-negative / all-positive group change nothing
    s2 = s + [0.5, 0.6, 0.2, 0.4, 0.4, 0.8]
    y2 = y + [1, 0, 0, 0, 1, 1]
    g2 = g + [1, 2, 3, 3, 4, 4]
    assert abs(M.gauc(t(s2), t(y2), t(g2)).item() - 0.6) < 1e-12
    # no group with both classes -> NaN
    assert math.isnan(M.gauc(t([0.1, 0.2, 0.3]), t([1, 0, 0]), t([1, 2, 3])).item())


def test_equal_scores_in_different_groups_do_not_tie():
    # float32 scores; the max of group 0 equals the min of group 1 (adjacent after sorting by
    # (group, score)) and both groups have AUC 1, NDCG 1.
    s = torch.tensor([0.5, 0.1, 0.9, 0.5], dtype=torch.float32)
    y = torch.tensor([1, 0, 1, 0])
    g = torch.tensor([0, 0, 1, 1])
    assert M.gauc(s, y, g).item() == 1.0
    assert M.ndcg_at_k(s, y, g, 1).item() == 1.0
    # and with negatives on top: both groups AUC 0
    assert M.gauc(s, 1 - y, g).item() == 0.0


def test_float32_ties_across_many_groups():
    # few distinct float32 values shared by every group; compare against the per-group loop
    rng = np.random.default_rng(5)
    g = np.repeat(np.arange(300), rng.integers(1, 9, size=300))
    s = (rng.integers(0, 4, size=len(g)) / np.float32(7)).astype(np.float32)
    y = (rng.random(len(g)) < 0.4).astype(np.float32)
    assert abs(M.gauc(t(s), t(y), t(g)).item() - ref_gauc(s, y, g)) < TOL
    assert abs(M.ndcg_at_k(t(s), t(y), t(g), 3).item() - ref_ndcg(s, y, g, 3)) < TOL


def test_ndcg_hand_cases():
    # group 0: single positive row -> 1; group 1: positive ranked second -> 1/log2(3);
    # group 2: no positive -> not counted
    s = t([0.3, 0.2, 0.8, 0.5, 0.6])
    y = t([1, 1, 0, 0, 0])
    g = t([0, 1, 1, 2, 2])
    assert abs(M.ndcg_at_k(s, y, g, 10).item() - (1 + 1 / math.log2(3)) / 2) < 1e-12
    assert abs(M.ndcg_at_k(s, y, g, 1).item() - 0.5) < 1e-12
    # a tie straddling the cut-off: gain averaged over the tied rows (sklearn's _tie_averaged_dcg)
    s = t([0.5, 0.5, 0.5, 0.1])
    y = t([1, 0, 0, 1])
    g = t([0, 0, 0, 0])
    ref = ndcg_score([[1, 0, 0, 1]], [[0.5, 0.5, 0.5, 0.1]], k=1)
    assert abs(M.ndcg_at_k(s, y, g, 1).item() - ref) < 1e-12
    assert abs(ref - 1 / 3) < 1e-12
    assert math.isnan(M.ndcg_at_k(t([0.1, 0.2]), t([0, 0]), t([1, 1]), 3).item())
    with pytest.raises(ValueError):
        M.ndcg_at_k(s, y, g, 0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_scores(dtype):
    s, y, g = make_data(4, 4, n_groups=200)  # 4 decimals: the half cast itself creates the ties
    s_half = torch.from_numpy(s).to(dtype)
    s_ref = s_half.float().numpy()  # the values the metric actually sees (exact widening)
    assert len(np.unique(s_ref)) < 0.7 * len(np.unique(s))
    assert abs(M.auc(s_half, t(y)).item() - roc_auc_score(y, s_ref)) < TOL
    assert abs(M.gauc(s_half, t(y), t(g)).item() - ref_gauc(s_ref, y, g)) < TOL
    assert abs(M.ndcg_at_k(s_half, t(y), t(g), 3).item() - ref_ndcg(s_ref, y, g, 3)) < TOL
    ll = M.logloss(s_half, t(y))
    assert ll.dtype == torch.float64
    assert abs(ll.item() - log_loss(y, 1 / (1 + np.exp(-s_ref.astype(np.float64))))) < TOL


def test_score_dtypes_and_signs(data):
    # negative float32 (sign-flipped key), float64 and int64 (rank keys) give the sklearn values
    s, y, g = data
    variants = {
        "f32-negative": (s - np.float32(0.55)).astype(np.float32),
        "f64": s.astype(np.float64) * 1e-3 - 0.5,
        "i64": np.round(s * 100).astype(np.int64) - 40,
    }
    for name, v in variants.items():
        # each variant is a strictly increasing map of s (same order, same ties) ...
        order = np.argsort(s, kind="stable")
        assert (np.sign(np.diff(v[order].astype(np.float64))) == np.sign(np.diff(s[order]))).all(), name
        # ... so per-group metrics equal the (reference-checked) float32 ones, and AUC is sklearn's
        assert abs(M.auc(t(v), t(y)).item() - roc_auc_score(y, v)) < TOL, name
        assert abs(M.gauc(t(v), t(y), t(g)).item() - ref_gauc(s, y, g)) < TOL, name
        assert abs(M.ndcg_at_k(t(v), t(y), t(g), 3).item() - ref_ndcg(s, y, g, 3)) < TOL, name


def test_negative_zero_ties_with_zero():
    s = torch.tensor([-0.0, 0.0, -1.0, 1.0])
    y = torch.tensor([1, 0, 0, 1])
    assert M.auc(s, y).item() == roc_auc_score([1, 0, 0, 1], [-0.0, 0.0, -1.0, 1.0]) == 0.875


def test_group_id_ranges(data):
    # dense small ids (offset path) and ids spanning the whole int64 range (unique path) agree
    s, y, g = data
    _, dense = np.unique(g, return_inverse=True)
    spread = np.where(dense % 2 == 0, np.iinfo(np.int64).min + dense, np.iinfo(np.int64).max - dense)
    for ids in (dense.astype(np.int64), dense.astype(np.int32) + 5, spread):
        assert abs(M.gauc(t(s), t(y), t(ids)).item() - ref_gauc(s, y, g)) < TOL
        assert abs(M.ndcg_at_k(t(s), t(y), t(ids), 10).item() - ref_ndcg(s, y, g, 10)) < TOL


def test_nan_scores_give_nan():
    s = torch.tensor([0.1, float("nan"), 0.3, 0.4])
    y = torch.tensor([0, 1, 0, 1])
    g = torch.tensor([0, 0, 1, 1])
    assert math.isnan(M.auc(s, y).item())
    assert math.isnan(M.gauc(s, y, g).item())
    assert math.isnan(M.ndcg_at_k(s, y, g, 2).item())


def test_positive_rate():
    assert M.positive_rate(torch.tensor([1, 0, 0, 1], dtype=torch.uint8)).item() == 0.5
    assert M.positive_rate(torch.tensor([1.0, 0.0, 0.0, 0.0])).dtype == torch.float64


def test_shape_errors():
    with pytest.raises(ValueError):
        M.auc(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError):
        M.gauc(torch.zeros(3), torch.zeros(3), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError):
        M.task_metrics(torch.zeros(3, 2), torch.zeros(3, 3))


# ---------------------------------------------------------------------------------------------
# task_metrics


def test_task_metrics(data):
    s, y, g = data
    rng = np.random.default_rng(11)
    logits = np.stack([s, rng.normal(size=len(s)).astype(np.float32)], 1)
    labels = np.stack([y, (rng.random(len(s)) < 0.1).astype(np.float32)], 1)
    rows = M.task_metrics(t(logits), t(labels).to(torch.uint8), t(g), k=3)
    assert len(rows) == 2
    for j, row in enumerate(rows):
        lj, yj = logits[:, j], labels[:, j]
        assert set(row) == {"auc", "gauc", "logloss", "ndcg@3", "positive_rate", "n"}
        assert all(type(row[key]) is float for key in row if key != "n") and row["n"] == len(s)
        assert abs(row["auc"] - roc_auc_score(yj, lj)) < TOL
        assert abs(row["gauc"] - ref_gauc(lj, yj, g)) < TOL
        assert abs(row["ndcg@3"] - ref_ndcg(lj, yj, g, 3)) < TOL
        assert abs(row["logloss"] - log_loss(yj, 1 / (1 + np.exp(-lj.astype(np.float64))))) < TOL
        assert abs(row["positive_rate"] - yj.mean()) < 1e-12

    no_groups = M.task_metrics(t(logits), t(labels), None)
    assert [r["gauc"] for r in no_groups] == [None, None]
    assert [r["ndcg@10"] for r in no_groups] == [None, None]
    assert [r["auc"] for r in no_groups] == [r["auc"] for r in rows]


@pytest.mark.parametrize("dense_ids", [False, True], ids=["sparse-ids", "dense-ids"])
def test_task_metrics_in_small_chunks(data, monkeypatch, dense_ids):
    """The row-sized passes run in ``_CHUNK``-row pieces (score-key flip, dense ids, key assembly,
    positives, logloss): with tiny, uneven chunks every piece boundary is crossed many times and
    the values must still be scikit-learn's."""
    s, y, g = data
    if dense_ids:  # ids within 2^30 take the chunked ``ids - min`` path, not ``unique``
        g = np.unique(g, return_inverse=True)[1].astype(np.int64) * 3 - 100
    monkeypatch.setattr(M, "_CHUNK", 37)
    logits = np.stack([s - 0.5, np.random.default_rng(5).normal(size=len(s)).astype(np.float32)], 1)
    labels = np.stack([y, 1 - y], 1)
    for row, lj, yj in zip(M.task_metrics(t(logits), t(labels), t(g), k=3), logits.T, labels.T):
        assert abs(row["auc"] - roc_auc_score(yj, lj)) < TOL
        assert abs(row["gauc"] - ref_gauc(lj, yj, g)) < TOL
        assert abs(row["ndcg@3"] - ref_ndcg(lj, yj, g, 3)) < TOL
        assert abs(row["logloss"] - log_loss(yj, 1 / (1 + np.exp(-lj.astype(np.float64))))) < TOL


def test_task_metrics_one_class_task_is_nan():
    rows = M.task_metrics(torch.randn(6, 1), torch.zeros(6, 1), torch.tensor([0, 0, 0, 1, 1, 1]))
    assert math.isnan(rows[0]["auc"]) and math.isnan(rows[0]["gauc"]) and math.isnan(rows[0]["ndcg@10"])
    assert rows[0]["positive_rate"] == 0.0
