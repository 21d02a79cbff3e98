"""Parsing of the CHAMELEON_* environment variables that engine plugins (TGI, vLLM) read.

Engine plugins are configured through the engine's environment, not flags: the engine owns its command
line. One parser per kind of value, so every plugin words a bad value the same way: the variable's
name, what it expects, and what it got. Client side only: the server never imports this.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from adapter_service.client.credentials import ENV_VARS, ClientSecurity
from adapter_service.core.clustering import AutoK, ClusteringPolicy, FixedK


def parse_policy(text: str, var: str = "CHAMELEON_POLICY") -> ClusteringPolicy:
    """ "auto:8" -> AutoK(max_k=8); "fixed:3" -> FixedK(3)."""
    kind, _, number = text.strip().partition(":")
    try:
        k = int(number)
    except ValueError:
        k = 0
    if kind == "auto" and k >= 1:
        return AutoK(max_k=k)
    if kind == "fixed" and k >= 1:
        return FixedK(k)
    raise ValueError(f"{var}: expected auto:MAX_K or fixed:K (K >= 1), got {text!r}")


def positive(var: str, text: str, kind: type, zero: bool = False):
    """A positive (or, with `zero`, non-negative) int or float; ValueError naming `var` otherwise."""
    try:
        value = kind(text)
    except ValueError:
        value = -1
    if value != value or value < 0 or (value == 0 and not zero):  # value != value: NaN
        raise ValueError(f"{var}: expected a {'non-negative' if zero else 'positive'} number, got {text!r}")
    return value


def flag(var: str, text: str) -> bool:
    value = text.strip().lower()
    if value in {"1", "true", "yes"}:
        return True
    if value in {"0", "false", "no", ""}:
        return False
    raise ValueError(f"{var}: expected 1 or 0, got {text!r}")


def wire_dtype(var: str, text: str) -> str:
    if text not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"{var}: expected float32, float16 or bfloat16, got {text!r}")
    return text


def common_settings(env: Mapping[str, str], allow_untested_var: str) -> dict[str, Any]:
    """The settings every engine plugin reads the same way, as config keyword arguments; each plugin
    adds its own (sidecar, policy, ...)."""
    kwargs: dict[str, Any] = {}
    for var, key in (
        ("CHAMELEON_DEADLINE_MS", "deadline_s"),
        ("CHAMELEON_MANIFEST_TIMEOUT_MS", "manifest_timeout_s"),
    ):
        if var in env:
            kwargs[key] = positive(var, env[var], float) / 1000
    if env.get("CHAMELEON_WIRE_DTYPE"):
        kwargs["wire_dtype"] = wire_dtype("CHAMELEON_WIRE_DTYPE", env["CHAMELEON_WIRE_DTYPE"])
    if "CHAMELEON_MAX_HELD_KEYS" in env:
        kwargs["max_held_keys"] = positive(
            "CHAMELEON_MAX_HELD_KEYS", env["CHAMELEON_MAX_HELD_KEYS"], int, zero=True
        )
    if "CHAMELEON_CHECK_WEIGHTS" in env:
        kwargs["check_weights"] = flag("CHAMELEON_CHECK_WEIGHTS", env["CHAMELEON_CHECK_WEIGHTS"])
    if env.get("CHAMELEON_METRICS_PORT"):
        kwargs["metrics_port"] = positive("CHAMELEON_METRICS_PORT", env["CHAMELEON_METRICS_PORT"], int)
    if allow_untested_var in env:
        kwargs["allow_untested"] = flag(allow_untested_var, env[allow_untested_var])
    if any(env.get(var, "").strip() for var in ENV_VARS.values()):
        # CHAMELEON_TLS_CA, _TLS_CERT, _TLS_KEY, _AUTH_TOKEN_FILE, _TLS_SERVER_NAME (errors name them)
        kwargs["security"] = ClientSecurity.from_env(env)
    if env.get("CHAMELEON_AUDIT_LOG", "").strip():
        kwargs["audit_log"] = env["CHAMELEON_AUDIT_LOG"].strip()
    return kwargs
