"""A TGI-compatible HTTP model server with Chameleon adapters, on the standard library only.

    chameleon serve-model --model smollm2-135m-instruct --port 8080 --sidecar 127.0.0.1:50051

    from huggingface_hub import InferenceClient
    client = InferenceClient(base_url="http://127.0.0.1:8080")
    client.text_generation("Hello", max_new_tokens=20)                    # POST / {"stream": false}
    for token in client.text_generation("Hello", stream=True): ...       # POST / {"stream": true}

Routes (TGI's API; what `InferenceClient(base_url=URL).text_generation` sends is `POST URL` with
`{"inputs": prompt, "parameters": {...non-null...}, "stream": true|false}`):

* `POST /generate` `{"inputs", "parameters"}` -> `{"generated_text", "details"?}`; details (finish_reason,
  generated_tokens, seed, prefill: [], tokens, top_tokens?) only when `parameters.details` is true.
* `POST /generate_stream` -> server-sent events, one `data:{...}\\n\\n` per token:
  `{"index", "token": {"id", "text", "logprob", "special"}, "top_tokens", "generated_text": null,
  "details": null}`; the last one carries `generated_text` and, with `details`, `{"finish_reason",
  "generated_tokens", "input_length", "seed"}`. Chunked transfer encoding, flushed per token.
  An error after the stream started is sent as `data:{"error", "error_type"}`.
* `POST /` -> `/generate_stream` when `"stream": true`, else `/generate` wrapped in a list (as TGI).
* `GET /info` (TGI's fields plus a `chameleon` object), `GET /health` (200 while the worker runs),
  `GET /metrics` (Prometheus text: the server's registry, then the plugin's).

Errors use TGI's shape `{"error": "...", "error_type": "..."}`: 422 `validation` (bad or unsupported
parameters, too many tokens, missing `inputs`), 400 for a body that is not JSON, 429 `overloaded`
(too many requests in flight), 503 `overloaded` while shutting down, 500 `generation` when the batch
failed. `return_full_text` defaults to false on every route.

Not supported (422 when asked for): `best_of` > 1, `decoder_input_details`, `grammar`, `watermark`,
a non-zero `frequency_penalty`, `adapter_id` (Chameleon chooses adapters per batch cluster).
Logprobs are real (see `chameleon_model_server.batching`); `top_n_tokens` (<= 5) is supported.

Non-streamed answers also carry TGI's timing headers (`x-queue-time`, `x-inference-time`, ...) and
`x-chameleon-adapted`, `x-chameleon-fallback-reason`, `x-chameleon-cluster`, `x-chameleon-batch-size`;
with `details`, the same facts as `details.chameleon` (`adapted`, `cluster`, `k`, `batch`, `batch_size`,
`fallback_reason`), an extra field TGI clients keep (huggingface_hub: `out.details.chameleon`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import metadata
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest

from chameleon_model_server.batching import (
    MAX_STOP_SEQUENCES,
    MAX_TOP_N_TOKENS,
    Batcher,
    BatcherError,
    GenerationRequest,
    GenerationResult,
    PendingGeneration,
    TokenEvent,
    TopToken,
    ValidationError,
)

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 8 * 1024 * 1024
ROUTER = "chameleon-tgi"


def _version() -> str:
    try:
        return metadata.version("chameleon-adapters")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "0+unknown"


# -- request parsing ------------------------------------------------------------------------------


class BadRequest(Exception):
    def __init__(self, status: int, message: str, error_type: str = "validation") -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type


def _int(params: dict, name: str) -> int | None:
    value = params.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValidationError(f"`{name}` must be an integer, got {value!r}")
    return value


def _float(params: dict, name: str) -> float | None:
    value = params.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValidationError(f"`{name}` must be a number, got {value!r}")
    return float(value)


def _bool(params: dict, name: str) -> bool | None:
    value = params.get(name)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise ValidationError(f"`{name}` must be a boolean, got {value!r}")
    return value


def parse_generate_body(body: dict[str, Any]) -> tuple[GenerationRequest, bool]:
    """TGI's `{"inputs", "parameters"}` -> (request, details). Raises ValidationError."""
    if not isinstance(body, dict):
        raise ValidationError("the request body must be a JSON object with `inputs` and `parameters`")
    if "inputs" not in body:
        raise ValidationError(
            "Failed to deserialize the JSON body into the target type: missing field `inputs`"
        )
    inputs = body["inputs"]
    if not isinstance(inputs, str):
        raise ValidationError("`inputs` must be a string")
    params = body.get("parameters") or {}
    if not isinstance(params, dict):
        raise ValidationError("`parameters` must be a JSON object")

    best_of = _int(params, "best_of")
    if best_of is not None and best_of != 1:
        raise ValidationError("`best_of` > 1 is not supported by this server")
    if _bool(params, "decoder_input_details"):
        raise ValidationError("`decoder_input_details` is not supported by this server")
    if params.get("grammar") is not None:
        raise ValidationError("`grammar` is not supported by this server")
    if _bool(params, "watermark"):
        raise ValidationError("`watermark` is not supported by this server")
    frequency_penalty = _float(params, "frequency_penalty")
    if frequency_penalty:
        raise ValidationError("`frequency_penalty` is not supported by this server")
    adapter_id = params.get("adapter_id")
    if adapter_id not in (None, ""):
        raise ValidationError(
            "`adapter_id` is not supported: Chameleon chooses each request's adapter from its batch's "
            "clusters"
        )
    stop = params.get("stop")
    if stop is None:
        stop = []
    if not isinstance(stop, list) or any(not isinstance(s, str) for s in stop):
        raise ValidationError("`stop` must be a list of strings")
    if len(stop) > MAX_STOP_SEQUENCES:
        raise ValidationError(
            f"`stop` supports up to {MAX_STOP_SEQUENCES} stop sequences. Given: {len(stop)}"
        )
    top_n = _int(params, "top_n_tokens")
    if top_n is not None and top_n > MAX_TOP_N_TOKENS:
        raise ValidationError(f"`top_n_tokens` must be >= 0 and <= {MAX_TOP_N_TOKENS}. Given: {top_n}")

    request = GenerationRequest(
        prompt=inputs,
        max_new_tokens=_int(params, "max_new_tokens"),
        do_sample=bool(_bool(params, "do_sample")),
        temperature=_float(params, "temperature"),
        top_p=_float(params, "top_p"),
        top_k=_int(params, "top_k"),
        typical_p=_float(params, "typical_p"),
        repetition_penalty=_float(params, "repetition_penalty"),
        seed=_int(params, "seed"),
        stop=tuple(stop),
        return_full_text=bool(_bool(params, "return_full_text")),
        truncate=_int(params, "truncate"),
        top_n_tokens=top_n,
    )
    request.check()
    return request, bool(_bool(params, "details"))


# -- response bodies ------------------------------------------------------------------------------


def _token_json(token_id: int, text: str, logprob: float, special: bool) -> dict[str, Any]:
    return {"id": token_id, "text": text, "logprob": logprob, "special": special}


def _top_json(tops: tuple[TopToken, ...]) -> list[dict[str, Any]]:
    return [_token_json(t.id, t.text, t.logprob, t.special) for t in tops]


def generate_response(result: GenerationResult, details: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"generated_text": result.generated_text}
    if details:
        d: dict[str, Any] = {
            "finish_reason": result.finish_reason,
            "generated_tokens": result.generated_tokens,
            "seed": result.seed,
            "prefill": [],
            "tokens": [
                _token_json(*token)
                for token in zip(
                    result.token_ids, result.token_texts, result.logprobs, result.specials, strict=True
                )
            ],
        }
        if result.top_tokens:
            d["top_tokens"] = [_top_json(t) for t in result.top_tokens]
        d["chameleon"] = _chameleon_json(result)
        body["details"] = d
    return body


def _chameleon_json(result: GenerationResult) -> dict[str, Any]:
    """What Chameleon did to this request, inside `details` where TGI clients keep unknown fields
    (huggingface_hub exposes them as attributes); the same facts travel as x-chameleon-* headers."""
    return {
        "adapted": result.adapted,
        "cluster": result.cluster,
        "k": result.k,
        "batch": result.batch,
        "batch_size": result.batch_size,
        "fallback_reason": result.fallback_reason,
    }


def stream_event(event: TokenEvent, details: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "index": event.index,
        "token": _token_json(event.id, event.text, event.logprob, event.special),
        "top_tokens": _top_json(event.top_tokens) if event.top_tokens else None,
        "generated_text": None,
        "details": None,
    }
    final = event.final
    if final is not None:
        body["generated_text"] = final.generated_text
        if details:
            body["details"] = {
                "finish_reason": final.finish_reason,
                "generated_tokens": final.generated_tokens,
                "input_length": final.input_length,
                "seed": final.seed,
                "chameleon": _chameleon_json(final),
            }
    return body


def _result_headers(result: GenerationResult, compute_type: str) -> dict[str, str]:
    def ms(seconds: float) -> str:
        return str(round(seconds * 1000))

    per_token = result.inference_seconds / max(1, result.generated_tokens)
    return {
        "x-compute-type": compute_type,
        "x-compute-time": f"{result.inference_seconds:.6f}",
        "x-total-time": ms(result.total_seconds),
        "x-validation-time": "0",
        "x-queue-time": ms(result.queue_seconds),
        "x-inference-time": ms(result.inference_seconds),
        "x-time-per-token": ms(per_token),
        "x-prompt-tokens": str(result.input_length),
        "x-generated-tokens": str(result.generated_tokens),
        "x-chameleon-batch-size": str(result.batch_size),
        "x-chameleon-adapted": "true" if result.adapted else "false",
        "x-chameleon-fallback-reason": result.fallback_reason or "",
        "x-chameleon-cluster": "" if result.cluster is None else str(result.cluster),
    }


# -- the server -----------------------------------------------------------------------------------


class ModelServer:
    """The HTTP server, its Batcher and the optional Chameleon handle.

    `handle`: an `AdapterHandle` (`chameleon_torch.attach(...)`) or None to serve the base model.
    `port=0` binds a free port: read it from `.port` (or `.url`) after construction.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        handle: Any = None,
        host: str = "127.0.0.1",
        port: int = 8080,
        model_id: str = "local-model",
        batch_window_ms: float = 10.0,
        max_batch_size: int = 32,
        max_input_tokens: int | None = None,
        max_total_tokens: int | None = None,
        max_concurrent_requests: int = 128,
        sidecar_address: str | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.model_id = model_id
        self.handle = handle
        self.sidecar_address = sidecar_address
        if sidecar_address is None and handle is not None:
            self.sidecar_address = getattr(getattr(handle, "client", None), "address", None)
        self.registry = registry if registry is not None else CollectorRegistry()
        self.batcher = Batcher(
            model,
            tokenizer,
            handle,
            batch_window_ms=batch_window_ms,
            max_batch_size=max_batch_size,
            max_input_tokens=max_input_tokens,
            max_total_tokens=max_total_tokens,
            max_concurrent_requests=max_concurrent_requests,
            registry=self.registry,
        )
        self.http_requests = Counter(
            "chameleon_server_http_requests",
            "HTTP requests, by route and status code",
            ["route", "code"],
            registry=self.registry,
        )
        param = _first_parameter(model)
        self.dtype = str(param.dtype) if param is not None else "unknown"
        self.device_type = param.device.type if param is not None else "cpu"
        self.httpd = _HTTPServer((host, port), _Handler)
        self.httpd.app = self
        self._thread: threading.Thread | None = None
        self._active = 0
        self._active_lock = threading.Condition()
        self._stopped = False

    # -- addresses
    @property
    def host(self) -> str:
        return str(self.httpd.server_address[0])

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # -- life cycle
    def start(self) -> ModelServer:
        """Start the batcher and serve HTTP on a background thread; returns at once."""
        self.batcher.start()
        if self._thread is None:
            self._thread = threading.Thread(
                target=self.httpd.serve_forever,
                kwargs={"poll_interval": 0.2},
                name="chameleon-http",
                daemon=True,
            )
            self._thread.start()
            log.info("listening on %s (model %s)", self.url, self.model_id)
        return self

    def shutdown(self, grace: float = 30.0) -> bool:
        """Refuse new generations (503), finish the accepted ones, then stop listening.

        Returns True when everything in flight finished within `grace` seconds.
        """
        if self._stopped:
            return True
        self._stopped = True
        deadline = time.monotonic() + grace
        drained = self.batcher.close(timeout=grace)
        with self._active_lock:  # let handlers write their last bytes
            while self._active > 0 and time.monotonic() < deadline:
                self._active_lock.wait(max(0.0, deadline - time.monotonic()))
            drained = drained and self._active == 0
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join(5)
        self.httpd.server_close()
        log.info("stopped", extra={"drained": drained})
        return drained

    def __enter__(self) -> ModelServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def _enter(self) -> None:
        with self._active_lock:
            self._active += 1

    def _leave(self) -> None:
        with self._active_lock:
            self._active -= 1
            self._active_lock.notify_all()

    # -- read-only views
    def info(self) -> dict[str, Any]:
        b = self.batcher
        manifest = getattr(self.handle, "manifest", None)
        return {
            "model_id": self.model_id,
            "model_sha": None,
            "model_dtype": self.dtype,
            "model_device_type": self.device_type,
            "model_pipeline_tag": "text-generation",
            "max_concurrent_requests": b.max_concurrent_requests,
            "max_best_of": 1,
            "max_stop_sequences": MAX_STOP_SEQUENCES,
            "max_input_tokens": b.max_input_tokens,
            "max_input_length": b.max_input_tokens,  # TGI's older name
            "max_total_tokens": b.max_total_tokens,
            "max_batch_size": b.max_batch_size,
            "max_batch_total_tokens": None,
            "max_waiting_tokens": None,
            "max_client_batch_size": 1,
            "validation_workers": 1,
            "waiting_served_ratio": None,
            "router": ROUTER,
            "version": _version(),
            "sha": None,
            "docker_label": None,
            "chameleon": {
                "sidecar": self.sidecar_address,
                "handle_attached": self.handle is not None,
                "artifact_id": getattr(manifest, "artifact_id", None),
                "artifact_sha256": getattr(manifest, "artifact_sha256", None),
                "batch_window_ms": b.batch_window_s * 1000.0,
                "worker_alive": b.is_alive(),
            },
        }

    def metrics_text(self) -> bytes:
        text = generate_latest(self.registry)
        metrics = getattr(self.handle, "metrics", None)
        registry = getattr(metrics, "registry", None)
        if registry is not None:
            text += generate_latest(registry)
        return text


def build_server(model: Any, tokenizer: Any, **kwargs: Any) -> ModelServer:
    """A ModelServer bound to its port but not yet serving (call `.start()`); kwargs as ModelServer."""
    return ModelServer(model, tokenizer, **kwargs)


def serve(model: Any, tokenizer: Any, **kwargs: Any) -> ModelServer:
    """Build and start a ModelServer; `port=0` picks a free port (see `.port`). Stop with `.shutdown()`."""
    return ModelServer(model, tokenizer, **kwargs).start()


def _first_parameter(model: Any) -> Any:
    try:
        return next(model.parameters())
    except (StopIteration, AttributeError, TypeError):
        return None


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    app: ModelServer


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = f"{ROUTER}/{_version()}"
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    @property
    def app(self) -> ModelServer:
        return self.server.app

    # -- plumbing
    def _route(self) -> str:
        path = self.path.split("?", 1)[0]
        return path.rstrip("/") or "/"

    def _send(
        self, status: int, body: bytes, content_type: str, headers: dict[str, str] | None = None
    ) -> None:
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
        self.app.http_requests.labels(self._route(), str(status)).inc()

    def _json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json", headers)

    def _error(self, status: int, message: str, error_type: str) -> None:
        self._json(status, {"error": message, "error_type": error_type})

    def _reject(self, status: int, message: str, error_type: str) -> None:
        """Refuse a generation request before it reaches the batcher (counted like the batcher's refusals)."""
        metrics = self.app.batcher.metrics
        metrics.errors.labels(error_type).inc()
        metrics.requests.labels("rejected").inc()
        self._error(status, message, error_type)

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks, total = [], 0
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    break
                total += size
                if total > MAX_BODY_BYTES:
                    self.close_connection = True
                    raise BadRequest(413, f"request body above {MAX_BODY_BYTES} bytes")
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        if length < 0:
            raise ValueError("negative Content-Length")
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            raise BadRequest(413, f"request body above {MAX_BODY_BYTES} bytes")
        return self.rfile.read(length) if length else b""

    # -- GET
    def do_GET(self) -> None:
        route = self._route()
        try:
            if route == "/health":
                if self.app.batcher.is_alive():
                    self._send(200, b"", "text/plain")
                else:
                    self._error(503, "the generation worker is not running", "overloaded")
            elif route == "/info":
                self._json(200, self.app.info())
            elif route == "/metrics":
                self._send(200, self.app.metrics_text(), CONTENT_TYPE_LATEST)
            else:
                self._error(404, f"no route GET {route}", "not_found")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    do_HEAD = do_GET

    # -- POST
    def do_POST(self) -> None:
        route = self._route()
        self.app._enter()
        try:
            self._post(route)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception:  # never let a bug kill the connection silently
            log.exception("unexpected error on POST %s", route)
            self.close_connection = True
            with contextlib.suppress(OSError):
                self._error(500, "internal server error", "generation")
        finally:
            self.app._leave()

    def _post(self, route: str) -> None:
        try:
            raw = self._read_body()
        except BadRequest as exc:
            self._error(exc.status, str(exc), exc.error_type)
            return
        except ValueError:
            self.close_connection = True
            self._error(400, "malformed request body framing (Content-Length or chunks)", "validation")
            return
        if route not in ("/", "/generate", "/generate_stream"):
            self._error(404, f"no route POST {route}", "not_found")
            return
        try:
            body = json.loads(raw.decode("utf-8")) if raw else None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            self._reject(400, f"Failed to parse the request body as JSON: {exc}", "validation")
            return
        if body is None:
            self._reject(422, "the request body must be a JSON object with `inputs`", "validation")
            return
        stream = route == "/generate_stream"
        if route == "/" and isinstance(body, dict):
            flag = body.get("stream", False)
            if not isinstance(flag, bool):
                self._reject(422, "`stream` must be a boolean", "validation")
                return
            stream = flag
        try:
            request, details = parse_generate_body(body)
        except BatcherError as exc:
            self._reject(exc.status, str(exc), exc.error_type)
            return
        try:
            pending = self.app.batcher.submit(request)  # counts its own refusals
        except BatcherError as exc:
            self._error(exc.status, str(exc), exc.error_type)
            return
        if stream:
            self._stream(pending, details)
        else:
            self._respond(pending, details, as_list=route == "/")

    def _respond(self, pending: PendingGeneration, details: bool, as_list: bool) -> None:
        try:
            result = pending.result()
        except BatcherError as exc:
            self._error(exc.status, str(exc), exc.error_type)
            return
        body: Any = generate_response(result, details)
        if as_list:
            body = [body]
        self._json(200, body, _result_headers(result, self.app.device_type))

    def _stream(self, pending: PendingGeneration, details: bool) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("x-accel-buffering", "no")
        self.send_header("x-compute-type", self.app.device_type)
        self.end_headers()
        self.wfile.flush()
        status = "200"
        try:
            try:
                for event in pending:
                    self._chunk(b"data:" + json.dumps(stream_event(event, details)).encode() + b"\n\n")
            except BatcherError as exc:
                status = str(exc.status)
                self._chunk(
                    b"data:"
                    + json.dumps({"error": str(exc), "error_type": exc.error_type}).encode()
                    + b"\n\n"
                )
            self._chunk(b"")  # end of the chunked body
        except (BrokenPipeError, ConnectionResetError):
            pending.cancel()
            self.close_connection = True
            status = "499"
            log.info("client went away during a stream; its row stops at the next step")
        self.app.http_requests.labels(self._route(), status).inc()

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()


# -- command line ---------------------------------------------------------------------------------

_DTYPES = ("float32", "bfloat16", "float16")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="chameleon serve-model",
        description="Serve a causal LM over TGI's HTTP API, with Chameleon adapters when a sidecar is given.",
    )
    p.add_argument(
        "--model",
        default="smollm2-135m-instruct",
        help="local Hugging Face directory, hub id, .gguf file, or the preset smollm2-135m-instruct "
        "(the default)",
    )
    p.add_argument("--model-id", default=None, help="name reported in /info (default: --model)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080, help="0 picks a free port (logged)")
    p.add_argument("--sidecar", default=None, metavar="ADDRESS", help="adapter service address (host:port)")
    p.add_argument("--deadline-ms", type=float, default=500.0, help="per-batch deadline of the sidecar call")
    p.add_argument("--batch-window-ms", type=float, default=10.0, help="how long a batch collects requests")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-input-tokens", type=int, default=None, help="default: max-total-tokens - 1")
    p.add_argument(
        "--max-total-tokens", type=int, default=None, help="default: the model's max_position_embeddings"
    )
    p.add_argument("--max-concurrent-requests", type=int, default=128, help="more are answered 429")
    p.add_argument("--dtype", choices=_DTYPES, default="float32")
    p.add_argument(
        "--no-weights-check",
        action="store_true",
        help="attach even when the embeddings do not hash as the artifact's base model (bf16/fp16 "
        "serving matches artifacts exported since half-precision fingerprints without it)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--grace", type=float, default=30.0, help="seconds to finish in-flight requests on SIGTERM"
    )
    p.add_argument("--log-level", default="info")
    p.add_argument("--plain-logs", action="store_true", help="human-readable logs instead of JSON lines")
    return p


def _attach(model: Any, tokenizer: Any, address: str, deadline_s: float, check_weights: bool = True) -> Any:
    """Attach the plugin; returns None (base model) when that is impossible for a reason other than a
    model/artifact mismatch, which raises."""
    from adapter_service.client import AdapterClient
    from chameleon_torch import ManifestMismatch, PluginConfig, attach

    try:
        client = AdapterClient(address, timeout=deadline_s)
        config = PluginConfig(deadline_s=deadline_s, check_weights=check_weights)
        return attach(model, client, config, tokenizer=tokenizer)
    except ManifestMismatch:
        raise
    except Exception:
        log.warning(
            "could not attach to the adapter service at %s; serving the base model", address, exc_info=True
        )
        return None


def main(argv: list[str] | None = None) -> int:
    if argv and argv[0] == "--":  # `chameleon serve-model -- --model ...`
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    from adapter_service.core import logs

    logs.configure(args.log_level, json_format=not args.plain_logs)
    import torch

    from adapter_service.models.loading import load_causal_lm

    started = time.perf_counter()
    try:
        model, tokenizer = load_causal_lm(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    except (FileNotFoundError, OSError, ValueError, ImportError) as exc:
        log.error("could not load model %s: %s", args.model, exc)
        return 2
    log.info("model loaded", extra={"model": args.model, "seconds": round(time.perf_counter() - started, 2)})

    handle = None
    if args.sidecar:
        from chameleon_torch import ManifestMismatch

        try:
            handle = _attach(
                model, tokenizer, args.sidecar, args.deadline_ms / 1000.0, not args.no_weights_check
            )
        except ManifestMismatch as exc:
            log.error("%s", exc)
            return 2
    try:
        server = ModelServer(
            model,
            tokenizer,
            handle=handle,
            host=args.host,
            port=args.port,
            model_id=args.model_id or str(args.model),
            batch_window_ms=args.batch_window_ms,
            max_batch_size=args.max_batch_size,
            max_input_tokens=args.max_input_tokens,
            max_total_tokens=args.max_total_tokens,
            max_concurrent_requests=args.max_concurrent_requests,
            sidecar_address=args.sidecar,
        )
    except (OSError, ValueError) as exc:
        log.error("could not start the server: %s", exc)
        return 2

    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        log.info("received %s; shutting down", signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    crashed = False
    try:
        server.start()
        while not stop.wait(0.5):
            if not server.batcher.is_alive():
                log.error("the generation worker stopped unexpectedly")
                crashed = True
                break
        drained = server.shutdown(args.grace)
        if not drained:
            log.warning("requests still in flight after %.0f s of grace were dropped", args.grace)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if handle is not None:
            handle.detach()
    return 1 if crashed else 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
