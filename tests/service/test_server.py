"""The real server on a loopback port, called through the real client (and a raw stub for bad input)."""

from __future__ import annotations

import asyncio
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from adapter_service.client import AdapterClient, AdapterServiceError, AsyncAdapterClient, build_adapt_request
from adapter_service.core import codec
from adapter_service.core.artifact import load_artifact
from adapter_service.core.clustering import AutoK, FixedK
from adapter_service.proto import adapter_service_pb2 as pb
from adapter_service.proto import adapter_service_pb2_grpc as pb_grpc
from adapter_service.serving.runtime import HyperNetworkRuntime
from adapter_service.serving.validation import Limits
from conftest import ServerThread, start_server

D = 64


def blobs(n: int = 24, groups: int = 3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((groups, D))
    return (centres[np.arange(n) % groups] + 0.05 * rng.standard_normal((n, D))).astype(np.float32)


@pytest.fixture(scope="module")
def client(server: ServerThread):
    with AdapterClient(server.address, timeout=10) as c:
        yield c


@pytest.fixture(scope="module")
def stub(server: ServerThread):
    channel = grpc.insecure_channel(server.address)
    yield pb_grpc.AdapterServiceStub(channel)
    channel.close()


def test_manifest(client: AdapterClient, artifact_dir: Path) -> None:
    artifact = load_artifact(artifact_dir)
    m = client.manifest()
    assert m.artifact_id == artifact.manifest.artifact_id
    assert m.artifact_sha256 == artifact.sha256
    assert m.base_model == artifact.manifest.base_model
    assert set(m.base_model.weights_sha256_by_dtype) == {"bfloat16", "float16"}
    assert m.base_model.weights_sha256_by_dtype == artifact.manifest.base_model.weights_sha256_by_dtype
    assert m.grouping == "policy"  # Adapt honours the caller's clustering policy
    assert (m.statistic.kind, m.statistic.dim) == ("mean_input_embedding", D)
    assert m.targets == tuple(artifact.manifest.targets)
    assert (m.rank, m.scaling) == (4, 2.0)
    assert m.dtypes == ("float32", "float16", "bfloat16")
    assert (m.max_rows, m.max_clusters, m.max_message_bytes) == (256, 8, 8 << 20)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_adapt_round_trip(client: AdapterClient, artifact_dir: Path, dtype: str) -> None:
    stats = blobs()
    ids = [f"r{i}" for i in range(len(stats))]
    result = client.adapt(stats, request_ids=ids, policy=FixedK(3), dtype=dtype)
    assert result.k == 3 and result.grouping == "policy"
    assert result.assignments.shape == (24,)
    # rows i and i+3 come from the same blob
    assert np.array_equal(result.assignments[:3].repeat(1), result.assignments[3:6])
    assert sorted(c.size for c in result.clusters) == [8, 8, 8]
    manifest = client.manifest()
    for c in result.clusters:
        assert not c.omitted
        assert set(c.modules) == {t[0] for t in manifest.targets}
        for name, d_in, d_out in manifest.targets:
            delta = c.modules[name]
            assert delta.a.shape == (4, d_in) and delta.b.shape == (d_out, 4)
            assert delta.a.dtype == codec.numpy_dtype(dtype)
    assert set(result.timings) == {"decode", "cluster", "hypernetwork", "encode", "total"}
    assert result.timings["total"] > 0

    # The tensors are the hyper-network's output for each cluster's centroid.
    runtime = HyperNetworkRuntime(load_artifact(artifact_dir))
    normed = stats / np.linalg.norm(stats, axis=1, keepdims=True)
    centroids = np.stack([normed[result.assignments == c].mean(0) for c in range(3)])
    expected = runtime.generate(centroids)
    group = runtime.manifest.groups[0]
    for c in range(3):
        want = expected[group.name].a[c, 0].astype(codec.numpy_dtype(dtype)).astype(np.float32)
        got = result.clusters[c].modules[group.modules[0]].a.astype(np.float32)
        assert np.allclose(got, want, rtol=1e-2 if dtype != "float32" else 1e-5, atol=1e-6)


def test_same_input_same_groups_and_tensors(client: AdapterClient) -> None:
    stats = blobs(seed=5)
    first = client.adapt(stats, policy=AutoK(max_k=6))
    second = client.adapt(stats, policy=AutoK(max_k=6))
    assert first.k == second.k == 3
    assert np.array_equal(first.assignments, second.assignments)
    for a, b in zip(first.clusters, second.clusters, strict=True):
        assert a.key == b.key
        for name in a.modules:
            assert np.array_equal(a.modules[name].a, b.modules[name].a)
            assert np.array_equal(a.modules[name].b, b.modules[name].b)


def test_held_keys_are_left_out(client: AdapterClient) -> None:
    stats = blobs(seed=7)
    full = client.adapt(stats, policy=FixedK(3), dtype="float16")
    held = [full.clusters[0].key, full.clusters[2].key]
    partial = client.adapt(stats, policy=FixedK(3), dtype="float16", held_keys=held)
    assert [c.omitted for c in partial.clusters] == [True, False, True]
    assert partial.clusters[0].modules == {} and partial.clusters[1].modules
    assert [c.key for c in partial.clusters] == [c.key for c in full.clusters]
    # A different dtype is a different adapter: keys differ.
    other = client.adapt(stats, policy=FixedK(3), dtype="float32", held_keys=held)
    assert not any(c.omitted for c in other.clusters)


def test_default_policy_is_auto(client: AdapterClient) -> None:
    assert client.adapt(blobs(n=30, groups=5, seed=2)).k == 5


def _raw(stats: np.ndarray, **fields) -> pb.AdaptRequest:
    return pb.AdaptRequest(statistics=codec.encode(stats), **fields)


BAD_REQUESTS = {
    "empty batch": (
        pb.AdaptRequest(statistics=codec.encode(np.zeros((0, D), np.float32))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "statistics.shape: empty batch",
    ),
    "too many rows": (
        _raw(blobs(n=257)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "N = 257 rows; expected at most 256",
    ),
    "wrong D": (
        _raw(np.ones((4, D + 1), np.float32)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "statistics.shape: D = 65; expected D = 64",
    ),
    "NaN": (
        _raw(np.where(np.eye(4, D) > 0, np.nan, 1.0).astype(np.float32)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "statistics.data: 4 non-finite values",
    ),
    "Inf": (_raw(np.full((2, D), np.inf, np.float32)), grpc.StatusCode.INVALID_ARGUMENT, "non-finite"),
    "byte length": (
        pb.AdaptRequest(statistics=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2, D], data=b"\0" * 100)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "statistics.data: 100 bytes, expected 512",
    ),
    "unknown statistics dtype": (
        pb.AdaptRequest(statistics=pb.Tensor(dtype=7, shape=[1, D], data=b"\0" * 4 * D)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "statistics.dtype: unknown value 7",
    ),
    "unknown output dtype": (
        _raw(blobs(), dtype=11),
        grpc.StatusCode.INVALID_ARGUMENT,
        "dtype: unknown value 11",
    ),
    "k = 0": (
        _raw(blobs(), clustering=pb.ClusteringPolicy(fixed=pb.FixedK(k=0))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "clustering.fixed.k: got 0; expected 1 <= k <= 8",
    ),
    "k above limit": (
        _raw(blobs(), clustering=pb.ClusteringPolicy(fixed=pb.FixedK(k=9))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "clustering.fixed.k: got 9",
    ),
    "auto max_k above limit": (
        _raw(blobs(), clustering=pb.ClusteringPolicy(auto=pb.AutoK(max_k=99))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "clustering.auto.max_k: got 99",
    ),
    "duplicate ids": (
        _raw(blobs(n=3), request_ids=["a", "b", "a"]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "request_ids: duplicate id 'a'",
    ),
    "ids count": (
        _raw(blobs(n=3), request_ids=["a"]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "request_ids: 1 ids for 3",
    ),
    "missing statistics": (pb.AdaptRequest(), grpc.StatusCode.INVALID_ARGUMENT, "statistics: missing"),
    # Shapes whose element count overflows int64 (or numpy) are refused before numpy sees them.
    "shape [2**62, 0]": (
        pb.AdaptRequest(statistics=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2**62, 0])),
        grpc.StatusCode.INVALID_ARGUMENT,
        "statistics.shape: [4611686018427387904, 0] is out of range",
    ),
    "shape [0, 2**63 - 1]": (
        pb.AdaptRequest(statistics=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[0, 2**63 - 1])),
        grpc.StatusCode.INVALID_ARGUMENT,
        "statistics.shape: [0, 9223372036854775807] is out of range",
    ),
    "shape [2**32, 2**32]": (
        pb.AdaptRequest(statistics=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2**32, 2**32], data=b"\0" * 4)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "statistics.shape",
    ),
    "negative dimension": (
        pb.AdaptRequest(statistics=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[-1, D])),
        grpc.StatusCode.INVALID_ARGUMENT,
        "statistics.shape: [-1, 64] has a negative dimension",
    ),
    "negative times negative": (
        pb.AdaptRequest(statistics=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[-2, -D], data=b"\0" * 512)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "statistics.shape",
    ),
    "100 000 dimensions": (
        pb.AdaptRequest(statistics=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[1] * 100_000)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "statistics.shape: got [1, 1, 1, 1, 1, 1, 1, 1, ...] (100000 dimensions), expected [*, *]",
    ),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_input_is_refused_and_service_keeps_serving(stub, client: AdapterClient, case: str) -> None:
    request, code, message = BAD_REQUESTS[case]
    with pytest.raises(grpc.RpcError) as info:
        stub.Adapt(request, timeout=10)
    assert info.value.code() == code
    assert message in info.value.details()
    assert client.adapt(blobs(n=6), policy=FixedK(2)).k == 2


def test_client_surfaces_status(client: AdapterClient) -> None:
    with pytest.raises(AdapterServiceError) as info:
        client.adapt(blobs(), policy=FixedK(99))
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_message_above_size_limit(artifact_dir: Path) -> None:
    small = start_server(
        artifact_dir, limits=Limits(max_rows=4096, max_clusters=8, max_message_bytes=32 << 10)
    )
    try:
        with AdapterClient(small.address, timeout=10) as c:
            big = np.ones((256, D), np.float32)  # 64 KiB of statistics
            with pytest.raises(AdapterServiceError) as info:
                c.adapt(big)
            assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            # A response that would not fit is refused before the work, naming what to change.
            with pytest.raises(AdapterServiceError, match="response would be about") as info:
                c.adapt(blobs(n=64, groups=8), policy=FixedK(8), dtype="float32")  # ~60 KiB
            assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert c.adapt(blobs(n=8), policy=FixedK(2)).k == 2
    finally:
        small.stop()


def test_health_and_reflection(server: ServerThread) -> None:
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "chameleon.v1.AdapterService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {"chameleon.v1.AdapterService", "grpc.health.v1.Health"} <= services


def test_32_concurrent_clients(server: ServerThread) -> None:
    def one(i: int) -> tuple[int, np.ndarray]:
        with AdapterClient(server.address, timeout=30) as c:
            stats = blobs(n=16, groups=2 + i % 3, seed=i)
            results = [c.adapt(stats, policy=AutoK(max_k=4), dtype="float16") for _ in range(3)]
            assert all(np.array_equal(r.assignments, results[0].assignments) for r in results)
            return results[0].k, results[0].assignments

    with ThreadPoolExecutor(32) as pool:
        outcomes = list(pool.map(one, range(32)))
    assert [k for k, _ in outcomes] == [2 + i % 3 for i in range(32)]


def test_async_client(server: ServerThread) -> None:
    async def main() -> list[int]:
        async with AsyncAdapterClient(server.address, timeout=10) as c:
            manifest = await c.manifest()
            assert manifest.rank == 4
            results = await asyncio.gather(
                *(c.adapt(blobs(seed=s), policy=FixedK(3), as_torch=True) for s in range(4))
            )
        import torch

        delta = next(iter(results[0].clusters[0].modules.values()))
        assert isinstance(delta.a, torch.Tensor) and delta.a.dtype == torch.float32
        return [r.k for r in results]

    assert asyncio.run(main()) == [3, 3, 3, 3]


def test_metrics_endpoint_counts_calls_and_errors(server: ServerThread, client: AdapterClient) -> None:
    client.adapt(blobs(), policy=FixedK(3))
    with pytest.raises(AdapterServiceError):
        client.adapt(blobs(), policy=FixedK(99))
    text = (
        urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=5)
        .read()
        .decode()
    )
    assert 'chameleon_rpcs_total{code="OK",method="Adapt"}' in text
    assert 'chameleon_rpc_errors_total{code="INVALID_ARGUMENT",method="Adapt"}' in text
    for stage in ("decode", "cluster", "hypernetwork", "encode", "total"):
        assert f'chameleon_adapt_stage_seconds_count{{stage="{stage}"}}' in text
    assert "chameleon_adapt_rows_bucket" in text and "chameleon_adapt_clusters_bucket" in text


def test_build_request_rejects_unknown_policy() -> None:
    with pytest.raises(TypeError, match="policy"):
        build_adapt_request(blobs(), policy="auto")  # type: ignore[arg-type]


def test_a_huge_duplicate_id_is_clipped_in_the_status_message(stub) -> None:
    huge = "x" * (1 << 20)
    with pytest.raises(grpc.RpcError) as info:
        stub.Adapt(_raw(blobs(n=2), request_ids=[huge, huge]), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("request_ids: duplicate id 'xxxx")
    assert f"({len(huge) + 2} chars)" in info.value.details()
    assert len(info.value.details()) < 1000


@pytest.mark.parametrize(
    "method",
    [
        "/chameleon.v1.AdapterService/Adapt",
        "/chameleon.v1.AdapterService/GetManifest",
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    ],
)
def test_undecodable_bytes_are_invalid_argument_with_one_warning(
    server: ServerThread, client: AdapterClient, method: str, caplog
) -> None:
    """grpc's own deserializer would answer UNKNOWN and log a traceback per call, health included (which
    answers callers without a token)."""
    with grpc.insecure_channel(server.address) as channel, caplog.at_level("WARNING"):
        if method.endswith(("Watch", "ServerReflectionInfo")):  # response (and request) streams
            stream = channel.stream_stream(method, request_serializer=None, response_deserializer=None)

            def send(data: bytes) -> None:
                list(stream(iter([data]), timeout=10))
        else:
            unary = channel.unary_unary(method, request_serializer=None, response_deserializer=None)

            def send(data: bytes) -> None:
                unary(data, timeout=10)

        for _ in range(3):
            with pytest.raises(grpc.RpcError) as info:
                send(b"\xff\xff\xff")
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert info.value.details().startswith("request: not a valid ")
    undecodable = [r for r in caplog.records if r.getMessage() == "undecodable request"]
    assert len(undecodable) == 3
    assert not any(r.exc_info for r in caplog.records)
    assert client.adapt(blobs(n=6), policy=FixedK(2)).k == 2
