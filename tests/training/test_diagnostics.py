"""Grouping diagnostics: the numbers that say whether a statistic groups requests by domain."""

from __future__ import annotations

import numpy as np
import pytest

from adapter_service.training.diagnostics import grouping_diagnostics, knn_accuracy, nmi


def test_nmi_is_one_for_the_same_partition_and_zero_for_independent_ones() -> None:
    assert nmi([0, 0, 1, 1], ["a", "a", "b", "b"]) == pytest.approx(1.0)
    assert nmi([0, 1, 0, 1], ["a", "a", "b", "b"]) == pytest.approx(0.0, abs=1e-12)
    assert nmi([0, 0, 0, 0], ["a", "a", "b", "b"]) == 0.0  # one cluster carries no information


def test_separable_domains_score_high_and_noise_scores_at_chance() -> None:
    rng = np.random.default_rng(0)
    labels = [f"d{i % 4}" for i in range(128)]
    centres = rng.standard_normal((4, 32))
    clean = np.stack([centres[int(lab[1])] for lab in labels]) + 0.05 * rng.standard_normal((128, 32))
    good = grouping_diagnostics(clean, labels)
    assert good["knn_accuracy"] == 1.0
    assert good["policies"]["k=4"]["purity"] > 0.95 and good["policies"]["k=4"]["nmi"] > 0.9
    assert good["policies"]["k=4"]["chance_purity"] < 0.6
    noise = grouping_diagnostics(rng.standard_normal((128, 32)), labels)
    assert noise["knn_accuracy"] < 0.5
    assert noise["policies"]["k=4"]["nmi"] < 0.4
    assert good["policies"]["k=4"]["chance_nmi"] < 0.4 < good["policies"]["k=4"]["nmi"]
    assert noise["majority_share"] == 0.25


def test_knn_accuracy_and_label_count_are_checked() -> None:
    x = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    assert knn_accuracy(x, ["a", "a", "b", "b"], k=1) == 1.0
    with pytest.raises(ValueError, match="labels: expected 4"):
        grouping_diagnostics(x, ["a", "b"])
