"""The TGI-compatible example server: a real HTTP server on loopback, the real InferenceClient, a tiny
Llama built from a config and a byte-level BPE tokenizer trained here (nothing is downloaded)."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import runpy
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from huggingface_hub import InferenceClient
from huggingface_hub.errors import GenerationError as HubGenerationError
from huggingface_hub.errors import ValidationError as HubValidationError
from prometheus_client import CollectorRegistry, Counter

from chameleon_model_server.batching import Batcher, GenerationRequest, IncrementalDecoder, ShuttingDown
from chameleon_model_server.http_server import ModelServer, build_parser, serve
from samples import PROMPTS, tiny_model, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def server(tokenizer) -> Iterator[ModelServer]:
    # A wide window so that concurrent clients surely share a batch on a slow machine.
    running = serve(tiny_model(tokenizer), tokenizer, port=0, model_id="tiny-llama", batch_window_ms=150)
    yield running
    running.shutdown(grace=10)


@pytest.fixture()
def client(server: ModelServer) -> InferenceClient:
    return InferenceClient(base_url=server.url, timeout=60)


def get(server: ModelServer, path: str) -> tuple[int, bytes, http.client.HTTPResponse]:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read(), response
    finally:
        conn.close()


def post(server: ModelServer, path: str, body: bytes | dict) -> tuple[int, bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
    try:
        conn.request("POST", path, body=data, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def metric(server: ModelServer, name: str, **labels: str) -> float:
    status, body, _ = get(server, "/metrics")
    assert status == 200
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = "^" + re.escape(name) + (r"\{" + re.escape(want) + r"\}" if want else "") + r" (\S+)"
    match = re.search(pattern, body.decode(), re.MULTILINE)
    assert match, f"{name}{labels} not in /metrics"
    return float(match.group(1))


# -- generation through the real InferenceClient ---------------------------------------------------


def test_plain_stream_and_details_agree(client: InferenceClient) -> None:
    prompt = PROMPTS[0]
    text = client.text_generation(prompt, max_new_tokens=12)
    detailed = client.text_generation(prompt, max_new_tokens=12, details=True)
    streamed = list(client.text_generation(prompt, max_new_tokens=12, stream=True, details=True))
    plain_stream = list(client.text_generation(prompt, max_new_tokens=12, stream=True))

    assert isinstance(text, str) and text == detailed.generated_text
    d = detailed.details
    assert d.finish_reason == "length" and d.generated_tokens == 12 and len(d.tokens) == 12
    assert d.seed is None  # greedy
    assert all(t.logprob <= 0.0 and np.isfinite(t.logprob) for t in d.tokens)
    assert [t.id for t in d.tokens] == [s.token.id for s in streamed]
    assert [t.text for t in d.tokens] == [s.token.text for s in streamed] == plain_stream
    assert [t.logprob for t in d.tokens] == pytest.approx([s.token.logprob for s in streamed])
    assert [s.index for s in streamed] == list(range(12))
    assert all(s.generated_text is None and s.details is None for s in streamed[:-1])
    last = streamed[-1]
    assert last.generated_text == text
    assert last.details.finish_reason == "length" and last.details.generated_tokens == 12
    assert last.details.input_length > 0


def test_max_new_tokens_and_full_text(client: InferenceClient) -> None:
    for n in (1, 5):
        out = client.text_generation(PROMPTS[1], max_new_tokens=n, details=True)
        assert out.details.generated_tokens == n and out.details.finish_reason == "length"
    short = client.text_generation(PROMPTS[1], max_new_tokens=5)
    full = client.text_generation(PROMPTS[1], max_new_tokens=5, return_full_text=True)
    assert full == PROMPTS[1] + short


def test_incremental_text_matches_decoded_text(client: InferenceClient, tokenizer) -> None:
    out = client.text_generation(PROMPTS[3], max_new_tokens=16, details=True)
    ids = [t.id for t in out.details.tokens]
    assert out.generated_text == tokenizer.decode(ids, skip_special_tokens=True)
    # text of an incomplete last character is held back, as TGI does
    assert out.generated_text.startswith("".join(t.text for t in out.details.tokens))


def test_incremental_decoder_keeps_characters_whole(tokenizer) -> None:
    text = "Café 東京 and the lizard 🦎!"
    ids = tokenizer(text)["input_ids"]
    assert len(ids) > len(text.split())  # byte-level pieces split the multi-byte characters
    decoder = IncrementalDecoder(tokenizer.decode)
    pieces = [decoder.push(i) for i in ids]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert "" in pieces  # some tokens only complete a character later
    prompt = tokenizer("The quick")["input_ids"]
    decoder = IncrementalDecoder(tokenizer.decode, context=prompt)
    assert "".join(decoder.push(i) for i in tokenizer(" brown fox")["input_ids"]) == " brown fox"


def test_stop_sequence(client: InferenceClient) -> None:
    base = client.text_generation(PROMPTS[2], max_new_tokens=16, details=True)
    pieces = [t.text for t in base.details.tokens]
    j = next(i for i in range(2, len(pieces)) if pieces[i].strip())
    stop = pieces[j]
    # the first token at which the accumulated text contains the stop sequence
    end = next(i for i in range(len(pieces)) if stop in "".join(pieces[: i + 1]))
    out = client.text_generation(PROMPTS[2], max_new_tokens=16, stop=[stop], details=True)
    assert out.details.finish_reason == "stop_sequence"
    assert out.details.generated_tokens == end + 1
    assert [t.id for t in out.details.tokens] == [t.id for t in base.details.tokens[: end + 1]]
    assert stop in out.generated_text  # TGI keeps the stop sequence
    streamed = list(
        client.text_generation(PROMPTS[2], max_new_tokens=16, stop=[stop], stream=True, details=True)
    )
    assert len(streamed) == end + 1 and streamed[-1].details.finish_reason == "stop_sequence"


def test_seeded_sampling_is_reproducible(client: InferenceClient) -> None:
    kwargs = dict(max_new_tokens=8, do_sample=True, temperature=0.8, top_k=20, seed=1234, details=True)
    a = client.text_generation(PROMPTS[0], **kwargs)
    b = client.text_generation(PROMPTS[0], **kwargs)
    assert [t.id for t in a.details.tokens] == [t.id for t in b.details.tokens]
    assert a.details.seed == 1234
    top = client.text_generation(PROMPTS[0], max_new_tokens=3, top_n_tokens=3, details=True)
    assert len(top.details.top_tokens) == 3 and all(len(step) == 3 for step in top.details.top_tokens)
    # greedy: the chosen token is the most likely one
    assert [step[0]["id"] for step in top.details.top_tokens] == [t.id for t in top.details.tokens]


def test_concurrent_clients_are_batched_and_match_sequential(server: ModelServer, client) -> None:
    lengths = [6 + 2 * i for i in range(len(PROMPTS))]  # different max_new_tokens per row
    sequential = [
        [t.id for t in client.text_generation(p, max_new_tokens=n, details=True).details.tokens]
        for p, n in zip(PROMPTS, lengths, strict=True)
    ]
    batches_before = metric(server, "chameleon_server_batch_size_count")
    singles_before = metric(server, "chameleon_server_batch_size_bucket", le="1.0")

    barrier = threading.Barrier(len(PROMPTS))
    results: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            c = InferenceClient(base_url=server.url, timeout=60)
            barrier.wait(10)
            if i % 2:  # half stream, half not: both go through the same batches
                events = list(
                    c.text_generation(PROMPTS[i], max_new_tokens=lengths[i], stream=True, details=True)
                )
                results[i] = [e.token.id for e in events]
            else:
                out = c.text_generation(PROMPTS[i], max_new_tokens=lengths[i], details=True)
                results[i] = [t.id for t in out.details.tokens]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert [results[i] for i in range(len(PROMPTS))] == sequential
    batches = metric(server, "chameleon_server_batch_size_count") - batches_before
    singles = metric(server, "chameleon_server_batch_size_bucket", le="1.0") - singles_before
    assert batches < len(PROMPTS) and singles < batches, "no batch had more than one row"


# -- raw routes -------------------------------------------------------------------------------------


def test_tgi_routes_on_one_keep_alive_connection(server: ModelServer) -> None:
    conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
    try:
        body = {"inputs": PROMPTS[5], "parameters": {"max_new_tokens": 4, "details": True}}
        conn.request("POST", "/generate", body=json.dumps(body), headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        generated = json.loads(response.read())
        assert response.status == 200
        assert response.getheader("x-generated-tokens") == "4"
        assert response.getheader("x-chameleon-adapted") == "false"
        assert generated["details"]["finish_reason"] == "length"
        assert [t["id"] for t in generated["details"]["tokens"]] and generated["details"]["prefill"] == []

        conn.request(
            "POST", "/generate_stream", body=json.dumps(body), headers={"Content-Type": "application/json"}
        )
        response = conn.getresponse()
        assert response.status == 200
        assert response.getheader("Content-Type") == "text/event-stream"
        assert response.getheader("Transfer-Encoding") == "chunked"
        events = [json.loads(line[5:]) for line in response.read().decode().split("\n\n") if line]
        assert [e["token"]["id"] for e in events] == [t["id"] for t in generated["details"]["tokens"]]
        assert events[-1]["generated_text"] == generated["generated_text"]

        # POST / without "stream" answers a list (TGI's compat route), and without details
        plain = {"inputs": PROMPTS[5], "parameters": {"max_new_tokens": 4}}
        conn.request("POST", "/", body=json.dumps(plain), headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200
        assert json.loads(response.read()) == [{"generated_text": generated["generated_text"]}]
    finally:
        conn.close()


def test_info_health_metrics(server: ModelServer) -> None:
    status, body, _ = get(server, "/info")
    info = json.loads(body)
    assert status == 200
    assert info["model_id"] == "tiny-llama" and info["model_dtype"] == "torch.float32"
    assert info["model_device_type"] == "cpu"
    assert info["max_total_tokens"] == 128 and info["max_input_tokens"] == 127
    assert info["max_batch_size"] == 32 and info["version"]
    assert info["chameleon"] == {
        "sidecar": None,
        "handle_attached": False,
        "artifact_id": None,
        "artifact_sha256": None,
        "batch_window_ms": 150.0,
        "worker_alive": True,
    }
    # what InferenceClient calls when pointed at an endpoint
    assert InferenceClient(model=server.url, provider="hf-inference").health_check()

    status, body, _ = get(server, "/health")
    assert status == 200
    status, body, response = get(server, "/metrics")
    assert status == 200 and response.getheader("Content-Type").startswith("text/plain")
    text = body.decode()
    for name in (
        "chameleon_server_requests_total",
        "chameleon_server_batch_size_bucket",
        "chameleon_server_queue_wait_seconds_bucket",
        "chameleon_server_generated_tokens_total",
        "chameleon_server_request_seconds_bucket",
        "chameleon_server_errors_total",
        "chameleon_server_http_requests_total",
    ):
        assert name in text


def test_validation_errors_and_server_keeps_serving(server: ModelServer, client: InferenceClient) -> None:
    errors_before = metric(server, "chameleon_server_errors_total", error_type="validation")
    with pytest.raises(HubValidationError, match="max_new_tokens"):
        client.text_generation(PROMPTS[0], max_new_tokens=0)
    with pytest.raises(HubValidationError, match="temperature"):
        client.text_generation(PROMPTS[0], max_new_tokens=2, temperature=0.0, stream=True)
    with pytest.raises(HubValidationError, match="max_new_tokens"):
        client.text_generation(PROMPTS[0], max_new_tokens=500)  # above max_total_tokens
    for payload, fragment in [
        ({"parameters": {"max_new_tokens": 2}}, "inputs"),
        ({"inputs": "", "parameters": {"max_new_tokens": 2}}, "empty"),
        ({"inputs": "x", "parameters": {"max_new_tokens": "two"}}, "integer"),
        ({"inputs": "x", "parameters": {"stop": ["a", "b", "c", "d", "e"]}}, "stop"),
        ({"inputs": "x", "parameters": {"best_of": 2}}, "best_of"),
        ({"inputs": "x", "parameters": {"adapter_id": "mine"}}, "adapter_id"),
    ]:
        status, body = post(server, "/generate", payload)
        assert status == 422, payload
        error = json.loads(body)
        assert error["error_type"] == "validation" and fragment in error["error"]
    status, body = post(server, "/generate", b"{not json")
    assert status == 400 and json.loads(body)["error_type"] == "validation"
    status, _ = post(server, "/nowhere", {"inputs": "x"})
    assert status == 404
    assert metric(server, "chameleon_server_errors_total", error_type="validation") >= errors_before + 9
    assert client.text_generation(PROMPTS[0], max_new_tokens=2)  # still serving


# -- batcher behaviour without HTTP ---------------------------------------------------------------


def test_rows_finish_on_their_own_eos_inside_a_batch(tokenizer) -> None:
    model = tiny_model(tokenizer, seed=3)
    probe = Batcher(model, tokenizer, batch_window_ms=0).start()
    try:
        free = probe.generate(GenerationRequest(PROMPTS[0], max_new_tokens=8), timeout=60)
    finally:
        probe.close(10)
    eos = free.token_ids[2]
    model.generation_config.eos_token_id = eos  # make the 3rd greedy token of PROMPTS[0] an EOS
    batcher = Batcher(model, tokenizer, batch_window_ms=200).start()
    try:
        solo = [batcher.generate(GenerationRequest(p, max_new_tokens=8), timeout=60) for p in PROMPTS[:3]]
        pending = [batcher.submit(GenerationRequest(p, max_new_tokens=8)) for p in PROMPTS[:3]]
        together = [p.result(60) for p in pending]
    finally:
        batcher.close(10)
    first = together[0]
    assert first.finish_reason == "eos_token" and first.token_ids[-1] == eos
    assert first.generated_tokens == free.token_ids.index(eos) + 1
    assert first.batch_size == 3
    assert [r.token_ids for r in together] == [r.token_ids for r in solo]
    assert all(r.finish_reason in ("length", "eos_token") for r in together)


def test_grouping_keeps_incompatible_settings_apart() -> None:
    def pending(**kwargs):
        return SimpleNamespace(request=GenerationRequest("x", **kwargs))

    items = [
        pending(),
        pending(do_sample=True, temperature=0.7),
        pending(max_new_tokens=3, stop=("a",)),  # greedy: batches with the first
        pending(do_sample=True, temperature=0.7, seed=1),  # seeded: alone
        pending(temperature=0.7),  # a temperature alone means sampling (TGI), same as the second
        pending(repetition_penalty=1.2),
    ]
    groups = Batcher.group(items)
    assert [[items.index(p) for p in g] for g in groups] == [[0, 2], [1, 4], [3], [5]]


class FakeHandle:
    """Stands in for an AdapterHandle: every batch is 'adapted' into two clusters, or fails when told."""

    def __init__(self) -> None:
        self.metrics = SimpleNamespace(registry=CollectorRegistry())
        self.calls = Counter("fake_plugin_batches", "batches", registry=self.metrics.registry)
        self.fail_next = False
        self.manifest = SimpleNamespace(artifact_id="fake-artifact", artifact_sha256="0" * 64)
        self.client = SimpleNamespace(address="127.0.0.1:1")
        self.rows: list[int] = []

    @contextlib.contextmanager
    def adapt(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        self.calls.inc()
        self.rows.append(input_ids.shape[0])
        assert attention_mask.shape == input_ids.shape
        assert bool((attention_mask[:, -1] == 1).all())  # left padding
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("adapter exploded")
        yield SimpleNamespace(
            adapted=True, fallback_reason=None, k=2, assignments=np.arange(input_ids.shape[0]) % 2
        )


def test_handle_is_used_and_a_failed_batch_fails_only_its_requests(tokenizer) -> None:
    handle = FakeHandle()
    with serve(tiny_model(tokenizer), tokenizer, port=0, handle=handle, batch_window_ms=0) as server:
        client = InferenceClient(base_url=server.url, timeout=60)
        _, body, _ = get(server, "/info")
        chameleon = json.loads(body)["chameleon"]
        assert chameleon["handle_attached"] and chameleon["artifact_id"] == "fake-artifact"
        assert chameleon["sidecar"] == "127.0.0.1:1"

        conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
        conn.request(
            "POST", "/generate", body=json.dumps({"inputs": "lazy", "parameters": {"max_new_tokens": 2}})
        )
        response = conn.getresponse()
        response.read()
        conn.close()
        assert response.status == 200
        assert response.getheader("x-chameleon-adapted") == "true"
        assert response.getheader("x-chameleon-cluster") == "0"

        handle.fail_next = True
        with pytest.raises(HubGenerationError, match="adapter exploded"):
            client.text_generation(PROMPTS[0], max_new_tokens=3)
        handle.fail_next = True
        with pytest.raises(HubGenerationError, match="adapter exploded"):
            list(client.text_generation(PROMPTS[0], max_new_tokens=3, stream=True))
        assert client.text_generation(PROMPTS[0], max_new_tokens=3)  # the worker survived
        assert metric(server, "chameleon_server_errors_total", error_type="generation") == 2
        assert metric(server, "fake_plugin_batches_total") == 4  # the plugin's registry is exported too
        assert metric(server, "chameleon_server_batches_total", adapted="true") >= 2


def test_tokens_stream_as_produced_and_shutdown_is_graceful(tokenizer) -> None:
    model = tiny_model(tokenizer)
    model.register_forward_pre_hook(lambda module, args: time.sleep(0.02))  # a slow model: ~20 ms a step
    server = serve(model, tokenizer, port=0, batch_window_ms=0)
    client = InferenceClient(base_url=server.url, timeout=60)
    started = time.perf_counter()
    stream = iter(client.text_generation(PROMPTS[0], max_new_tokens=50, stream=True, details=True))
    first = next(stream)
    first_at = time.perf_counter() - started
    stopper = threading.Thread(target=server.shutdown, kwargs={"grace": 30})
    stopper.start()
    deadline = time.monotonic() + 5
    while not server.batcher.closing and time.monotonic() < deadline:
        time.sleep(0.005)
    status, body = post(server, "/generate", {"inputs": "x", "parameters": {"max_new_tokens": 1}})
    rest = list(stream)
    total = time.perf_counter() - started
    stopper.join(30)
    assert not stopper.is_alive()
    assert status == 503 and json.loads(body)["error_type"] == "overloaded"  # refused while draining
    assert first.index == 0 and len(rest) == 49 and rest[-1].details.generated_tokens == 50
    assert first_at < total / 3, (first_at, total)  # the first token came long before the last
    with pytest.raises(ShuttingDown):
        server.batcher.submit(GenerationRequest("x", max_new_tokens=1))
    assert not server.batcher.is_alive()


def test_cli_defaults() -> None:
    args = build_parser().parse_args(["--model", "dir", "--sidecar", "127.0.0.1:50051"])
    assert (args.deadline_ms, args.batch_window_ms, args.max_batch_size) == (500.0, 10.0, 32)
    assert args.dtype == "float32" and args.device == "cpu" and (args.host, args.port) == ("127.0.0.1", 8080)


def test_example_client(server: ModelServer, capsys: pytest.CaptureFixture[str]) -> None:
    example = runpy.run_path(str(ROOT / "examples" / "tgi_client.py"), run_name="example")
    assert example["main"](["--url", server.url, "--prompt", PROMPTS[0], "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "plain:" in out and "finish_reason=length tokens=4" in out and "stream:" in out


def test_server_command_with_unreachable_sidecar(tmp_path: Path, tokenizer) -> None:
    """The server's `main` (`chameleon serve-model`, `examples/tgi_api_server.py`) end to end: loads a
    local directory, serves the base model when the sidecar cannot be reached, exits 0 on SIGTERM."""
    model_dir = tmp_path / "tiny"
    tiny_model(tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    command = [
        sys.executable,
        str(ROOT / "examples" / "tgi_api_server.py"),
        "--model",
        str(model_dir),
        "--port",
        "0",
        "--sidecar",
        "127.0.0.1:1",  # nothing listens there
        "--deadline-ms",
        "200",
        "--plain-logs",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
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

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 60
        while not found.wait(0.2) and proc.poll() is None and time.monotonic() < deadline:
            pass
        assert found.is_set(), "".join(lines)
        client = InferenceClient(base_url=url[0], timeout=60)
        out = client.text_generation(PROMPTS[0], max_new_tokens=3, details=True)
        assert out.details.generated_tokens == 3
        conn = http.client.HTTPConnection(url[0][len("http://") :], timeout=10)
        conn.request("GET", "/info")
        chameleon = json.loads(conn.getresponse().read())["chameleon"]
        conn.close()
        assert chameleon["sidecar"] == "127.0.0.1:1"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    reader.join(10)
    logs = "".join(lines)
    assert "shutting down" in logs
