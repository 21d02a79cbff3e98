"""Settings of the TGI plugin, read from the shard's environment (the launcher copies its env to shards)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from adapter_service.client.credentials import ClientSecurity
from adapter_service.client.settings import common_settings, parse_policy, positive
from adapter_service.core.clustering import AutoK, ClusteringPolicy


@dataclass(frozen=True)
class TGIPluginConfig:
    # CHAMELEON_SIDECAR: host:port or unix:PATH of `chameleon serve`, or any gRPC target naming several
    # replicas (dns:///name:port, ipv4:a:p,b:p): calls are spread over them and moved off a lost one.
    sidecar: str = "127.0.0.1:50051"
    deadline_s: float = 0.5  # CHAMELEON_DEADLINE_MS: per Adapt call; later answers mean base model
    manifest_timeout_s: float = 5.0  # CHAMELEON_MANIFEST_TIMEOUT_MS: at shard start-up
    policy: ClusteringPolicy = field(
        default_factory=lambda: AutoK(max_k=8)
    )  # CHAMELEON_POLICY auto:8 | fixed:3
    # CHAMELEON_WIRE_DTYPE: None = the model's half type (bfloat16 for bf16 models, else float16).
    wire_dtype: str | None = None
    cache_bytes: int = 256 * 1024 * 1024  # CHAMELEON_CACHE_MB: adapters kept on the GPU for reuse
    max_held_keys: int = 256  # CHAMELEON_MAX_HELD_KEYS: cached keys sent with each call
    check_weights: bool = True  # CHAMELEON_CHECK_WEIGHTS: compare the embedding hash with the artifact's
    metrics_port: int | None = None  # CHAMELEON_METRICS_PORT: serve the plugin's Prometheus metrics
    allow_untested: bool = False  # CHAMELEON_TGI_ALLOW_UNTESTED: start on TGI sources other than 3.3.7
    # CHAMELEON_TLS_CA, CHAMELEON_TLS_CERT, CHAMELEON_TLS_KEY, CHAMELEON_AUTH_TOKEN_FILE,
    # CHAMELEON_TLS_SERVER_NAME: TLS, mTLS and the bearer token towards the sidecar.
    security: ClientSecurity | None = None
    audit_log: str | None = None  # CHAMELEON_AUDIT_LOG: JSON lines, one per prefill with new requests

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> TGIPluginConfig:
        """Parse CHAMELEON_* variables; ValueError naming the variable on a bad value."""
        env = os.environ if env is None else env
        kwargs = common_settings(env, "CHAMELEON_TGI_ALLOW_UNTESTED")
        if "CHAMELEON_SIDECAR" in env:
            kwargs["sidecar"] = env["CHAMELEON_SIDECAR"]
        if "CHAMELEON_POLICY" in env:
            kwargs["policy"] = parse_policy(env["CHAMELEON_POLICY"])
        if "CHAMELEON_CACHE_MB" in env:
            kwargs["cache_bytes"] = int(
                positive("CHAMELEON_CACHE_MB", env["CHAMELEON_CACHE_MB"], float, zero=True) * 2**20
            )
        return cls(**kwargs)
