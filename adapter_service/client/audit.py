"""The plugins' per-batch audit record: JSON lines saying which adapter served each row, and why not.

One line per batch (TGI: per prefill with new requests; vLLM: per group): the time, the artifact, each
row's adapter key or "base" with the reason, and each adapter's size relative to the weights it
changes. Never prompt text. Writing must never fail a generation: an unwritable file is logged once and
the record is dropped. Client side only: the server never imports this.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
from datetime import UTC, datetime
from typing import Any

log = logging.getLogger("adapter_service.client")

BASE = "base"  # the adapter of a row served on the base model


def row(request: str | int, adapter: str | None, why: str | None = None) -> dict[str, Any]:
    """One row's entry: `adapter` None is the base model, `why` says why (fallback reason, guarded,
    opted out, static)."""
    entry: dict[str, Any] = {"request": request, "adapter": adapter or BASE}
    if why is not None:
        entry["why"] = why
    return entry


def relative_norm(delta_sq: float, weight_sq: float) -> float | None:
    """||delta||_F / ||W||_F from squared norms; None where undefined (JSON has no NaN)."""
    value = math.sqrt(delta_sq / weight_sq) if weight_sq > 0 and delta_sq >= 0 else float("nan")
    return round(value, 6) if math.isfinite(value) else None


def adapter_norms(delta_sq: dict[str, float], weight_sq: dict[str, float]) -> dict[str, Any]:
    """An adapter's audit entry from squared Frobenius norms per module, of its deltas (s B A) and of
    the base weights: the whole adapter's relative norm and its largest module's. Modules without a
    known weight are left out; with none known, delta_norm is None."""
    known = {n: w for n, w in weight_sq.items() if w and n in delta_sq}
    if not known:
        return {"delta_norm": None}
    worst = max(known, key=lambda n: delta_sq[n] / known[n])
    return {
        "delta_norm": relative_norm(sum(delta_sq[n] for n in known), sum(known.values())),
        "max_module": worst,
        "max_module_delta_norm": relative_norm(delta_sq[worst], known[worst]),
    }


class AuditLog:
    """Appends one JSON object per line to `path` (created with its parent directory if needed)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._lock = threading.Lock()
        self._failed = False

    def write_batch(
        self,
        manifest: Any,
        rows: list[dict[str, Any]],
        norms: dict[str, dict[str, Any]],
        **extra: Any,
    ) -> None:
        """A plugin's batch: the artifact from `manifest` (a ServiceManifest or None), `rows`, and the
        entries of `norms` for the adapters the rows used. Never raises: an audit record that cannot be
        built is logged, and the batch is served all the same."""
        try:
            used = {r["adapter"] for r in rows}
            self.write(
                artifact_id=manifest.artifact_id if manifest else None,
                artifact_sha256=manifest.artifact_sha256 if manifest else None,
                rows=rows,
                adapters={key: norms[key] for key in used if key in norms},
                **extra,
            )
        except Exception:
            log.exception("chameleon: could not write the audit record")

    def write(
        self,
        *,
        artifact_id: str | None,
        artifact_sha256: str | None,
        rows: list[dict[str, Any]],
        adapters: dict[str, dict[str, Any]] | None = None,
        **extra: Any,
    ) -> None:
        """One batch. `adapters`: per key, e.g. {"delta_norm": ..., "max_module": ...}."""
        record = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "artifact_id": artifact_id,
            "artifact_sha256": artifact_sha256,
            **extra,
            "rows": rows,
            "adapters": adapters or {},
        }
        try:
            line = json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n"
            with self._lock:
                parent = os.path.dirname(self.path)
                if parent:
                    os.makedirs(parent, exist_ok=True)
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(line)
            self._failed = False
        except (OSError, TypeError, ValueError) as exc:
            if not self._failed:  # once per failure streak: a full disk must not flood the log
                log.warning(f"chameleon audit log {self.path!r}: cannot write ({exc}); records are dropped")
            self._failed = True
