"""Transport security of the sidecar: TLS or mutual TLS, a bearer token checked by an interceptor, and
the refusal to listen beyond loopback in plain text without a token.

The standard health service is exempt from the token so that orchestrators' probes (which carry no
secrets) keep working; everything else, reflection included, needs it.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from adapter_service.serving.errors import ServiceError

log = logging.getLogger(__name__)
HEALTH_METHOD_PREFIX = "/grpc.health.v1.Health/"
AUTH_METADATA_KEY = "authorization"


@dataclass(frozen=True)
class TlsFiles:
    cert: Path
    key: Path
    client_ca: Path | None = None  # set: mutual TLS, clients need a certificate signed by this CA


def server_credentials(tls: TlsFiles) -> grpc.ServerCredentials:
    """TLS credentials from PEM files; with `client_ca`, clients without a certificate it signed are
    refused during the handshake."""
    try:
        cert, key = tls.cert.read_bytes(), tls.key.read_bytes()
        ca = tls.client_ca.read_bytes() if tls.client_ca is not None else None
    except OSError as exc:
        raise ServiceError(f"cannot read TLS files: {exc}") from exc
    for name, data in (("--tls-cert", cert), ("--tls-key", key), ("--tls-client-ca", ca)):
        if data is not None and b"-----BEGIN" not in data:
            raise ServiceError(f"{name}: expected a PEM file")
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
    )


def read_token_file(path: str | os.PathLike[str]) -> str:
    """The bearer token in `path` (surrounding whitespace dropped). A token never goes on the command
    line, where `ps` and shell history would show it."""
    try:
        raw = Path(path).read_bytes()
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise ServiceError(f"--auth-token-file: cannot read it: {exc}") from exc
    try:
        token = raw.decode("ascii").strip()
    except UnicodeDecodeError as exc:
        raise ServiceError(f"--auth-token-file {path}: expected printable ASCII") from exc
    if not token or any(not c.isprintable() or c.isspace() for c in token):
        raise ServiceError(f"--auth-token-file {path}: expected one token of printable ASCII, no spaces")
    if stat.S_IMODE(mode) & 0o077:
        log.warning(
            "the token file is readable by other users; expected mode 0600 or 0400",
            extra={"path": str(path), "mode": oct(stat.S_IMODE(mode))},
        )
    return token


def is_loopback(address: str) -> bool:
    """True for unix sockets and for hosts that only resolve to loopback addresses."""
    if address.startswith(("unix:", "unix-abstract:")):
        return True
    host = address.rsplit(":", 1)[0] if ":" in address else address
    host = host.strip("[]")
    if host.startswith("ipv4:") or host.startswith("ipv6:"):
        host = host.split(":", 1)[1].strip("[]")
    try:
        return _ip_is_loopback(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False  # unresolvable: do not assume it is safe
    return bool(infos) and all(_ip_is_loopback(ipaddress.ip_address(i[4][0].split("%")[0])) for i in infos)


def _ip_is_loopback(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def check_exposure(address: str, *, tls: bool, token: bool, allow_insecure_remote: bool) -> None:
    """Refuse to serve beyond loopback in plain text with no token, where anyone on the network could
    call it (and read every adapter), unless the operator explicitly accepts that."""
    if is_loopback(address):
        return
    if tls or token:
        if not tls:
            log.warning(
                "listening beyond loopback without TLS: the bearer token crosses the network in clear",
                extra={"address": address},
            )
        return
    if allow_insecure_remote:
        log.warning(
            "listening beyond loopback in plain text without a token (--allow-insecure-remote): make sure "
            "only the model server can reach this port",
            extra={"address": address},
        )
        return
    raise ServiceError(
        f"refusing to listen on {address} in plain text without a token: anyone who can reach it could "
        "call it. Use --tls-cert/--tls-key and/or --auth-token-file, a loopback or unix: address, or pass "
        "--allow-insecure-remote if only the model server can reach this port"
    )


Behavior = Callable[..., Awaitable[object]]


def refusing_handler(
    handler: grpc.RpcMethodHandler,
    code: grpc.StatusCode,
    details: str,
    on_refuse: Callable[[], None] | None = None,
) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that answers `code` without running it."""

    async def refuse(request_or_iterator: object, context: grpc.aio.ServicerContext) -> None:
        if on_refuse is not None:
            on_refuse()
        await context.abort(code, details)

    kind = (handler.request_streaming, handler.response_streaming)
    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[kind]
    return make(
        refuse,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Every call but the health service's must carry `authorization: Bearer <token>`; the others get
    UNAUTHENTICATED. The comparison takes the same time wherever the tokens differ."""

    def __init__(self, token: str, on_refuse: Callable[[], None] | None = None) -> None:
        self._expected = f"Bearer {token}".encode()
        self._on_refuse = on_refuse

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(HEALTH_METHOD_PREFIX):
            return handler
        if self.authorized(handler_call_details.invocation_metadata):
            return handler
        return refusing_handler(
            handler,
            grpc.StatusCode.UNAUTHENTICATED,
            "missing or wrong bearer token: expected metadata 'authorization: Bearer <token>'",
            self._on_refuse,
        )

    def authorized(self, metadata: object) -> bool:
        values = [value for key, value in (metadata or ()) if key == AUTH_METADATA_KEY]
        if len(values) != 1:
            return False
        given = values[0]
        if isinstance(given, str):
            given = given.encode("utf-8", "replace")
        return hmac.compare_digest(given, self._expected)
