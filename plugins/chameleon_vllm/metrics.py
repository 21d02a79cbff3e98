"""chameleon_torch's PluginMetrics plus what only an engine with its own LoRA cache has."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from chameleon_torch.metrics import PluginMetrics


class VLLMMetrics(PluginMetrics):
    """Same batch/fallback/adapter counters as the other plugins (one dashboard reads them all), plus
    the adapters handed to vLLM and how requests were served."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        super().__init__(registry)
        r = self.registry
        self.stored = Gauge(
            "chameleon_vllm_stored_adapters", "Adapters held in the worker for vLLM to load", registry=r
        )
        self.evictions = Counter(
            "chameleon_vllm_evictions", "Adapters dropped once no request used them", registry=r
        )
        self.requests = Counter(
            "chameleon_vllm_requests",
            "Requests when first scheduled, by what they got",
            ["outcome"],  # cluster | base (opted out, unsupported or fallback) | static (the client's LoRA)
            registry=r,
        )
        for outcome in ("cluster", "base", "static"):
            self.requests.labels(outcome)
