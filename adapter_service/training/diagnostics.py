"""Does a statistic group requests by domain? Measured the way serving uses it, against known labels.

A per-cluster adapter can only be better than one static adapter if the clusters carry information
about what the continuation needs. With domain labels as a proxy, three numbers answer that:

* purity: the share of requests whose cluster's majority label is their own, for the clusters the
  service forms in serving-sized batches (with the chance level for the same cluster sizes);
* NMI between those clusters and the labels (0 = independent, 1 = the same partition), with its
  chance level: in batches of 32, even random clusters score well above 0;
* k-NN domain accuracy over the whole set (cosine, leave-one-out): whether the statistic separates
  the domains at all, whatever k-means makes of it in a batch of 32.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from adapter_service.core.clustering import AutoK, ClusteringPolicy, FixedK, cluster, l2_normalize


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def nmi(a: Sequence, b: Sequence) -> float:
    """Normalised mutual information (arithmetic-mean normalisation); 0 when either side is one group."""
    a_ids = {v: i for i, v in enumerate(dict.fromkeys(a))}
    b_ids = {v: i for i, v in enumerate(dict.fromkeys(b))}
    table = np.zeros((len(a_ids), len(b_ids)))
    for x, y in zip(a, b, strict=True):
        table[a_ids[x], b_ids[y]] += 1
    ha, hb = _entropy(table.sum(axis=1)), _entropy(table.sum(axis=0))
    if ha == 0 or hb == 0:
        return 0.0
    mutual = ha + hb - _entropy(table.ravel())
    return float(mutual / ((ha + hb) / 2))


def purity_hits(assignments: np.ndarray, labels: Sequence) -> int:
    """How many rows carry their group's most common label (purity = hits / rows)."""
    hits = 0
    for c in np.unique(assignments):
        hits += Counter(labels[i] for i in np.flatnonzero(assignments == c)).most_common(1)[0][1]
    return hits


def knn_accuracy(stats: np.ndarray, labels: Sequence[str], k: int = 5) -> float:
    """Leave-one-out k-NN label accuracy under cosine similarity (ties: the nearest neighbour's label)."""
    x = l2_normalize(np.asarray(stats, dtype=np.float64))
    sims = x @ x.T
    np.fill_diagonal(sims, -np.inf)
    order = np.argsort(-sims, axis=1)[:, :k]
    correct = 0
    for i, neighbours in enumerate(order):
        votes = Counter(labels[j] for j in neighbours)
        best = max(votes.values())
        winners = {lab for lab, n in votes.items() if n == best}
        guess = next(labels[j] for j in neighbours if labels[j] in winners)
        correct += guess == labels[i]
    return correct / len(labels)


def grouping_diagnostics(
    stats: np.ndarray,
    labels: Sequence[str],
    batch_size: int = 32,
    policies: dict[str, ClusteringPolicy] | None = None,
    seed: int = 0,
) -> dict:
    """Purity, chance purity and NMI of the service's clusters in consecutive serving-sized batches,
    per policy, plus k-NN domain accuracy and the majority-label share (the accuracy of knowing nothing)."""
    stats = np.asarray(stats, dtype=np.float32)
    labels = list(labels)
    if len(labels) != len(stats):
        raise ValueError(f"labels: expected {len(stats)} labels, got {len(labels)}")
    policies = policies or {"auto k": AutoK(max_k=8), "k=4": FixedK(4), "k=8": FixedK(8)}
    rng = np.random.default_rng(seed)
    result: dict = {
        "documents": len(labels),
        "labels": len(set(labels)),
        "majority_share": Counter(labels).most_common(1)[0][1] / len(labels),
        "knn_accuracy": knn_accuracy(stats, labels),
        "policies": {},
    }
    for name, policy in policies.items():
        hits = chance = 0
        scores, chance_scores, ks = [], [], []
        for start in range(0, len(labels), batch_size):
            rows = list(range(start, min(start + batch_size, len(labels))))
            batch_labels = [labels[i] for i in rows]
            assignments = cluster(stats[rows], policy, seed=seed).assignments
            hits += purity_hits(assignments, batch_labels)
            shuffled = rng.permutation(assignments)  # same cluster sizes, no relation to the prompts
            chance += purity_hits(shuffled, batch_labels)
            scores.append(nmi(assignments.tolist(), batch_labels))
            chance_scores.append(nmi(shuffled.tolist(), batch_labels))
            ks.append(len(np.unique(assignments)))
        result["policies"][name] = {
            "purity": hits / len(labels),
            "chance_purity": chance / len(labels),
            "nmi": float(np.mean(scores)),
            "chance_nmi": float(np.mean(chance_scores)),  # NMI of small partitions is biased upwards
            "mean_k": float(np.mean(ks)),
        }
    return result
