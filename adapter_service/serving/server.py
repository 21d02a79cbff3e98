"""The sidecar process: load an artifact, serve AdapterService + health + reflection on grpc.aio.

Loopback by default (a sidecar talks to its neighbour, not the network); metrics on their own port;
SIGTERM/SIGINT drain in-flight calls for `grace` seconds, then stop.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from adapter_service.core.artifact import load_artifact
from adapter_service.proto import adapter_service_pb2 as pb
from adapter_service.proto import adapter_service_pb2_grpc as pb_grpc
from adapter_service.serving.metrics import ServiceMetrics
from adapter_service.serving.runtime import HyperNetworkRuntime
from adapter_service.serving.servicer import AdapterServicer
from adapter_service.serving.validation import Limits

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["AdapterService"].full_name


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
    expect_sha256: str | None = None


class ServiceError(Exception):
    """The service cannot start (bad artifact, address in use, ...)."""


class AdapterServer:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        artifact = load_artifact(config.artifact)  # raises ArtifactError with the reason
        if config.expect_sha256 and artifact.sha256 != config.expect_sha256:
            raise ServiceError(f"artifact sha256 is {artifact.sha256}, expected {config.expect_sha256}")
        self.runtime = HyperNetworkRuntime(artifact, threads=config.ort_threads)
        self.metrics = ServiceMetrics()
        self.executor = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="adapt")
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.address = ""
        self.metrics_port: int | None = None

    async def start(self) -> str:
        """Bind and start; returns the bound address (the real port when 0 was asked)."""
        limits = self.config.limits
        # A little headroom over the payload limit for framing; larger messages get RESOURCE_EXHAUSTED.
        options = [
            ("grpc.max_receive_message_length", limits.max_message_bytes),
            ("grpc.max_send_message_length", limits.max_message_bytes + 1024 * 1024),
        ]
        server = grpc.aio.server(options=options, maximum_concurrent_rpcs=self.config.max_concurrent_rpcs)
        servicer = AdapterServicer(self.runtime, limits, self.metrics, self.executor, self.config.seed)
        pb_grpc.add_AdapterServiceServicer_to_server(servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        try:
            port = server.add_insecure_port(self.config.address)
        except RuntimeError as exc:
            raise ServiceError(f"cannot bind {self.config.address}: {exc}") from exc
        if self.config.address.startswith("unix:"):
            self.address = self.config.address
        else:
            self.address = f"{self.config.address.rsplit(':', 1)[0]}:{port}"
        await server.start()
        self.server = server
        if self.config.metrics_port is not None:
            self.metrics_port = self.metrics.serve(self.config.metrics_port, self.config.metrics_address)
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
            },
        )
        return self.address

    async def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING, let in-flight calls finish within `grace`, release everything."""
        if self.server is None:
            return
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.config.grace_seconds if grace is None else grace)
        self.server = None
        self.metrics.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
        log.info("stopped", extra={"address": self.address})

    async def wait(self) -> None:
        if self.server is not None:
            await self.server.wait_for_termination()


async def run(config: ServerConfig) -> None:
    """Serve until SIGTERM or SIGINT, then shut down gracefully."""
    server = AdapterServer(config)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down", extra={"grace_s": config.grace_seconds})
    await server.stop()
