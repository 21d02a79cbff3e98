"""The example server under hostile or careless clients: bursts, stalls, idle connections, malformed
requests, API keys, and a SIGTERM whose drain outlasts the grace. Raw sockets where http.client would
refuse to send the request."""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from huggingface_hub import InferenceClient

from chameleon_model_server.batching import GenerationRequest, ValidationError
from chameleon_model_server.connections import LINGER_S
from chameleon_model_server.http_server import ModelServer, build_parser, read_api_key, serve
from samples import PROMPTS, tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def server(tokenizer) -> Iterator[ModelServer]:
    running = serve(
        tiny_model(tokenizer),
        tokenizer,
        port=0,
        max_body_bytes=64 * 1024,
        max_new_tokens_limit=20,
        max_input_tokens=32,
        read_timeout_s=5.0,
        idle_timeout_s=5.0,
    )
    yield running
    running.shutdown(grace=10)


# -- raw HTTP ---------------------------------------------------------------------------------------


class Answer:
    def __init__(self, status: int, headers: dict[str, str], body: bytes, closed: bool) -> None:
        self.status, self.headers, self.body, self.closed = status, headers, body, closed

    def json(self) -> dict:
        assert self.headers.get("content-type") == "application/json", (self.status, self.headers, self.body)
        return json.loads(self.body)


def read_answer(sock: socket.socket) -> Answer:
    """One response off a raw socket (Content-Length framing, which every error answer has)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a complete answer: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("iso-8859-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return Answer(status, headers, body, headers.get("connection", "").lower() == "close")


def exchange(server: ModelServer, data: bytes, shut_write: bool = False, timeout: float = 15) -> Answer:
    with socket.create_connection((server.host, server.port), timeout=timeout) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # answered before all was sent
            sock.sendall(data)
            if shut_write:
                sock.shutdown(socket.SHUT_WR)
        return read_answer(sock)


def post_bytes(path: str, body: bytes, extra: str = "") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


def generate_json(text: str) -> bytes:
    """A /generate request whose JSON body is `text` verbatim (json.dumps cannot write NaN or bad escapes)."""
    return post_bytes("/generate", text.encode())


def healthy(server: ModelServer) -> bool:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=15)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status == 200
    finally:
        conn.close()


ONE_MB = "x" * (1024 * 1024)
DEEP = "[" * 30_000 + "]" * 30_000  # beyond the interpreter's recursion limit, within the body limit
MALFORMED: list[tuple[str, bytes, int, bool]] = [
    # (what, bytes sent, status, close the write side after sending)
    ("garbage request line", b"HELLO\r\n\r\n", 400, False),
    ("method only", b"GET\r\n\r\n", 400, False),
    ("HTTP/0.9 request", b"GET /health\r\n\r\n", 400, False),
    ("four words", b"GET /health HTTP/1.1 extra\r\n\r\n", 400, False),
    ("not HTTP", b"GET /health FOO/1.1\r\n\r\n", 400, False),
    ("bad version digits", b"GET /health HTTP/1.x\r\n\r\n", 400, False),
    ("binary request line", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400, False),
    ("bad method characters", b"G@T /health HTTP/1.1\r\n\r\n", 400, False),
    ("request line too long", b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\n\r\n", 414, False),
    ("header line too long", b"GET /health HTTP/1.1\r\nX-Long: " + b"a" * 20_000 + b"\r\n\r\n", 431, False),
    ("too many headers", b"GET /health HTTP/1.1\r\n" + b"X-A: b\r\n" * 150 + b"\r\n", 431, False),
    (
        "headers too large",
        b"GET /health HTTP/1.1\r\n" + (b"X-A: " + b"b" * 7000 + b"\r\n") * 12 + b"\r\n",
        431,
        False,
    ),
    (
        "duplicated 1 MB request id",
        b"GET /info HTTP/1.1\r\n" + (b"X-Request-Id: " + ONE_MB.encode() + b"\r\n") * 2 + b"\r\n",
        431,
        False,
    ),
    ("header without colon", b"GET /health HTTP/1.1\r\nno colon here\r\n\r\n", 400, False),
    ("folded header", b"GET /health HTTP/1.1\r\nX-A: b\r\n continued\r\n\r\n", 400, False),
    ("PUT", b"PUT /generate HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}", 405, False),
    ("DELETE", b"DELETE /info HTTP/1.1\r\n\r\n", 405, False),
    ("OPTIONS", b"OPTIONS /generate HTTP/1.1\r\n\r\n", 405, False),
    ("GET on a POST route", b"GET /generate HTTP/1.1\r\n\r\n", 405, False),
    ("POST on a GET route", post_bytes("/health", b"{}"), 405, False),
    ("unknown route", post_bytes("/nowhere", b"{}"), 404, False),
    ("POST without a length", b"POST /generate HTTP/1.1\r\nHost: t\r\n\r\n", 411, False),
    ("Content-Length not a number", b"POST /generate HTTP/1.1\r\nContent-Length: abc\r\n\r\n", 400, False),
    ("negative Content-Length", b"POST /generate HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400, False),
    ("signed Content-Length", b"POST /generate HTTP/1.1\r\nContent-Length: +2\r\n\r\n{}", 400, False),
    (
        "conflicting Content-Length list",
        b"POST /generate HTTP/1.1\r\nContent-Length: 2, 3\r\n\r\n{}",
        400,
        False,
    ),
    (
        "two Content-Length headers",
        b"POST /generate HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
        400,
        False,
    ),
    (
        "Content-Length and chunked",
        b"POST /generate HTTP/1.1\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
        False,
    ),
    (
        "bad chunk size",
        b"POST /generate HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
        400,
        False,
    ),
    (
        "truncated chunk",
        b"POST /generate HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n{}",
        400,
        True,
    ),
    (
        "body shorter than Content-Length",
        b"POST /generate HTTP/1.1\r\nContent-Length: 100\r\n\r\n{}",
        400,
        True,
    ),
    ("body too large", b"POST /generate HTTP/1.1\r\nContent-Length: 1000000000\r\n\r\n", 413, False),
    (
        "chunked body too large",
        b"POST /generate HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        + (b"8000\r\n" + b" " * 0x8000 + b"\r\n") * 3
        + b"0\r\n\r\n",
        413,
        False,
    ),
    (
        "100-continue with a body too large",
        b"POST /generate HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1000000\r\n\r\n",
        413,
        False,
    ),
    ("body not UTF-8", post_bytes("/generate", b'{"inputs": "\xff\xfe"}'), 400, False),
    ("body not JSON", generate_json("{not json"), 400, False),
    ("NaN temperature", generate_json('{"inputs": "hi", "parameters": {"temperature": NaN}}'), 400, False),
    (
        "Infinity repetition penalty",
        generate_json('{"inputs": "hi", "parameters": {"repetition_penalty": Infinity}}'),
        400,
        False,
    ),
    ("-Infinity top_p", generate_json('{"inputs": "hi", "parameters": {"top_p": -Infinity}}'), 400, False),
    ("NaN deep inside", generate_json('{"inputs": "hi", "parameters": {"x": [[{"y": NaN}]]}}'), 400, False),
    (
        "number out of range",
        generate_json('{"inputs": "hi", "parameters": {"temperature": 1e999}}'),
        400,
        False,
    ),
    (
        "5000-digit integer",
        generate_json('{"inputs": "hi", "parameters": {"seed": ' + "9" * 5000 + "}}"),
        400,
        False,
    ),
    ("lone surrogate in inputs", generate_json('{"inputs": "a\\ud800b"}'), 400, False),
    (
        "lone surrogate in stop",
        generate_json('{"inputs": "a", "parameters": {"stop": ["\\udfff"]}}'),
        400,
        False,
    ),
    ("lone surrogate in a key", generate_json('{"inputs": "a", "\\ud800": 1}'), 400, False),
    ("deeply nested JSON", generate_json(DEEP), 400, False),
    (
        "nested beyond the depth limit",
        generate_json('{"inputs": "a", "x": ' + "[" * 60 + "]" * 60 + "}"),
        400,
        False,
    ),
    ("tiny temperature", generate_json('{"inputs": "hi", "parameters": {"temperature": 1e-30}}'), 422, False),
    (
        "tiny repetition penalty",
        generate_json('{"inputs": "hi", "parameters": {"repetition_penalty": 1e-300}}'),
        422,
        False,
    ),
    (
        "max_new_tokens above the limit",
        generate_json('{"inputs": "hi", "parameters": {"max_new_tokens": 21}}'),
        422,
        False,
    ),
    ("input above max-input-tokens", generate_json(json.dumps({"inputs": "lazy dog " * 200})), 422, False),
    (
        "50 kB value echoed",
        generate_json(json.dumps({"inputs": "hi", "parameters": {"top_k": "x" * 50_000}})),
        422,
        False,
    ),
    ("body a list", generate_json("[1, 2]"), 422, False),
    ("body null", generate_json("null"), 422, False),
    ("parameters not an object", generate_json('{"inputs": "a", "parameters": [1]}'), 422, False),
    ("inputs not a string", generate_json('{"inputs": {"a": 1}}'), 422, False),
    ("stream not a boolean", post_bytes("/", b'{"inputs": "a", "stream": "yes"}'), 422, False),
]


@pytest.mark.parametrize(("what", "data", "status", "shut_write"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_requests_get_json_4xx(
    server: ModelServer, what: str, data: bytes, status: int, shut_write: bool
) -> None:
    answer = exchange(server, data, shut_write=shut_write)
    assert answer.status == status, (what, answer.status, answer.body[:300])
    error = answer.json()
    assert set(error) == {"error", "error_type"} and error["error"] and error["error_type"]
    assert len(answer.body) < 2000  # nothing a client sent is echoed at length
    if status == 405:
        assert answer.headers["allow"] in ("POST", "GET, HEAD")
    assert healthy(server), f"not serving after: {what}"


def test_malformed_table_is_large_and_server_never_500s(server: ModelServer) -> None:
    assert len(MALFORMED) >= 30
    errors = re.findall(r'chameleon_server_http_requests_total\{code="5\d\d"', metrics_text(server))
    assert not errors


def metrics_text(server: ModelServer) -> str:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=15)
    try:
        conn.request("GET", "/metrics")
        return conn.getresponse().read().decode()
    finally:
        conn.close()


def test_protocol_errors_other_than_4xx_are_json_too(server: ModelServer) -> None:
    answer = exchange(server, b"GET /health HTTP/2.0\r\n\r\n")
    assert answer.status == 505 and answer.json()["error_type"] == "http_version_not_supported"
    answer = exchange(server, b"POST /generate HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n")
    assert answer.status == 501 and answer.json()["error_type"] == "not_implemented"
    assert healthy(server)


def test_unknown_paths_do_not_grow_the_metrics(server: ModelServer) -> None:
    for i in range(5):
        exchange(server, f"GET /probe-{i} HTTP/1.1\r\n\r\n".encode())
    text = metrics_text(server)
    assert "probe-" not in text and 'route="other"' in text


def test_keep_alive_survives_refusals_with_a_read_body(server: ModelServer) -> None:
    """A 422 after the body was read leaves the connection usable; a 405 with an unread body closes it."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
    try:
        conn.request("POST", "/generate", body=b'{"inputs": "x", "parameters": {"temperature": 0}}')
        response = conn.getresponse()
        assert response.status == 422 and response.getheader("Connection") is None
        response.read()
        conn.request(
            "POST", "/generate", body=json.dumps({"inputs": PROMPTS[0], "parameters": {"max_new_tokens": 2}})
        )
        response = conn.getresponse()
        assert response.status == 200 and json.loads(response.read())["generated_text"] is not None
        conn.request("PUT", "/generate", body=b"{}")
        response = conn.getresponse()
        assert response.status == 405 and response.getheader("Connection") == "close"
    finally:
        conn.close()


def test_batcher_refuses_non_finite_numbers() -> None:
    for name in ("temperature", "top_p", "typical_p", "repetition_penalty"):
        for value in (math.nan, math.inf):
            with pytest.raises(ValidationError, match=name):
                GenerationRequest("x", **{name: value}).check()


# -- connections ----------------------------------------------------------------------------------


def test_burst_of_200_clients_is_queued_not_reset(tokenizer) -> None:
    """More clients than workers wait in the backlog; more requests than the cap are answered 429."""
    with serve(
        tiny_model(tokenizer),
        tokenizer,
        port=0,
        max_concurrent_requests=4,
        max_connections=8,
        batch_window_ms=20,
    ) as server:
        outcomes: list[object] = []
        barrier = threading.Barrier(200)

        def client(i: int) -> None:
            try:
                barrier.wait(30)
                conn = http.client.HTTPConnection(server.host, server.port, timeout=120)
                body = {"inputs": PROMPTS[i % len(PROMPTS)], "parameters": {"max_new_tokens": 2}}
                conn.request("POST", "/generate", body=json.dumps(body))
                response = conn.getresponse()
                payload = json.loads(response.read())
                conn.close()
                if response.status == 429:
                    assert payload["error_type"] == "overloaded"
                outcomes.append(response.status)
            except BaseException as exc:  # a reset, a refusal, a timeout
                outcomes.append(exc)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(200)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        failures = [o for o in outcomes if not isinstance(o, int)]
        assert not failures, failures[:5]
        assert len(outcomes) == 200 and set(outcomes) <= {200, 429}
        assert 200 in outcomes and 429 in outcomes  # the cap was reached, and requests were served
        assert server.httpd.threads <= 8


def test_stalled_body_is_answered_408_and_frees_its_worker(tokenizer) -> None:
    with serve(tiny_model(tokenizer), tokenizer, port=0, max_connections=1, read_timeout_s=1.0) as server:
        stalled = socket.create_connection((server.host, server.port), timeout=15)
        started = time.monotonic()
        stalled.sendall(b'POST /generate HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n{"inputs":')
        # the only worker is busy with the stalled client: this one waits in the backlog, then is served
        waiting = socket.create_connection((server.host, server.port), timeout=15)
        waiting.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        answer = read_answer(stalled)
        elapsed = time.monotonic() - started
        assert answer.status == 408 and answer.json()["error_type"] == "timeout" and answer.closed
        assert 0.9 < elapsed < 3.0, elapsed
        assert stalled.recv(1) == b""  # closed
        stalled.close()
        assert read_answer(waiting).status == 200
        assert time.monotonic() - started < 3.0 + LINGER_S
        waiting.close()

        # headers that never end: 408 too
        with socket.create_connection((server.host, server.port), timeout=15) as sock:
            sock.sendall(b"POST /generate HTTP/1.1\r\nHost: t\r\n")
            answer = read_answer(sock)
            assert answer.status == 408 and answer.json()["error_type"] == "timeout"

        # a trickle does not extend the deadline: it is a total
        with socket.create_connection((server.host, server.port), timeout=15) as sock:
            started = time.monotonic()
            sock.sendall(b"POST /generate HTTP/1.1\r\nContent-Length: 50\r\n\r\n")
            with contextlib.suppress(OSError):
                for _ in range(20):
                    sock.sendall(b" ")
                    time.sleep(0.1)
            assert read_answer(sock).status == 408
            assert time.monotonic() - started < 2.5
        assert healthy(server)


def test_idle_keep_alive_connections_are_closed(tokenizer) -> None:
    with serve(tiny_model(tokenizer), tokenizer, port=0, idle_timeout_s=0.5) as server:
        with socket.create_connection((server.host, server.port), timeout=15) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
            assert read_answer(sock).status == 200
            started = time.monotonic()
            assert sock.recv(1) == b""  # closed by the server, without an answer
            assert 0.4 < time.monotonic() - started < 2.0
        with socket.create_connection(
            (server.host, server.port), timeout=15
        ) as sock:  # silent from the start
            started = time.monotonic()
            assert sock.recv(1) == b""
            assert time.monotonic() - started < 2.0


def test_thread_count_stays_bounded_with_100_idle_connections(tokenizer) -> None:
    with serve(tiny_model(tokenizer), tokenizer, port=0, max_connections=8, idle_timeout_s=30) as server:
        before = threading.active_count()
        sockets = [socket.create_connection((server.host, server.port), timeout=15) for _ in range(100)]
        try:
            time.sleep(1.0)
            assert threading.active_count() <= before + 8
            assert server.httpd.connections <= 8
        finally:
            for sock in sockets:
                sock.close()
        deadline = time.monotonic() + 20
        while server.httpd.connections and time.monotonic() < deadline:
            time.sleep(0.05)
        assert healthy(server)
        assert server.httpd.threads <= 8


def test_idle_keep_alive_connections_yield_to_waiting_clients(tokenizer) -> None:
    """With every worker held by idle keep-alive connections, a new client is served long before the
    idle timeout: the idle ones give their workers up."""
    with serve(tiny_model(tokenizer), tokenizer, port=0, max_connections=2, idle_timeout_s=60) as server:
        idle = []
        for _ in range(2):
            sock = socket.create_connection((server.host, server.port), timeout=15)
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
            assert read_answer(sock).status == 200
            idle.append(sock)
        started = time.monotonic()
        assert healthy(server)
        assert time.monotonic() - started < 5.0
        for sock in idle:
            sock.close()


# -- API key --------------------------------------------------------------------------------------


def test_api_key(tokenizer, tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("s3cret-key\n")
    key = read_api_key(str(key_file))
    assert key == "s3cret-key"
    with serve(tiny_model(tokenizer), tokenizer, port=0, api_key=key) as server:
        assert healthy(server)  # health stays open for probes
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret-key"}):
            conn = http.client.HTTPConnection(server.host, server.port, timeout=15)
            conn.request("GET", "/info", headers=headers)
            response = conn.getresponse()
            assert response.status == 401 and response.getheader("WWW-Authenticate") == "Bearer"
            assert json.loads(response.read())["error_type"] == "unauthorized"
            conn.close()
        answer = exchange(server, post_bytes("/generate", b'{"inputs": "x"}'))
        assert answer.status == 401 and answer.closed
        answer = exchange(server, post_bytes("/nowhere", b"{}"))
        assert answer.status == 401  # routes are not revealed without the key
        client = InferenceClient(base_url=server.url, api_key=key, timeout=60)
        assert client.text_generation(PROMPTS[0], max_new_tokens=2)
        with pytest.raises(Exception, match="API key"):
            InferenceClient(base_url=server.url, api_key="nope", timeout=60).text_generation(
                "x", max_new_tokens=1
            )
    for bad in ("", "two words", "\u00e9t\u00e9"):
        key_file.write_text(bad)
        with pytest.raises(ValueError, match="API key file"):
            read_api_key(str(key_file))


def test_cli_connection_flags() -> None:
    args = build_parser().parse_args([])
    assert (args.backlog, args.max_connections, args.read_timeout_s, args.idle_timeout_s) == (
        1024,
        256,
        10.0,
        5.0,
    )
    assert args.max_body_bytes == 8 * 1024 * 1024 and args.max_new_tokens_limit is None
    assert args.api_key_file is None and args.grace == 30.0
    assert args.sidecar_tls_ca is None and args.sidecar_token_file is None
    assert build_parser().parse_args(["--grace", "0"]).grace == 0.0
    bad_values = (
        ["--max-connections", "0"],
        ["--read-timeout-s", "nan"],
        ["--backlog", "-1"],
        ["--grace", "nan"],
    )
    for bad in bad_values:
        with pytest.raises(SystemExit):
            build_parser().parse_args(bad)


# -- SIGTERM past the grace -----------------------------------------------------------------------


def endless_model_dir(tokenizer, path: Path) -> Path:
    """A tiny model with room for thousands of tokens that never chooses EOS greedily (its EOS row of
    the output layer is zero, so its logit is 0 while the largest of the other 359 is positive)."""
    model = tiny_model(tokenizer, max_positions=4096)
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_token_id] = 0.0
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def start_server(args: list[str]) -> tuple[subprocess.Popen, str, list[str]]:
    command = [
        sys.executable,
        str(ROOT / "examples" / "tgi_api_server.py"),
        "--port",
        "0",
        "--plain-logs",
        *args,
    ]
    proc = subprocess.Popen(
        command, stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    lines: list[str] = []
    found = threading.Event()
    url: list[str] = []

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            match = re.search(r"listening on (http://\S+)", line)
            if match:
                url.append(match.group(1))
                found.set()

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + 90
    while not found.wait(0.2) and proc.poll() is None and time.monotonic() < deadline:
        pass
    if not found.is_set():
        proc.kill()
        raise AssertionError("".join(lines))
    return proc, url[0][len("http://") :], lines


def test_sigterm_past_the_grace_ends_requests_with_503_and_exits_0(tokenizer, tmp_path: Path) -> None:
    model_dir = endless_model_dir(tokenizer, tmp_path / "endless")
    proc, address, lines = start_server(
        ["--model", str(model_dir), "--grace", "1", "--batch-window-ms", "100"]
    )
    try:
        body = json.dumps({"inputs": PROMPTS[0], "parameters": {"max_new_tokens": 4000}})
        plain: dict[str, object] = {}

        def generate() -> None:
            conn = http.client.HTTPConnection(address, timeout=120)
            conn.request("POST", "/generate", body=body)
            response = conn.getresponse()
            plain["status"], plain["body"] = response.status, json.loads(response.read())

        waiter = threading.Thread(target=generate)
        waiter.start()
        stream = http.client.HTTPConnection(address, timeout=120)
        stream.request("POST", "/generate_stream", body=body)
        response = stream.getresponse()
        assert response.status == 200
        first = response.readline()
        assert first.startswith(b"data:") and json.loads(first[5:])["token"]
        time.sleep(0.5)
        assert "status" not in plain  # both are still generating
        proc.send_signal(signal.SIGTERM)
        events = [
            json.loads(line[5:]) for line in response.read().split(b"\n\n") if line.startswith(b"data:")
        ]
        stream.close()
        waiter.join(60)
        code = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    logs = "".join(lines)
    assert code == 0, logs[-3000:]  # not -6 (SIGABRT)
    assert "terminate called" not in logs
    assert events and events[-1]["error_type"] == "shutdown" and "shut down" in events[-1]["error"]
    assert len(events) < 3999  # cut, not finished
    assert plain["status"] == 503 and plain["body"]["error_type"] == "shutdown"
    assert "grace of 1.0 s over" in logs


def test_shutdown_does_not_wait_for_half_sent_requests_or_idle_connections(tokenizer) -> None:
    server = serve(tiny_model(tokenizer), tokenizer, port=0, read_timeout_s=60, idle_timeout_s=60)
    half = socket.create_connection((server.host, server.port), timeout=15)
    half.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n")
    idle = socket.create_connection((server.host, server.port), timeout=15)
    idle.sendall(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
    assert read_answer(idle).status == 200
    time.sleep(0.3)
    started = time.monotonic()
    assert server.shutdown(grace=5)
    assert time.monotonic() - started < 2.5
    assert idle.recv(1) == b"" and half.recv(1) == b""
    half.close()
    idle.close()


@pytest.mark.parametrize("hurry", [False, True], ids=["grace over", "second signal"])
def test_grace_expiry_and_hurry_end_requests_in_process(tokenizer, hurry: bool) -> None:
    """Past the grace (or on `hurry()`, a second SIGTERM), running and queued requests end with 503
    `shutdown` (a stream with an error event) and the worker stops between two decoding steps."""
    model = tiny_model(tokenizer)
    model.register_forward_pre_hook(lambda module, args: time.sleep(0.02))  # ~20 ms a step
    server = serve(model, tokenizer, port=0, batch_window_ms=0, max_batch_size=1)
    client = InferenceClient(base_url=server.url, timeout=60)
    stream = iter(client.text_generation(PROMPTS[0], max_new_tokens=120, stream=True, details=True))
    next(stream)
    outcome: dict[str, object] = {}
    body = generate_json(json.dumps({"inputs": "x", "parameters": {"max_new_tokens": 5}}))
    waiter = threading.Thread(target=lambda: outcome.setdefault("answer", exchange(server, body)))
    waiter.start()
    time.sleep(0.2)  # queued behind the stream (batches of one)
    started = time.monotonic()
    grace = 60 if hurry else 0.5
    stopper = threading.Thread(target=lambda: outcome.setdefault("drained", server.shutdown(grace=grace)))
    stopper.start()
    if hurry:
        time.sleep(0.3)
        server.hurry()
    with pytest.raises(Exception, match="shut down"):
        list(stream)
    stopper.join(30)
    waiter.join(30)
    assert time.monotonic() - started < 10
    assert outcome["drained"] is False and server.worker_stopped
    answer = outcome["answer"]
    assert answer.status == 503 and answer.json()["error_type"] == "shutdown"
