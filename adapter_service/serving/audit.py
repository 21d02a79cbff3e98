"""The audit log: one JSON line per Adapt call (appended and flushed per line), for answering later
which adapter served which request and how strong it was. No prompt text ever: the sidecar never sees
any. The schema is in docs/guide/deploy.md (Audit log).
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from pathlib import Path

import grpc
import numpy as np

from adapter_service.core import codec
from adapter_service.core.clustering import AutoK, ClusteringPolicy, FixedK, PerRequest
from adapter_service.core.compact import column_weights
from adapter_service.proto import adapter_service_pb2 as pb
from adapter_service.serving.adapt import AdaptOutputs
from adapter_service.serving.errors import ServiceError, clip
from adapter_service.serving.runtime import HyperNetworkRuntime
from adapter_service.serving.validation import AdaptCall

GROUPING_NAMES = {pb.GROUPING_POLICY: "policy", pb.GROUPING_PREDICTED_LABEL: "predicted-label"}
_POLICY_KINDS = {AutoK: "auto", FixedK: "fixed", PerRequest: "per_request"}
MAX_IDS = 4096  # request ids listed in an error record (a valid call has at most --max-rows)


class AuditLog:
    """Appends records to `path`; thread-safe (OK records are written from the Adapt worker threads)."""

    def __init__(self, path: Path, runtime: HyperNetworkRuntime) -> None:
        self.path = path
        self.runtime = runtime
        self._lock = threading.Lock()
        self._mixture_grams: dict[str, np.ndarray] = {}
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        except OSError as exc:
            raise ServiceError(f"--audit-log: cannot open {path}: {exc}") from exc
        self._file = os.fdopen(fd, "a", buffering=1, encoding="utf-8")

    def close(self) -> None:
        with self._lock:
            self._file.close()

    def ok(
        self, call: AdaptCall, response: pb.AdaptResponse, outputs: AdaptOutputs, peer: str, seconds: float
    ) -> None:
        norms = self.delta_norms(outputs)
        keys = [c.adapter_key for c in response.clusters]
        requests = []
        for row, cluster_index in enumerate(response.assignments):
            entry = {"cluster": int(cluster_index), "adapter_key": keys[cluster_index]}
            if call.request_ids:
                entry = {"id": clip(call.request_ids[row]), **entry}
            requests.append(entry)
        self._write(
            {
                **self._common("OK", peer, seconds),
                "rows": len(response.assignments),
                "requests": requests,
                "policy": policy_record(call.policy),
                "grouping": GROUPING_NAMES.get(response.grouping, str(response.grouping)),
                "dtype": codec.dtype_name(call.dtype),
                "compact": call.compact,
                "clusters": [
                    {
                        "index": c.index,
                        "size": c.size,
                        "adapter_key": c.adapter_key,
                        "omitted": c.omitted,
                        "delta_norms": norms.get(c.index),
                    }
                    for c in response.clusters
                ],
            }
        )

    def error(self, request: object, code: grpc.StatusCode, message: str, peer: str, seconds: float) -> None:
        record = {**self._common(code.name, peer, seconds), "error": clip(message)}
        if isinstance(request, pb.AdaptRequest):
            shape = request.statistics.shape if request.HasField("statistics") else []
            ids = list(request.request_ids)
            record.update(
                rows=int(shape[0]) if len(shape) == 2 else None,
                request_ids=[clip(i) for i in ids[:MAX_IDS]] if ids else None,
                policy=_requested_policy(request),
            )
        self._write(record)

    def delta_norms(self, outputs: AdaptOutputs) -> dict[int, dict[str, float]]:
        """Per generated cluster and module, ||s B A||_F, from r x r Gram matrices:
        ||BA||_F^2 = trace((B^T B)(A A^T)), so the d_out x d_in product is never formed."""
        manifest = self.runtime.manifest
        scale = abs(manifest.scaling)
        norms: dict[int, dict[str, float]] = {index: {} for index in outputs.needed}
        if not outputs.needed:
            return norms
        for group in manifest.groups:
            if outputs.weights is not None:  # compact: B = basis B with column block m times weight m
                columns = column_weights(np.asarray(outputs.weights, np.float64), manifest.rank)
                squared = np.einsum("lij,ki,kj->kl", self._mixture_gram(group.name), columns, columns)
            else:
                out = outputs.generated[group.name]
                gram_a = out.a @ out.a.swapaxes(-1, -2)  # [K, L, r, r]
                gram_b = out.b.swapaxes(-1, -2) @ out.b
                squared = np.einsum("klij,klji->kl", gram_b.astype(np.float64), gram_a.astype(np.float64))
            values = scale * np.sqrt(np.maximum(squared, 0.0))
            for row, index in enumerate(outputs.needed):
                for layer, module in enumerate(group.modules):
                    norms[index][module] = float(values[row, layer])
        return norms

    def _mixture_gram(self, group: str) -> np.ndarray:
        """(B^T B) * (A A^T)^T per module of a mixture's shared factors, so that a cluster's squared norm
        is w^T M w for its column weights w."""
        if group not in self._mixture_grams:
            bases = self.runtime.bases[group]
            a, b = bases.a.astype(np.float64), bases.b.astype(np.float64)
            gram_a = a @ a.swapaxes(-1, -2)
            gram_b = b.swapaxes(-1, -2) @ b
            self._mixture_grams[group] = gram_b * gram_a.swapaxes(-1, -2)
        return self._mixture_grams[group]

    def _common(self, status: str, peer: str, seconds: float) -> dict:
        now = time.time()
        return {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z",
            "method": "Adapt",
            "status": status,
            "peer": clip(peer),
            "artifact_id": self.runtime.manifest.artifact_id,
            "artifact_sha256": self.runtime.artifact.sha256,
            "duration_s": round(seconds, 6),
        }

    def _write(self, record: dict) -> None:
        line = json.dumps(record, separators=(",", ":")) + "\n"
        with self._lock:
            if not self._file.closed:
                self._file.write(line)


def policy_record(policy: ClusteringPolicy) -> dict:
    """The clustering policy applied, as {"kind": "auto"|"fixed"|"per_request", its parameters}."""
    return {"kind": _POLICY_KINDS.get(type(policy), type(policy).__name__), **dataclasses.asdict(policy)}


def _requested_policy(request: pb.AdaptRequest) -> dict:
    which = request.clustering.WhichOneof("policy") if request.HasField("clustering") else None
    if which is None:
        return {"kind": "auto"}
    if which == "fixed":
        return {"kind": "fixed", "k": request.clustering.fixed.k}
    if which == "auto":
        auto = request.clustering.auto
        return {"kind": "auto", "max_k": auto.max_k, "min_cluster_size": auto.min_cluster_size}
    return {"kind": which}
