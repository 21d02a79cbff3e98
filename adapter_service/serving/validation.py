"""Turns an AdaptRequest into a checked AdaptCall, or a RequestError naming the field at fault.

Every check the service makes on caller input lives here, so the servicer stays thin and each
rejection carries the gRPC status and a message of the form "<field>: got X, expected Y".
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import grpc
import numpy as np

from adapter_service.core import codec
from adapter_service.core.artifact import Manifest
from adapter_service.core.clustering import AutoK, ClusteringPolicy, FixedK, PerRequest
from adapter_service.proto import adapter_service_pb2 as pb
from adapter_service.serving.errors import clip

DEFAULT_MAX_K = 8


@dataclass(frozen=True)
class Limits:
    max_rows: int = 1024
    max_clusters: int = 64  # per-request serving of a batch needs k = its size; cheap in the compact form
    max_message_bytes: int = 64 * 1024 * 1024


class RequestError(Exception):
    """A request the service refuses; `code` is the gRPC status to answer with. The message is clipped
    (callers' values are clipped where they are quoted; this bounds the whole)."""

    def __init__(self, code: grpc.StatusCode, field: str, message: str) -> None:
        super().__init__(clip(f"{field}: {message}", 1000))
        self.code = code
        self.field = field


@dataclass(frozen=True)
class AdaptCall:
    request_ids: tuple[str, ...]
    statistics: np.ndarray  # [N, D] float32
    policy: ClusteringPolicy
    dtype: int  # wire dtype of the returned tensors
    held_keys: frozenset[str]
    compact: bool = False  # the mixture's compact form (compact.py)


def parse_adapt_request(request: pb.AdaptRequest, manifest: Manifest, limits: Limits) -> AdaptCall:
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    if not request.HasField("statistics"):
        raise RequestError(invalid, "statistics", f"missing; expected a [N, {manifest.statistic.dim}] tensor")
    try:
        stats = codec.decode(request.statistics, "statistics", shape=(None, None))
    except codec.CodecError as exc:
        raise RequestError(invalid, exc.field, str(exc).split(": ", 1)[1]) from exc
    n, d = stats.shape
    if n == 0:
        raise RequestError(invalid, "statistics.shape", "empty batch (N = 0); expected at least 1 row")
    if n > limits.max_rows:
        raise RequestError(invalid, "statistics.shape", f"N = {n} rows; expected at most {limits.max_rows}")
    if d != manifest.statistic.dim:
        raise RequestError(
            invalid,
            "statistics.shape",
            f"D = {d}; expected D = {manifest.statistic.dim} ({manifest.statistic.kind} of "
            f"{manifest.statistic.params.get('encoder') or manifest.base_model.architecture})",
        )
    stats = stats.astype(np.float32, copy=False)  # float32 on the wire (the usual case): no copy
    finite = np.isfinite(stats)
    if not finite.all():
        row = int(np.argwhere(~finite)[0][0])
        raise RequestError(
            invalid,
            "statistics.data",
            f"{int((~finite).sum())} non-finite values (first in row {row}); expected finite values",
        )
    if not np.any(stats, axis=1).all():
        row = int(np.argwhere(~np.any(stats, axis=1))[0][0])
        raise RequestError(
            invalid, "statistics.data", f"row {row} is all zeros; expected a non-zero statistic"
        )

    ids = tuple(request.request_ids)
    if ids:
        if len(ids) != n:
            raise RequestError(
                invalid, "request_ids", f"{len(ids)} ids for {n} rows; expected one per row or none"
            )
        if len(set(ids)) != n:
            dup = next(i for i, count in Counter(ids).items() if count > 1)
            raise RequestError(invalid, "request_ids", f"duplicate id {clip(repr(dup))}; expected unique ids")

    dtype = request.dtype or pb.DTYPE_FLOAT32
    if dtype not in (pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT16, pb.DTYPE_BFLOAT16):
        raise RequestError(
            invalid,
            "dtype",
            f"unknown value {dtype}; expected DTYPE_FLOAT32, DTYPE_FLOAT16 or DTYPE_BFLOAT16",
        )
    if request.compact and manifest.mixture is None:
        raise RequestError(
            grpc.StatusCode.FAILED_PRECONDITION,
            "compact",
            f"artifact {manifest.artifact_id} has no compact form (Manifest.mixture is unset: not a mixture, "
            "or one with a delta-norm cap); expected compact = false",
        )
    return AdaptCall(
        request_ids=ids,
        statistics=stats,
        policy=_policy(request, limits, n),
        dtype=dtype,
        held_keys=frozenset(request.held_adapter_keys),
        compact=request.compact,
    )


def _policy(request: pb.AdaptRequest, limits: Limits, n: int) -> ClusteringPolicy:
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    which = request.clustering.WhichOneof("policy") if request.HasField("clustering") else None
    if which is None:
        return AutoK(max_k=min(DEFAULT_MAX_K, limits.max_clusters))
    if which == "per_request":
        if n > limits.max_clusters:
            raise RequestError(
                invalid,
                "clustering.per_request",
                f"N = {n} rows would be {n} clusters; expected N <= max_clusters = {limits.max_clusters}",
            )
        return PerRequest()
    if which == "fixed":
        k = request.clustering.fixed.k
        if not 1 <= k <= limits.max_clusters:
            raise RequestError(
                invalid, "clustering.fixed.k", f"got {k}; expected 1 <= k <= {limits.max_clusters}"
            )
        return FixedK(k)
    auto = request.clustering.auto
    if not 1 <= auto.max_k <= limits.max_clusters:
        raise RequestError(
            invalid,
            "clustering.auto.max_k",
            f"got {auto.max_k}; expected 1 <= max_k <= {limits.max_clusters}",
        )
    if auto.min_cluster_size < 0:
        raise RequestError(
            invalid,
            "clustering.auto.min_cluster_size",
            f"got {auto.min_cluster_size}; expected >= 1 (0 means 1)",
        )
    return AutoK(max_k=auto.max_k, min_cluster_size=max(1, auto.min_cluster_size))
