"""TLS, mutual TLS and the bearer token on a real server, with certificates made at test time, called
through raw gRPC channels; and the refusal to listen beyond loopback in plain text."""

from __future__ import annotations

import datetime
import ipaddress
import logging
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from adapter_service.core import codec
from adapter_service.demo.sidecar import free_port
from adapter_service.proto import adapter_service_pb2 as pb
from adapter_service.proto import adapter_service_pb2_grpc as pb_grpc
from adapter_service.serving.errors import ServiceError
from adapter_service.serving.security import check_exposure, is_loopback, read_token_file
from conftest import ServerThread, start_server

CHAMELEON = Path(sys.executable).with_name("chameleon")
TOKEN = "s3cret-token_0123456789"


@dataclass(frozen=True)
class Pem:
    cert: bytes
    key: bytes


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(subject: str, issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None, *, ca: bool, sans=()):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    issuer_name, issuer_key = issuer if issuer is not None else (_name(subject), key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    cert = builder.sign(issuer_key, hashes.SHA256())
    pem = Pem(
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )
    return pem, (cert.subject, key)


@dataclass(frozen=True)
class Certs:
    ca: Pem
    server: Pem
    client: Pem  # signed by `ca`
    stranger: Pem  # a client certificate from another CA
    dir: Path


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    ca, ca_issuer = _issue("chameleon test CA", None, ca=True)
    server, _ = _issue(
        "localhost",
        ca_issuer,
        ca=False,
        sans=(x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))),
    )
    client, _ = _issue("model-server", ca_issuer, ca=False)
    _, other_issuer = _issue("another CA", None, ca=True)
    stranger, _ = _issue("intruder", other_issuer, ca=False)
    folder = tmp_path_factory.mktemp("certs")
    for name, pem in (("ca", ca), ("server", server), ("client", client)):
        (folder / f"{name}.pem").write_bytes(pem.cert)
        (folder / f"{name}.key").write_bytes(pem.key)
    return Certs(ca, server, client, stranger, folder)


def _request() -> pb.AdaptRequest:
    stats = np.random.default_rng(0).standard_normal((6, 64)).astype(np.float32)
    return pb.AdaptRequest(statistics=codec.encode(stats))


def _tls_channel(address: str, certs: Certs, client: Pem | None = None) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=certs.ca.cert,
        private_key=client.key if client else None,
        certificate_chain=client.cert if client else None,
    )
    return grpc.secure_channel(address, credentials)


def _tls_server(artifact_dir: Path, certs: Certs, *, mutual: bool, **overrides) -> ServerThread:
    return start_server(
        artifact_dir,
        tls_cert=certs.dir / "server.pem",
        tls_key=certs.dir / "server.key",
        tls_client_ca=certs.dir / "ca.pem" if mutual else None,
        **overrides,
    )


def test_tls(artifact_dir: Path, certs: Certs) -> None:
    server = _tls_server(artifact_dir, certs, mutual=False)
    try:
        with _tls_channel(server.address, certs) as channel:
            stub = pb_grpc.AdapterServiceStub(channel)
            assert stub.GetManifest(pb.GetManifestRequest(), timeout=10).rank == 4
            assert len(stub.Adapt(_request(), timeout=10).assignments) == 6
        with grpc.insecure_channel(server.address) as plain:  # plain text cannot talk to a TLS port
            with pytest.raises(grpc.RpcError) as info:
                pb_grpc.AdapterServiceStub(plain).GetManifest(pb.GetManifestRequest(), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop()


def test_mutual_tls_refuses_clients_without_a_certificate_from_the_ca(
    artifact_dir: Path, certs: Certs
) -> None:
    server = _tls_server(artifact_dir, certs, mutual=True)
    try:
        with _tls_channel(server.address, certs, certs.client) as channel:
            assert (
                pb_grpc.AdapterServiceStub(channel).GetManifest(pb.GetManifestRequest(), timeout=10).rank == 4
            )
        for client in (None, certs.stranger):
            with _tls_channel(server.address, certs, client) as channel:
                with pytest.raises(grpc.RpcError) as info:
                    pb_grpc.AdapterServiceStub(channel).GetManifest(pb.GetManifestRequest(), timeout=5)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # the handshake fails
    finally:
        server.stop()


def test_bearer_token(artifact_dir: Path) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    server = start_server(artifact_dir, auth_token=TOKEN)
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.AdapterServiceStub(channel)
            for metadata in (None, [("authorization", "Bearer wrong")], [("authorization", TOKEN)]):
                for call, request in ((stub.Adapt, _request()), (stub.GetManifest, pb.GetManifestRequest())):
                    with pytest.raises(grpc.RpcError) as info:
                        call(request, metadata=metadata, timeout=10)
                    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
                    assert "bearer token" in info.value.details()
            good = [("authorization", f"Bearer {TOKEN}")]
            assert len(stub.Adapt(_request(), metadata=good, timeout=10).assignments) == 6
            # Health needs no token (probes carry no secrets); reflection does.
            health = health_pb2_grpc.HealthStub(channel)
            reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
            ask = reflection_pb2.ServerReflectionRequest(list_services="")
            with pytest.raises(grpc.RpcError) as info:
                list(reflect.ServerReflectionInfo(iter([ask]), timeout=5))
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            answers = list(reflect.ServerReflectionInfo(iter([ask]), metadata=good, timeout=5))
            assert "chameleon.v1.AdapterService" in {
                s.name for s in answers[0].list_services_response.service
            }
    finally:
        server.stop()


def test_token_over_mutual_tls(artifact_dir: Path, certs: Certs) -> None:
    server = _tls_server(artifact_dir, certs, mutual=True, auth_token=TOKEN)
    try:
        with _tls_channel(server.address, certs, certs.client) as channel:
            stub = pb_grpc.AdapterServiceStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                stub.GetManifest(pb.GetManifestRequest(), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
            good = [("authorization", f"Bearer {TOKEN}")]
            assert stub.GetManifest(pb.GetManifestRequest(), metadata=good, timeout=10).rank == 4
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("127.0.0.1:50051", True),
        ("127.1.2.3:1", True),
        ("[::1]:50051", True),
        ("localhost:50051", True),
        ("unix:/tmp/x.sock", True),
        ("0.0.0.0:50051", False),
        ("[::]:50051", False),
        ("10.1.2.3:50051", False),
        ("[::ffff:127.0.0.1]:5", True),
    ],
)
def test_is_loopback(address: str, loopback: bool) -> None:
    assert is_loopback(address) is loopback


def test_plain_text_beyond_loopback_needs_tls_a_token_or_the_explicit_flag(caplog) -> None:
    with pytest.raises(ServiceError, match=r"refusing to listen on 0\.0\.0\.0:1 in plain text"):
        check_exposure("0.0.0.0:1", tls=False, token=False, allow_insecure_remote=False)
    check_exposure("0.0.0.0:1", tls=True, token=False, allow_insecure_remote=False)
    check_exposure("127.0.0.1:1", tls=False, token=False, allow_insecure_remote=False)
    with caplog.at_level(logging.WARNING):
        check_exposure("0.0.0.0:1", tls=False, token=True, allow_insecure_remote=False)
        check_exposure("0.0.0.0:1", tls=False, token=False, allow_insecure_remote=True)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("token crosses the network in clear" in w for w in warnings)
    assert any("--allow-insecure-remote" in w for w in warnings)


def test_token_file(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(f"{TOKEN}\n")
    path.chmod(0o600)
    assert read_token_file(path) == TOKEN
    for bad in ("", "two words", "caf\u00e9"):
        path.write_text(bad)
        with pytest.raises(ServiceError, match="--auth-token-file"):
            read_token_file(path)


def _wait_serving(channel: grpc.Channel, proc: subprocess.Popen, timeout: float = 90) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else proc.returncode
        try:
            if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.1)
    raise AssertionError("the sidecar did not report SERVING")


def test_serve_refuses_plain_text_on_all_interfaces(artifact_dir: Path) -> None:
    address = f"0.0.0.0:{free_port()}"
    result = subprocess.run(
        [
            str(CHAMELEON),
            "serve",
            "--artifact",
            str(artifact_dir),
            "--address",
            address,
            "--metrics-port",
            "-1",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert f"refusing to listen on {address} in plain text" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_with_tls_and_token_from_the_command_line(
    artifact_dir: Path, certs: Certs, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    token_file.chmod(0o600)
    address = f"localhost:{free_port()}"
    proc = subprocess.Popen(
        [
            str(CHAMELEON),
            "serve",
            "--artifact",
            str(artifact_dir),
            "--address",
            address,
            "--metrics-port",
            "-1",
            "--tls-cert",
            str(certs.dir / "server.pem"),
            "--tls-key",
            str(certs.dir / "server.key"),
            "--tls-client-ca",
            str(certs.dir / "ca.pem"),
            "--auth-token-file",
            str(token_file),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with _tls_channel(address, certs, certs.client) as channel:
            _wait_serving(channel, proc)
            stub = pb_grpc.AdapterServiceStub(channel)
            good = [("authorization", f"Bearer {TOKEN}")]
            assert stub.GetManifest(pb.GetManifestRequest(), metadata=good, timeout=10).rank == 4
            with pytest.raises(grpc.RpcError) as info:
                stub.GetManifest(pb.GetManifestRequest(), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        proc.terminate()
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    assert TOKEN not in stderr
