"""A throwaway PKI for TLS tests, made with the openssl command: a CA, a server certificate for
localhost/127.0.0.1, a client certificate, and a second CA that signed neither."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class PKI:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed nothing here: trusting it must fail the handshake


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ca(name: str, cwd: Path) -> None:
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
        "-keyout", f"{name}.key", "-out", f"{name}.pem", cwd=cwd,
    )  # fmt: skip


def _leaf(name: str, ca: str, ext: str, cwd: Path) -> None:
    (cwd / f"{name}.ext").write_text(ext)
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=cwd,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
        "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem", cwd=cwd,
    )  # fmt: skip


def make_pki(root: Path) -> PKI:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make test certificates")
    root.mkdir(parents=True, exist_ok=True)
    _ca("ca", root)
    _ca("other-ca", root)
    _leaf(
        "server",
        "ca",
        "subjectAltName=DNS:localhost,DNS:sidecar.test,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        root,
    )
    _leaf("client", "ca", "extendedKeyUsage=clientAuth\n", root)
    return PKI(
        root / "ca.pem",
        root / "server.pem",
        root / "server.key",
        root / "client.pem",
        root / "client.key",
        root / "other-ca.pem",
    )
