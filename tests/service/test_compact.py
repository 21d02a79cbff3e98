"""The mixture's compact wire form: the bases once, then a few weights per cluster.

Against a real sidecar on loopback, the compact answer must rebuild exactly the adapters the whole
form sends, in a fraction of the bytes; bases are sent once per caller; a server whose artifact has
no compact form refuses it by name and keeps serving; a lying artifact is refused at load.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from adapter_service.client import (
    AdapterClient,
    AsyncAdapterClient,
    BasesCache,
    InvalidResponse,
    ServiceManifest,
    build_adapt_request,
    parse_adapt_response,
)
from adapter_service.core.artifact import ArtifactError, Manifest, load_artifact, write_artifact
from adapter_service.core.clustering import FixedK, PerRequest
from adapter_service.core.compact import column_weights, weighted_b
from adapter_service.proto import adapter_service_pb2 as pb
from adapter_service.proto import adapter_service_pb2_grpc as pb_grpc
from adapter_service.serving.adapt import bases_key
from adapter_service.serving.runtime import HyperNetworkRuntime
from adapter_service.serving.validation import Limits
from adapter_service.training.export import export_artifact, plan_export
from adapter_service.training.hypernetwork import build_network
from conftest import start_server, tiny_llama

BASES, RANK = 3, 6


def statistics(n: int = 24, seed: int = 0) -> np.ndarray:
    """Three groups around one shared direction, as real statistics look."""
    rng = np.random.default_rng(seed)
    common = rng.normal(size=64) * 5
    offsets = rng.normal(size=(3, 64))
    rows = common + offsets[np.arange(n) % 3] + 0.1 * rng.normal(size=(n, 64))
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def mixture_artifact(out: Path, max_delta_norm: float | None = None) -> Path:
    model = tiny_llama()
    plan = plan_export(
        model,
        ["q_proj", "v_proj"],
        rank=RANK,
        init="random",
        kind="mixture",
        bases=BASES,
        routing_sharpness=2.0,
        max_delta_norm=max_delta_norm,
    )
    torch.manual_seed(0)
    network = build_network(plan.hypernetwork_config)
    network.fit_statistics(torch.from_numpy(statistics(60, seed=1)))
    export_artifact(network.eval(), plan, out)
    return out


@pytest.fixture(scope="module")
def mixture_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return mixture_artifact(tmp_path_factory.mktemp("mixture"))


@pytest.fixture(scope="module")
def mixture_server(mixture_dir: Path):
    running = start_server(mixture_dir, limits=Limits(max_rows=256, max_clusters=32))
    yield running
    running.stop()


def test_weighted_b_scales_each_basis_block() -> None:
    b = np.ones((2, 5, 6), np.float32)
    w = np.array([1.0, 2.0, 3.0], np.float32)
    assert column_weights(w, 6).tolist() == [1, 1, 2, 2, 3, 3]
    assert weighted_b(b, w)[1, 4].tolist() == [1, 1, 2, 2, 3, 3]
    torch.testing.assert_close(
        weighted_b(torch.from_numpy(b), torch.from_numpy(w)),
        torch.from_numpy(b * np.float32([1, 1, 2, 2, 3, 3])),
    )
    with pytest.raises(ValueError, match="weights: 4 bases do not divide rank 6"):
        column_weights(np.ones(4), 6)


def test_only_an_uncapped_mixture_offers_the_compact_form(tmp_path: Path, artifact_dir: Path) -> None:
    mixture = load_artifact(mixture_artifact(tmp_path / "m"))
    assert mixture.manifest.mixture is not None and mixture.manifest.mixture.bases == BASES
    runtime = HyperNetworkRuntime(mixture)
    assert set(runtime.bases) == {g.name for g in mixture.manifest.groups}
    assert runtime.mixture_weights(statistics(4)).shape == (4, BASES)
    # A delta-norm cap rescales each cluster's B by its own factor: whole adapters only.
    capped = load_artifact(mixture_artifact(tmp_path / "c", max_delta_norm=0.5))
    assert capped.manifest.mixture is None and HyperNetworkRuntime(capped).bases is None
    # The paper's generator has no bases; its manifest JSON has no "mixture" key, so its hash is
    # what it was before the field existed.
    full = load_artifact(artifact_dir)
    assert full.manifest.mixture is None
    assert "mixture" not in json.loads((artifact_dir / "manifest.json").read_text())


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_compact_answer_rebuilds_the_whole_adapters(mixture_server, dtype: str) -> None:
    stats = statistics(24)
    with AdapterClient(mixture_server.address, timeout=30) as c:
        assert c.manifest().mixture_bases == BASES
        whole = c.adapt(stats, policy=FixedK(6), dtype=dtype, compact=False)
        compact = c.adapt(stats, policy=FixedK(6), dtype=dtype)  # compact by default when offered
    assert np.array_equal(whole.assignments, compact.assignments)
    assert whole.k == compact.k == 6
    tolerance = {"float32": 1e-6, "float16": 2e-3}[dtype]
    for w, k in zip(whole.clusters, compact.clusters, strict=True):
        assert w.key != k.key  # the forms have keys of their own
        assert set(w.modules) == set(k.modules)
        for name, delta in w.modules.items():
            assert k.modules[name].a.dtype == delta.a.dtype == np.dtype(dtype)
            np.testing.assert_array_equal(k.modules[name].a, delta.a)
            np.testing.assert_allclose(
                k.modules[name].b.astype(np.float32),
                delta.b.astype(np.float32),
                rtol=tolerance,
                atol=tolerance,
            )


def test_bases_are_sent_once_and_answers_are_much_smaller(mixture_server, mixture_dir: Path) -> None:
    stats = statistics(32)
    sha = load_artifact(mixture_dir).manifest.sha256()
    key = bases_key(sha, pb.DTYPE_FLOAT32)
    with grpc.insecure_channel(mixture_server.address) as channel:
        stub = pb_grpc.AdapterServiceStub(channel)
        whole = stub.Adapt(build_adapt_request(stats, policy=FixedK(32)), timeout=30)
        first = stub.Adapt(build_adapt_request(stats, policy=FixedK(32), compact=True), timeout=30)
        again = stub.Adapt(
            build_adapt_request(stats, policy=FixedK(32), compact=True, held_keys=[key]), timeout=30
        )
    assert first.bases_key == again.bases_key == key
    assert len(first.bases) == len(load_artifact(mixture_dir).manifest.targets)
    assert not again.bases  # held: left out
    assert all(len(c.basis_weights) == BASES and not c.modules for c in again.clusters)
    # per request (k = 32): whole adapters grow with k, the compact form by a few floats a cluster
    assert first.ByteSize() * 8 < whole.ByteSize()
    assert again.ByteSize() * 50 < whole.ByteSize()


def test_per_request_policy_gives_each_row_its_adapter_within_the_limit(mixture_server) -> None:
    stats = statistics(24)
    with AdapterClient(mixture_server.address, timeout=30) as c:
        result = c.adapt(stats, policy=PerRequest())
        assert result.k == 24 and result.assignments.tolist() == list(range(24))
        with pytest.raises(Exception) as info:  # the server's limit is 32 clusters
            c.adapt(statistics(40), policy=PerRequest())
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details == (
            "clustering.per_request: N = 40 rows would be 40 clusters; expected N <= max_clusters = 32"
        )
        assert c.adapt(stats, policy=FixedK(2)).k == 2  # still serving


def test_client_keeps_the_bases_and_rebuilds_from_its_cache(mixture_server) -> None:
    stats = statistics(24)
    with AdapterClient(mixture_server.address, timeout=30) as c:
        answers = []
        call = c._call
        c._call = lambda method, request, timeout: (
            answers.append(call(method, request, timeout)) or answers[-1]
        )
        first = c.adapt(stats, policy=FixedK(4))
        assert len(c.bases.keys()) == 1
        second = c.adapt(stats, policy=FixedK(4))
    assert answers[-2].bases and not answers[-1].bases  # sent once, then held
    for a, b in zip(first.clusters, second.clusters, strict=True):
        assert a.key == b.key
        for name, delta in a.modules.items():
            np.testing.assert_array_equal(b.modules[name].b, delta.b)
            np.testing.assert_array_equal(b.modules[name].a, delta.a)


def test_async_client_and_torch_tensors(mixture_server) -> None:
    async def main():
        async with AsyncAdapterClient(mixture_server.address, timeout=30) as c:
            return await c.adapt(statistics(12), policy=FixedK(3), as_torch=True)

    result = asyncio.run(main())
    delta = next(iter(result.clusters[0].modules.values()))
    assert isinstance(delta.a, torch.Tensor) and isinstance(delta.b, torch.Tensor)
    assert delta.b.shape[1] == RANK


def test_compact_refused_by_name_where_there_is_none(server) -> None:
    with AdapterClient(server.address, timeout=30) as c:
        assert c.manifest().mixture_bases == 0
        with pytest.raises(Exception) as info:
            c.adapt(statistics(8), policy=FixedK(2), compact=True)
        assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
        assert "compact" in info.value.details and "expected compact = false" in info.value.details
        assert c.adapt(statistics(8), policy=FixedK(2)).k == 2  # default: whole adapters; still serving


def test_client_refuses_weights_without_bases() -> None:
    manifest = ServiceManifest.from_message(
        pb.Manifest(
            artifact_id="x",
            rank=RANK,
            targets=[pb.TargetModule(name="m", d_in=4, d_out=2)],
            dtypes=[pb.DTYPE_FLOAT32],
            mixture=pb.MixtureLayout(bases=BASES),
        )
    )
    response = pb.AdaptResponse(assignments=[0], bases_key="unknown")
    response.clusters.add(index=0, size=1, adapter_key="k", basis_weights=[1.0, 1.0, 1.0])
    with pytest.raises(
        InvalidResponse, match="basis_weights: the bases 'unknown' were neither sent nor held"
    ):
        parse_adapt_response(response, manifest, 1, "float32", bases_cache=BasesCache())
    bases = {"m": (np.ones((RANK, 4), np.float32), np.ones((2, RANK), np.float32))}
    cache = BasesCache()
    cache.put("unknown", bases)
    response.clusters[0].basis_weights[:] = [1.0, 2.0]
    with pytest.raises(InvalidResponse, match=r"clusters\[0\].basis_weights: 2 values, expected 3"):
        parse_adapt_response(response, manifest, 1, "float32", bases_cache=cache)


def test_a_lying_mixture_layout_is_refused_at_load(tmp_path: Path) -> None:
    artifact = load_artifact(mixture_artifact(tmp_path / "m"))
    data = artifact.manifest.to_json()
    data["mixture"]["basis_b_outputs"] = list(reversed(data["mixture"]["basis_b_outputs"]))
    liar = write_artifact(tmp_path / "liar", Manifest.from_json(data), artifact.onnx_bytes)
    with pytest.raises(ArtifactError, match="do not rebuild the adapters the graph emits"):
        HyperNetworkRuntime(liar)
    data = artifact.manifest.to_json()
    data["mixture"]["bases"] = 4
    with pytest.raises(ValueError, match=r"field 'mixture\.bases': expected a divisor of rank 6"):
        Manifest.from_json(data)
