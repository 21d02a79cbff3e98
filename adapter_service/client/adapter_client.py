"""Clients of the adapter service: `AdapterClient` (blocking) and `AsyncAdapterClient` (asyncio).

The only way plugins talk to the service. Importing this module pulls in grpc, numpy and the codec,
never onnxruntime, torch or the server, so it is cheap inside a model server. Results are typed and
checked against the manifest: a response with a wrong shape or dtype raises InvalidResponse.

With a mixture artifact the clients ask for the compact form (compact.py) by default: they keep the
bases they were sent and rebuild every cluster's adapter from its weights, so callers see whole
adapters either way, at a fraction of the bytes.

Channels reconnect fast (RECONNECT_BACKOFF_MS: with gRPC's default backoff, growing to 120 s, a sidecar
restarted after a 15 s or 90 s outage was used again 8 s or 18 s after it answered health) and calls
never wait for a connection (wait_for_ready=False): while the sidecar is down a call fails within the
few short retries of service_config (~70 ms), and the plugin runs that batch on the base model instead
of holding it for the deadline.

The address is any gRPC target: `host:port` or `unix:PATH` for one sidecar, or `dns:///name:port`,
`ipv4:a:p,b:p`, `ipv6:...` for a set of interchangeable replicas, which the client connects to all at
once, spreads calls over (the healthy ones) and moves a call off a lost one (service_config), so
losing a replica costs no batch while another is up.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from adapter_service.client.credentials import ClientSecurity
from adapter_service.core import codec
from adapter_service.core.artifact import Fingerprint, StatisticSpec
from adapter_service.core.clustering import AutoK, ClusteringPolicy, FixedK, PerRequest
from adapter_service.core.compact import weighted_b
from adapter_service.proto import adapter_service_pb2 as pb
from adapter_service.proto import adapter_service_pb2_grpc as pb_grpc

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024 + 1024 * 1024

# gRPC channel arguments bounding how long a restarted sidecar waits to be used again. Initial and
# maximum backoff between connection attempts: 100 ms, growing x1.6 to 1 s (gRPC's defaults: 1 s to
# 120 s), so a sidecar back after any outage is reconnected to within about a second. The minimum is
# what gRPC core uses as MIN_CONNECT_TIMEOUT of its backoff protocol, the least time one connection
# attempt (TCP + TLS handshake) is given, so it stays at 1 s: a 100 ms floor would abort slow TLS
# handshakes. One attempt per second to a down sidecar costs nothing measurable.
RECONNECT_BACKOFF_MS = {
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.min_reconnect_backoff_ms": 1000,
    "grpc.max_reconnect_backoff_ms": 1000,
}
PAUSED_STATE = "paused"  # trailing metadata `chameleon-state` of an Adapt refused by a paused sidecar

# Retries of a call answered UNAVAILABLE: a replica killed with the call in flight, or a connection
# closed under it (a draining sidecar, the server's --max-connection-age). Safe to repeat: Adapt and
# GetManifest are deterministic and change nothing on the sidecar, so a second answer is the first one.
# gRPC enforces the call's deadline over all attempts together (the plugins' is 500 ms by default): a
# retry never makes a batch wait past it, it only turns a failure into an answer while time is left.
# Only UNAVAILABLE: any other status is the service's considered answer. The backoffs (gRPC core: 10,
# 20, 40 ms, each +-20%) stay short because a call that no replica can take is retried too: while every
# sidecar is down a batch falls back after ~70 ms instead of at once, still far inside its deadline.
# gRPC caps the attempts at 5.
RETRY_MAX_ATTEMPTS = 4
RETRY_INITIAL_BACKOFF = "0.01s"
RETRY_MAX_BACKOFF = "0.1s"
RETRY_BACKOFF_MULTIPLIER = 2
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["AdapterService"].full_name  # chameleon.v1.AdapterService
# Targets that name a set of replicas, gRPC's resolver schemes; a plain `host:port` or `unix:PATH` is one
# sidecar, as before.
REPLICA_SCHEMES = ("dns:", "ipv4:", "ipv6:")


def service_config(address: str) -> str:
    """The gRPC service config of a channel to `address` (JSON).

    A replica set gets round_robin: a connection to every address the target resolves to, each call sent
    to the next READY one, so a lost replica is skipped from the next pick on; healthCheckConfig counts a
    replica READY only while its health service says SERVING, so one draining after SIGTERM (NOT_SERVING
    first) stops getting calls within a round trip instead of refusing them. One sidecar keeps gRPC's
    pick_first: it connects when a call needs it, so a sidecar restarted on its address is reached by the
    next call, where round_robin would have tried it at once, failed and waited its reconnect backoff
    (at least 100 ms in gRPC core). Either way, with wait_for_ready=False a pick fails only when nothing
    is READY: the plugin then falls back. The retry policy is the same for both."""
    replicas = address.startswith(REPLICA_SCHEMES)
    config: dict[str, Any] = {
        "loadBalancingConfig": [{"round_robin": {}} if replicas else {"pick_first": {}}],
        "methodConfig": [
            {
                "name": [{"service": SERVICE_NAME}],
                "retryPolicy": {
                    "maxAttempts": RETRY_MAX_ATTEMPTS,
                    "initialBackoff": RETRY_INITIAL_BACKOFF,
                    "maxBackoff": RETRY_MAX_BACKOFF,
                    "backoffMultiplier": RETRY_BACKOFF_MULTIPLIER,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ],
    }
    if replicas:
        config["healthCheckConfig"] = {"serviceName": SERVICE_NAME}
    return json.dumps(config)


GROUPING_NAMES = {pb.GROUPING_POLICY: "policy", pb.GROUPING_PREDICTED_LABEL: "predicted-label"}


class AdapterServiceError(Exception):
    """The service answered with an error status (or could not be reached).

    `paused`: the operator paused the sidecar (FAILED_PRECONDITION with trailing metadata
    `chameleon-state: paused`); plugins serve the base model until it is resumed."""

    def __init__(self, code: grpc.StatusCode, details: str, paused: bool = False) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.paused = paused

    @classmethod
    def from_rpc_error(cls, exc: grpc.RpcError) -> AdapterServiceError:
        code, details = exc.code(), exc.details() or ""
        paused = False
        if code == grpc.StatusCode.FAILED_PRECONDITION:
            trailing = getattr(exc, "trailing_metadata", lambda: ())() or ()
            states = [value for key, value in trailing if key == "chameleon-state"]
            paused = PAUSED_STATE in states or details.startswith(f"{PAUSED_STATE}:")
        return cls(code, details, paused)


class InvalidResponse(Exception):
    """The service answered, but not with what its manifest promised."""


@dataclass(frozen=True)
class ServiceManifest:
    artifact_id: str
    artifact_sha256: str
    base_model: Fingerprint
    statistic: StatisticSpec
    targets: tuple[tuple[str, int, int], ...]  # (module, d_in, d_out)
    rank: int
    scaling: float
    dtypes: tuple[str, ...]
    max_rows: int
    max_clusters: int
    max_message_bytes: int
    mixture_bases: int = 0  # > 0: a mixture that Adapt can send in the compact form
    grouping: str = "policy"  # or "predicted-label": the artifact groups by label, ignoring the policy

    @classmethod
    def from_message(cls, m: pb.Manifest) -> ServiceManifest:
        fp = m.base_model
        return cls(
            artifact_id=m.artifact_id,
            artifact_sha256=m.artifact_sha256,
            base_model=Fingerprint(
                fp.architecture,
                fp.hidden_size,
                fp.vocab_size,
                fp.num_layers,
                fp.weights_sha256,
                dict(fp.weights_sha256_by_dtype),
            ),
            statistic=StatisticSpec(
                m.statistic.kind, m.statistic.dim, m.statistic.normalization, dict(m.statistic.params)
            ),
            targets=tuple((t.name, t.d_in, t.d_out) for t in m.targets),
            rank=m.rank,
            scaling=m.scaling,
            dtypes=tuple(codec.dtype_name(d) for d in m.dtypes),
            max_rows=m.limits.max_rows,
            max_clusters=m.limits.max_clusters,
            max_message_bytes=m.limits.max_message_bytes,
            mixture_bases=m.mixture.bases if m.HasField("mixture") else 0,
            grouping=GROUPING_NAMES.get(m.grouping, "policy"),
        )


@dataclass(frozen=True)
class ModuleDelta:
    a: Any  # [r, d_in]: numpy array, or torch tensor when asked
    b: Any  # [d_out, r]


@dataclass(frozen=True)
class ClusterAdapter:
    index: int
    size: int
    key: str
    omitted: bool  # the caller holds `key`; `modules` is empty
    modules: dict[str, ModuleDelta]  # compact form: rebuilt from the bases (empty with rebuild=False)
    weights: np.ndarray | None = None  # compact form: float32 [bases], B's column-block weights


@dataclass(frozen=True)
class AdaptResult:
    assignments: np.ndarray  # int32 [N]: cluster index of each row
    clusters: tuple[ClusterAdapter, ...]
    timings: dict[str, float]  # server-side seconds per stage
    artifact_id: str
    # Compact form: the bases' key, and the bases (A, unweighted B per module) when this response
    # carried them; None when they were held (the client's `bases` cache has them).
    bases_key: str = ""
    bases: dict[str, ModuleDelta] | None = None
    # "predicted-label" when the artifact grouped the batch by label instead of the requested policy
    grouping: str = "policy"

    @property
    def k(self) -> int:
        return len(self.clusters)


def build_adapt_request(
    statistics: Any,
    *,
    request_ids: Sequence[str] | None = None,
    policy: ClusteringPolicy | None = None,
    dtype: str = "float32",
    held_keys: Sequence[str] = (),
    compact: bool = False,
) -> pb.AdaptRequest:
    """statistics: [N, D] numpy array or torch tensor (sent as float32)."""
    if hasattr(statistics, "detach"):  # torch, without importing it
        statistics = statistics.detach().to("cpu").float().numpy()
    request = pb.AdaptRequest(
        request_ids=list(request_ids or ()),
        statistics=codec.encode(np.asarray(statistics, dtype=np.float32)),
        dtype=codec.parse_dtype(dtype),
        held_adapter_keys=list(held_keys),
        compact=compact,
    )
    if isinstance(policy, FixedK):
        request.clustering.fixed.k = policy.k
    elif isinstance(policy, AutoK):
        request.clustering.auto.max_k = policy.max_k
        request.clustering.auto.min_cluster_size = policy.min_cluster_size
    elif isinstance(policy, PerRequest):
        request.clustering.per_request.SetInParent()
    elif policy is not None:
        raise TypeError(f"policy: expected FixedK, AutoK, PerRequest or None, got {type(policy).__name__}")
    return request


class BasesCache:
    """The mixture bases a client was sent, by key (a few: one per artifact and dtype in use)."""

    def __init__(self, capacity: int = 4) -> None:
        self.capacity = capacity
        self._entries: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}

    def keys(self) -> list[str]:
        return list(self._entries)

    def get(self, key: str) -> dict[str, tuple[np.ndarray, np.ndarray]] | None:
        return self._entries.get(key)

    def put(self, key: str, bases: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
        self._entries.pop(key, None)
        self._entries[key] = bases
        while len(self._entries) > self.capacity:
            del self._entries[next(iter(self._entries))]


def _decode_factors(
    modules, where: str, list_field: str, shapes: dict[str, tuple[int, int]], r: int, dtype: str
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """ModuleAdapter messages -> (A [r, d_in], B [d_out, r]) per module, each checked against the
    manifest; errors name `where` (`bases`, `clusters[i]`) and the repeated field `list_field`."""
    factors = {}
    for m in modules:
        if m.module not in shapes:
            raise InvalidResponse(f"{list_field}: unknown module {m.module!r}")
        d_in, d_out = shapes[m.module]
        try:
            a = codec.decode(m.a, f"{where}.{m.module}.a", shape=(r, d_in), dtype=dtype)
            b = codec.decode(m.b, f"{where}.{m.module}.b", shape=(d_out, r), dtype=dtype)
        except codec.CodecError as exc:
            raise InvalidResponse(str(exc)) from exc
        factors[m.module] = (a, b)
    if len(factors) != len(shapes):
        raise InvalidResponse(f"{where}: {len(factors)} modules, expected {len(shapes)}")
    return factors


def _weights(values: Sequence[float], where: str, manifest: ServiceManifest) -> np.ndarray:
    if len(values) != manifest.mixture_bases:
        raise InvalidResponse(
            f"{where}.basis_weights: {len(values)} values, expected {manifest.mixture_bases}"
        )
    w = np.asarray(values, dtype=np.float32)
    if not np.isfinite(w).all():
        raise InvalidResponse(f"{where}.basis_weights: non-finite values")
    return w


def _rebuild(
    weights: dict[int, np.ndarray], bases: dict[str, tuple[Any, Any]], as_torch: bool
) -> dict[int, dict[str, ModuleDelta]]:
    """Whole adapters of the compact clusters (index -> weights) from the shared bases (compact.py):
    one product per module for all of them, in float32 (half-precision arithmetic is slow in numpy)."""
    order = list(weights)
    stacked = np.stack([weights[i] for i in order])  # [c, bases]
    rebuilt: dict[int, dict[str, ModuleDelta]] = {i: {} for i in order}
    for name, (a, b) in bases.items():
        if as_torch:
            import torch

            w = torch.from_numpy(stacked).to(device=b.device)
            scaled = weighted_b(b.float()[None], w).to(b.dtype)
        else:
            scaled = weighted_b(b.astype(np.float32)[None], stacked).astype(b.dtype)
        for row, i in enumerate(order):
            rebuilt[i][name] = ModuleDelta(a, scaled[row])
    return rebuilt


def parse_adapt_response(
    response: pb.AdaptResponse,
    manifest: ServiceManifest,
    n_rows: int,
    dtype: str,
    as_torch: bool = False,
    device: Any = None,
    bases_cache: BasesCache | None = None,
    rebuild: bool = True,
) -> AdaptResult:
    """Check every tensor against the manifest (shape, dtype, byte length) and type the result.

    A compact response's bases are stored in `bases_cache` (and looked up there when the response
    leaves them out). With `rebuild` each compact cluster comes back as a whole adapter; without,
    only its weights (for a caller that applies the bases itself, as chameleon_torch does)."""
    assignments = np.asarray(response.assignments, dtype=np.int32)
    k = len(response.clusters)
    if assignments.shape != (n_rows,):
        raise InvalidResponse(f"assignments: {len(assignments)} entries, expected {n_rows}")
    if n_rows and (assignments.min() < 0 or assignments.max() >= k):
        raise InvalidResponse(f"assignments: values outside 0..{k - 1}")
    shapes = {name: (d_in, d_out) for name, d_in, d_out in manifest.targets}
    r = manifest.rank
    shared = None  # the bases of a compact response, converted once for this call
    if response.bases:
        if not response.bases_key:
            raise InvalidResponse("bases_key: empty, expected the key of the bases sent")
        decoded = _decode_factors(response.bases, "bases", "bases", shapes, r, dtype)
        if bases_cache is not None:
            bases_cache.put(response.bases_key, decoded)
    elif response.bases_key:
        decoded = bases_cache.get(response.bases_key) if bases_cache is not None else None
    else:
        decoded = None
    if decoded is not None and (rebuild or response.bases):
        shared = {
            name: (codec.to_torch(a, device), codec.to_torch(b, device)) if as_torch else (a, b)
            for name, (a, b) in decoded.items()
        }
    clusters = []
    compact: dict[int, np.ndarray] = {}  # cluster index -> weights, rebuilt after the loop
    for i, c in enumerate(response.clusters):
        if c.index != i:
            raise InvalidResponse(f"clusters[{i}].index: got {c.index}, expected {i}")
        modules = {}
        weights = None
        if c.basis_weights and not c.omitted:
            if c.modules:
                raise InvalidResponse(f"clusters[{i}]: both modules and basis_weights; expected one form")
            weights = _weights(c.basis_weights, f"clusters[{i}]", manifest)
            if rebuild:
                if shared is None:
                    raise InvalidResponse(
                        f"clusters[{i}].basis_weights: the bases {response.bases_key!r} were neither "
                        "sent nor held"
                    )
                compact[i] = weights
        elif not c.omitted:
            where = f"clusters[{i}]"
            for name, (a, b) in _decode_factors(
                c.modules, where, f"{where}.modules", shapes, r, dtype
            ).items():
                if as_torch:
                    a, b = codec.to_torch(a, device), codec.to_torch(b, device)
                modules[name] = ModuleDelta(a, b)
        clusters.append(ClusterAdapter(c.index, c.size, c.adapter_key, c.omitted, modules, weights))
    if compact:
        for i, modules in _rebuild(compact, shared, as_torch).items():
            clusters[i].modules.update(modules)
    t = response.timings
    timings = {s: getattr(t, s) for s in ("decode", "cluster", "hypernetwork", "encode", "total")}
    sent = (
        {name: ModuleDelta(a, b) for name, (a, b) in shared.items()}
        if response.bases and shared is not None
        else None
    )
    return AdaptResult(
        assignments,
        tuple(clusters),
        timings,
        response.artifact_id,
        response.bases_key,
        sent,
        GROUPING_NAMES.get(response.grouping, "policy"),
    )


def _request(
    statistics: Any,
    manifest: ServiceManifest,
    bases: BasesCache,
    request_ids: Sequence[str] | None,
    policy: ClusteringPolicy | None,
    dtype: str,
    held_keys: Sequence[str],
    compact: bool | None,
    rebuild: bool,
) -> pb.AdaptRequest:
    """The request both clients send: compact when asked, or by default when offered. When the client
    rebuilds, it names the bases it holds so they are not sent again; a caller that applies the bases
    itself (rebuild=False) names the ones it holds in `held_keys`, so a cache it cleared is refilled."""
    compact = manifest.mixture_bases > 0 if compact is None else compact
    held = [*held_keys, *bases.keys()] if compact and rebuild else list(held_keys)
    return build_adapt_request(
        statistics, request_ids=request_ids, policy=policy, dtype=dtype, held_keys=held, compact=compact
    )


def _channel_options(
    address: str, max_message_bytes: int, security: ClientSecurity | None
) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        *RECONNECT_BACKOFF_MS.items(),
        ("grpc.service_config", service_config(address)),
        # Ours only: a DNS TXT record must not swap the balancing or retry policy of a model server.
        ("grpc.service_config_disable_resolution", 1),
        ("grpc.enable_retries", 1),
        # A retry resends the request, which gRPC keeps only up to this size (256 KiB by default, about
        # 110 rows of a 576-wide statistic): a larger request would silently never be retried.
        ("grpc.per_rpc_retry_buffer_size", max_message_bytes),
        # Own connection: gRPC otherwise shares one among channels with equal arguments, so a client's
        # reconnect timing (and its `disconnects` count) would depend on other clients in the process.
        ("grpc.use_local_subchannel_pool", 1),
        *(security.channel_options() if security is not None else ()),
    ]


def _channel(module: Any, address: str, max_message_bytes: int, security: ClientSecurity | None) -> Any:
    """A secure channel when `security.tls`, else an insecure one (`module`: grpc or grpc.aio)."""
    options = _channel_options(address, max_message_bytes, security)
    if security is not None:
        security.warn_if_exposed(address)
        if security.tls:
            return module.secure_channel(address, security.channel_credentials(), options=options)
    return module.insecure_channel(address, options=options)


class AdapterClient:
    """Blocking client. `timeout` (seconds) is the default deadline of every call.

    `address`: any gRPC target, one sidecar or several interchangeable replicas (module docstring).
    `security`: TLS, mTLS and a bearer token (ClientSecurity); None is plaintext without a token.
    `disconnects` counts the times the channel went from READY to not ready, so a caller can tell that
    the sidecar behind the address may have been restarted (and re-check its manifest). A replica set's
    channel is READY while any replica is: it counts the times all of them were lost at once. (One
    sidecar's connection closed by its --max-connection-age counts too: a cheap, needless re-check.)"""

    def __init__(
        self,
        address: str,
        *,
        timeout: float = 2.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        security: ClientSecurity | None = None,
    ) -> None:
        self.address = address
        self.timeout = timeout
        self.security = security
        self._metadata = security.metadata() if security is not None else ()
        self.channel = _channel(grpc, address, max_message_bytes, security)
        self.stub = pb_grpc.AdapterServiceStub(self.channel)
        self._manifest: ServiceManifest | None = None
        self.bases = BasesCache()
        self.disconnects = 0
        self._ready = False
        self.channel.subscribe(self._on_state)

    def _on_state(self, state: grpc.ChannelConnectivity) -> None:
        """Called by gRPC's connectivity thread on every state change of the channel."""
        if state == grpc.ChannelConnectivity.READY:
            self._ready = True
        elif self._ready:
            self._ready = False
            self.disconnects += 1

    def manifest(self, timeout: float | None = None, refresh: bool = False) -> ServiceManifest:
        if self._manifest is None or refresh:
            message = self._call(self.stub.GetManifest, pb.GetManifestRequest(), timeout)
            self._manifest = ServiceManifest.from_message(message)
        return self._manifest

    def adapt(
        self,
        statistics: Any,
        *,
        request_ids: Sequence[str] | None = None,
        policy: ClusteringPolicy | None = None,
        dtype: str = "float32",
        held_keys: Sequence[str] = (),
        timeout: float | None = None,
        as_torch: bool = False,
        device: Any = None,
        compact: bool | None = None,
        rebuild: bool = True,
    ) -> AdaptResult:
        """One batch's statistics [N, D] -> per-row cluster and per-cluster (A, B) for each target.

        `compact`: ask for the mixture's compact form; None = whenever the manifest offers it.
        `rebuild=False`: leave compact clusters as weights (parse_adapt_response)."""
        manifest = self.manifest(timeout)
        request = _request(
            statistics, manifest, self.bases, request_ids, policy, dtype, held_keys, compact, rebuild
        )
        response = self._call(self.stub.Adapt, request, timeout)
        return parse_adapt_response(
            response, manifest, request.statistics.shape[0], dtype, as_torch, device, self.bases, rebuild
        )

    def health(self, service: str = "", timeout: float | None = None) -> str:
        """ "SERVING", "NOT_SERVING", ... as the standard grpc.health.v1 service reports it. A replica
        set's channel reaches only replicas that say SERVING, so there it raises UNAVAILABLE instead while
        none does (probe one replica by its own address to see its status)."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self.channel)
        reply = self._call(stub.Check, health_pb2.HealthCheckRequest(service=service), timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return method(
                request,
                timeout=self.timeout if timeout is None else timeout,
                metadata=self._metadata,
                # No waiting for a connection: with no replica READY the call fails (after the retry
                # backoffs) and the batch falls back now, instead of at the deadline.
                wait_for_ready=False,
            )
        except grpc.RpcError as exc:
            raise AdapterServiceError.from_rpc_error(exc) from exc

    def close(self) -> None:
        self.channel.unsubscribe(self._on_state)
        self.channel.close()

    def __enter__(self) -> AdapterClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncAdapterClient:
    """The asyncio twin of AdapterClient, for async model servers (no `disconnects` count)."""

    def __init__(
        self,
        address: str,
        *,
        timeout: float = 2.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        security: ClientSecurity | None = None,
    ) -> None:
        self.address = address
        self.timeout = timeout
        self.security = security
        self._metadata = security.metadata() if security is not None else ()
        self.channel = _channel(grpc.aio, address, max_message_bytes, security)
        self.stub = pb_grpc.AdapterServiceStub(self.channel)
        self._manifest: ServiceManifest | None = None
        self.bases = BasesCache()

    async def manifest(self, timeout: float | None = None, refresh: bool = False) -> ServiceManifest:
        if self._manifest is None or refresh:
            message = await self._call(self.stub.GetManifest, pb.GetManifestRequest(), timeout)
            self._manifest = ServiceManifest.from_message(message)
        return self._manifest

    async def adapt(
        self,
        statistics: Any,
        *,
        request_ids: Sequence[str] | None = None,
        policy: ClusteringPolicy | None = None,
        dtype: str = "float32",
        held_keys: Sequence[str] = (),
        timeout: float | None = None,
        as_torch: bool = False,
        device: Any = None,
        compact: bool | None = None,
        rebuild: bool = True,
    ) -> AdaptResult:
        manifest = await self.manifest(timeout)
        request = _request(
            statistics, manifest, self.bases, request_ids, policy, dtype, held_keys, compact, rebuild
        )
        response = await self._call(self.stub.Adapt, request, timeout)
        return parse_adapt_response(
            response, manifest, request.statistics.shape[0], dtype, as_torch, device, self.bases, rebuild
        )

    async def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return await method(
                request,
                timeout=self.timeout if timeout is None else timeout,
                metadata=self._metadata,
                wait_for_ready=False,
            )
        except grpc.RpcError as exc:
            raise AdapterServiceError.from_rpc_error(exc) from exc

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncAdapterClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
