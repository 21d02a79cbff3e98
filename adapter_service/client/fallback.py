"""Why a model-server plugin runs a batch on the base model, shared by every plugin.

A plugin never fails a generation because the sidecar failed: each way the sidecar can fail it becomes a
`Fallback` with a short reason, which the plugin logs and counts in its metrics. The reasons are the
same in every plugin, so one dashboard reads them all. Client side only: the server never imports this.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc

from adapter_service.client import AdapterClient, AdapterServiceError, InvalidResponse, ServiceManifest

_STATUS_REASONS = {grpc.StatusCode.DEADLINE_EXCEEDED: "deadline", grpc.StatusCode.UNAVAILABLE: "unavailable"}


class ManifestMismatch(ValueError):
    """The sidecar's artifact was not made for this model (or asks for a statistic it cannot compute)."""


class Fallback(Exception):
    """This batch runs on the base model, for `reason` (a metric label) and `detail` (for the log)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def sidecar_fallback(exc: AdapterServiceError | InvalidResponse) -> Fallback:
    """An Adapt call's failure as a fallback: 'deadline', 'unavailable', 'rejected' (any other gRPC
    status: the sidecar refused the request) or 'invalid_response' (an answer that failed validation)."""
    if isinstance(exc, InvalidResponse):
        return Fallback("invalid_response", str(exc))
    return Fallback(_STATUS_REASONS.get(exc.code, "rejected"), str(exc))


def ensure_manifest(
    client: AdapterClient,
    current: ServiceManifest | None,
    artifact_id: str | None,
    timeout: float,
    install: Callable[[ServiceManifest], None],
    forget: Callable[[], None],
) -> None:
    """Fetch and `install` the sidecar's manifest when none is held, or when an answer came from another
    artifact (`artifact_id`): the sidecar may be restarted on a new artifact at any time. `install`
    raises ManifestMismatch for an artifact the model cannot serve; then `forget` drops what the plugin
    held, so no batch is adapted until a fitting artifact is served."""
    if current is not None and (artifact_id is None or artifact_id == current.artifact_id):
        return
    try:
        manifest = client.manifest(timeout=timeout, refresh=True)
    except AdapterServiceError as exc:
        raise Fallback("no_manifest", str(exc)) from exc
    try:
        install(manifest)
    except ManifestMismatch as exc:
        forget()
        raise Fallback("manifest_mismatch", str(exc)) from exc
