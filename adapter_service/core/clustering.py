"""Group the requests of one serving batch by their statistics, so each group can get its own adapter.

Rows are L2-normalised first and then clustered with euclidean k-means: on unit vectors the squared
euclidean distance is 2 - 2 cos, so this groups requests by direction (spherical-ish k-means, as in the
paper) and a prompt's statistic does not land elsewhere just because its norm differs.

Everything is vectorised numpy (loops only over k, Lloyd iterations and restarts), computed in float64
and deterministic: the same input and seed give bit-identical output on every call. Cluster numbers are
canonical (cluster 0 holds row 0, cluster 1 the first row not in cluster 0, ...), so equal partitions
always compare equal and downstream caches keyed on them stay stable.

Policies:

* `FixedK(k)`: k-means with k clusters, capped at the number of distinct (normalised) rows, since
  duplicates cannot be split; empty clusters are never returned.
* `PerRequest()`: no k-means; every distinct (normalised) row is its own cluster, so each request gets
  the adapter of its own statistic. The study's best way to serve the mixture generator, and in the
  compact wire form it costs what one adapter costs (docs/research/adaptation.md).
* `AutoK(max_k, min_cluster_size, min_silhouette)`: the candidates are k = 1..K with
  K = min(max_k, N // min_cluster_size, number of distinct normalised rows), at least 1. Every k >= 2
  is clustered with k-means; partitions with a cluster smaller than `min_cluster_size` are discarded
  (an adapter for a couple of requests is not worth generating), and the rest are scored by their mean
  euclidean silhouette on the normalised rows. The best-scoring k wins (ties go to the smaller k), but
  only if its score reaches `min_silhouette`; otherwise the batch is treated as one group (k = 1),
  because a weak structure is more likely noise than distinct request populations.

Cost: one N x N Gram / distance matrix per call (8 MB each at N = 1024), shared by k-means++ seeding,
every Lloyd run and the silhouette; meant for batch-sized N (up to a few thousand rows).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "AutoK",
    "Clustering",
    "ClusteringPolicy",
    "FixedK",
    "PerRequest",
    "cluster",
    "kmeans",
    "l2_normalize",
]


@dataclass(frozen=True)
class FixedK:
    """Always ask for `k` clusters (fewer come back only when there are fewer distinct rows)."""

    k: int

    def __post_init__(self) -> None:
        _check_positive_int("k", self.k)


@dataclass(frozen=True)
class AutoK:
    """Choose k by silhouette; see the module docstring for the exact rule."""

    max_k: int = 8
    min_cluster_size: int = 1
    min_silhouette: float = 0.1  # below this, one cluster wins

    def __post_init__(self) -> None:
        _check_positive_int("max_k", self.max_k)
        _check_positive_int("min_cluster_size", self.min_cluster_size)
        if isinstance(self.min_silhouette, bool) or not isinstance(
            self.min_silhouette, (int, float, np.integer, np.floating)
        ):
            raise ValueError(f"min_silhouette: expected a float, got {self.min_silhouette!r}")
        if math.isnan(self.min_silhouette):
            raise ValueError("min_silhouette: expected a float (not NaN), got nan")


@dataclass(frozen=True)
class PerRequest:
    """One cluster per distinct request statistic (identical statistics share one)."""


ClusteringPolicy = FixedK | AutoK | PerRequest


@dataclass(frozen=True)
class Clustering:
    """A partition of the N rows of one batch.

    `centroids[j]` is the plain mean of the rows of cluster j as clustered; for `cluster()` those are the
    L2-normalised rows, and the mean is deliberately NOT re-normalised (its norm says how tight the
    cluster is; re-normalise downstream if a unit vector is needed).
    """

    assignments: np.ndarray  # int32 [N], cluster index per row, in 0..k-1
    centroids: np.ndarray  # float32 [k, D], mean of the (normalised) rows of each cluster
    sizes: np.ndarray  # int32 [k], all >= 1
    k: int
    silhouette: float | None  # mean silhouette of this partition (None when k == 1)


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Scale each vector along the last axis to unit L2 norm; vectors with norm < eps are divided by eps.

    Huge or tiny statistics neither overflow nor underflow (such rows are pre-scaled by their max |value|);
    all-zero rows stay zero. Computed in float64; floating input keeps its dtype, other input comes back
    as float64.
    """
    a = np.asarray(x)
    if a.ndim < 1:
        raise ValueError(f"x: expected an array with at least 1 dimension, got shape {list(a.shape)}")
    if not (isinstance(eps, (int, float)) and eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"eps: expected a finite float >= 0, got {eps!r}")
    out_dtype = a.dtype if np.issubdtype(a.dtype, np.floating) else np.dtype(np.float64)
    return _normalize64(a.astype(np.float64, copy=False), eps).astype(out_dtype, copy=False)


def kmeans(
    x: np.ndarray, k: int, *, seed: int = 0, n_init: int = 3, max_iter: int = 50, tol: float = 1e-6
) -> Clustering:
    """Euclidean k-means on the rows of `x` as given (`cluster()` passes normalised rows).

    k-means++ seeding from `np.random.default_rng(seed)`, `n_init` restarts (lowest inertia wins, ties go
    to the earlier restart), vectorised Lloyd iterations until the assignment stops changing, the
    centres move less than `tol` (total squared shift) or `max_iter` is reached. The effective k is at
    most the number of distinct rows (rows whose squared distance rounds to 0 count as one); empty
    clusters are refilled with the row farthest from its centre, and any that still cannot be filled are
    dropped, so every returned cluster is non-empty.
    """
    data = _validate_x(x)
    _check_positive_int("k", k)
    _check_positive_int("n_init", n_init)
    _check_positive_int("max_iter", max_iter)
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not (tol >= 0 and math.isfinite(tol)):
        raise ValueError(f"tol: expected a finite float >= 0, got {tol!r}")
    prep = _prepare(data)
    return _scored(prep, _kmeans(prep, k, seed=seed, n_init=n_init, max_iter=max_iter, tol=tol))


def cluster(x: np.ndarray, policy: ClusteringPolicy, *, seed: int = 0) -> Clustering:
    """L2-normalise the rows of `x`, then partition them according to `policy` (see module docstring)."""
    if not isinstance(policy, (FixedK, AutoK, PerRequest)):
        raise TypeError(f"policy: expected FixedK, AutoK or PerRequest, got {type(policy).__name__}")
    if isinstance(policy, PerRequest):  # no distances needed
        data = _normalize64(_validate_x(x), 1e-12)
        groups, _ = _duplicate_groups(data)
        return _make_clustering(data, _canonical(groups), None)
    prep = _prepare(_normalize64(_validate_x(x), 1e-12))
    if isinstance(policy, FixedK):
        _check_positive_int("k", policy.k)  # defence in depth against object.__setattr__
        return _scored(prep, _kmeans(prep, policy.k, seed=seed))
    return _auto_k(prep, policy, seed)


# --- internals --------------------------------------------------------------------------------------------


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name}: expected an integer >= 1, got {value!r}")


def _validate_x(x: np.ndarray) -> np.ndarray:
    """Return `x` as a float64 [N, D] array, or raise ValueError saying what was expected."""
    a = np.asarray(x)
    if a.ndim != 2:
        raise ValueError(f"x: expected a 2-D array [N, D], got shape {list(a.shape)}")
    if a.shape[0] == 0:
        raise ValueError(f"x: expected at least one row (N >= 1), got shape {list(a.shape)}")
    if a.shape[1] == 0:
        raise ValueError(f"x: expected at least one column (D >= 1), got shape {list(a.shape)}")
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise ValueError(f"x: expected a real float or integer array, got dtype {a.dtype}")
    data = a.astype(np.float64, copy=False)
    if not np.isfinite(data).all():
        raise ValueError("x: expected only finite values, got NaN or inf")
    return data


def _normalize64(a: np.ndarray, eps: float) -> np.ndarray:
    """Row normalisation of a float64 array along its last axis (always returns a new array).

    The plain sum of squares is used when it is safe; otherwise (overflow, or squares too small to keep
    their precision) each row is first divided by its max |value|.
    """
    rows = a.reshape(-1, a.shape[-1])
    if rows.size == 0:
        return a.copy()
    norm_sq = np.einsum("nd,nd->n", rows, rows)
    if np.isfinite(norm_sq).all() and not ((norm_sq > 0) & (norm_sq < 1e-280)).any():
        norm = np.sqrt(norm_sq)
    else:
        peak = np.max(np.abs(rows), axis=1)
        rows = rows / np.where(peak > 0, peak, 1.0)[:, None]
        scaled_norm = np.sqrt(np.einsum("nd,nd->n", rows, rows))
        with np.errstate(over="ignore"):
            small = peak * scaled_norm < eps
        # rows now hold x / peak: unit = rows / scaled_norm, and a small row x / eps = rows * peak / eps
        norm = np.where(small, eps / np.where(peak > 0, peak, 1.0), scaled_norm)
        norm[small & (peak == 0)] = 0.0
        return _divide_rows(rows, norm).reshape(a.shape)
    return _divide_rows(rows, np.maximum(norm, eps)).reshape(a.shape)


def _divide_rows(rows: np.ndarray, norm: np.ndarray) -> np.ndarray:
    """rows / norm, a correctly rounded division (a row along an axis becomes exactly +-1 there, which
    multiplying by 1 / norm does not guarantee); rows with norm 0 are all-zero and stay zero."""
    return np.divide(rows, norm[:, None], out=np.zeros_like(rows), where=norm[:, None] > 0)


# --- k-means on a precomputed Gram matrix -----------------------------------------------------------------
#
# Lloyd's update is computed in kernel form: with one-hot assignments M [N, k] and counts n_j, the centre
# is c_j = M_j^T X / n_j, so x_i c_j^T = (G M)_ij / n_j and ||c_j||^2 = (M^T G M)_jj / n_j^2 with the Gram
# matrix G = X X^T. This is the same ||x||^2 - 2 x c^T + ||c||^2 distance as in feature space, but each
# iteration costs one [N, N] x [N, k] product instead of two [N, D] products, and the N x N pairwise
# distances come for free for k-means++ seeding and for the silhouette (one matrix per call).

_DUPLICATE_HASH_SEED = 0x5EED  # fixed multipliers of the row hash used to find exact duplicates


@dataclass(frozen=True)
class _Prepared:
    """Per-call precomputation shared by every k-means run and the silhouette."""

    data: np.ndarray  # float64 [N, D]
    sq: np.ndarray  # float64 [N], squared row norms
    gram: np.ndarray  # float64 [N, N], X X^T (exactly symmetric)
    d2: np.ndarray  # float64 [N, N], squared distances; exactly 0 between duplicate rows
    n_distinct: int


def _prepare(data: np.ndarray) -> _Prepared:
    sq = np.einsum("nd,nd->n", data, data)
    gram = data @ data.T
    d2 = sq[:, None] + sq[None, :] - 2.0 * gram
    np.maximum(d2, 0.0, out=d2)
    groups, n_distinct = _duplicate_groups(data)
    # Exact zeros between duplicates (and on the diagonal) are what make k-means++ stop at the number of
    # distinct rows; the expanded formula alone leaves round-off residue there.
    if n_distinct < data.shape[0]:
        d2[groups[:, None] == groups[None, :]] = 0.0
    else:
        np.fill_diagonal(d2, 0.0)
    return _Prepared(data=data, sq=sq, gram=gram, d2=d2, n_distinct=n_distinct)


def _duplicate_groups(data: np.ndarray) -> tuple[np.ndarray, int]:
    """Group id per row (equal ids <=> equal rows, -0.0 == 0.0) and the number of distinct rows.

    Hashes each row's bit pattern (odd multiplier per column, wrapping uint64 product, XOR across the
    row: exact integer arithmetic, so the hash cannot depend on reduction order) and verifies every row
    against its group's first row; only a hash collision, never seen in practice, falls back to the much
    slower `np.unique(axis=0)`.
    """
    bits = np.ascontiguousarray(data + 0.0).view(np.uint64)  # + 0.0 turns -0.0 into 0.0
    keys = np.bitwise_xor.reduce(bits * _hash_multipliers(data.shape[1]), axis=1)
    _, first, groups = np.unique(keys, return_index=True, return_inverse=True)
    groups = groups.reshape(-1)
    if (data != data[first[groups]]).any():
        _, groups = np.unique(data, axis=0, return_inverse=True)
        groups = groups.reshape(-1)
    return groups, int(groups.max()) + 1


@functools.lru_cache(maxsize=8)
def _hash_multipliers(d: int) -> np.ndarray:
    rng = np.random.default_rng(_DUPLICATE_HASH_SEED)
    multipliers = rng.integers(0, 2**64 - 1, size=d, dtype=np.uint64, endpoint=True) | np.uint64(1)
    multipliers.flags.writeable = False
    return multipliers


def _kmeans_pp(d2: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Greedy k-means++ seeding (a few sampled candidates per step, as in scikit-learn) -> <= k row indices.

    A duplicate of a chosen centre is at distance exactly 0 and can never be drawn, so seeding stops early
    when only duplicates remain: the effective k is at most the number of distinct rows.
    """
    n = d2.shape[0]
    n_trials = 2 + int(math.log(k))
    chosen = [int(rng.integers(n))]
    closest = d2[chosen[0]].copy()
    while len(chosen) < k:
        cumulative = np.cumsum(closest)
        total = cumulative[-1]
        if not total > 0:
            break
        picks = np.minimum(np.searchsorted(cumulative, rng.random(n_trials) * total, side="right"), n - 1)
        picks = picks[closest[picks] > 0]  # only the clamp at the end of the cumsum can hit a zero
        if picks.size == 0:
            picks = np.array([int(np.argmax(closest))])
        potentials = np.minimum(d2[picks], closest[None, :]).sum(axis=1)
        best = int(picks[int(np.argmin(potentials))])
        chosen.append(best)
        np.minimum(closest, d2[best], out=closest)
    return np.asarray(chosen)


def _one_hot(labels: np.ndarray, k: int) -> np.ndarray:
    one_hot = np.zeros((labels.shape[0], k))
    one_hot[np.arange(labels.shape[0]), labels] = 1.0
    return one_hot


def _fill_empty(d2: np.ndarray, labels: np.ndarray, counts: np.ndarray) -> None:
    """Give each empty cluster the row farthest from its current centre (in place, deterministic).

    Only rows whose cluster has other members may move, so filling one cluster never empties another;
    a cluster stays empty when every movable row already sits on its centre (it is dropped later).
    """
    own_d2 = d2[np.arange(labels.shape[0]), labels]
    for j in np.flatnonzero(counts == 0):
        candidates = np.where(counts[labels] > 1, own_d2, -1.0)
        row = int(np.argmax(candidates))
        if candidates[row] <= 0:
            break
        counts[labels[row]] -= 1
        labels[row] = j
        counts[j] = 1
        own_d2[row] = 0.0


def _centre_terms(
    one_hot: np.ndarray, sums: np.ndarray, counts: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """From one-hot M and G M: x_i c_j^T [N, k], ||c_j||^2 [k] and safe counts [k] of the cluster means."""
    safe = np.maximum(counts, 1).astype(np.float64)
    cross = sums / safe[None, :]
    return cross, np.einsum("nk,nk->k", one_hot, cross) / safe, safe


def _lloyd(prep: _Prepared, seeds: np.ndarray, max_iter: int, tol: float) -> tuple[np.ndarray, float]:
    """Lloyd iterations from the seed rows -> (labels, inertia); a cluster may be empty only if unfillable.

    Stops when the assignment repeats, when the centres moved by <= tol in total squared distance, or
    after max_iter updates; the returned labels are the ones whose means were computed last. G M is
    updated incrementally from the rows that moved (late iterations move few), and recomputed in full
    when many moved.
    """
    k = seeds.shape[0]
    n = prep.sq.shape[0]
    d2 = prep.d2[seeds].T.copy()  # the initial centres are rows: their distances are already known
    cross = prep.gram[:, seeds]
    centre_sq = prep.sq[seeds]
    previous: np.ndarray | None = None
    one_hot = sums = np.zeros((0, 0))
    labels = np.zeros(n, dtype=np.intp)
    for _ in range(max_iter):
        labels = np.argmin(d2, axis=1)
        counts = np.bincount(labels, minlength=k)
        if (counts == 0).any():
            _fill_empty(d2, labels, counts)
        if previous is None:
            one_hot = _one_hot(labels, k)
            sums = prep.gram @ one_hot
        else:
            moved = np.flatnonzero(labels != previous)
            if moved.size == 0:
                break
            moved_one_hot = _one_hot(labels[moved], k)
            if 4 * moved.size >= n:
                one_hot[moved] = moved_one_hot
                sums = prep.gram @ one_hot
            else:
                sums += prep.gram[moved].T @ (moved_one_hot - one_hot[moved])  # G is symmetric
                one_hot[moved] = moved_one_hot
        new_cross, new_centre_sq, safe = _centre_terms(one_hot, sums, counts)
        # ||c_new - c_old||^2 = ||c_new||^2 + ||c_old||^2 - 2 c_new c_old^T, with c_new = M^T X / n.
        new_dot_old = np.einsum("nk,nk->k", one_hot, cross) / safe
        empty = counts == 0  # an unfillable cluster keeps its centre (and is dropped at the end)
        new_cross[:, empty] = cross[:, empty]
        new_centre_sq[empty] = centre_sq[empty]
        new_dot_old[empty] = centre_sq[empty]
        shift = float(np.sum(new_centre_sq + centre_sq - 2.0 * new_dot_old))
        cross, centre_sq, previous = new_cross, new_centre_sq, labels
        if shift <= tol:
            break
        d2 = prep.sq[:, None] - 2.0 * cross + centre_sq[None, :]
        np.maximum(d2, 0.0, out=d2)
    # cross and centre_sq describe the means of `labels` here, whichever way the loop ended
    own = prep.sq - 2.0 * cross[np.arange(n), labels] + centre_sq[labels]
    return labels, float(np.sum(np.maximum(own, 0.0)))


def _canonical(labels: np.ndarray) -> np.ndarray:
    """Renumber clusters by their first row, dropping unused numbers: the result uses exactly 0..k-1."""
    used, first_row = np.unique(labels, return_index=True)
    mapping = np.empty(int(used.max()) + 1, dtype=np.intp)
    mapping[used[np.argsort(first_row)]] = np.arange(used.shape[0])
    return mapping[labels]


def _kmeans(
    prep: _Prepared, k: int, *, seed: int, n_init: int = 3, max_iter: int = 50, tol: float = 1e-6
) -> np.ndarray:
    """Best of `n_init` seeded runs -> canonical labels [N] using exactly 0..k'-1 with k' <= k."""
    rng = np.random.default_rng(seed)
    best_labels: np.ndarray | None = None
    best_inertia = math.inf
    for _ in range(n_init):
        labels, inertia = _lloyd(prep, _kmeans_pp(prep.d2, k, rng), max_iter, tol)
        if inertia < best_inertia:
            best_inertia, best_labels = inertia, labels
    assert best_labels is not None
    return _canonical(best_labels)


def _silhouette(distances: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette of a partition with k >= 2 clusters, from the N x N distances and a one-hot [N, k].

    a(i) is the mean distance to the other members of i's cluster, b(i) the smallest mean distance to
    another cluster; singletons score 0, and so do points with a(i) = b(i) = 0 (duplicates).
    """
    n = labels.shape[0]
    rows = np.arange(n)
    one_hot = _one_hot(labels, int(labels.max()) + 1)
    counts = one_hot.sum(axis=0)
    sums = distances @ one_hot  # [N, k]: total distance from each row to each cluster
    own = counts[labels]
    a = sums[rows, labels] / np.maximum(own - 1.0, 1.0)
    mean_to = sums / counts[None, :]
    mean_to[rows, labels] = np.inf
    b = mean_to.min(axis=1)
    denom = np.maximum(a, b)
    ok = (own > 1) & (denom > 0)
    s = np.where(ok, (b - a) / np.where(ok, denom, 1.0), 0.0)
    return float(s.mean())


def _scored(prep: _Prepared, labels: np.ndarray) -> Clustering:
    """Clustering for labels already chosen, scored with the silhouette when k >= 2."""
    score = _silhouette(np.sqrt(prep.d2), labels) if labels.max() > 0 else None
    return _make_clustering(prep.data, labels, score)


def _auto_k(prep: _Prepared, policy: AutoK, seed: int) -> Clustering:
    n = prep.data.shape[0]
    k_cap = min(policy.max_k, n // policy.min_cluster_size, prep.n_distinct)
    single = np.zeros(n, dtype=np.intp)
    if k_cap < 2:
        return _make_clustering(prep.data, single, None)
    distances = np.sqrt(prep.d2)
    best: tuple[float, np.ndarray] | None = None
    for k in range(2, k_cap + 1):
        labels = _kmeans(prep, k, seed=seed)
        sizes = np.bincount(labels)
        if sizes.shape[0] < 2 or sizes.min() < policy.min_cluster_size:
            continue
        score = _silhouette(distances, labels)
        if best is None or score > best[0]:
            best = (score, labels)
    if best is None or not best[0] >= policy.min_silhouette:
        return _make_clustering(prep.data, single, None)
    return _make_clustering(prep.data, best[1], best[0])


def _make_clustering(data: np.ndarray, labels: np.ndarray, score: float | None) -> Clustering:
    """Package canonical labels: centroids are the plain means of the rows of each cluster."""
    k = int(labels.max()) + 1
    sizes = np.bincount(labels, minlength=k)
    means = (_one_hot(labels, k).T @ data) / sizes[:, None]
    return Clustering(
        assignments=labels.astype(np.int32),
        centroids=means.astype(np.float32),
        sizes=sizes.astype(np.int32),
        k=k,
        silhouette=score,
    )
