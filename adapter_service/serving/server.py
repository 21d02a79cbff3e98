"""The sidecar process: load an artifact, serve AdapterService + health + reflection on grpc.aio.

Loopback by default (a sidecar talks to its neighbour, not the network); metrics on their own port;
optional TLS / mutual TLS and a bearer token (security.py). SIGTERM/SIGINT drain in-flight calls for
`grace` seconds while new ones get UNAVAILABLE (drain.py), then stop; SIGUSR1/SIGUSR2 pause and resume
adapter generation (pause.py). An address is never taken over from a running server: TCP ports are
bound without SO_REUSEPORT, and a unix socket is replaced only when nothing listens on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from adapter_service.core.artifact import load_artifact
from adapter_service.serving.audit import AuditLog
from adapter_service.serving.decoding import TolerantDecodingInterceptor
from adapter_service.serving.drain import DrainGate
from adapter_service.serving.errors import ServiceError
from adapter_service.serving.metrics import ServiceMetrics
from adapter_service.serving.pause import CHECK_SECONDS, PauseSwitch
from adapter_service.serving.runtime import HyperNetworkRuntime
from adapter_service.serving.security import (
    TlsFiles,
    TokenAuthInterceptor,
    check_exposure,
    server_credentials,
)
from adapter_service.serving.servicer import SERVICE_NAME, AdapterServicer, add_to_server
from adapter_service.serving.validation import Limits

__all__ = ["SERVICE_NAME", "AdapterServer", "ServerConfig", "ServiceError", "run"]
log = logging.getLogger(__name__)


@dataclass
class ServerConfig:
    artifact: Path
    address: str = "127.0.0.1:50051"  # host:port, or unix:PATH
    metrics_port: int | None = 9464  # None: no metrics endpoint; 0: any free port
    metrics_address: str = "127.0.0.1"
    limits: Limits = field(default_factory=Limits)
    max_concurrent_rpcs: int = 64
    workers: int = 4
    ort_threads: int = 0  # 0: onnxruntime's default
    seed: int = 0
    grace_seconds: float = 5.0
    # > 0: close each client connection after about this many seconds (GOAWAY, calls in flight get
    # grace_seconds), so clients of a `dns:///` target reconnect and re-resolve, and find new replicas.
    max_connection_age_s: float = 0.0
    expect_sha256: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # mutual TLS
    auth_token: str | None = None  # the token itself (the CLI reads it from --auth-token-file)
    allow_insecure_remote: bool = False
    socket_mode: int = 0o600  # of a unix: socket
    pause_file: Path | None = None
    audit_log: Path | None = None


class AdapterServer:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.tls = _tls_files(config)
        age = config.max_connection_age_s
        if not 0 <= age < float("inf"):
            raise ServiceError(f"max_connection_age_s: expected 0 (never) or a positive number, got {age}")
        # Before the artifact loads: an unsafe exposure is refused in a moment, not after the load.
        check_exposure(
            config.address,
            tls=self.tls is not None,
            token=bool(config.auth_token),
            allow_insecure_remote=config.allow_insecure_remote,
        )
        self.credentials = server_credentials(self.tls) if self.tls is not None else None
        artifact = load_artifact(config.artifact)  # raises ArtifactError with the reason
        if config.expect_sha256 and artifact.sha256 != config.expect_sha256:
            raise ServiceError(f"artifact sha256 is {artifact.sha256}, expected {config.expect_sha256}")
        self.runtime = HyperNetworkRuntime(artifact, threads=config.ort_threads)
        self.metrics = ServiceMetrics()
        self.pause = PauseSwitch(config.pause_file, on_change=lambda paused: self.metrics.paused.set(paused))
        self.audit = AuditLog(config.audit_log, self.runtime) if config.audit_log is not None else None
        self.gate = DrainGate(on_refuse=lambda: self.metrics.refused.labels("draining").inc())
        self.executor = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="adapt")
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.address = ""
        self.metrics_port: int | None = None
        self._pause_watch: asyncio.Task | None = None
        self._hurry: asyncio.Event | None = None

    async def start(self) -> str:
        """Bind and start; returns the bound address (the real port when 0 was asked)."""
        config = self.config
        limits = config.limits
        # A little headroom over the payload limit for framing; larger messages get RESOURCE_EXHAUSTED.
        options = [
            ("grpc.max_receive_message_length", limits.max_message_bytes),
            ("grpc.max_send_message_length", limits.max_message_bytes + 1024 * 1024),
            ("grpc.so_reuseport", 0),  # a second server must fail to bind, not share (hijack) the port
        ]
        if config.max_connection_age_s > 0:
            # A client resolves a `dns:///` target when it connects and again only when a connection
            # drops, so without an age it never sees replicas added later. The GOAWAY fails no call: calls
            # in flight get the grace, calls racing it are retried by the client. gRPC adds +-10% jitter,
            # so a fleet's clients do not all reconnect at once.
            options += [
                ("grpc.max_connection_age_ms", _milliseconds(config.max_connection_age_s)),
                ("grpc.max_connection_age_grace_ms", _milliseconds(config.grace_seconds)),
            ]
        interceptors: list[grpc.aio.ServerInterceptor] = []
        if config.auth_token:
            on_refuse = self.metrics.refused.labels("unauthenticated").inc
            interceptors.append(TokenAuthInterceptor(config.auth_token, on_refuse=on_refuse))
        interceptors.append(self.gate)  # after auth: unauthenticated calls are never counted in flight
        # Innermost, so the handlers refusing a call (auth, drain) reuse its deserializers too.
        interceptors.append(TolerantDecodingInterceptor(f"/{SERVICE_NAME}/"))
        server = grpc.aio.server(
            options=options, interceptors=interceptors, maximum_concurrent_rpcs=config.max_concurrent_rpcs
        )
        servicer = AdapterServicer(
            self.runtime, limits, self.metrics, self.executor, config.seed, self.pause, self.audit
        )
        add_to_server(servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        port = self._bind(server)
        if config.address.startswith("unix:"):
            self.address = config.address
        else:
            self.address = f"{config.address.rsplit(':', 1)[0]}:{port}"
        await server.start()
        self.server = server
        if config.metrics_port is not None:
            try:
                self.metrics_port = self.metrics.serve(config.metrics_port, config.metrics_address)
            except OSError as exc:
                await server.stop(0)
                self.server = None
                raise ServiceError(
                    f"cannot serve metrics on {config.metrics_address}:{config.metrics_port}: {exc}"
                ) from exc
        self._hurry = asyncio.Event()
        self.metrics.paused.set(self.pause.refresh())
        if config.pause_file is not None:
            self._pause_watch = asyncio.create_task(self._watch_pause_file())
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        m = self.runtime.manifest
        log.info(
            "serving",
            extra={
                "address": self.address,
                "metrics_port": self.metrics_port,
                "artifact_id": m.artifact_id,
                "artifact_sha256": self.runtime.artifact.sha256,
                "providers": self.runtime.providers,
                "targets": len(m.targets),
                "rank": m.rank,
                "tls": "mutual" if self.tls and self.tls.client_ca else "server" if self.tls else "off",
                "auth_token": bool(config.auth_token),
                "paused": self.pause.paused,
                "audit_log": str(config.audit_log) if config.audit_log else None,
            },
        )
        return self.address

    def _bind(self, server: grpc.aio.Server) -> int:
        address = self.config.address
        path = _unix_path(address)
        if path is not None:
            _claim_unix_socket(address, path)
            # Created under umask 0o177, so the socket is never open to others, not even between bind
            # and chmod. (The umask is process-wide; start-up runs nothing else that creates files.)
            old_umask = os.umask(0o177)
        try:
            if self.credentials is not None:
                port = server.add_secure_port(address, self.credentials)
            else:
                port = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise ServiceError(
                f"cannot listen on {address}: the address is in use (another server?) or not available"
            ) from exc
        finally:
            if path is not None:
                os.umask(old_umask)
        if path is not None:
            os.chmod(path, self.config.socket_mode)
        return port

    async def _watch_pause_file(self) -> None:
        """Look at the pause file every CHECK_SECONDS, so its log line and gauge follow it without calls."""
        while True:
            self.pause.refresh()
            await asyncio.sleep(CHECK_SECONDS)

    def hurry(self) -> None:
        """End a running drain now (a second SIGTERM): calls still in flight are cancelled."""
        if self._hurry is not None:
            self._hurry.set()

    async def stop(self, grace: float | None = None) -> None:
        """Drain, then release everything: health reports NOT_SERVING, new calls get UNAVAILABLE, calls in
        flight have `grace` seconds to finish, and only then does gRPC stop (cancelling any left)."""
        if self.server is None:
            return
        grace = self.config.grace_seconds if grace is None else grace
        await self.health.enter_graceful_shutdown()
        left = await self.gate.drain(grace, self._hurry)
        if left:
            log.warning("grace period over: cancelling calls still in flight", extra={"in_flight": left})
        # Nothing of ours is in flight now; the short grace covers calls that arrived in the last moment.
        await self.server.stop(0 if left else min(grace, 1.0))
        self.server = None
        if self._pause_watch is not None:
            self._pause_watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pause_watch
        self.metrics.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
        if self.audit is not None:
            self.audit.close()
        log.info("stopped", extra={"address": self.address, "cancelled": left})

    async def wait(self) -> None:
        if self.server is not None:
            await self.server.wait_for_termination()


def _milliseconds(seconds: float) -> int:
    """A gRPC duration argument: a C int of milliseconds (at most ~24 days), at least 1."""
    return min(2**31 - 1, max(1, round(seconds * 1000)))


def _tls_files(config: ServerConfig) -> TlsFiles | None:
    if (config.tls_cert is None) != (config.tls_key is None):
        raise ServiceError("--tls-cert and --tls-key go together: expected both or neither")
    if config.tls_cert is None:
        if config.tls_client_ca is not None:
            raise ServiceError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS is TLS)")
        return None
    return TlsFiles(
        Path(config.tls_cert), Path(config.tls_key), config.tls_client_ca and Path(config.tls_client_ca)
    )


def _unix_path(address: str) -> str | None:
    """The file of a `unix:PATH` or `unix:///abs/path` address; None for other addresses."""
    if not address.startswith("unix:"):
        return None
    return address[len("unix://") :] if address.startswith("unix://") else address[len("unix:") :]


def _claim_unix_socket(address: str, path: str) -> None:
    """Refuse when a server listens on `path`; remove a stale socket file that nothing listens on.

    gRPC itself unlinks whatever socket is there before binding, which would silently take the address
    over from a running server (its clients would reach the newcomer)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ServiceError(f"cannot listen on {address}: {exc}") from exc
    if not stat.S_ISSOCK(mode):
        raise ServiceError(f"cannot listen on {address}: {path} exists and is not a socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            log.info("replacing a stale socket file that nothing listens on", extra={"path": path})
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return
        except OSError as exc:  # e.g. no permission to connect: not ours to replace
            raise ServiceError(
                f"cannot listen on {address}: {path} is a socket we cannot check ({exc})"
            ) from exc
    raise ServiceError(f"cannot listen on {address}: another server is listening on it")


async def run(config: ServerConfig) -> None:
    """Serve until SIGTERM or SIGINT, then drain and shut down; SIGUSR1 pauses, SIGUSR2 resumes."""
    server = AdapterServer(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Before start(): a SIGTERM right after health turns SERVING must drain, not kill the process.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, server.pause.set_manual, True)
    loop.add_signal_handler(signal.SIGUSR2, server.pause.set_manual, False)
    await server.start()
    await stop.wait()
    log.info("shutting down", extra={"grace_s": config.grace_seconds, "in_flight": server.gate.in_flight})
    for sig in (signal.SIGTERM, signal.SIGINT):  # a second signal: stop without waiting any longer
        loop.add_signal_handler(sig, server.hurry)
    await server.stop()
