"""Client credentials (TLS, mTLS, bearer token) and the pause switch, as the clients and plugins see them.

The sidecar here is the real one, in this process (secured_sidecar.py), started with its TLS, mutual
TLS and token options; its pause switch is flipped as SIGUSR1 does.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import grpc
import pytest
import torch
from plugin_pki import PKI, make_pki
from secured_sidecar import SecuredSidecar

from adapter_service.client import AdapterClient, AdapterServiceError, AsyncAdapterClient, ClientSecurity
from adapter_service.client.fallback import FallbackLog, sidecar_fallback
from adapter_service.client.settings import common_settings
from chameleon_tgi.config import TGIPluginConfig
from chameleon_torch import FALLBACK_REASONS, PluginConfig, attach
from chameleon_vllm.config import VLLMPluginConfig
from conftest import tiny_llama

TOKEN = "s3cret-token"
ROWS = [[11, 12, 13, 14], [101, 102, 103, 104], [201, 202, 203, 204]]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    return path


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor(ROWS)
    return ids, torch.ones_like(ids)


def adapt_once(address: str, security: ClientSecurity | None) -> tuple[str | None, float]:
    """Attach the tiny Llama through `address`, run one batch: (fallback reason or None, its seconds)."""
    client = AdapterClient(address, timeout=5, security=security)
    try:
        handle = attach(tiny_llama(), client, PluginConfig(deadline_s=5, manifest_timeout_s=5))
        ids, mask = batch()
        with torch.no_grad(), handle.adapt(ids, mask) as result:
            pass
        return result.fallback_reason, result.seconds
    finally:
        client.close()


# -- ClientSecurity: every mistake named at start-up ---------------------------------------------------
def test_security_validation_names_the_field_or_variable(pki: PKI, token_file: Path, tmp_path: Path) -> None:
    assert not ClientSecurity().tls and ClientSecurity(ca_file=str(pki.ca)).tls
    with pytest.raises(ValueError, match="cert_file is set but key_file is not"):
        ClientSecurity(ca_file=str(pki.ca), cert_file=str(pki.client_cert))
    with pytest.raises(ValueError, match="CHAMELEON_TLS_KEY is set but CHAMELEON_TLS_CERT is not"):
        ClientSecurity.from_env({"CHAMELEON_TLS_CA": str(pki.ca), "CHAMELEON_TLS_KEY": str(pki.client_key)})
    with pytest.raises(ValueError, match="CHAMELEON_TLS_CERT is set but CHAMELEON_TLS_CA is not"):
        ClientSecurity.from_env(
            {"CHAMELEON_TLS_CERT": str(pki.client_cert), "CHAMELEON_TLS_KEY": str(pki.client_key)}
        )
    with pytest.raises(ValueError, match=r"CHAMELEON_TLS_CA: cannot read '/nonexistent/ca\.pem'"):
        ClientSecurity.from_env({"CHAMELEON_TLS_CA": "/nonexistent/ca.pem"})
    with pytest.raises(ValueError, match=r"ca_file: .* is not a PEM file"):
        ClientSecurity(ca_file=str(token_file))
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(ValueError, match=r"CHAMELEON_AUTH_TOKEN_FILE: .* is empty"):
        ClientSecurity.from_env({"CHAMELEON_AUTH_TOKEN_FILE": str(empty)})
    two = tmp_path / "two"
    two.write_text("one two\n")
    with pytest.raises(ValueError, match=r"token_file: .* more than one token"):
        ClientSecurity(token_file=str(two))
    with pytest.raises(ValueError, match="server_name is set but ca_file is not"):
        ClientSecurity(server_name="sidecar.test")
    assert ClientSecurity.from_env({}) == ClientSecurity()
    env = {"CHAMELEON_AUTH_TOKEN_FILE": str(token_file), "CHAMELEON_TLS_CA": str(pki.ca)}
    assert ClientSecurity.from_env(env) == ClientSecurity(ca_file=str(pki.ca), token_file=str(token_file))
    assert ClientSecurity(token_file=str(token_file)).metadata() == (("authorization", f"Bearer {TOKEN}"),)
    assert TOKEN not in repr(ClientSecurity(token_file=str(token_file)))


def test_engine_plugins_read_the_same_variables(pki: PKI, token_file: Path) -> None:
    env = {
        "CHAMELEON_TLS_CA": str(pki.ca),
        "CHAMELEON_TLS_CERT": str(pki.client_cert),
        "CHAMELEON_TLS_KEY": str(pki.client_key),
        "CHAMELEON_AUTH_TOKEN_FILE": str(token_file),
        "CHAMELEON_TLS_SERVER_NAME": "sidecar.test",
        "CHAMELEON_AUDIT_LOG": "/var/log/chameleon/audit.jsonl",
    }
    want = ClientSecurity(
        str(pki.ca), str(pki.client_cert), str(pki.client_key), str(token_file), "sidecar.test"
    )
    for config in (TGIPluginConfig.from_env(env), VLLMPluginConfig.from_env(env)):
        assert config.security == want and config.audit_log == "/var/log/chameleon/audit.jsonl"
    assert "security" not in common_settings({}, "X") and TGIPluginConfig.from_env({}).security is None
    with pytest.raises(ValueError, match="CHAMELEON_TLS_CERT is set but CHAMELEON_TLS_KEY is not"):
        VLLMPluginConfig.from_env(
            {"CHAMELEON_TLS_CA": str(pki.ca), "CHAMELEON_TLS_CERT": str(pki.client_cert)}
        )


# -- against the real sidecar: token, TLS, mTLS ------------------------------------------------------------
def test_bearer_token_over_plaintext_loopback(artifact_dir: Path, token_file: Path) -> None:
    gate = SecuredSidecar(artifact_dir, token=TOKEN)
    try:
        assert AdapterClient(gate.address).health() == "SERVING"  # health needs no token
        assert adapt_once(gate.address, ClientSecurity(token_file=str(token_file)))[0] is None
        with pytest.raises(AdapterServiceError) as refused:
            AdapterClient(gate.address, timeout=5).manifest()
        assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
        reason, _ = adapt_once(gate.address, None)
        assert reason == "unauthenticated"
    finally:
        gate.stop()


@pytest.mark.parametrize("mtls", [False, True])
def test_tls_and_mutual_tls(artifact_dir: Path, pki: PKI, token_file: Path, mtls: bool) -> None:
    gate = SecuredSidecar(artifact_dir, token=TOKEN, pki=pki, client_ca=mtls)
    client_cert = {"cert_file": str(pki.client_cert), "key_file": str(pki.client_key)} if mtls else {}
    try:
        good = ClientSecurity(ca_file=str(pki.ca), token_file=str(token_file), **client_cert)
        assert adapt_once(gate.address, good)[0] is None
        # a name the certificate carries, reached through another address (as behind a proxy)
        named = ClientSecurity(
            str(pki.ca), token_file=str(token_file), server_name="sidecar.test", **client_cert
        )
        assert adapt_once(gate.address.replace("127.0.0.1", "localhost"), named)[0] is None
        # a CA that did not sign the sidecar's certificate, a wrong name: refused handshakes, told apart
        # from a down sidecar, and never slow (no wait for the deadline)
        for bad in (
            ClientSecurity(ca_file=str(pki.other_ca), token_file=str(token_file), **client_cert),
            ClientSecurity(str(pki.ca), token_file=str(token_file), server_name="other.test", **client_cert),
        ):
            reason, seconds = adapt_once(gate.address, bad)
            assert reason == "unauthenticated" and seconds < 2
        if mtls:  # no client certificate: the sidecar only closes the connection (no manifest yet)
            reason, _ = adapt_once(
                gate.address, ClientSecurity(ca_file=str(pki.ca), token_file=str(token_file))
            )
            assert reason == "no_manifest"
    finally:
        gate.stop()


def test_tls_failures_are_unauthenticated_not_unavailable() -> None:
    handshake = (
        "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: Tls handshake failed "
        "(TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:1000007d:SSL routines:OPENSSL_internal:"
        "CERTIFICATE_VERIFY_FAILED"
    )
    down = "failed to connect to all addresses; last error: UNAVAILABLE: ipv4:127.0.0.1:1: Connection refused"
    cases = {
        (grpc.StatusCode.UNAVAILABLE, handshake): "unauthenticated",
        (grpc.StatusCode.UNAVAILABLE, down): "unavailable",
        (grpc.StatusCode.UNAUTHENTICATED, "no token"): "unauthenticated",
        (grpc.StatusCode.PERMISSION_DENIED, "not you"): "unauthenticated",
        (grpc.StatusCode.FAILED_PRECONDITION, "something else"): "rejected",
    }
    for (code, details), reason in cases.items():
        assert sidecar_fallback(AdapterServiceError(code, details)).reason == reason
    paused = AdapterServiceError(grpc.StatusCode.FAILED_PRECONDITION, "paused: by the operator", paused=True)
    assert sidecar_fallback(paused).reason == "paused"
    assert {"unauthenticated", "paused"} <= set(FALLBACK_REASONS)


# -- the pause switch ---------------------------------------------------------------------------------
def test_paused_sidecar_raises_paused_in_both_clients_and_plugins_fall_back(
    artifact_dir: Path, caplog
) -> None:
    gate = SecuredSidecar(artifact_dir)
    ids, mask = batch()
    try:
        client = AdapterClient(gate.address, timeout=5)
        dim = client.manifest().statistic.dim
        handle = attach(tiny_llama(), client, PluginConfig(deadline_s=5))
        gate.paused = True
        with pytest.raises(AdapterServiceError) as paused:
            client.adapt(torch.zeros(2, dim))
        assert paused.value.paused and paused.value.code == grpc.StatusCode.FAILED_PRECONDITION

        async def async_adapt() -> AdapterServiceError:
            async with AsyncAdapterClient(gate.address, timeout=5) as aio:
                try:
                    await aio.adapt(torch.zeros(2, dim))
                except AdapterServiceError as exc:
                    return exc
            raise AssertionError("a paused sidecar answered")

        assert asyncio.run(async_adapt()).paused
        with caplog.at_level(logging.INFO, logger="chameleon_torch"):
            reasons = []
            for step in range(5):
                gate.paused = step < 3
                with torch.no_grad(), handle.adapt(ids, mask) as result:
                    pass
                reasons.append(result.fallback_reason)
        assert reasons == ["paused", "paused", "paused", None, None]
        assert handle.metrics.fallback_count("paused") == 3
        # logged once when it changed, once when it came back; not once per batch
        messages = [r.getMessage() for r in caplog.records if r.name == "chameleon_torch"]
        assert sum("unavailable (paused)" in m for m in messages) == 1
        assert sum("adapters back" in m for m in messages) == 1
        # other failures are not taken for a pause
        not_paused = AdapterServiceError(grpc.StatusCode.FAILED_PRECONDITION, "other")
        assert not not_paused.paused
        client.close()
    finally:
        gate.stop()


def test_fallback_log_says_each_change_once(caplog) -> None:
    log = FallbackLog(logging.getLogger("test.fallback"), unit="group")
    with caplog.at_level(logging.DEBUG, logger="test.fallback"):
        for reason in ["unavailable"] * 4 + ["unauthenticated"] * 2:
            log.fallback(reason, "detail")
        log.adapted()
        log.adapted()
    levels = [
        (r.levelname, r.getMessage().split(";")[0]) for r in caplog.records if r.levelno > logging.DEBUG
    ]
    assert levels == [
        ("WARNING", "chameleon adapters unavailable (unavailable)"),
        ("WARNING", "chameleon adapters unavailable (unauthenticated)"),
        ("INFO", "chameleon adapters back"),
    ]
