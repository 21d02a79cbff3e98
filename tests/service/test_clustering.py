"""adapter_service.core.clustering: determinism, canonical numbering, recovery, edge cases, validation."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from adapter_service.core.clustering import (
    AutoK,
    Clustering,
    FixedK,
    cluster,
    kmeans,
    l2_normalize,
)


def blobs(
    n_blobs: int, per_blob: int, dim: int, *, noise: float = 0.01, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Well-separated gaussian blobs in random row order -> (x float32 [N, D], true blob per row)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_blobs, dim))
    truth = np.repeat(np.arange(n_blobs), per_blob)
    rng.shuffle(truth)
    x = centres[truth] + noise * rng.standard_normal((truth.size, dim))
    return x.astype(np.float32), truth


def canonical(labels: np.ndarray) -> np.ndarray:
    """Relabel by order of first appearance, so equal partitions compare equal."""
    _, first = np.unique(labels, return_index=True)
    order = labels[np.sort(first)]
    mapping = np.empty(labels.max() + 1, dtype=np.int64)
    mapping[order] = np.arange(order.size)
    return mapping[labels]


def assert_well_formed(c: Clustering, n: int, d: int) -> None:
    assert isinstance(c.k, int)
    assert c.assignments.dtype == np.int32 and c.assignments.shape == (n,)
    assert c.centroids.dtype == np.float32 and c.centroids.shape == (c.k, d)
    assert c.sizes.dtype == np.int32 and c.sizes.shape == (c.k,)
    assert set(np.unique(c.assignments).tolist()) == set(range(c.k))
    assert (c.sizes >= 1).all()
    assert int(c.sizes.sum()) == n
    np.testing.assert_array_equal(c.sizes, np.bincount(c.assignments, minlength=c.k))
    if c.k == 1:
        assert c.silhouette is None
    else:
        assert c.silhouette is not None and -1.0 <= c.silhouette <= 1.0


def assert_first_appearance_order(assignments: np.ndarray) -> None:
    _, first = np.unique(assignments, return_index=True)
    assert assignments[0] == 0
    np.testing.assert_array_equal(assignments[np.sort(first)], np.arange(first.size))


# --- determinism and numbering ----------------------------------------------------------------------------


@pytest.mark.parametrize("policy", [FixedK(5), AutoK(max_k=8)])
def test_same_input_and_seed_give_bitwise_identical_output(policy) -> None:
    x = np.random.default_rng(3).standard_normal((96, 40)).astype(np.float32)
    a = cluster(x, policy, seed=7)
    b = cluster(x.copy(), policy, seed=7)
    assert a.k == b.k
    assert a.silhouette == b.silhouette
    for field in ("assignments", "centroids", "sizes"):
        left, right = getattr(a, field), getattr(b, field)
        assert left.dtype == right.dtype and left.shape == right.shape
        assert left.tobytes() == right.tobytes(), field


def test_kmeans_is_deterministic_and_does_not_modify_its_input() -> None:
    x = np.random.default_rng(4).standard_normal((50, 12))
    before = x.copy()
    a = kmeans(x, 4, seed=1)
    b = kmeans(x, 4, seed=1)
    np.testing.assert_array_equal(x, before)
    assert a.assignments.tobytes() == b.assignments.tobytes()
    assert a.centroids.tobytes() == b.centroids.tobytes()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clusters_are_numbered_by_first_appearance(seed: int) -> None:
    x = np.random.default_rng(seed).standard_normal((64, 16)).astype(np.float32)
    c = cluster(x, FixedK(6), seed=seed)
    assert c.k == 6
    assert_first_appearance_order(c.assignments)


def test_numbering_follows_row_order_not_blob_order() -> None:
    # Rows 0..3 come from blobs 3, 3, 1, 0: the numbering must be 0, 0, 1, 2 whatever the seeding did.
    x, truth = blobs(4, 6, 24, seed=5)
    head = [int(np.flatnonzero(truth == b)[0]) for b in (3, 1, 0)]
    order = [head[0], int(np.flatnonzero(truth == 3)[1]), head[1], head[2]]
    rest = [i for i in range(truth.size) if i not in order]
    c = cluster(x[order + rest], FixedK(4))
    np.testing.assert_array_equal(c.assignments[:4], [0, 0, 1, 2])
    assert_first_appearance_order(c.assignments)


# --- recovering structure ---------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_fixed_k_recovers_well_separated_blobs(seed: int) -> None:
    x, truth = blobs(4, 8, 32, seed=seed)
    c = cluster(x, FixedK(4), seed=seed)
    assert_well_formed(c, 32, 32)
    assert c.k == 4
    np.testing.assert_array_equal(c.assignments, canonical(truth))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_auto_k_finds_the_number_of_blobs(seed: int) -> None:
    x, truth = blobs(4, 8, 32, seed=seed)
    c = cluster(x, AutoK(max_k=8), seed=seed)
    assert_well_formed(c, 32, 32)
    assert c.k == 4
    np.testing.assert_array_equal(c.assignments, canonical(truth))
    assert c.silhouette is not None and c.silhouette > 0.9


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auto_k_keeps_a_single_tight_blob_together(seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(32) + 0.01 * rng.standard_normal((40, 32))).astype(np.float32)
    c = cluster(x, AutoK(max_k=8), seed=seed)
    assert_well_formed(c, 40, 32)
    assert c.k == 1
    assert c.silhouette is None
    np.testing.assert_allclose(c.centroids[0], l2_normalize(x.astype(np.float64)).mean(axis=0), atol=1e-6)


def test_auto_k_returns_one_cluster_when_no_candidate_reaches_min_silhouette() -> None:
    x, _ = blobs(3, 6, 16, seed=2)
    assert cluster(x, AutoK(max_k=6)).k == 3
    assert cluster(x, AutoK(max_k=6, min_silhouette=1.01)).k == 1


def test_auto_k_with_max_k_one_is_a_single_cluster() -> None:
    x, _ = blobs(3, 5, 8, seed=1)
    c = cluster(x, AutoK(max_k=1))
    assert c.k == 1 and c.silhouette is None
    np.testing.assert_array_equal(c.assignments, np.zeros(15, dtype=np.int32))


def test_silhouette_matches_a_direct_computation() -> None:
    x = np.random.default_rng(8).standard_normal((30, 6))
    c = cluster(x, FixedK(3))
    xn = l2_normalize(x)
    dist = np.linalg.norm(xn[:, None, :] - xn[None, :, :], axis=-1)
    scores = []
    for i in range(30):
        own = c.assignments == c.assignments[i]
        if own.sum() == 1:
            scores.append(0.0)
            continue
        a = dist[i, own].sum() / (own.sum() - 1)
        b = min(dist[i, c.assignments == j].mean() for j in range(c.k) if j != c.assignments[i])
        scores.append((b - a) / max(a, b))
    assert c.silhouette == pytest.approx(float(np.mean(scores)), abs=1e-9)


# --- degenerate inputs ------------------------------------------------------------------------------------


def test_fewer_rows_than_k_gives_one_cluster_per_row() -> None:
    x = np.random.default_rng(0).standard_normal((3, 10)).astype(np.float32)
    c = cluster(x, FixedK(8))
    assert_well_formed(c, 3, 10)
    assert c.k == 3
    np.testing.assert_array_equal(c.assignments, [0, 1, 2])


def test_all_duplicate_rows_give_a_single_cluster() -> None:
    x = np.tile(np.random.default_rng(1).standard_normal(12), (9, 1)).astype(np.float32)
    c = cluster(x, FixedK(5))
    assert_well_formed(c, 9, 12)
    assert c.k == 1
    assert c.silhouette is None
    assert cluster(x, AutoK(max_k=5)).k == 1


def test_two_distinct_values_repeated_give_two_clusters() -> None:
    rng = np.random.default_rng(2)
    values = rng.standard_normal((2, 12))
    which = np.array([0, 1, 1, 0, 1, 0, 0, 1, 1, 0])
    c = cluster(values[which].astype(np.float32), FixedK(4))
    assert_well_formed(c, 10, 12)
    assert c.k == 2
    np.testing.assert_array_equal(c.assignments, canonical(which))


def test_one_dimensional_rows_split_by_sign() -> None:
    # In D = 1 normalised rows are exactly +-1 (a correctly rounded division), so there are 2 distinct rows.
    x = np.random.default_rng(16).standard_normal((25, 1))
    c = cluster(x, FixedK(5))
    assert c.k == 2
    np.testing.assert_array_equal(c.assignments, canonical((x[:, 0] > 0).astype(int)))


@pytest.mark.parametrize("case", range(40))
def test_invariants_on_random_inputs(case: int) -> None:
    rng = np.random.default_rng(1000 + case)
    n, d = int(rng.integers(1, 50)), int(rng.integers(1, 30))
    distinct = rng.standard_normal((int(rng.integers(1, n + 1)), d)) * (rng.random((1, 1)) < 0.9)
    x = distinct[rng.integers(0, distinct.shape[0], n)] * 10.0 ** rng.integers(-5, 5, (n, 1))
    policy = (
        FixedK(int(rng.integers(1, 10)))
        if case % 2
        else AutoK(int(rng.integers(1, 9)), int(rng.integers(1, 4)))
    )
    c = cluster(x.astype(np.float32), policy, seed=case)
    assert_well_formed(c, n, d)
    assert_first_appearance_order(c.assignments)
    n_distinct = np.unique(l2_normalize(x.astype(np.float32).astype(np.float64)), axis=0).shape[0]
    assert c.k <= n_distinct
    if isinstance(policy, AutoK) and c.k > 1:
        assert c.sizes.min() >= policy.min_cluster_size
        assert c.silhouette is not None and c.silhouette >= policy.min_silhouette


def test_single_row() -> None:
    c = cluster(np.ones((1, 4), dtype=np.float32), AutoK())
    assert_well_formed(c, 1, 4)
    assert c.k == 1
    np.testing.assert_allclose(c.centroids, [[0.5, 0.5, 0.5, 0.5]])


def test_zero_rows_are_allowed_and_stay_zero() -> None:
    x = np.zeros((4, 3), dtype=np.float32)
    x[2] = [0.0, 3.0, 4.0]
    c = cluster(x, FixedK(3))
    assert_well_formed(c, 4, 3)
    assert c.k == 2
    np.testing.assert_allclose(c.centroids[c.assignments[2]], [0.0, 0.6, 0.8])
    np.testing.assert_array_equal(c.centroids[c.assignments[0]], [0.0, 0.0, 0.0])


def test_min_cluster_size_is_respected() -> None:
    rng = np.random.default_rng(6)
    centres = rng.standard_normal((2, 16))
    x = np.concatenate(
        [centres[0] + 0.01 * rng.standard_normal((2, 16)), centres[1] + 0.01 * rng.standard_normal((10, 16))]
    ).astype(np.float32)
    # Without the constraint the two-row blob gets its own cluster...
    free = cluster(x, AutoK(max_k=8))
    assert free.k == 2 and sorted(free.sizes.tolist()) == [2, 10]
    # ... with it, no returned cluster may be smaller than 3.
    constrained = cluster(x, AutoK(max_k=8, min_cluster_size=3))
    assert_well_formed(constrained, 12, 16)
    assert constrained.sizes.min() >= 3


def test_min_cluster_size_caps_the_candidates() -> None:
    x, _ = blobs(4, 3, 16, seed=3)  # 12 rows: min_cluster_size=5 allows at most 12 // 5 = 2 clusters
    c = cluster(x, AutoK(max_k=8, min_cluster_size=5))
    assert c.k <= 2
    assert c.sizes.min() >= 5


# --- centroids, sizes, normalisation ----------------------------------------------------------------------


@pytest.mark.parametrize("policy", [FixedK(3), FixedK(7), AutoK(max_k=8)])
def test_centroids_are_means_of_the_normalised_rows(policy) -> None:
    x, _ = blobs(3, 7, 20, noise=0.5, seed=9)
    x *= np.random.default_rng(9).uniform(0.1, 10.0, size=(21, 1)).astype(np.float32)
    c = cluster(x, policy)
    assert_well_formed(c, 21, 20)
    xn = l2_normalize(x.astype(np.float64))
    for j in range(c.k):
        np.testing.assert_allclose(c.centroids[j], xn[c.assignments == j].mean(axis=0), atol=1e-6)


def test_centroids_are_not_renormalised() -> None:
    x, _ = blobs(2, 10, 16, noise=0.5, seed=1)
    c = cluster(x, FixedK(2))
    norms = np.linalg.norm(c.centroids, axis=1)
    assert (norms < 0.999).all()


def test_kmeans_works_on_rows_as_given() -> None:
    # The same five rows at two norms: plain k-means separates the norms, cluster() pairs row i with i + 5.
    y = np.random.default_rng(5).standard_normal(8) + 0.01 * np.random.default_rng(6).standard_normal((5, 8))
    x = np.concatenate([y, 100.0 * y])
    raw = kmeans(x, 2)
    assert raw.k == 2
    np.testing.assert_array_equal(raw.assignments, [0] * 5 + [1] * 5)
    for j in range(2):
        np.testing.assert_allclose(raw.centroids[j], x[raw.assignments == j].mean(axis=0), rtol=1e-5)
    normalised = cluster(x, FixedK(2))
    np.testing.assert_array_equal(normalised.assignments[:5], normalised.assignments[5:])


def test_scaled_copies_land_in_the_same_cluster() -> None:
    base = np.random.default_rng(11).standard_normal((5, 24))
    x = np.concatenate([base, 3.0 * base]).astype(np.float32)
    c = cluster(x, FixedK(5))
    assert_well_formed(c, 10, 24)
    assert c.k == 5
    np.testing.assert_array_equal(c.assignments[:5], c.assignments[5:])


def test_l2_normalize() -> None:
    x = np.array([[3.0, 4.0], [0.0, 0.0], [1e-300, 0.0], [1e300, 1e300]])
    out = l2_normalize(x)
    np.testing.assert_allclose(out[0], [0.6, 0.8])
    np.testing.assert_array_equal(out[1], [0.0, 0.0])
    np.testing.assert_allclose(out[2], [1e-288, 0.0])  # norm below eps: divided by eps, as documented
    np.testing.assert_allclose(out[3], [2**-0.5, 2**-0.5])  # no overflow
    assert l2_normalize(x[:2].astype(np.float32)).dtype == np.float32
    assert l2_normalize(np.array([[1, 1]])).dtype == np.float64


def test_huge_and_tiny_rows_are_clustered_by_direction() -> None:
    base = np.random.default_rng(12).standard_normal((4, 6))
    x = np.concatenate([base * 1e150, base * 1e-8])  # norms above eps = 1e-12, so both get normalised
    c = cluster(x, FixedK(4))
    assert c.k == 4
    np.testing.assert_array_equal(c.assignments[:4], c.assignments[4:])


def test_sizes_sum_to_n_and_match_bincount() -> None:
    x = np.random.default_rng(13).standard_normal((77, 9)).astype(np.float32)
    for policy in (FixedK(1), FixedK(4), FixedK(9), AutoK(max_k=8)):
        c = cluster(x, policy)
        assert_well_formed(c, 77, 9)


# --- empty clusters ---------------------------------------------------------------------------------------


def test_lloyd_refills_an_empty_cluster() -> None:
    # Seeds 0, 1 and 2 are the same isolated row. Left alone, centres 1 and 2 would sit on that row for
    # ever and tie on it (argmin keeps the first), so cluster 2 would stay empty; it must be refilled.
    from adapter_service.core import clustering as impl

    rng = np.random.default_rng(0)
    data = np.concatenate(
        [np.tile([1.0, 0.0, 0.0], (3, 1)), [0.0, 1.0, 0.0] + 0.01 * rng.standard_normal((6, 3))]
    )
    prep = impl._prepare(data)
    labels, inertia = impl._lloyd(prep, np.array([0, 1, 2]), max_iter=50, tol=0.0)
    assert np.bincount(labels, minlength=3).min() >= 1
    assert inertia >= 0.0


def test_many_duplicates_in_high_dimension_never_split_a_duplicate_group() -> None:
    # In D = 576 the expanded ||a||^2 + ||b||^2 - 2ab leaves round-off between equal rows; duplicates must
    # still count as one point each, or k-means++ would seed two centres on the same row.
    rng = np.random.default_rng(14)
    values = rng.standard_normal((3, 576))
    which = rng.permutation(np.repeat(np.arange(3), 20))
    x = values[which].astype(np.float32)
    for policy in (FixedK(8), AutoK(max_k=8)):
        c = cluster(x, policy)
        assert_well_formed(c, 60, 576)
        assert c.k == 3
        np.testing.assert_array_equal(c.assignments, canonical(which))


def test_kmeans_caps_k_at_the_number_of_distinct_rows() -> None:
    x = np.repeat(np.random.default_rng(15).standard_normal((4, 576)), 16, axis=0)
    c = kmeans(x, 10, n_init=2)
    assert c.k == 4
    assert sorted(c.sizes.tolist()) == [16, 16, 16, 16]


# --- validation -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("x", "pattern"),
    [
        (np.ones(5), r"x: expected a 2-D array"),
        (np.ones((2, 3, 4)), r"x: expected a 2-D array"),
        (np.ones((0, 4)), r"x: expected at least one row"),
        (np.ones((3, 0)), r"x: expected at least one column"),
        (np.array([[1.0, np.nan]]), r"x: expected only finite values"),
        (np.array([[1.0, np.inf]]), r"x: expected only finite values"),
        (np.array([["a", "b"]]), r"x: expected a real float or integer array"),
    ],
)
def test_invalid_x_raises(x: np.ndarray, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        cluster(x, FixedK(2))
    with pytest.raises(ValueError, match=pattern):
        kmeans(x, 2)


@pytest.mark.parametrize(
    ("make", "pattern"),
    [
        (lambda: FixedK(0), r"k: expected an integer >= 1, got 0"),
        (lambda: FixedK(-3), r"k: expected an integer >= 1"),
        (lambda: FixedK(2.5), r"k: expected an integer >= 1"),
        (lambda: FixedK(True), r"k: expected an integer >= 1"),
        (lambda: AutoK(max_k=0), r"max_k: expected an integer >= 1, got 0"),
        (lambda: AutoK(min_cluster_size=0), r"min_cluster_size: expected an integer >= 1, got 0"),
        (lambda: AutoK(min_silhouette=float("nan")), r"min_silhouette"),
    ],
)
def test_invalid_policy_raises(make, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        make()


def test_policy_bypassing_its_constructor_check_is_still_rejected() -> None:
    policy = FixedK(2)
    object.__setattr__(policy, "k", 0)
    with pytest.raises(ValueError, match=r"k: expected an integer >= 1"):
        cluster(np.ones((3, 2)), policy)


def test_unknown_policy_raises() -> None:
    with pytest.raises(TypeError, match="policy"):
        cluster(np.ones((3, 2)), 3)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"k": 0}, r"k: expected an integer >= 1, got 0"),
        ({"k": 2, "n_init": 0}, r"n_init: expected an integer >= 1"),
        ({"k": 2, "max_iter": 0}, r"max_iter: expected an integer >= 1"),
        ({"k": 2, "tol": -1.0}, r"tol: expected a finite float >= 0"),
        ({"k": 2, "tol": float("nan")}, r"tol: expected a finite float >= 0"),
    ],
)
def test_invalid_kmeans_arguments_raise(kwargs: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        kmeans(np.ones((4, 2)), **kwargs)


def test_clustering_is_frozen() -> None:
    c = cluster(np.eye(3), FixedK(2))
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.k = 5  # type: ignore[misc]


# --- scale ------------------------------------------------------------------------------------------------


def test_full_size_batch_completes() -> None:
    x, _ = blobs(6, 171, 576, noise=0.5, seed=21)
    x = x[:1024]
    c = cluster(x, AutoK(max_k=8))
    assert_well_formed(c, 1024, 576)
    assert c.k == 6


def test_per_request_gives_every_distinct_row_its_own_cluster() -> None:
    from adapter_service.core.clustering import PerRequest

    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 5))
    x[4] = x[1]  # the same prompt statistic twice: one cluster, one adapter
    result = cluster(x, PerRequest())
    assert result.assignments.tolist() == [0, 1, 2, 3, 1, 4]
    assert result.k == 5 and result.sizes.tolist() == [1, 2, 1, 1, 1] and result.silhouette is None
    np.testing.assert_allclose(result.centroids[2], x[2] / np.linalg.norm(x[2]), rtol=1e-6)
