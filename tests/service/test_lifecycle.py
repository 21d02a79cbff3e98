"""The sidecar's life as an operator sees it: it never takes an address over from a running server, it
drains on SIGTERM without cancelling calls, and it can be paused and resumed without a restart."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from adapter_service.core import codec
from adapter_service.demo.sidecar import SidecarProcess
from adapter_service.proto import adapter_service_pb2 as pb
from adapter_service.proto import adapter_service_pb2_grpc as pb_grpc
from adapter_service.serving.pause import CHECK_SECONDS
from adapter_service.serving.server import ServerConfig
from conftest import ServerThread, start_server

CHAMELEON = Path(sys.executable).with_name("chameleon")


def _request(rows: int = 6, seed: int = 0) -> pb.AdaptRequest:
    stats = np.random.default_rng(seed).standard_normal((rows, 64)).astype(np.float32)
    return pb.AdaptRequest(statistics=codec.encode(stats))


def _serve(artifact_dir: Path, address: str, *extra: str) -> subprocess.CompletedProcess:
    command = [str(CHAMELEON), "serve", "--artifact", str(artifact_dir), "--address", address]
    return subprocess.run(
        [*command, "--metrics-port", "-1", *extra],
        capture_output=True,
        text=True,
        timeout=90,
    )


def _start_unix(artifact_dir: Path, address: str, **overrides) -> ServerThread:
    return ServerThread(ServerConfig(artifact=artifact_dir, address=address, metrics_port=None, **overrides))


def _manifest_ok(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.AdapterServiceStub(channel).GetManifest(pb.GetManifestRequest(), timeout=10).rank == 4


def test_a_second_server_on_the_same_port_exits_2_and_the_first_keeps_serving(artifact_dir: Path) -> None:
    first = start_server(artifact_dir)
    try:
        result = _serve(artifact_dir, first.address)
        assert result.returncode == 2
        assert f"cannot listen on {first.address}" in result.stderr
        assert "Traceback" not in result.stderr
        assert _manifest_ok(first.address)
    finally:
        first.stop()


def test_a_live_unix_socket_is_not_taken_over(artifact_dir: Path, tmp_path: Path) -> None:
    address = f"unix:{tmp_path / 'sidecar.sock'}"
    first = _start_unix(artifact_dir, address)
    try:
        inode = os.stat(tmp_path / "sidecar.sock").st_ino
        result = _serve(artifact_dir, address)
        assert result.returncode == 2
        assert f"cannot listen on {address}: another server is listening on it" in result.stderr
        assert os.stat(tmp_path / "sidecar.sock").st_ino == inode
        assert _manifest_ok(address)
    finally:
        first.stop()


def test_a_stale_unix_socket_is_replaced_and_a_regular_file_is_not(
    artifact_dir: Path, tmp_path: Path
) -> None:
    path = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as dead:  # bound, never listening, then closed: a crashed server
        dead.bind(str(path))
    server = _start_unix(artifact_dir, f"unix:{path}")
    try:
        assert _manifest_ok(f"unix:{path}")
    finally:
        server.stop()

    regular = tmp_path / "notes.txt"
    regular.write_text("keep me")
    result = _serve(artifact_dir, f"unix:{regular}")
    assert result.returncode == 2 and "exists and is not a socket" in result.stderr
    assert regular.read_text() == "keep me"


@pytest.mark.parametrize("mode", [0o600, 0o660])
def test_unix_socket_mode_does_not_depend_on_the_umask(artifact_dir: Path, tmp_path: Path, mode: int) -> None:
    path = tmp_path / "mode.sock"
    old = os.umask(0)
    try:
        server = _start_unix(artifact_dir, f"unix:{path}", socket_mode=mode)
    finally:
        os.umask(old)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == mode
        assert _manifest_ok(f"unix:{path}")
    finally:
        server.stop()


def test_sigterm_drains_in_flight_calls_and_refuses_new_ones(artifact_dir: Path, tmp_path: Path) -> None:
    """24 real, slow calls (1024 rows each, auto k: about half a second of clustering apiece, four
    workers) are in flight at SIGTERM: every one is answered, a call made during the drain gets
    UNAVAILABLE, health says NOT_SERVING, and the process exits 0."""
    log = tmp_path / "sidecar.log"
    sidecar = SidecarProcess(artifact_dir, log_path=log, extra_args=["--grace", "120", "--plain-logs"])
    request = _request(rows=1024)
    finished: list[float] = []
    lock = threading.Lock()
    try:
        channel = grpc.insecure_channel(sidecar.address)
        stub = pb_grpc.AdapterServiceStub(channel)

        def one(_: int) -> str:
            try:
                stub.Adapt(request, timeout=180)
                code = "OK"
            except grpc.RpcError as exc:
                code = exc.code().name
            with lock:
                finished.append(time.monotonic())
            return code

        with ThreadPoolExecutor(24) as pool:
            calls = [pool.submit(one, i) for i in range(24)]
            time.sleep(1.0)
            sigterm = time.monotonic()
            sidecar.proc.send_signal(signal.SIGTERM)
            health = health_pb2_grpc.HealthStub(channel)
            deadline = time.monotonic() + 30
            while health.Check(health_pb2.HealthCheckRequest(), timeout=5).status != 2:  # NOT_SERVING
                assert time.monotonic() < deadline
                time.sleep(0.05)
            with lock:
                still_running = 24 - len(finished)
            with pytest.raises(grpc.RpcError) as late:
                stub.Adapt(_request(), timeout=30)
            codes = Counter(call.result() for call in calls)
        channel.close()
        code = sidecar.proc.wait(timeout=180)  # exits by itself: a second SIGTERM would mean "hurry"
        assert still_running > 0, "every call ended before the drain began: the test proved nothing"
        assert late.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in late.value.details()
        assert codes == {"OK": 24}
        assert max(finished) > sigterm
    finally:
        sidecar.stop()
    assert code == 0
    assert "stopped" in log.read_text()


def _adapt_error(address: str) -> grpc.RpcError | None:
    with grpc.insecure_channel(address) as channel:
        try:
            pb_grpc.AdapterServiceStub(channel).Adapt(_request(), timeout=10)
        except grpc.RpcError as exc:
            return exc
    return None


def _wait_for(predicate, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("condition not reached in time")


def test_pause_file_pauses_and_resumes_without_restart(artifact_dir: Path, tmp_path: Path) -> None:
    switch = tmp_path / "paused"
    server = start_server(artifact_dir, pause_file=switch)
    metrics = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
    try:
        assert _adapt_error(server.address) is None
        assert "chameleon_server_paused 0.0" in urllib.request.urlopen(metrics, timeout=5).read().decode()
        switch.touch()
        error = _wait_for(lambda: _adapt_error(server.address))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error.details().startswith("paused:")
        assert ("chameleon-state", "paused") in tuple(error.trailing_metadata())
        assert _manifest_ok(server.address)  # the manifest and health keep answering
        with grpc.insecure_channel(server.address) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert "chameleon_server_paused 1.0" in urllib.request.urlopen(metrics, timeout=5).read().decode()
        switch.unlink()
        _wait_for(lambda: _adapt_error(server.address) is None)
        time.sleep(CHECK_SECONDS * 2)  # the watcher, not a call, updates the gauge
        assert "chameleon_server_paused 0.0" in urllib.request.urlopen(metrics, timeout=5).read().decode()
    finally:
        server.stop()


def test_sigusr1_pauses_and_sigusr2_resumes(artifact_dir: Path, tmp_path: Path) -> None:
    log = tmp_path / "sidecar.log"
    with SidecarProcess(artifact_dir, log_path=log) as sidecar:
        assert _adapt_error(sidecar.address) is None
        sidecar.proc.send_signal(signal.SIGUSR1)
        error = _wait_for(lambda: _adapt_error(sidecar.address))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and error.details().startswith("paused:")
        sidecar.proc.send_signal(signal.SIGUSR2)
        _wait_for(lambda: _adapt_error(sidecar.address) is None)
    events = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    messages = [e["msg"] for e in events]
    assert any(m.startswith("paused") for m in messages) and any(m.startswith("resumed") for m in messages)
