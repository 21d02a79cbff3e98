"""Prometheus metrics of one service instance, served on their own port.

Each server gets its own registry, so several servers in one process (tests, benchmarks) never
share or collide on counters.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

STAGES = ("decode", "cluster", "hypernetwork", "encode", "total")
_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.stage_seconds = Histogram(
            "chameleon_adapt_stage_seconds",
            "Adapt latency per stage",
            ["stage"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.rows = Histogram(
            "chameleon_adapt_rows",
            "Rows (requests) per Adapt call",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
            registry=self.registry,
        )
        self.clusters = Histogram(
            "chameleon_adapt_clusters",
            "Clusters per Adapt call",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32),
            registry=self.registry,
        )
        self.adapters = Counter(
            "chameleon_adapters",
            "Cluster adapters answered, by whether tensors were sent or left out",
            ["outcome"],
            registry=self.registry,
        )
        self.fallback_rows = Counter(
            "chameleon_fallback_adapter_rows",
            "Requests served the artifact's fallback adapter (the static LoRA its label router gives the "
            "requests it is unsure of)",
            registry=self.registry,
        )
        self.response_bytes = Counter(
            "chameleon_adapt_response_bytes", "Bytes of Adapt responses", registry=self.registry
        )
        self.rpcs = Counter(
            "chameleon_rpcs",
            "RPCs handled, by method and status code",
            ["method", "code"],
            registry=self.registry,
        )
        self.errors = Counter(
            "chameleon_rpc_errors",
            "Failed RPCs, by method and status code",
            ["method", "code"],
            registry=self.registry,
        )
        self.paused = Gauge(
            "chameleon_server_paused",
            "1 while the pause switch makes Adapt answer FAILED_PRECONDITION, else 0",
            registry=self.registry,
        )
        self.refused = Counter(
            "chameleon_rpcs_refused",
            "Calls refused before reaching a method: unauthenticated, or arriving while draining",
            ["reason"],
            registry=self.registry,
        )
        self._http = None

    def serve(self, port: int, address: str = "127.0.0.1") -> int:
        """Expose /metrics; returns the bound port (pass 0 for any free one)."""
        self._http, _thread = start_http_server(port, addr=address, registry=self.registry)
        return self._http.server_address[1]

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
