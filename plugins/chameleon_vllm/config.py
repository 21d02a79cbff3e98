"""Settings of the vLLM plugin, read from the environment of vLLM's processes (children inherit it)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from adapter_service.client.credentials import ClientSecurity
from adapter_service.client.settings import common_settings, parse_policy
from adapter_service.core.clustering import ClusteringPolicy

SIDECAR_VAR = "CHAMELEON_SIDECAR"


def enabled(env: Mapping[str, str] | None = None) -> bool:
    """The plugin acts only when CHAMELEON_SIDECAR names a sidecar: installed but unset, vLLM is stock."""
    env = os.environ if env is None else env
    return bool(env.get(SIDECAR_VAR, "").strip())


@dataclass(frozen=True)
class VLLMPluginConfig:
    # CHAMELEON_SIDECAR: host:port or unix:PATH of `chameleon serve`, or any gRPC target naming several
    # replicas (dns:///name:port, ipv4:a:p,b:p): calls are spread over them and moved off a lost one.
    sidecar: str = "127.0.0.1:50051"
    deadline_s: float = 0.5  # CHAMELEON_DEADLINE_MS: per Adapt call; later answers mean base model
    manifest_timeout_s: float = 5.0  # CHAMELEON_MANIFEST_TIMEOUT_MS: at engine start-up
    # CHAMELEON_POLICY auto:K | fixed:K. None: auto with max_k = min(8, --max-loras), so one group's
    # adapters always fit vLLM's slots together.
    policy: ClusteringPolicy | None = None
    # CHAMELEON_WIRE_DTYPE: None = bfloat16 for bf16 models, float16 otherwise (float32 for exactness).
    wire_dtype: str | None = None
    max_held_keys: int = 256  # CHAMELEON_MAX_HELD_KEYS: held keys sent with each call
    check_weights: bool = True  # CHAMELEON_CHECK_WEIGHTS: compare the embedding hash with the artifact's
    metrics_port: int | None = None  # CHAMELEON_METRICS_PORT: the plugin's Prometheus metrics
    allow_untested: bool = False  # CHAMELEON_VLLM_ALLOW_UNTESTED: start on vLLM sources not tested
    # CHAMELEON_TLS_CA, CHAMELEON_TLS_CERT, CHAMELEON_TLS_KEY, CHAMELEON_AUTH_TOKEN_FILE,
    # CHAMELEON_TLS_SERVER_NAME: TLS, mTLS and the bearer token towards the sidecar.
    security: ClientSecurity | None = None
    audit_log: str | None = None  # CHAMELEON_AUDIT_LOG: JSON lines, one per group

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> VLLMPluginConfig:
        """Parse CHAMELEON_* variables; ValueError naming the variable on a bad value."""
        env = os.environ if env is None else env
        kwargs = common_settings(env, "CHAMELEON_VLLM_ALLOW_UNTESTED")
        if env.get(SIDECAR_VAR, "").strip():
            kwargs["sidecar"] = env[SIDECAR_VAR].strip()
        if env.get("CHAMELEON_POLICY"):
            kwargs["policy"] = parse_policy(env["CHAMELEON_POLICY"])
        return cls(**kwargs)
