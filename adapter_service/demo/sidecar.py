"""Run `chameleon serve` as a child process and wait until it reports SERVING.

For the demo, benchmarks, tests and example model servers: a real sidecar in its own process
(its own GIL, its own signals), started and stopped the way a user would.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from adapter_service.client import AdapterClient, AdapterServiceError, ClientSecurity


def free_port() -> int:
    """A loopback port that was free a moment ago (good enough for tests and demos)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SidecarProcess:
    """`with SidecarProcess(artifact) as sidecar:` ... `sidecar.address`; stopped with SIGTERM on exit."""

    def __init__(
        self,
        artifact: str | os.PathLike[str],
        *,
        address: str | None = None,
        metrics_port: int | None = None,
        log_path: str | os.PathLike[str] | None = None,
        extra_args: Sequence[str] = (),
        startup_timeout: float = 120.0,
        security: ClientSecurity | None = None,
    ) -> None:
        """`security`: how to reach a sidecar started with TLS options in `extra_args` (health needs no
        token, but a TLS listener needs a TLS client)."""
        self.security = security
        self.address = address or f"127.0.0.1:{free_port()}"
        self.metrics_port = metrics_port
        command = [
            sys.executable,
            "-m",
            "adapter_service.cli",
            "serve",
            "--artifact",
            str(artifact),
            "--address",
            self.address,
            "--metrics-port",
            str(-1 if metrics_port is None else metrics_port),
            *extra_args,
        ]
        self.log_path = Path(log_path) if log_path else None
        self._log = open(self.log_path, "w") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}
        )
        try:
            self._wait_serving(startup_timeout)
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _wait_serving(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with AdapterClient(self.address, timeout=1.0, security=self.security) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"the sidecar exited with code {self.proc.returncode}{self._log_tail()}"
                    )
                with contextlib.suppress(AdapterServiceError):
                    if client.health() == "SERVING":
                        return
                time.sleep(0.1)
        raise RuntimeError(f"the sidecar did not report SERVING within {timeout:.0f} s{self._log_tail()}")

    def kill(self) -> None:
        """Stop abruptly (SIGKILL), as a crash would: for fallback tests."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (the server drains in-flight calls), SIGKILL only if it hangs; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not subprocess.DEVNULL:
            self._log.close()
        return self.proc.returncode

    def _log_tail(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return ":\n" + "\n".join(self.log_path.read_text().splitlines()[-20:])

    def __enter__(self) -> SidecarProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
