"""The mixture's compact wire form: one shared set of bases, then `bases` weights per cluster.

A mixture generator (hypernetwork.MixtureHyperNetwork) emits, for every cluster, the same A and a B
whose column block m (rank / bases columns) is the unweighted B's block m times the cluster's weight
m. So the service can send the bases once and a handful of floats per cluster, and the receiver
rebuilds each cluster's B here. Server (runtime check) and client share this one function.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def column_weights(weights: Any, rank: int) -> Any:
    """[..., bases] weights -> [..., rank]: each basis's weight repeated over its rank / bases columns."""
    bases = weights.shape[-1]
    if bases < 1 or rank % bases:
        raise ValueError(f"weights: {bases} bases do not divide rank {rank}")
    if hasattr(weights, "repeat_interleave"):  # torch, without importing it
        return weights.repeat_interleave(rank // bases, dim=-1)
    return np.repeat(weights, rank // bases, axis=-1)


def weighted_b(unweighted_b: Any, weights: Any) -> Any:
    """B [..., d_out, rank] with column block m scaled by weights [..., bases] (numpy or torch)."""
    columns = column_weights(weights, unweighted_b.shape[-1])
    return unweighted_b * columns[..., None, :]
