"""A STAND-IN for the sidecar's TLS, bearer-token and pause-switch behaviour, for client and plugin tests.

The real server side is built in adapter_service.serving; this proxy answers the way the contract says,
in front of a real sidecar, so the client side is tested against real gRPC (real TLS handshakes, real
metadata, real status codes) without depending on that code:
- every AdapterService call without `authorization: Bearer <token>` gets UNAUTHENTICATED (health is
  exempt);
- while `paused`, Adapt gets FAILED_PRECONDITION, details "paused: ...", trailing metadata
  `chameleon-state: paused`;
- other calls are forwarded as bytes to the real sidecar.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2_grpc

from adapter_service.client import DEFAULT_MAX_MESSAGE_BYTES

SERVICE = "chameleon.v1.AdapterService"
OPTIONS = [
    ("grpc.max_receive_message_length", DEFAULT_MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", DEFAULT_MAX_MESSAGE_BYTES),
]


class GatedSidecar:
    def __init__(
        self,
        upstream: str,
        *,
        token: str | None = None,
        pki: Any = None,  # tests/plugins/plugin_pki.PKI: serve TLS with its server certificate
        client_ca: bool = False,  # with pki: require a client certificate signed by its CA (mTLS)
    ) -> None:
        self.token = token
        self.paused = False
        self.calls = 0
        self._upstream = grpc.insecure_channel(upstream, options=OPTIONS)
        self.server = grpc.server(ThreadPoolExecutor(4), options=OPTIONS)
        handlers = {
            name: grpc.unary_unary_rpc_method_handler(self._forward(name))
            for name in ("GetManifest", "Adapt")
        }
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), self.server)
        if pki is None:
            port = self.server.add_insecure_port("127.0.0.1:0")
        else:
            credentials = grpc.ssl_server_credentials(
                [(pki.server_key.read_bytes(), pki.server_cert.read_bytes())],
                root_certificates=pki.ca.read_bytes() if client_ca else None,
                require_client_auth=client_ca,
            )
            port = self.server.add_secure_port("127.0.0.1:0", credentials)
        self.address = f"127.0.0.1:{port}"
        self.server.start()

    def _forward(self, name: str):
        call = self._upstream.unary_unary(f"/{SERVICE}/{name}")  # bytes in, bytes out

        def handler(request: bytes, context: grpc.ServicerContext) -> bytes:
            self.calls += 1
            if self.token is not None:
                metadata = dict(context.invocation_metadata())
                if metadata.get("authorization") != f"Bearer {self.token}":
                    context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")
            if name == "Adapt" and self.paused:
                context.set_trailing_metadata((("chameleon-state", "paused"),))
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, "paused: the operator paused adapters")
            try:
                return call(request, timeout=context.time_remaining())
            except grpc.RpcError as exc:
                context.abort(exc.code(), exc.details() or "")

        return handler

    def stop(self) -> None:
        self.server.stop(0).wait(5)
        self._upstream.close()
