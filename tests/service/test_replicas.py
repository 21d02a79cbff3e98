"""Many sidecars behind one client: gRPC targets, round-robin over replicas, retries, connection age.

Real servers throughout: in-process AdapterServers where one process is enough, `chameleon serve`
processes where a replica must be killed or must prove it answers like the others.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from adapter_service.cli import build_parser
from adapter_service.client import AdapterClient, AdapterServiceError, AsyncAdapterClient
from adapter_service.client.adapter_client import SERVICE_NAME, service_config
from adapter_service.client.adapter_client import build_adapt_request as request_for
from adapter_service.client.credentials import is_local
from adapter_service.core.clustering import AutoK, FixedK
from adapter_service.demo.run import DEMO_ARTIFACT
from adapter_service.demo.sidecar import SidecarProcess
from adapter_service.proto import adapter_service_pb2 as pb
from adapter_service.serving.validation import Limits
from conftest import ServerThread, start_server
from samples import audit_records, start_sidecars

DEADLINE_S = 2.0  # generous: these tests are about calls not failing, on a loaded 2-core machine


def statistics(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """Rows around three directions, l2-normalised, as the plugins' statistics are."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, dim)) * 3
    rows = centres[np.arange(n) % 3] + rng.normal(size=(n, dim))
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def ipv4_target(addresses: list[str]) -> str:
    return "ipv4:" + ",".join(addresses)


@pytest.mark.parametrize(
    ("address", "local"),
    [
        ("127.0.0.1:50051", True),
        ("localhost:50051", True),
        ("[::1]:50051", True),
        ("unix:/run/chameleon.sock", True),
        ("ipv4:127.0.0.1:50051,127.0.0.1:50052,127.0.0.2:50053", True),
        ("ipv4:127.0.0.1:50051,10.0.0.7:50051", False),
        ("ipv4:10.0.0.7:50051", False),
        ("ipv6:[::1]:50051,[::1]:50052", True),
        ("ipv6:[::1]:50051,[fd00::7]:50051", False),
        ("dns:///localhost:50051", True),
        ("dns:localhost:50051", True),
        ("dns://10.0.0.53/localhost:50051", True),  # the DNS server is asked names, never sent calls
        ("dns://127.0.0.1:53/sidecars.default.svc:50051", False),
        ("dns:///sidecars.default.svc.cluster.local:50051", False),
        ("sidecar:50051", False),
        ("10.0.0.7:50051", False),
    ],
)
def test_is_local_holds_only_when_every_address_of_the_target_is_loopback(address: str, local: bool) -> None:
    assert is_local(address) is local


@pytest.mark.parametrize(
    ("address", "policy"),
    [
        ("127.0.0.1:50051", "pick_first"),
        ("unix:/run/chameleon.sock", "pick_first"),
        ("dns:///sidecars:50051", "round_robin"),
        ("ipv4:127.0.0.1:1,127.0.0.1:2", "round_robin"),
        ("ipv6:[::1]:1", "round_robin"),
    ],
)
def test_service_config_balances_replica_sets_and_retries_only_unavailable(address: str, policy: str) -> None:
    config = json.loads(service_config(address))
    assert config["loadBalancingConfig"] == [{policy: {}}]
    assert ("healthCheckConfig" in config) == (policy == "round_robin")
    assert SERVICE_NAME == "chameleon.v1.AdapterService"
    (method,) = config["methodConfig"]
    assert method["name"] == [{"service": SERVICE_NAME}]  # every method: Adapt and GetManifest
    retry = method["retryPolicy"]
    assert retry["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert 2 <= retry["maxAttempts"] <= 5  # gRPC's cap


def test_dns_target_reaches_a_local_sidecar(server: ServerThread) -> None:
    port = server.address.rsplit(":", 1)[1]
    with AdapterClient(f"dns:///localhost:{port}", timeout=DEADLINE_S) as client:
        result = client.adapt(statistics(6, 64), policy=FixedK(2))
    assert result.k == 2 and result.assignments.shape == (6,)


def test_round_robin_spreads_calls_and_fails_fast_once_no_replica_is_left(
    artifact_dir: Path, tmp_path: Path
) -> None:
    """Both replicas answer; one stopped costs no call (and no `disconnects`); with none left a call
    fails with UNAVAILABLE after the short retries, not at its deadline, and `disconnects` moves."""
    servers = [start_server(artifact_dir, audit_log=tmp_path / f"replica-{i}.jsonl") for i in range(2)]
    client = AdapterClient(ipv4_target([s.address for s in servers]), timeout=DEADLINE_S)
    try:
        x = statistics(4, 64)
        for _ in range(20):
            client.adapt(x, policy=FixedK(2))
        answered = [len((tmp_path / f"replica-{i}.jsonl").read_text().splitlines()) for i in range(2)]
        assert sum(answered) == 20 and min(answered) >= 5, answered
        servers[0].stop()
        for _ in range(10):
            client.adapt(x, policy=FixedK(2))
        assert client.disconnects == 0  # READY while any replica is
        servers[1].stop()
        started = time.monotonic()
        with pytest.raises(AdapterServiceError) as failed:
            client.adapt(x, policy=FixedK(2))
        seconds = time.monotonic() - started
        assert failed.value.code.name == "UNAVAILABLE"
        assert seconds < DEADLINE_S / 4, seconds
        give_up = time.monotonic() + 5
        while client.disconnects == 0 and time.monotonic() < give_up:
            time.sleep(0.05)
        assert client.disconnects == 1
    finally:
        client.close()
        for s in servers:
            if s.server.server is not None:
                s.stop()


def test_a_large_request_refused_by_a_replica_is_retried_on_another(artifact_dir: Path) -> None:
    """A replica whose drain has begun while its health still says SERVING refuses calls UNAVAILABLE:
    each is retried on the other replica, including requests larger than gRPC's default retry buffer
    (256 KiB), which would otherwise fail."""
    limits = Limits(max_rows=4096, max_clusters=8, max_message_bytes=8 << 20)
    refusing, answering = (start_server(artifact_dir, limits=limits) for _ in range(2))
    refusing.server.gate.draining = True
    try:
        with AdapterClient(ipv4_target([refusing.address, answering.address]), timeout=10) as client:
            x = statistics(1500, 64)  # 384 KB of float32
            for _ in range(6):
                assert client.adapt(x, policy=FixedK(2)).k == 2
        refused = refusing.server.metrics.refused.labels("draining")._value.get()
        assert refused >= 2, "no call reached the refusing replica: the test proved nothing"
    finally:
        refusing.stop()
        answering.stop()


def test_max_connection_age_flag_is_validated() -> None:
    parser = build_parser()
    args = parser.parse_args(["serve", "--artifact", "a", "--max-connection-age", "300"])
    assert args.max_connection_age == 300.0
    assert parser.parse_args(["serve", "--artifact", "a"]).max_connection_age == 0.0
    for bad in ("-1", "soon", "inf"):
        with pytest.raises(SystemExit):
            parser.parse_args(["serve", "--artifact", "a", "--max-connection-age", bad])


def test_max_connection_age_recycles_connections_without_a_failed_call(
    artifact_dir: Path, tmp_path: Path
) -> None:
    """`chameleon serve --max-connection-age 1`: a client calling for 2.5 s, by `host:port` (pick_first)
    or by `dns:///` (round_robin), is seen from several client ports (connections closed and reopened, so
    a `dns:///` name is resolved again), and no call fails; a server without an age keeps one connection."""
    aged = SidecarProcess(
        artifact_dir,
        extra_args=["--max-connection-age", "1", "--grace", "2", "--audit-log", str(tmp_path / "aged")],
    )
    plain = start_server(artifact_dir, audit_log=tmp_path / "plain")
    port = aged.address.rsplit(":", 1)[1]
    targets = {"one": aged.address, "dns": f"dns:///127.0.0.1:{port}", "plain": plain.address}
    clients = {name: AdapterClient(target, timeout=DEADLINE_S) for name, target in targets.items()}
    try:
        x = statistics(4, 64)
        calls = 0
        ends = time.monotonic() + 2.5
        while time.monotonic() < ends:
            for name, client in clients.items():
                client.adapt(x, request_ids=[f"{name}-{calls}-{i}" for i in range(4)], policy=FixedK(2))
            calls += 1
        records = [json.loads(line) for name in ("aged", "plain") for line in (tmp_path / name).open()]
        assert {r["status"] for r in records} == {"OK"} and len(records) == 3 * calls  # no call failed
        peers = {name: Counter() for name in clients}
        for r in records:
            peers[r["requests"][0]["id"].split("-")[0]][r["peer"]] += 1
        disconnects = {name: client.disconnects for name, client in clients.items()}
        print(f"{calls} calls per client; client ports seen: {peers}; disconnects {disconnects}")
        assert len(peers["one"]) >= 2 and len(peers["dns"]) >= 2, peers
        assert len(peers["plain"]) == 1, peers
    finally:
        for client in clients.values():
            client.close()
        aged.stop()
        plain.stop()


def comparable(response: pb.AdaptResponse) -> bytes:
    """The response without its timings (the only field that may differ between equal answers)."""
    copy = pb.AdaptResponse()
    copy.CopyFrom(response)
    copy.ClearField("timings")
    return copy.SerializeToString(deterministic=True)


def test_replicas_answer_byte_for_byte_alike(artifact_dir: Path, tmp_path: Path) -> None:
    """The same statistics sent to each replica get the same assignments, adapter keys and tensor bytes,
    whole and compact, and the same bases key: an adapter cached from one replica is valid from any."""
    (tmp_path / "demo").mkdir()
    (tmp_path / "tiny").mkdir()
    demo = start_sidecars(DEMO_ARTIFACT, 2, tmp_path / "demo")
    tiny = start_sidecars(artifact_dir, 2, tmp_path / "tiny")
    clients = {}
    try:
        clients = {s.address: AdapterClient(s.address, timeout=30) for s in demo + tiny}

        def answers(replicas: list[SidecarProcess], request: pb.AdaptRequest) -> list[pb.AdaptResponse]:
            return [clients[s.address].stub.Adapt(request, timeout=30) for s in replicas]

        x = statistics(12, 576, seed=3)
        for form in ({"compact": False}, {"compact": True}, {"compact": True, "dtype": "float16"}):
            responses = answers(demo, request_for(x, **form))
            first = responses[0]
            assert first.clusters and all(c.modules or c.basis_weights for c in first.clusters)
            assert bool(first.bases) == form["compact"] and bool(first.bases_key) == form["compact"]
            assert all(comparable(r) == comparable(first) for r in responses[1:]), form
            # What one replica sent, another leaves out when told it is held: the keys mean the same.
            held = [c.adapter_key for c in first.clusters] + ([first.bases_key] if first.bases_key else [])
            (again,) = answers(demo[1:], request_for(x, held_keys=held, **form))
            assert all(c.omitted and not c.modules for c in again.clusters) and not again.bases
        for policy in (AutoK(max_k=4), FixedK(3)):  # k-means, seeded alike on every replica
            responses = answers(tiny, request_for(statistics(30, 64, seed=5), policy=policy))
            assert len(responses[0].clusters) >= 2
            assert comparable(responses[1]) == comparable(responses[0]), policy
    finally:
        for client in clients.values():
            client.close()
        for sidecar in demo + tiny:
            sidecar.stop()


def test_killing_and_draining_replicas_under_load_fails_no_call(artifact_dir: Path, tmp_path: Path) -> None:
    """Three sidecar processes behind one `ipv4:` target, four threads calling Adapt back to back: one
    replica is SIGKILLed, then another gets SIGTERM while a slow call (1024 rows) keeps its drain open;
    no call fails, and each phase's calls are answered by the replicas still up (their audit logs)."""
    replicas = start_sidecars(artifact_dir, 3, tmp_path)
    client = AdapterClient(ipv4_target([r.address for r in replicas]), timeout=DEADLINE_S)
    stop = threading.Event()
    answered: list[str] = []  # request id of each answered call
    failures: list[str] = []
    slowest = [0.0]

    def load(worker: int) -> None:
        x = statistics(8, 64, seed=worker)
        n = 0
        while not stop.is_set():
            rid = f"w{worker}-{n}"
            started = time.monotonic()
            try:
                client.adapt(x, request_ids=[f"{rid}-{i}" for i in range(8)])
                answered.append(rid)
            except AdapterServiceError as exc:
                failures.append(f"{rid}: {exc}")
            slowest[0] = max(slowest[0], time.monotonic() - started)
            n += 1

    def hold_drain_open() -> None:
        """Slow calls to replica 1 alone, so one is in flight when it gets SIGTERM and its drain lasts."""
        x = statistics(1024, 64, seed=9)
        with AdapterClient(replicas[1].address, timeout=30) as direct:
            while not stop.is_set():
                try:
                    direct.adapt(x, policy=AutoK(max_k=8))
                except AdapterServiceError:
                    return  # replica 1 has stopped

    threads = [threading.Thread(target=load, args=(w,), daemon=True) for w in range(4)]
    threads.append(threading.Thread(target=hold_drain_open, daemon=True))
    try:
        client.manifest()
        for thread in threads:
            thread.start()
        time.sleep(1.0)
        killed = time.time()
        replicas[0].kill()
        time.sleep(1.0)
        drained = time.time()
        exit_code = replicas[1].stop()  # SIGTERM: drains the calls in flight, then exits
        exited = time.time()
        time.sleep(1.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
        client.close()
        for replica in replicas:
            replica.stop()
    # The load's calls (they carry request ids) as each replica's audit log recorded them.
    ok = [
        [r for r in audit_records(tmp_path, i) if r["status"] == "OK" and "id" in r["requests"][0]]
        for i in range(3)
    ]
    phases = {
        "before kill": [sum(r["t"] < killed for r in rs) for rs in ok],
        "kill..sigterm": [sum(killed <= r["t"] < drained for r in rs) for rs in ok],
        "after exit": [sum(r["t"] >= exited for r in rs) for rs in ok],
    }
    print(
        f"{len(answered)} calls answered, {len(failures)} failed, slowest {slowest[0]:.3f} s; answered "
        f"per replica {[len(rs) for rs in ok]}, by phase {phases}; drain {exited - drained:.2f} s"
    )
    assert failures == []
    assert exit_code == 0
    # The drain finished a slow call that was in flight at SIGTERM: replica 1's own record of it, written
    # when it answered, falls between the signal and the exit. (The client thread's clock is no proof: with
    # four load threads holding the GIL, it may note the answer after the test has seen the exit.)
    slow = [r for r in audit_records(tmp_path, 1) if r["status"] == "OK" and r["rows"] == 1024]
    assert any(drained < r["t"] <= exited for r in slow), "no call was in flight during the drain"
    assert len(answered) >= 40
    assert min(phases["before kill"]) > 0  # round robin used all three
    assert phases["kill..sigterm"][0] == 0 and min(phases["kill..sigterm"][1:]) > 0
    assert phases["after exit"][:2] == [0, 0] and phases["after exit"][2] > 0
    # every answered call is in the audit log of a replica that answered it
    logged = {r["requests"][0]["id"].rsplit("-", 1)[0] for rs in ok for r in rs}
    assert set(answered) <= logged


def test_async_client_survives_a_killed_replica(artifact_dir: Path, tmp_path: Path) -> None:
    replicas = start_sidecars(artifact_dir, 2, tmp_path)
    failures: list[str] = []

    async def main() -> int:
        answered = 0
        async with AsyncAdapterClient(
            ipv4_target([r.address for r in replicas]), timeout=DEADLINE_S
        ) as client:
            await client.manifest()
            ends = time.monotonic() + 2.5
            killed = False

            async def worker(seed: int) -> None:
                nonlocal answered
                x = statistics(8, 64, seed=seed)
                while time.monotonic() < ends:
                    try:
                        await client.adapt(x)
                        answered += 1
                    except AdapterServiceError as exc:
                        failures.append(str(exc))

            async def killer() -> None:
                nonlocal killed
                await asyncio.sleep(1.0)
                replicas[0].kill()  # SIGKILL
                killed = True

            await asyncio.gather(*(worker(s) for s in range(3)), killer())
            assert killed
        return answered

    try:
        answered = asyncio.run(main())
    finally:
        for replica in replicas:
            replica.stop()
    after = [sum(1 for r in audit_records(tmp_path, i) if r["status"] == "OK") for i in range(2)]
    print(f"async: {answered} calls answered, {len(failures)} failed; per replica {after}")
    assert failures == []
    assert min(after) > 0 and sum(after) >= answered >= 20
