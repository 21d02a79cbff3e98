"""The model server's HTTP/1.1 connection layer: a listen backlog, a bounded pool of worker threads, read
deadlines, an idle timeout and JSON errors for every protocol error, on the standard library only.

http.server's ThreadingHTTPServer listens with a backlog of 5, starts a thread per connection, reads
without deadlines and answers its own errors in HTML: a burst of clients is reset by the kernel before
the server's 429 can answer, and silent or slow clients each hold a thread for ever. Here:

* the listening socket's backlog is `backlog`, and the acceptor takes a connection only when one of the
  `max_connections` workers is free: a burst waits in the kernel's queue instead of being reset;
* a connection waits `idle_timeout_s` for the first byte of each request, then has `read_timeout_s`
  for the request line and headers and again for the body (a total, so trickling bytes does not extend
  it); a request cut by a deadline is answered 408, an idle connection is just closed. Writes have
  `read_timeout_s` too: a client that accepts no bytes for that long is dropped;
* a keep-alive connection waiting for its next request gives its worker up early when every worker is
  busy and connections wait in the backlog, and when the server drains;
* everything the protocol layer refuses (garbage request line, oversized request line or headers,
  broken body framing, timeouts) is answered with TGI's error shape `{"error", "error_type"}` and the
  connection is closed, since where the next request starts is unknown.

Subclasses of `PooledRequestHandler` implement `dispatch()` and answer with `respond*`.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import logging
import math
import re
import select
import socket
import socketserver
import threading
import time
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from typing import Any

log = logging.getLogger(__name__)

MAX_REQUEST_LINE = 8 * 1024
MAX_HEADER_LINE = 8 * 1024
MAX_HEADER_BYTES = 64 * 1024
MAX_HEADERS = 100
MAX_CHUNK_LINE = 1024
MAX_ECHO = 200  # characters of a client's value that an error message or a log line repeats
_TICK_S = 0.25  # how often an idle connection checks whether it should give its worker up
# Closing a socket with unread input makes the kernel send a reset, which can destroy the error answer
# before the client reads it: after refusing a request whose body was not read, read and drop what the
# client still sends, for this long at most (a "lingering close", as Apache and nginx do).
LINGER_S = 2.0
LINGER_BYTES = 64 * 1024 * 1024

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HEADER_LINE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[^\r\n]*\r?\n")
_VERSION = re.compile(r"HTTP/([0-9])\.([0-9])")
_DIGITS = re.compile(r"[0-9]{1,19}")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,15}")

# error_type of the errors the protocol layer answers itself (the application's own use TGI's types)
ERROR_TYPES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    408: "timeout",
    411: "length_required",
    413: "payload_too_large",
    414: "uri_too_long",
    431: "headers_too_large",
    501: "not_implemented",
    505: "http_version_not_supported",
}


def clip(value: object, limit: int = MAX_ECHO) -> str:
    """`value` as text of at most `limit` characters: clients' values are repeated in errors and logs, and
    a megabyte id must not become a megabyte log line."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


class RequestError(Exception):
    """A request refused with `status` and TGI's error body; `close`: the connection cannot be reused."""

    def __init__(
        self, status: int, message: str, error_type: str | None = None, *, close: bool = False
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type or ERROR_TYPES.get(status, "bad_request")
        self.close = close


class _Reader(io.RawIOBase):
    """Socket reads against a deadline (a total, not per read); `abandon`, while set, is asked every tick
    whether to give the connection up."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.deadline = time.monotonic()
        self.abandon: Callable[[], bool] | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while True:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("read deadline passed")
            self.sock.settimeout(min(remaining, _TICK_S) if self.abandon is not None else remaining)
            try:
                return self.sock.recv_into(buffer)
            except TimeoutError:
                if self.abandon is not None and self.abandon():
                    raise ConnectionAbortedError("idle connection given up") from None


class _Writer(io.BufferedIOBase):
    """Unbuffered socket writes, each with a total timeout (socket.sendall's, since Python 3.5)."""

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        self.sock = sock
        self.timeout = timeout

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.sock.settimeout(self.timeout)
        self.sock.sendall(data)
        with memoryview(data) as view:
            return view.nbytes

    def fileno(self) -> int:
        return self.sock.fileno()


class PooledHTTPServer(socketserver.TCPServer):
    """A TCP server with a listen backlog and at most `max_connections` worker threads (see the module
    docstring). `start()` accepts on a background thread; `begin_drain()` then `close()` stop it."""

    allow_reuse_address = True

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[PooledRequestHandler],
        *,
        backlog: int = 1024,
        max_connections: int = 256,
        read_timeout_s: float = 10.0,
        idle_timeout_s: float = 5.0,
    ) -> None:
        for name, value in (
            ("backlog", backlog),
            ("max_connections", max_connections),
            ("read_timeout_s", read_timeout_s),
            ("idle_timeout_s", idle_timeout_s),
        ):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        self.request_queue_size = int(backlog)  # read by server_activate (listen) in TCPServer.__init__
        self.max_connections = int(max_connections)
        self.read_timeout_s = float(read_timeout_s)
        self.idle_timeout_s = float(idle_timeout_s)
        super().__init__(address, handler)
        self.socket.settimeout(0.2)  # the acceptor's poll interval
        self.draining = False
        self._closing = threading.Event()
        self._slots = threading.Semaphore(self.max_connections)
        self._lock = threading.Lock()
        self._busy = 0  # connections handed to workers and not yet closed
        self._work: list[tuple[socket.socket, Any]] = []
        self._connections: dict[socket.socket, Any] = {}  # served now -> its handler (once it exists)
        self._work_ready = threading.Condition(self._lock)
        self._workers: list[threading.Thread] = []
        self._acceptor: threading.Thread | None = None

    # -- life cycle
    def start(self) -> None:
        if self._acceptor is None:
            self._acceptor = threading.Thread(target=self._accept_loop, name="chameleon-http", daemon=True)
            self._acceptor.start()

    def begin_drain(self) -> None:
        """Keep answering, but close keep-alive connections after their current request or while idle."""
        self.draining = True

    def close(self, timeout: float = 5.0) -> None:
        """Stop accepting, close the listener and end the workers: idle connections are given up at once,
        a worker still answering gets `timeout` seconds, and one still reading a request is cut after
        `_TICK_S * 2` (callers finish their own requests before closing)."""
        deadline = time.monotonic() + timeout
        self.draining = True
        self._closing.set()
        if self._acceptor is not None:
            self._acceptor.join(max(0.0, deadline - time.monotonic()))
        self.server_close()
        with self._work_ready:
            self._work_ready.notify_all()
        for worker in list(self._workers):
            worker.join(max(0.0, min(deadline, time.monotonic() + 2 * _TICK_S) - time.monotonic()))
        with self._work_ready:
            reading = [conn for conn, handler in self._connections.items() if handler.reading]
        for conn in reading:  # a half-sent request would hold its worker until the read deadline
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for worker in list(self._workers):
            worker.join(max(0.0, deadline - time.monotonic()))
        stuck = [w.name for w in self._workers if w.is_alive()]
        if stuck:
            log.warning(
                "%d HTTP workers still busy after %.1f s; they end with their connections",
                len(stuck),
                timeout,
            )

    @property
    def connections(self) -> int:
        """Connections being served now (at most max_connections)."""
        return self._busy

    @property
    def threads(self) -> int:
        return len(self._workers)

    # -- accepting
    def _accept_loop(self) -> None:
        while not self._closing.is_set():
            if not self._slots.acquire(timeout=0.2):
                continue
            accepted = None
            while accepted is None and not self._closing.is_set():
                try:
                    accepted = self.socket.accept()
                except TimeoutError:
                    continue
                except OSError as exc:  # EMFILE, ENFILE, ECONNABORTED...: try again shortly
                    if self._closing.is_set():
                        break
                    log.warning("accept failed: %s", exc)
                    time.sleep(0.1)
            if accepted is None:
                self._slots.release()
                break
            self._dispatch(*accepted)

    def _dispatch(self, conn: socket.socket, address: Any) -> None:
        with self._work_ready:
            self._busy += 1
            self._work.append((conn, address))
            # Workers are never lost, and each serves one connection at a time: as many workers as busy
            # connections means every queued connection is taken at once.
            if len(self._workers) < self._busy:
                worker = threading.Thread(
                    target=self._work_loop, name=f"chameleon-http-{len(self._workers)}", daemon=True
                )
                self._workers.append(worker)
                worker.start()
            self._work_ready.notify()

    def _work_loop(self) -> None:
        while True:
            with self._work_ready:
                while not self._work and not self._closing.is_set():
                    self._work_ready.wait()
                if not self._work:
                    return
                conn, address = self._work.pop(0)
            try:
                self.finish_request(conn, address)
            except Exception:
                self.handle_error(conn, address)
            finally:
                self.shutdown_request(conn)
                with self._work_ready:
                    self._busy -= 1
                    self._connections.pop(conn, None)
                self._slots.release()

    def register(self, conn: socket.socket, handler: Any) -> None:
        with self._work_ready:
            self._connections[conn] = handler

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.exception("error while serving a connection from %s", client_address)

    def should_give_up(self, kept_alive: bool) -> bool:
        """Whether a connection waiting for a request should close now: the server stops, or it drains (a
        connection that already served a request), or every worker is busy while others wait."""
        if self._closing.is_set():
            return True
        if self.draining and kept_alive:
            return True
        if self._busy < self.max_connections:
            return False
        try:
            readable, _, _ = select.select([self.socket], [], [], 0)
        except (OSError, ValueError):
            return False
        return bool(readable)


class PooledRequestHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 request parsing with limits and deadlines (see the module docstring); subclasses implement
    `dispatch()` and may override `on_response(status)` (metrics)."""

    protocol_version = "HTTP/1.1"
    default_request_version = "HTTP/1.1"  # for errors answered before the version is known
    server: PooledHTTPServer

    # -- connection set-up
    def setup(self) -> None:
        self.connection = self.request
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # streamed tokens
        self._reader = _Reader(self.connection)
        self.rfile = io.BufferedReader(self._reader, 64 * 1024)
        self.wfile = _Writer(self.connection, self.server.read_timeout_s)
        self._served = 0
        self._linger = False
        self.reading = False  # between the first byte of a request and its last (see PooledHTTPServer.close)
        self.server.register(self.connection, self)

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            if self._linger:
                self._linger_close()
            self.rfile.close()

    def _linger_close(self) -> None:
        self.connection.shutdown(socket.SHUT_WR)  # the answer is complete: FIN after it
        deadline, dropped = time.monotonic() + LINGER_S, 0
        buffer = bytearray(64 * 1024)
        while dropped < LINGER_BYTES and (remaining := deadline - time.monotonic()) > 0:
            self.connection.settimeout(remaining)
            received = self.connection.recv_into(buffer)
            if not received:
                break
            dropped += received

    # -- one request
    def handle_one_request(self) -> None:
        self.close_connection = True
        self.command, self.path, self.request_version = None, "", self.default_request_version
        self.requestline = ""
        self._body_pending = False
        reader = self._reader
        kept_alive = self._served > 0
        reader.deadline = time.monotonic() + self.server.idle_timeout_s
        reader.abandon = lambda: self.server.should_give_up(kept_alive)
        try:
            if not self.rfile.peek(1):
                return  # the client closed the connection
        except OSError:  # idle timeout, given up, reset
            return
        finally:
            reader.abandon = None
        reader.deadline = time.monotonic() + self.server.read_timeout_s
        self.reading = True
        try:
            if not self._read_head():
                return
        except TimeoutError:
            self.send_error(
                408, f"request line and headers not received within {self.server.read_timeout_s:g} s"
            )
            return
        except OSError:
            return
        finally:
            self.reading = False
        self._served += 1
        self.dispatch()
        if self._body_pending:  # answered without reading the body: the next request's start is unknown
            self.close_connection = True

    def _read_head(self) -> bool:
        line = self.rfile.readline(MAX_REQUEST_LINE + 1)
        if line in (b"\r\n", b"\n"):  # one empty line before a request is allowed (RFC 9112 2.2)
            line = self.rfile.readline(MAX_REQUEST_LINE + 1)
        if len(line) > MAX_REQUEST_LINE:
            self.send_error(414, f"request line longer than {MAX_REQUEST_LINE} bytes")
            return False
        if not line.endswith(b"\n"):
            return False  # closed mid-line
        self.raw_requestline = line
        self.requestline = line.decode("iso-8859-1").rstrip("\r\n")
        words = self.requestline.split()
        if len(words) != 3:
            self.send_error(
                400, f"malformed request line {clip(self.requestline)!r}: expected METHOD TARGET HTTP/1.1"
            )
            return False
        method, target, version = words
        match = _VERSION.fullmatch(version)
        if not match:
            self.send_error(400, f"malformed HTTP version {clip(version)!r}")
            return False
        if match.group(1) != "1":
            self.send_error(505, f"HTTP version {clip(version)} is not supported; use HTTP/1.1")
            return False
        self.request_version = version
        if not _TOKEN.fullmatch(method):
            self.send_error(400, f"malformed method {clip(method)!r}")
            return False
        self.command, self.path = method, target

        lines: list[bytes] = []
        total = 0
        while True:
            line = self.rfile.readline(MAX_HEADER_LINE + 1)
            total += len(line)
            if len(line) > MAX_HEADER_LINE or total > MAX_HEADER_BYTES or len(lines) > MAX_HEADERS:
                self.send_error(
                    431,
                    f"request headers above the limits ({MAX_HEADERS} fields, {MAX_HEADER_LINE} bytes a "
                    f"line, {MAX_HEADER_BYTES} bytes in all)",
                )
                return False
            if not line.endswith(b"\n"):
                return False  # closed inside the headers
            if line in (b"\r\n", b"\n"):
                break
            if not _HEADER_LINE.fullmatch(line):
                self.send_error(400, f"malformed header line {clip(line)}")
                return False
            lines.append(line)
        self.headers = http.client.parse_headers(io.BytesIO(b"".join(lines) + b"\r\n"))

        tokens = {t.strip().lower() for v in self.headers.get_all("Connection", []) for t in v.split(",")}
        if version == "HTTP/1.1":
            self.close_connection = "close" in tokens
        else:
            self.close_connection = "keep-alive" not in tokens
        self._body_pending = bool(self.headers.get_all("Transfer-Encoding")) or any(
            v.strip() not in ("", "0") for v in self.headers.get_all("Content-Length", [])
        )
        return True

    def handle_expect_100(self) -> bool:
        return True  # sent by read_body, once the request is known to be acceptable

    def dispatch(self) -> None:  # pragma: no cover - subclasses implement it
        raise NotImplementedError

    # -- bodies
    def read_body(self, max_bytes: int) -> bytes:
        """The request body (Content-Length or chunked), within `read_timeout_s`; RequestError (400, 408,
        411, 413, 501) otherwise."""
        transfer = self.headers.get_all("Transfer-Encoding", [])
        lengths = self.headers.get_all("Content-Length", [])
        if transfer:
            if lengths:
                raise RequestError(400, "both Content-Length and Transfer-Encoding were sent", close=True)
            codings = [c.strip().lower() for v in transfer for c in v.split(",")]
            if codings != ["chunked"]:
                raise RequestError(
                    501, f"unsupported Transfer-Encoding {clip(', '.join(transfer))!r}", close=True
                )
            self._continue()
            return self._timed(lambda: self._read_chunked(max_bytes))
        if not lengths:
            raise RequestError(
                411, "a request body needs Content-Length (or chunked Transfer-Encoding)", close=True
            )
        values = {v.strip() for value in lengths for v in value.split(",")}
        text = values.pop() if len(values) == 1 else ""
        if not _DIGITS.fullmatch(text):
            raise RequestError(400, f"malformed Content-Length {clip(', '.join(lengths))!r}", close=True)
        length = int(text)
        if length > max_bytes:
            raise RequestError(413, f"request body above {max_bytes} bytes", close=True)
        if length == 0:
            self._body_pending = False
            return b""
        self._continue()
        body = self._timed(lambda: self.rfile.read(length))
        if len(body) < length:
            raise RequestError(400, f"the body ended after {len(body)} of {length} bytes", close=True)
        self._body_pending = False
        return body

    def _continue(self) -> None:
        if self.request_version == "HTTP/1.1" and self.headers.get("Expect", "").lower() == "100-continue":
            self.send_response_only(100)
            self.end_headers()

    def _timed(self, read: Callable[[], bytes]) -> bytes:
        self._reader.deadline = time.monotonic() + self.server.read_timeout_s
        self.reading = True
        try:
            return read()
        except TimeoutError:
            raise RequestError(
                408, f"request body not received within {self.server.read_timeout_s:g} s", close=True
            ) from None
        finally:
            self.reading = False

    def _read_chunked(self, max_bytes: int) -> bytes:
        chunks, total = [], 0
        while True:
            line = self.rfile.readline(MAX_CHUNK_LINE + 1)
            if not line.endswith(b"\n"):
                raise RequestError(400, "malformed or truncated chunk size line", close=True)
            size_text = line.split(b";", 1)[0].strip()
            if not _HEX.fullmatch(size_text):
                raise RequestError(400, f"malformed chunk size {clip(size_text)}", close=True)
            size = int(size_text, 16)
            if size == 0:
                trailers = 0
                while (line := self.rfile.readline(MAX_HEADER_LINE + 1)) not in (b"\r\n", b"\n"):
                    trailers += len(line)
                    if not line.endswith(b"\n") or trailers > MAX_HEADER_BYTES:
                        raise RequestError(400, "malformed or truncated chunked trailers", close=True)
                self._body_pending = False
                return b"".join(chunks)
            total += size
            if total > max_bytes:
                raise RequestError(413, f"request body above {max_bytes} bytes", close=True)
            data = self.rfile.read(size)
            if len(data) < size or self.rfile.readline(3) not in (b"\r\n", b"\n"):
                raise RequestError(400, "truncated or malformed chunk", close=True)
            chunks.append(data)

    # -- answers
    def on_response(self, status: int) -> None:
        """Called once per answer (metrics)."""

    def respond(
        self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None
    ) -> None:
        if self.server.draining or self._body_pending:
            self.close_connection = True
        if self._body_pending and status != 408:  # a stalled client sends nothing to wait for
            self._linger = True
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
        self.on_response(status)

    def respond_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        self.respond(status, json.dumps(payload).encode(), "application/json", headers)

    def respond_error(
        self, status: int, message: str, error_type: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        """TGI's error body; the message is clipped (it may repeat what the client sent)."""
        error_type = error_type or ERROR_TYPES.get(status, "bad_request")
        self.respond_json(status, {"error": clip(message, 4 * MAX_ECHO), "error_type": error_type}, headers)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Every error http.server or this layer generates: JSON, never HTML, and the connection closed."""
        self.close_connection = True
        self._linger = code != 408  # what the client still sends is unread (a stalled one sends nothing)
        if not _VERSION.fullmatch(self.request_version or ""):
            self.request_version = self.default_request_version  # always send a status line
        message = message or HTTPStatus(code).phrase
        with contextlib.suppress(OSError):
            self.respond_error(code, message)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), clip(format % args))
