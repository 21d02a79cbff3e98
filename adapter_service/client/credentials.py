"""How a client proves who it is to the sidecar, and checks that the sidecar is who it claims to be.

`ClientSecurity` names files, never secrets: the token is read from a file (a command line or an
environment value would show it in `ps` and in crash dumps). Every problem is reported when the object
is made, naming the field (or the CHAMELEON_* variable it came from), so a typo fails at start-up
instead of turning into a fallback on every batch. Client side only: the server never imports this.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields

import grpc

log = logging.getLogger("adapter_service.client")

# The variables every plugin reads (settings.common_settings) and ClientSecurity.from_env understands.
ENV_VARS = {
    "ca_file": "CHAMELEON_TLS_CA",
    "cert_file": "CHAMELEON_TLS_CERT",
    "key_file": "CHAMELEON_TLS_KEY",
    "token_file": "CHAMELEON_AUTH_TOKEN_FILE",
    "server_name": "CHAMELEON_TLS_SERVER_NAME",
}
_PEM_FILES = ("ca_file", "cert_file", "key_file")


def _read(path: str, label: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ValueError(f"{label}: cannot read {path!r} ({exc.strerror or exc})") from exc
    if not data.strip():
        raise ValueError(f"{label}: {path!r} is empty")
    return data


def _token(path: str, label: str) -> str:
    """The bearer token in `path`, surrounding whitespace removed; ValueError naming `label` otherwise."""
    raw = _read(path, label)
    try:
        token = raw.decode("ascii").strip()
    except UnicodeDecodeError as exc:
        raise ValueError(f"{label}: {path!r} is not an ASCII token") from exc
    if not token:
        raise ValueError(f"{label}: {path!r} holds an empty token")
    if any(c.isspace() or not c.isprintable() for c in token):
        raise ValueError(f"{label}: {path!r} holds more than one token (whitespace inside)")
    return token


def _check(values: Mapping[str, str | None], labels: Mapping[str, str]) -> None:
    """Raise ValueError naming `labels[field]` for the first problem in `values`."""
    tls = values["ca_file"] is not None
    cert, key = values["cert_file"], values["key_file"]
    if (cert is None) != (key is None):
        have, missing = ("cert_file", "key_file") if key is None else ("key_file", "cert_file")
        raise ValueError(
            f"{labels[have]} is set but {labels[missing]} is not: a client certificate needs its key"
        )
    for field in ("cert_file", "server_name"):
        if values[field] is not None and not tls:
            raise ValueError(
                f"{labels[field]} is set but {labels['ca_file']} is not: it applies only over TLS, which "
                f"{labels['ca_file']} (the CA that signed the sidecar's certificate) turns on"
            )
    for field in _PEM_FILES:
        if values[field] is not None:
            data = _read(values[field], labels[field])
            if b"-----BEGIN" not in data:
                raise ValueError(f"{labels[field]}: {values[field]!r} is not a PEM file")
    if values["token_file"] is not None:
        _token(values["token_file"], labels["token_file"])


@dataclass(frozen=True)
class ClientSecurity:
    """TLS (with `ca_file`), mutual TLS (plus `cert_file` and `key_file`) and a bearer token (`token_file`).

    Files are checked when the object is made and read when a client is made from it (restart the
    model server to pick up a rotated token or certificate)."""

    ca_file: str | None = None  # PEM root CA that signed the sidecar's certificate -> TLS on
    cert_file: str | None = None  # client certificate (mTLS), with key_file
    key_file: str | None = None
    token_file: str | None = None  # bearer token, read from the file (never passed on a command line)
    server_name: str | None = None  # override of the TLS target name (grpc.ssl_target_name_override)

    def __post_init__(self) -> None:
        _check({f.name: getattr(self, f.name) for f in fields(self)}, {f.name: f.name for f in fields(self)})

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> ClientSecurity:
        """CHAMELEON_TLS_CA, CHAMELEON_TLS_CERT, CHAMELEON_TLS_KEY, CHAMELEON_AUTH_TOKEN_FILE and
        CHAMELEON_TLS_SERVER_NAME; unset or empty variables are None. Errors name the variable."""
        values = {field: (environ.get(var) or "").strip() or None for field, var in ENV_VARS.items()}
        _check(values, ENV_VARS)
        return cls(**values)

    @property
    def tls(self) -> bool:
        return self.ca_file is not None

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """The TLS credentials of a secure channel (ValueError without ca_file)."""
        if not self.tls:
            raise ValueError("ca_file: not set, so there is no TLS to configure")
        pem = {f: _read(getattr(self, f), f) if getattr(self, f) else None for f in _PEM_FILES}
        return grpc.ssl_channel_credentials(
            root_certificates=pem["ca_file"], private_key=pem["key_file"], certificate_chain=pem["cert_file"]
        )

    def channel_options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The `authorization: Bearer` pair every call sends; empty without a token.

        Sent as per-call metadata rather than call credentials, which gRPC refuses on insecure channels:
        a token over plaintext to a loopback or unix-socket sidecar is a legitimate setup."""
        if self.token_file is None:
            return ()
        return (("authorization", f"Bearer {_token(self.token_file, 'token_file')}"),)

    def warn_if_exposed(self, address: str) -> None:
        """Log a warning when a token would cross a network in plain text (no TLS, not loopback)."""
        if self.token_file is not None and not self.tls and not is_local(address):
            log.warning(
                f"the bearer token is sent to {address} without TLS: anyone on the path can read it; "
                "set ca_file (CHAMELEON_TLS_CA) or use a loopback or unix-socket address"
            )


def is_local(address: str) -> bool:
    """True for unix sockets and loopback hosts, where plaintext never leaves the machine: a gRPC target
    (`host:port`, `dns:[//authority/]host:port`, `ipv4:`/`ipv6:` lists) is local only when every address
    it names is loopback (the DNS server of a `dns://authority/` target is asked names, never sent calls)."""
    if address.startswith(("unix:", "unix-abstract:")):
        return True
    if address.startswith(("ipv4:", "ipv6:")):
        endpoints = address[len("ipv4:") :].split(",")
    elif address.startswith("dns:"):
        rest = address[len("dns:") :]
        endpoints = [rest[2:].split("/", 1)[-1] if rest.startswith("//") else rest]
    else:
        endpoints = [address]
    return all(_is_loopback(_host(endpoint.strip())) for endpoint in endpoints)


def _host(endpoint: str) -> str:
    """`host:port`, `[v6]:port`, `host` or a bare IPv6 address -> the host."""
    if endpoint.startswith("["):
        return endpoint[1:].split("]", 1)[0]
    return endpoint.rsplit(":", 1)[0] if endpoint.count(":") == 1 else endpoint


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
