"""chameleon_torch's PluginMetrics plus what only a server with shared adapter slots has."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from chameleon_torch.metrics import PluginMetrics


class TGIMetrics(PluginMetrics):
    """Same batch/fallback/adapter counters as chameleon_torch, plus TGI slot and request accounting."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        super().__init__(registry)
        r = self.registry
        self.slots = Gauge(
            "chameleon_tgi_registered_adapters", "Adapters registered in TGI's layer weights", registry=r
        )
        self.evictions = Counter(
            "chameleon_tgi_evictions", "Adapters unregistered once no request used them", registry=r
        )
        self.requests = Counter(
            "chameleon_tgi_requests",
            "Requests at their first prefill, by what they got",
            ["outcome"],  # cluster | base (opted out or fallback) | static (a LORA_ADAPTERS adapter)
            registry=r,
        )
        for outcome in ("cluster", "base", "static"):
            self.requests.labels(outcome)
