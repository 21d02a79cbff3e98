"""Settings of the PyTorch plugin."""

from __future__ import annotations

import os
from dataclasses import dataclass

from adapter_service.core.clustering import ClusteringPolicy


@dataclass(frozen=True)
class PluginConfig:
    deadline_s: float = 0.5  # per Adapt call; slower answers mean the batch runs on the base model
    manifest_timeout_s: float = 5.0  # at attach (start-up), where waiting a little is fine
    # None: one adapter per request (PerRequest) when the sidecar offers the compact form, where it
    # costs what one adapter costs and the studies found it best; AutoK(max_k=8) otherwise.
    policy: ClusteringPolicy | None = None
    # Wire dtype of A and B. None: bfloat16 for bfloat16 models, float16 otherwise: moving adapters
    # through gRPC costs ~3 ms/MB, halving the bytes halves it, and fp16 keeps 11 mantissa bits of
    # deltas that are themselves approximations. Ask for "float32" when exactness matters (tests).
    wire_dtype: str | None = None
    cache_bytes: int = 256 * 1024 * 1024  # LRU budget for received adapters, on the model's device
    max_held_keys: int = 256  # most recent cached keys sent with each call
    # Check the base model's embedding hash against the manifest at attach (costs one pass over it).
    check_weights: bool = True
    # A mixture's compact form (bases once, weights per cluster; applied at the cost of one adapter).
    # None: whenever the sidecar offers it; False: whole adapters per cluster (for comparisons).
    compact: bool | None = None
    # Drift guard: at prefill, a row whose adapter delta at any target module is non-finite, or larger
    # than this many times the module's base output (Frobenius norms over the row's prompt tokens), is
    # served on the base model for the rest of the batch and counted. Trained adapters stay well below
    # (the demo artifact on SmolLM2: 0.5-0.75 on 16-token prompts, at most 1.9 on one-token prompts); a
    # broken or overflowing artifact lands orders of magnitude above. None: no ratio bound (non-finite
    # deltas are always guarded).
    max_delta_ratio: float | None = 4.0
    # JSON lines, one per batch: artifact, each row's adapter key or "base" and why, each adapter's
    # ||s B A||_F / ||W||_F (adapter_service.client.audit). None: no audit.
    audit_log: str | os.PathLike[str] | None = None

    def __post_init__(self) -> None:
        ratio = self.max_delta_ratio
        if ratio is not None and not ratio > 0:
            raise ValueError(f"max_delta_ratio: expected a positive number or None, got {ratio!r}")
