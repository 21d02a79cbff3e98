"""Why a model-server plugin runs a batch on the base model, shared by every plugin.

A plugin never fails a generation because the sidecar failed: each way the sidecar can fail it becomes a
`Fallback` with a short reason, which the plugin counts in its metrics and logs once per change of
reason (`FallbackLog`). The reasons are the same in every plugin, so one dashboard reads them all.
Client side only: the server never imports this.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import grpc

from adapter_service.client import AdapterClient, AdapterServiceError, InvalidResponse, ServiceManifest

_STATUS_REASONS = {
    grpc.StatusCode.DEADLINE_EXCEEDED: "deadline",
    grpc.StatusCode.UNAVAILABLE: "unavailable",
    grpc.StatusCode.UNAUTHENTICATED: "unauthenticated",
    grpc.StatusCode.PERMISSION_DENIED: "unauthenticated",
}
# How gRPC words a failed TLS handshake (a CA that did not sign the sidecar's certificate, a name that
# does not match it, a TLS client against a plaintext sidecar): UNAVAILABLE like a down sidecar, but no
# restart fixes it, so it is told apart. A plaintext client against a TLS sidecar, or a client without
# the certificate an mTLS sidecar requires, only sees the socket closed: that stays 'unavailable'.
_TLS_MARKERS = ("handshake failed", "ssl_error", "tsi_", "verification check failed")


class ManifestMismatch(ValueError):
    """The sidecar's artifact was not made for this model (or asks for a statistic it cannot compute)."""


class Fallback(Exception):
    """This batch runs on the base model, for `reason` (a metric label) and `detail` (for the log)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def error_reason(exc: AdapterServiceError) -> str:
    """'paused', 'unauthenticated' (refused credentials, or a failed TLS handshake), 'deadline',
    'unavailable' or 'rejected' (any other status: the sidecar refused the request)."""
    if exc.paused:
        return "paused"
    if exc.code == grpc.StatusCode.UNAVAILABLE and any(m in exc.details.lower() for m in _TLS_MARKERS):
        return "unauthenticated"
    return _STATUS_REASONS.get(exc.code, "rejected")


def sidecar_fallback(exc: AdapterServiceError | InvalidResponse) -> Fallback:
    """An Adapt call's failure as a fallback: a reason of `error_reason`, or 'invalid_response' (an
    answer that failed validation)."""
    if isinstance(exc, InvalidResponse):
        return Fallback("invalid_response", str(exc))
    return Fallback(error_reason(exc), str(exc))


def ensure_manifest(
    client: AdapterClient,
    current: ServiceManifest | None,
    artifact_id: str | None,
    timeout: float,
    install: Callable[[ServiceManifest], None],
    forget: Callable[[], None],
    recheck: bool = False,
) -> None:
    """Fetch and `install` the sidecar's manifest when none is held, when an answer came from another
    artifact (`artifact_id`), or on `recheck` (the connection was lost: the sidecar behind the address
    may have been restarted on another artifact, even one with the same id). A manifest equal to the one
    held installs nothing, so a plain reconnect keeps the plugin's cache. `install` raises
    ManifestMismatch for an artifact the model cannot serve; then `forget` drops what the plugin held,
    so no batch is adapted until a fitting artifact is served."""
    if current is not None and not recheck and (artifact_id is None or artifact_id == current.artifact_id):
        return
    try:
        manifest = client.manifest(timeout=timeout, refresh=True)
    except AdapterServiceError as exc:
        reason = error_reason(exc)
        if current is None and reason not in ("unauthenticated", "paused"):
            reason = "no_manifest"  # never reached: the model has not been checked yet
        raise Fallback(reason, str(exc)) from exc
    if manifest == current:
        return
    try:
        install(manifest)
    except ManifestMismatch as exc:
        forget()
        raise Fallback("manifest_mismatch", str(exc)) from exc


class ManifestWatch:
    """When a plugin must re-check the sidecar's manifest: after the client's channel lost a connection
    (AdapterClient.disconnects moved). Call `ensure` wherever `ensure_manifest` was called."""

    def __init__(self, client: AdapterClient) -> None:
        self.client = client
        self.seen = getattr(client, "disconnects", 0)

    def ensure(
        self,
        current: ServiceManifest | None,
        artifact_id: str | None,
        timeout: float,
        install: Callable[[ServiceManifest], None],
        forget: Callable[[], None],
    ) -> None:
        seen = getattr(self.client, "disconnects", 0)
        ensure_manifest(self.client, current, artifact_id, timeout, install, forget, seen != self.seen)
        self.seen = seen  # only once the manifest was checked: a failed re-check is tried again


class FallbackLog:
    """Logs a plugin's fallbacks once per change of reason, and its return to adapted batches.

    Metrics count every batch; the log says when something changed, so a sidecar down for a minute
    is two lines, not one per batch. `unit` names what falls back ("batch", "group")."""

    def __init__(self, logger: logging.Logger, unit: str = "batch") -> None:
        self.logger = logger
        self.unit = unit
        self.reason: str | None = None
        self.count = 0

    def fallback(self, reason: str, detail: str) -> None:
        if reason == self.reason:
            self.count += 1
            self.logger.debug(f"chameleon {self.unit} on the base model ({reason}): {detail}")
            return
        self.reason, self.count = reason, 1
        self.logger.warning(
            f"chameleon adapters unavailable ({reason}); each {self.unit} runs on the base model until "
            f"this changes: {detail}",
            extra={"reason": reason, "detail": detail},
        )

    def adapted(self) -> None:
        if self.reason is not None:
            self.logger.info(
                f"chameleon adapters back; {self.count} {self.unit} fallback(s) for {self.reason}",
                extra={"reason": self.reason, "fallbacks": self.count},
            )
            self.reason, self.count = None, 0
