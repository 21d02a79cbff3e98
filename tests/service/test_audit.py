"""The audit log (--audit-log): one JSON line per Adapt call, successful or not, with what served which
request; the adapter norms from the Gram trick equal ||s B A||_F computed the long way."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import numpy as np
import pytest
from test_compact import mixture_artifact

from adapter_service.core import codec
from adapter_service.core.artifact import load_artifact
from adapter_service.core.clustering import FixedK
from adapter_service.core.compact import weighted_b
from adapter_service.proto import adapter_service_pb2 as pb
from adapter_service.proto import adapter_service_pb2_grpc as pb_grpc
from adapter_service.serving.adapt import adapt_with_outputs
from adapter_service.serving.audit import AuditLog
from adapter_service.serving.runtime import HyperNetworkRuntime
from adapter_service.serving.validation import AdaptCall, Limits
from conftest import start_server

D = 64


def _stats(n: int = 12, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((3, D))
    return (centres[np.arange(n) % 3] + 0.05 * rng.standard_normal((n, D))).astype(np.float32)


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_call_is_one_json_line(artifact_dir: Path, tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    server = start_server(artifact_dir, audit_log=audit)
    sha256 = load_artifact(artifact_dir).sha256
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.AdapterServiceStub(channel)
            ids = [f"req-{i}" for i in range(12)]
            fixed = pb.ClusteringPolicy(fixed=pb.FixedK(k=3))
            first = stub.Adapt(
                pb.AdaptRequest(statistics=codec.encode(_stats()), request_ids=ids, clustering=fixed),
                timeout=10,
            )
            held = [first.clusters[0].adapter_key]
            stub.Adapt(pb.AdaptRequest(statistics=codec.encode(_stats()), held_adapter_keys=held), timeout=10)
            with pytest.raises(grpc.RpcError):
                too_many = pb.ClusteringPolicy(fixed=pb.FixedK(k=99))
                stub.Adapt(
                    pb.AdaptRequest(statistics=codec.encode(_stats()), request_ids=ids, clustering=too_many),
                    timeout=10,
                )
            raw = channel.unary_unary("/chameleon.v1.AdapterService/Adapt")
            with pytest.raises(grpc.RpcError):
                raw(b"\xff\xff\xff", timeout=10)
            server.server.pause.set_manual(True)
            with pytest.raises(grpc.RpcError):
                stub.Adapt(pb.AdaptRequest(statistics=codec.encode(_stats())), timeout=10)
    finally:
        server.stop()

    ok, held_call, rejected, garbage, paused = _records(audit)
    for record in (ok, held_call, rejected, garbage, paused):
        assert record["artifact_sha256"] == sha256 and record["method"] == "Adapt"
        assert record["time"].endswith("Z") and record["duration_s"] >= 0 and record["peer"]

    assert ok["status"] == "OK" and "error" not in ok
    assert ok["rows"] == 12 and ok["policy"] == {"kind": "fixed", "k": 3}
    assert ok["grouping"] == "policy" and ok["dtype"] == "float32" and ok["compact"] is False
    keys = [c.adapter_key for c in first.clusters]
    assert [r["id"] for r in ok["requests"]] == ids
    assert [r["cluster"] for r in ok["requests"]] == list(first.assignments)
    assert [r["adapter_key"] for r in ok["requests"]] == [keys[c] for c in first.assignments]
    assert [c["adapter_key"] for c in ok["clusters"]] == keys
    modules = {name for name, _, _ in load_artifact(artifact_dir).manifest.targets}
    for cluster in ok["clusters"]:
        assert set(cluster["delta_norms"]) == modules
        assert all(v > 0 for v in cluster["delta_norms"].values())

    # No ids: rows and per-row clusters; the cluster the caller held has no tensors, so no norms.
    assert held_call["status"] == "OK" and held_call["policy"]["kind"] == "auto"
    assert held_call["rows"] == 12 and all("id" not in r for r in held_call["requests"])
    omitted = [c for c in held_call["clusters"] if c["omitted"]]
    assert len(omitted) == 1 and omitted[0]["delta_norms"] is None

    assert rejected["status"] == "INVALID_ARGUMENT" and "clustering.fixed.k: got 99" in rejected["error"]
    assert rejected["request_ids"] == ids and rejected["rows"] == 12
    assert rejected["policy"] == {"kind": "fixed", "k": 99}
    assert garbage["status"] == "INVALID_ARGUMENT" and "DecodeError" in garbage["error"]
    assert "rows" not in garbage  # nothing could be read from it
    assert paused["status"] == "FAILED_PRECONDITION" and paused["error"].startswith("paused:")


def _expected_norms(runtime: HyperNetworkRuntime, a: dict, b: dict, row: int) -> dict[str, float]:
    s = abs(runtime.manifest.scaling)
    return {
        module: float(
            np.linalg.norm(s * b[group.name][row, layer].astype(np.float64) @ a[group.name][row, layer])
        )
        for group in runtime.manifest.groups
        for layer, module in enumerate(group.modules)
    }


def test_norms_equal_the_frobenius_norm_of_s_b_a(artifact_dir: Path, tmp_path: Path) -> None:
    runtime = HyperNetworkRuntime(load_artifact(artifact_dir))
    call = AdaptCall(
        request_ids=(), statistics=_stats(), policy=FixedK(3), dtype=pb.DTYPE_FLOAT32, held_keys=frozenset()
    )
    _, outputs = adapt_with_outputs(call, runtime, Limits())
    audit = AuditLog(tmp_path / "a.jsonl", runtime)
    norms = audit.delta_norms(outputs)
    a = {name: out.a for name, out in outputs.generated.items()}
    b = {name: out.b for name, out in outputs.generated.items()}
    for row, index in enumerate(outputs.needed):
        expected = _expected_norms(runtime, a, b, row)
        assert norms[index] == pytest.approx(expected, rel=1e-4)
    audit.close()


def test_norms_of_the_compact_form(tmp_path: Path) -> None:
    runtime = HyperNetworkRuntime(load_artifact(mixture_artifact(tmp_path / "mixture")))
    stats = _stats()
    stats /= np.linalg.norm(stats, axis=1, keepdims=True)
    call = AdaptCall(
        request_ids=(),
        statistics=stats,
        policy=FixedK(3),
        dtype=pb.DTYPE_FLOAT32,
        held_keys=frozenset(),
        compact=True,
    )
    _, outputs = adapt_with_outputs(call, runtime, Limits())
    assert outputs.weights is not None and not outputs.generated
    audit = AuditLog(tmp_path / "a.jsonl", runtime)
    norms = audit.delta_norms(outputs)
    a = {
        g.name: np.broadcast_to(
            runtime.bases[g.name].a, (len(outputs.needed), *runtime.bases[g.name].a.shape)
        )
        for g in runtime.manifest.groups
    }
    b = {
        g.name: weighted_b(runtime.bases[g.name].b[None], outputs.weights[:, None, :])
        for g in runtime.manifest.groups
    }
    for row, index in enumerate(outputs.needed):
        assert norms[index] == pytest.approx(_expected_norms(runtime, a, b, row), rel=1e-4)
    audit.close()
