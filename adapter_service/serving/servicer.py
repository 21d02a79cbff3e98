"""The thin gRPC servicer: validate, call the plain `adapt` function off the event loop, count, answer."""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Executor

import grpc

from adapter_service.core.artifact import Artifact
from adapter_service.proto import adapter_service_pb2 as pb
from adapter_service.proto import adapter_service_pb2_grpc as pb_grpc
from adapter_service.serving.adapt import adapt
from adapter_service.serving.metrics import STAGES, ServiceMetrics
from adapter_service.serving.runtime import HyperNetworkRuntime
from adapter_service.serving.validation import Limits, RequestError, parse_adapt_request

log = logging.getLogger(__name__)
OFFERED_DTYPES = (pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT16, pb.DTYPE_BFLOAT16)
GROUPING_MESSAGE = {"policy": pb.GROUPING_POLICY, "predicted-label": pb.GROUPING_PREDICTED_LABEL}


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
    ) -> None:
        self.runtime = runtime
        self.limits = limits
        self.metrics = metrics
        self.executor = executor
        self.seed = seed
        self._manifest = manifest_message(runtime.artifact, limits)

    async def GetManifest(
        self, request: pb.GetManifestRequest, context: grpc.aio.ServicerContext
    ) -> pb.Manifest:
        self.metrics.rpcs.labels("GetManifest", "OK").inc()
        return self._manifest

    async def Adapt(self, request: pb.AdaptRequest, context: grpc.aio.ServicerContext) -> pb.AdaptResponse:
        loop = asyncio.get_running_loop()
        try:
            response = await loop.run_in_executor(self.executor, self._adapt, request)
        except RequestError as exc:
            self._count_error(exc.code)
            log.warning(
                "adapt rejected", extra={"field": exc.field, "code": exc.code.name, "error": str(exc)}
            )
            await context.abort(exc.code, str(exc))
        except Exception as exc:  # a bug or a runtime failure: answer INTERNAL and keep serving
            self._count_error(grpc.StatusCode.INTERNAL)
            log.exception("adapt failed")
            await context.abort(grpc.StatusCode.INTERNAL, f"adapt failed: {type(exc).__name__}: {exc}")
        self._observe(response)
        return response

    def _adapt(self, request: pb.AdaptRequest) -> pb.AdaptResponse:
        started = time.perf_counter()
        call = parse_adapt_request(request, self.runtime.manifest, self.limits)
        return adapt(call, self.runtime, self.limits, self.seed, decode_seconds=time.perf_counter() - started)

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
