"""Synthetic request statistics shared by the sidecar benchmarks (no model needed)."""

from __future__ import annotations

import numpy as np

DOMAINS = 4


def synthetic_batch(n: int = 32, dim: int = 576, seed: int = 0, domains: int = DOMAINS) -> np.ndarray:
    """[n, dim] float32 statistics of requests from `domains` domains: noisy copies of one direction
    per domain, so k-means has groups to find."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((domains, dim))
    labels = rng.integers(0, domains, n)
    return (centres[labels] + 0.35 * rng.standard_normal((n, dim))).astype(np.float32)
