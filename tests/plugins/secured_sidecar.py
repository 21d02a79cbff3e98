"""The real sidecar (AdapterServer, in this process) with its TLS, mutual TLS and bearer-token options
and its pause switch at hand, for the client and plugin tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from adapter_service.serving.server import ServerConfig
from conftest import ServerThread


class SecuredSidecar:
    def __init__(
        self,
        artifact: Path,
        *,
        token: str | None = None,
        pki: Any = None,  # tests/plugins/plugin_pki.PKI: serve TLS with its server certificate
        client_ca: bool = False,  # with pki: require a client certificate signed by its CA (mTLS)
        address: str = "127.0.0.1:0",
    ) -> None:
        self.artifact, self.pki, self.client_ca = artifact, pki, client_ca
        config = ServerConfig(
            artifact=artifact,
            address=address,
            metrics_port=None,
            auth_token=token,
            tls_cert=pki.server_cert if pki else None,
            tls_key=pki.server_key if pki else None,
            tls_client_ca=pki.ca if pki and client_ca else None,
        )
        self.thread = ServerThread(config)
        self.address = self.thread.address

    @property
    def paused(self) -> bool:
        return self.thread.server.pause.paused

    @paused.setter
    def paused(self, value: bool) -> None:
        self.thread.server.pause.set_manual(value)  # what SIGUSR1 / SIGUSR2 do

    def restart(self, token: str | None) -> SecuredSidecar:
        """The operator restarts the sidecar on the same address with another token."""
        self.stop()
        return SecuredSidecar(
            self.artifact, token=token, pki=self.pki, client_ca=self.client_ca, address=self.address
        )

    def stop(self) -> None:
        self.thread.stop()
