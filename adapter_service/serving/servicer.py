"""The thin gRPC servicer: validate, call the plain `adapt` function off the event loop, count, answer.

Requests are decoded by a deserializer that never raises (decoding.py): bytes that are not a message
are INVALID_ARGUMENT, counted, audited and logged as one warning line.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Executor

import grpc

from adapter_service.core.artifact import Artifact
from adapter_service.proto import adapter_service_pb2 as pb
from adapter_service.proto import adapter_service_pb2_grpc as pb_grpc
from adapter_service.serving.adapt import AdaptOutputs, adapt_with_outputs
from adapter_service.serving.audit import AuditLog
from adapter_service.serving.decoding import Undecodable, message_deserializer, refuse_undecodable
from adapter_service.serving.errors import clip
from adapter_service.serving.metrics import STAGES, ServiceMetrics
from adapter_service.serving.pause import PAUSED_DETAILS, STATE_METADATA, PauseSwitch
from adapter_service.serving.runtime import HyperNetworkRuntime
from adapter_service.serving.validation import AdaptCall, Limits, RequestError, parse_adapt_request

log = logging.getLogger(__name__)
OFFERED_DTYPES = (pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT16, pb.DTYPE_BFLOAT16)
GROUPING_MESSAGE = {"policy": pb.GROUPING_POLICY, "predicted-label": pb.GROUPING_PREDICTED_LABEL}
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["AdapterService"].full_name


def add_to_server(servicer: AdapterServicer, server: grpc.aio.Server) -> None:
    """Register the service as the generated code does, with tolerant request deserializers."""
    handlers = {
        "GetManifest": grpc.unary_unary_rpc_method_handler(
            servicer.GetManifest,
            request_deserializer=message_deserializer(pb.GetManifestRequest),
            response_serializer=pb.Manifest.SerializeToString,
        ),
        "Adapt": grpc.unary_unary_rpc_method_handler(
            servicer.Adapt,
            request_deserializer=message_deserializer(pb.AdaptRequest),
            response_serializer=pb.AdaptResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


def manifest_message(artifact: Artifact, limits: Limits) -> pb.Manifest:
    m = artifact.manifest
    fp = m.base_model
    return pb.Manifest(
        artifact_id=m.artifact_id,
        artifact_sha256=artifact.sha256,
        base_model=pb.ModelFingerprint(
            architecture=fp.architecture,
            hidden_size=fp.hidden_size,
            vocab_size=fp.vocab_size,
            num_layers=fp.num_layers,
            weights_sha256=fp.weights_sha256,
            weights_sha256_by_dtype=fp.weights_sha256_by_dtype,
        ),
        statistic=pb.StatisticSpec(
            kind=m.statistic.kind,
            dim=m.statistic.dim,
            normalization=m.statistic.normalization,
            params=m.statistic.params,
        ),
        targets=[pb.TargetModule(name=name, d_in=d_in, d_out=d_out) for name, d_in, d_out in m.targets],
        rank=m.rank,
        scaling=m.scaling,
        dtypes=OFFERED_DTYPES,
        limits=pb.Limits(
            max_rows=limits.max_rows,
            max_clusters=limits.max_clusters,
            max_message_bytes=limits.max_message_bytes,
        ),
        mixture=pb.MixtureLayout(bases=m.mixture.bases) if m.mixture is not None else None,
        grouping=GROUPING_MESSAGE[m.grouping],
    )


class AdapterServicer(pb_grpc.AdapterServiceServicer):
    def __init__(
        self,
        runtime: HyperNetworkRuntime,
        limits: Limits,
        metrics: ServiceMetrics,
        executor: Executor,
        seed: int = 0,
        pause: PauseSwitch | None = None,
        audit: AuditLog | None = None,
    ) -> None:
        self.runtime = runtime
        self.limits = limits
        self.metrics = metrics
        self.executor = executor
        self.seed = seed
        self.pause = pause or PauseSwitch()
        self.audit = audit
        self._manifest = manifest_message(runtime.artifact, limits)

    async def GetManifest(
        self, request: pb.GetManifestRequest | Undecodable, context: grpc.aio.ServicerContext
    ) -> pb.Manifest:
        if isinstance(request, Undecodable):
            await self._refuse_undecodable("GetManifest", request, context)
        self.metrics.rpcs.labels("GetManifest", "OK").inc()
        return self._manifest

    async def Adapt(
        self, request: pb.AdaptRequest | Undecodable, context: grpc.aio.ServicerContext
    ) -> pb.AdaptResponse:
        started = time.perf_counter()
        if isinstance(request, Undecodable):
            self._audit_error(request, grpc.StatusCode.INVALID_ARGUMENT, request.error, context, started)
            await self._refuse_undecodable("Adapt", request, context)
        if self.pause.paused:  # before any work: a paused sidecar costs its callers nothing
            self._count_error(grpc.StatusCode.FAILED_PRECONDITION)
            self._audit_error(request, grpc.StatusCode.FAILED_PRECONDITION, PAUSED_DETAILS, context, started)
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, PAUSED_DETAILS, trailing_metadata=(STATE_METADATA,)
            )
        loop = asyncio.get_running_loop()
        peer = context.peer() if self.audit is not None else ""
        try:
            response = await loop.run_in_executor(self.executor, self._adapt, request, peer, started)
        except RequestError as exc:
            self._count_error(exc.code)
            log.warning(
                "adapt rejected", extra={"field": exc.field, "code": exc.code.name, "error": str(exc)}
            )
            self._audit_error(request, exc.code, str(exc), context, started)
            await context.abort(exc.code, str(exc))
        except Exception as exc:  # a bug or a runtime failure: answer INTERNAL and keep serving
            self._count_error(grpc.StatusCode.INTERNAL)
            log.exception("adapt failed")
            message = clip(f"adapt failed: {type(exc).__name__}: {exc}", 1000)
            self._audit_error(request, grpc.StatusCode.INTERNAL, message, context, started)
            await context.abort(grpc.StatusCode.INTERNAL, message)
        self._observe(response)
        return response

    def _adapt(self, request: pb.AdaptRequest, peer: str, started: float) -> pb.AdaptResponse:
        """`started`: when the call arrived (the audit's duration); the stage timings start here."""
        decoding = time.perf_counter()
        call = parse_adapt_request(request, self.runtime.manifest, self.limits)
        response, outputs = adapt_with_outputs(
            call, self.runtime, self.limits, self.seed, decode_seconds=time.perf_counter() - decoding
        )
        if outputs.fallback_rows:
            self.metrics.fallback_rows.inc(outputs.fallback_rows)
        if self.audit is not None:  # here, off the event loop: the adapter norms are real (if small) work
            self._audit_ok(call, response, outputs, peer, started)
        return response

    def _audit_ok(
        self, call: AdaptCall, response: pb.AdaptResponse, outputs: AdaptOutputs, peer: str, started: float
    ) -> None:
        try:
            self.audit.ok(call, response, outputs, peer, time.perf_counter() - started)
        except Exception:  # the audit must never fail a call that succeeded
            log.exception("audit log write failed")

    def _audit_error(
        self,
        request: object,
        code: grpc.StatusCode,
        message: str,
        context: grpc.aio.ServicerContext,
        started: float,
    ) -> None:
        if self.audit is None:
            return
        try:
            self.audit.error(request, code, message, context.peer(), time.perf_counter() - started)
        except Exception:
            log.exception("audit log write failed")

    async def _refuse_undecodable(
        self, method: str, request: Undecodable, context: grpc.aio.ServicerContext
    ) -> None:
        code = grpc.StatusCode.INVALID_ARGUMENT
        self.metrics.rpcs.labels(method, code.name).inc()
        self.metrics.errors.labels(method, code.name).inc()
        await refuse_undecodable(method, request, context)

    def _count_error(self, code: grpc.StatusCode) -> None:
        self.metrics.rpcs.labels("Adapt", code.name).inc()
        self.metrics.errors.labels("Adapt", code.name).inc()

    def _observe(self, response: pb.AdaptResponse) -> None:
        m = self.metrics
        m.rpcs.labels("Adapt", "OK").inc()
        for stage in STAGES:
            m.stage_seconds.labels(stage).observe(getattr(response.timings, stage))
        m.rows.observe(len(response.assignments))
        m.clusters.observe(len(response.clusters))
        omitted = sum(c.omitted for c in response.clusters)
        m.adapters.labels("sent").inc(len(response.clusters) - omitted)
        m.adapters.labels("omitted").inc(omitted)
        m.response_bytes.inc(response.ByteSize())
        log.debug(
            "adapt",
            extra={
                "rows": len(response.assignments),
                "clusters": len(response.clusters),
                "total_s": response.timings.total,
            },
        )
