"""The Adapt computation as plain functions: cluster the batch, run the hyper-network, pack tensors.

Kept free of gRPC plumbing so it can be tested and benchmarked directly; the servicer only calls it.
The hyper-network runs only for clusters whose adapter the caller does not already hold. In the
mixture's compact form (compact.py) each cluster is its basis weights, and the bases go out once per
caller (until it holds `bases_key`).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import grpc
import numpy as np

from adapter_service.core import codec
from adapter_service.core.clustering import Clustering, PerRequest, cluster
from adapter_service.proto import adapter_service_pb2 as pb
from adapter_service.serving.runtime import GroupOutput, HyperNetworkRuntime
from adapter_service.serving.validation import AdaptCall, Limits, RequestError

# Per-tensor framing in the response (tags, lengths, shape): generous, so the estimate is an upper bound.
_TENSOR_OVERHEAD = 64
_MODULE_OVERHEAD = 64


def adapter_key(artifact_sha256: str, dtype: int, centroid: np.ndarray, compact: bool = False) -> str:
    """Same artifact, dtype, form and centroid -> same key, and (the network being deterministic) same
    tensors. The compact form rounds B differently in half precision, so it has keys of its own."""
    digest = hashlib.sha256()
    digest.update(artifact_sha256.encode())
    digest.update(codec.dtype_name(dtype).encode())
    if compact:
        digest.update(b"compact")
    digest.update(np.ascontiguousarray(centroid, dtype="<f4").tobytes())
    return digest.hexdigest()[:32]


def bases_key(artifact_sha256: str, dtype: int) -> str:
    """The key of a mixture artifact's bases in one dtype (compact form)."""
    return hashlib.sha256(f"{artifact_sha256}:{codec.dtype_name(dtype)}:bases".encode()).hexdigest()[:32]


@dataclass(frozen=True)
class AdaptOutputs:
    """What a call generated, before the wire cast: for the audit log's adapter norms."""

    needed: list[int]  # cluster indices generated, in row order of `generated` / `weights`
    generated: dict[str, GroupOutput]  # float32 A and B per group (empty in the compact form)
    weights: np.ndarray | None  # compact form: basis weights [len(needed), bases]
    fallback_rows: int = 0  # requests served the artifact's fallback adapter (`fallback_rows`)


def adapt(
    call: AdaptCall, runtime: HyperNetworkRuntime, limits: Limits, seed: int = 0, decode_seconds: float = 0.0
) -> pb.AdaptResponse:
    return adapt_with_outputs(call, runtime, limits, seed, decode_seconds)[0]


def adapt_with_outputs(
    call: AdaptCall, runtime: HyperNetworkRuntime, limits: Limits, seed: int = 0, decode_seconds: float = 0.0
) -> tuple[pb.AdaptResponse, AdaptOutputs]:
    """`adapt`, also returning the generated tensors it packed."""
    manifest = runtime.manifest
    started = time.perf_counter()
    grouping, label_weights = group_requests(call, runtime, seed)
    clustered = time.perf_counter()

    # A label group's adapter is its basis weights, so they key it: the same label, the same key in
    # every batch (its first request's centroid would change from batch to batch).
    identities = grouping.centroids if label_weights is None else label_weights
    keys = [adapter_key(runtime.artifact.sha256, call.dtype, c, call.compact) for c in identities]
    needed = [i for i, key in enumerate(keys) if key not in call.held_keys]
    shared_key = bases_key(runtime.artifact.sha256, call.dtype) if call.compact else ""
    send_bases = bool(call.compact and needed and shared_key not in call.held_keys)
    _check_response_size(len(needed), grouping.k, call, runtime, limits, send_bases)
    # Every cluster's basis weights when they are known anyway (label groups) or the fallback count
    # needs them; otherwise the compact form computes only the needed clusters'.
    every_weights = label_weights
    if every_weights is None and runtime.manifest.fallback_bases:
        every_weights = runtime.mixture_weights(grouping.centroids)
    weights = None
    if call.compact:
        generated = {}
        if not needed:
            weights = None
        elif every_weights is not None:
            weights = every_weights[needed]
        else:
            weights = runtime.mixture_weights(grouping.centroids[needed])
    else:
        generated = runtime.generate(grouping.centroids[needed]) if needed else {}
    generated_at = time.perf_counter()

    # One vectorised cast per group instead of one per tensor.
    wire_dtype = codec.numpy_dtype(call.dtype)
    cast = {
        name: (out.a.astype(wire_dtype, copy=False), out.b.astype(wire_dtype, copy=False))
        for name, out in generated.items()
    }

    response = pb.AdaptResponse(
        assignments=grouping.assignments.tolist(),
        artifact_id=manifest.artifact_id,
        bases_key=shared_key,
        grouping=pb.GROUPING_PREDICTED_LABEL if label_weights is not None else pb.GROUPING_POLICY,
    )
    if send_bases:
        for group in manifest.groups:
            shared = runtime.bases[group.name]
            a, b = shared.a.astype(wire_dtype, copy=False), shared.b.astype(wire_dtype, copy=False)
            for layer, module in enumerate(group.modules):
                response.bases.add(module=module, a=codec.encode(a[layer]), b=codec.encode(b[layer]))
    row_of = {cluster_index: row for row, cluster_index in enumerate(needed)}
    for index in range(grouping.k):
        entry = response.clusters.add(index=index, size=int(grouping.sizes[index]), adapter_key=keys[index])
        if index not in row_of:
            entry.omitted = True
            continue
        row = row_of[index]
        if call.compact:
            entry.basis_weights.extend(weights[row].tolist())
            continue
        for group in manifest.groups:
            a, b = cast[group.name]
            for layer, module in enumerate(group.modules):
                entry.modules.add(module=module, a=codec.encode(a[row, layer]), b=codec.encode(b[row, layer]))
    encoded = time.perf_counter()
    response.timings.CopyFrom(
        pb.StageTimings(
            decode=decode_seconds,
            cluster=clustered - started,
            hypernetwork=generated_at - clustered,
            encode=encoded - generated_at,
            total=decode_seconds + encoded - started,
        )
    )
    outputs = AdaptOutputs(
        needed=needed,
        generated=generated,
        weights=weights,
        fallback_rows=fallback_rows(grouping.sizes, every_weights, runtime.manifest.fallback_bases),
    )
    return response, outputs


def fallback_rows(sizes: np.ndarray, weights: np.ndarray | None, fallback_bases: int) -> int:
    """How many of the batch's requests get the artifact's fallback adapter: their cluster's weights
    [k, bases] are 1 on the last `fallback_bases` bases and 0 on the others. The count is for the
    metrics (operators watch how often the router is unsure); the wire form does not single it out."""
    f = fallback_bases
    if not f or weights is None:
        return 0
    alone = (weights[:, -f:] == 1).all(axis=1) & (weights[:, :-f] == 0).all(axis=1)
    return int(sizes[alone].sum())


def group_requests(
    call: AdaptCall, runtime: HyperNetworkRuntime, seed: int = 0
) -> tuple[Clustering, np.ndarray | None]:
    """The batch's clusters under the caller's policy, except for a predicted-label router: it gives
    every request of one predicted label the same adapter, and a k-means centroid of several labels is
    classified as one of them (docs/research/adaptation.md measured +0.13 NLL at auto k against per
    request), so its clusters are its predicted labels, whatever the policy: per request, rows with
    equal basis weights merged. A batch then needs at most one adapter per label. Returns the clusters
    and, for label groups, each one's basis weights [k, bases] (None otherwise)."""
    if runtime.manifest.grouping != "predicted-label":
        return cluster(call.statistics, call.policy, seed=seed), None
    rows = cluster(call.statistics, PerRequest())
    weights = runtime.mixture_weights(rows.centroids)
    _, first, label = np.unique(weights, axis=0, return_index=True, return_inverse=True)
    order = np.argsort(first)  # clusters numbered by their first request, as cluster() numbers them
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    assignments = rank[label.reshape(-1)][rows.assignments]
    grouping = Clustering(
        assignments=assignments.astype(np.int32),
        centroids=rows.centroids[first[order]],
        sizes=np.bincount(assignments, minlength=len(order)).astype(np.int32),
        k=len(order),
        silhouette=None,
    )
    return grouping, weights[first[order]]


def _check_response_size(
    generated: int, k: int, call: AdaptCall, runtime: HyperNetworkRuntime, limits: Limits, send_bases: bool
):
    """Refuse before doing the work when the answer could not be sent anyway."""
    manifest = runtime.manifest
    itemsize = codec.numpy_dtype(call.dtype).itemsize
    r = manifest.rank
    whole = sum(
        r * (d_in + d_out) * itemsize + 2 * _TENSOR_OVERHEAD + _MODULE_OVERHEAD + len(name)
        for name, d_in, d_out in manifest.targets
    )
    if call.compact:  # the bases (one whole adapter's worth) at most once, then weights per cluster
        per_cluster = 5 * manifest.mixture.bases + 16
        estimate = generated * per_cluster + send_bases * whole
    else:
        per_cluster = whole
        estimate = generated * per_cluster
    estimate += k * 128 + 8 * len(call.statistics) + 256
    if estimate > limits.max_message_bytes:
        raise RequestError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "dtype",
            f"the response would be about {estimate} bytes for {generated} adapters "
            f"({per_cluster} bytes each as {codec.dtype_name(call.dtype)}); expected at most "
            f"{limits.max_message_bytes}: ask for float16/bfloat16, fewer clusters, pass held_adapter_keys, "
            "or raise the server's --max-message-bytes",
        )
