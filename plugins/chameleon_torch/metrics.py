"""Prometheus metrics of the plugin: how often batches were adapted, why they fell back, cache use, and the
rows the drift guard served on the base model."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from chameleon_torch.layer import GUARD_REASONS

FALLBACK_REASONS = (
    "no_manifest",  # the sidecar was never reached, so the model could not be checked against it
    "manifest_mismatch",  # the sidecar serves an artifact made for another model
    "unavailable",  # the sidecar is down or refused the connection
    "deadline",  # the sidecar answered later than the deadline
    "unauthenticated",  # the sidecar refused the token or certificate, or a TLS handshake failed
    "paused",  # the operator paused the sidecar
    "rejected",  # the sidecar refused the request (any other gRPC status)
    "invalid_response",  # shapes, dtypes, byte lengths or non-finite values not as the manifest says
    "cache_miss",  # the sidecar left out an adapter the plugin no longer holds
    "plugin_error",  # a bug on this side; logged with a traceback
)


class PluginMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.batches = Counter(
            "chameleon_plugin_batches", "Batches seen, by outcome", ["outcome"], registry=r
        )
        self.fallbacks = Counter(
            "chameleon_plugin_fallbacks", "Batches run on the base model, by reason", ["reason"], registry=r
        )
        self.adapters = Counter(
            "chameleon_plugin_adapters",
            "Cluster adapters used, by where they came from",
            ["source"],
            registry=r,
        )
        self.sidecar_seconds = Histogram(
            "chameleon_plugin_sidecar_seconds",
            "Wall time of Adapt calls seen by the plugin",
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0),
            registry=r,
        )
        self.prepare_seconds = Histogram(
            "chameleon_plugin_prepare_seconds",
            "Statistic + sidecar + install time per batch",
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0),
            registry=r,
        )
        self.cache_bytes = Gauge(
            "chameleon_plugin_cache_bytes", "Bytes of adapters held in the cache", registry=r
        )
        self.guarded_rows = Counter(
            "chameleon_plugin_guarded_rows",
            "Rows served on the base model because their adapter's output was non-finite or drifted "
            "beyond max_delta_ratio of the base output",
            ["reason"],
            registry=r,
        )
        for reason in FALLBACK_REASONS:
            self.fallbacks.labels(reason)
        for reason in GUARD_REASONS:
            self.guarded_rows.labels(reason)
        for outcome in ("adapted", "fallback"):
            self.batches.labels(outcome)

    def fallback_count(self, reason: str | None = None) -> float:
        """Number of fallbacks (of one reason, or all): for tests and dashboards."""
        reasons = FALLBACK_REASONS if reason is None else (reason,)
        return sum(
            self.registry.get_sample_value("chameleon_plugin_fallbacks_total", {"reason": r}) or 0.0
            for r in reasons
        )

    def guarded_count(self, reason: str | None = None) -> float:
        """Number of guarded rows (of one reason, or all)."""
        reasons = GUARD_REASONS if reason is None else (reason,)
        return sum(
            self.registry.get_sample_value("chameleon_plugin_guarded_rows_total", {"reason": r}) or 0.0
            for r in reasons
        )
