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

Errors use TGI's shape `{"error": "...", "error_type": "..."}`, never HTML, for every refusal: 422
`validation` (bad or unsupported parameters, too many tokens, missing `inputs`), 400 for a body that is
not strict JSON (NaN or Infinity, numbers out of a float's range, unpaired surrogate escapes, nesting
deeper than MAX_JSON_DEPTH), 401 `unauthorized` without the API key, 404, 405 (with Allow), 429
`overloaded` (too many requests in flight), 503 `overloaded` while shutting down, 503 `shutdown` for a
request the shutdown's grace ran out on, 500 `generation` when the batch failed; the protocol layer's
own (400, 408, 411, 413, 414, 431; see `chameleon_model_server.connections`). Values a client sent are
clipped when an error or a log line repeats them. `return_full_text` defaults to false on every route.

Shutdown (SIGTERM, or `ModelServer.shutdown(grace)`): new generations get 503 while the accepted ones
finish; past the grace, each request still running ends with a 503 (a stream already started, with an
`error_type: "shutdown"` event), the worker stops between two decoding steps and is joined, and the
process exits normally: exiting while a thread runs inside torch would abort the interpreter.

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
import hmac
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Mapping
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
from chameleon_model_server.connections import (
    PooledHTTPServer,
    PooledRequestHandler,
    RequestError,
    clip,
)

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 8 * 1024 * 1024
MAX_JSON_DEPTH = 32  # TGI's request bodies nest 3 deep; deeper is an attack on the parser, not a request
MAX_JSON_NUMBER = 100  # digits of an integer literal
WORKER_STOP_S = 30.0  # after the grace: how long the worker may take to reach its next decoding step
FLUSH_S = 5.0  # after the worker stopped: how long handlers get to write their last bytes
ROUTER = "chameleon-tgi"


def _version() -> str:
    try:
        return metadata.version("chameleon-adapters")
    except metadata.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        return "0+unknown"


# -- request parsing ------------------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a valid JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {clip(text, 40)} is out of range")
    return value


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_JSON_NUMBER:
        raise ValueError(f"integer literal of {len(text)} digits")
    return int(text)


def parse_json(raw: bytes) -> Any:
    """A request body as JSON, strictly: UTF-8, no NaN or Infinity (Python's json accepts them, nothing
    downstream can use them), numbers that fit a float, at most MAX_JSON_DEPTH levels of nesting, no
    unpaired surrogate escapes (which no tokenizer can encode). RequestError(400) otherwise."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(
            400, f"the request body is not UTF-8: {exc.reason} at byte {exc.start}", "validation"
        ) from None
    try:
        value = json.loads(
            text, parse_constant=_reject_constant, parse_float=_finite_float, parse_int=_bounded_int
        )
    except RecursionError:
        raise RequestError(400, "the request body nests too deeply", "validation") from None
    except ValueError as exc:
        message = f"Failed to parse the request body as JSON: {clip(str(exc))}"
        raise RequestError(400, message, "validation") from None
    _check_json(value)
    return value


def _check_json(value: Any) -> None:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise RequestError(
                    400, "the request body holds an unpaired surrogate escape (\\ud800-\\udfff)", "validation"
                ) from None
        elif isinstance(item, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise RequestError(
                    400, f"the request body nests deeper than {MAX_JSON_DEPTH} levels", "validation"
                )
            items = [*item.keys(), *item.values()] if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in items)


def _int(params: dict, name: str) -> int | None:
    value = params.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValidationError(f"`{name}` must be an integer, got {clip(value, 40)}")
    return value


def _float(params: dict, name: str) -> float | None:
    value = params.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValidationError(f"`{name}` must be a number, got {clip(value, 40)}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise ValidationError(f"`{name}` must be a finite number, got {clip(value, 40)}")
    return number


def _bool(params: dict, name: str) -> bool | None:
    value = params.get(name)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise ValidationError(f"`{name}` must be a boolean, got {clip(value, 40)}")
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
    `api_key`: when set, every route but /health needs `Authorization: Bearer <api_key>` (else 401).
    Connection limits and timeouts: see `chameleon_model_server.connections`.
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
        max_new_tokens_limit: int | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
        backlog: int = 1024,
        max_connections: int = 256,
        read_timeout_s: float = 10.0,
        idle_timeout_s: float = 5.0,
        api_key: str | None = None,
        sidecar_address: str | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        if max_body_bytes < 1:
            raise ValueError("max_body_bytes must be >= 1")
        if api_key is not None and not api_key:
            raise ValueError("api_key must not be empty")
        self.model_id = model_id
        self.handle = handle
        self.sidecar_address = sidecar_address
        if sidecar_address is None and handle is not None:
            self.sidecar_address = getattr(getattr(handle, "client", None), "address", None)
        self.max_body_bytes = max_body_bytes
        self._api_key = api_key.encode() if api_key else None
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
            max_new_tokens_limit=max_new_tokens_limit,
            registry=self.registry,
        )
        self.http_requests = Counter(
            "chameleon_server_http_requests",
            "HTTP requests, by route (`other` for unknown paths) and status code",
            ["route", "code"],
            registry=self.registry,
        )
        param = _first_parameter(model)
        self.dtype = str(param.dtype) if param is not None else "unknown"
        self.device_type = param.device.type if param is not None else "cpu"
        self.httpd = _HTTPServer(
            (host, port),
            _Handler,
            backlog=backlog,
            max_connections=max_connections,
            read_timeout_s=read_timeout_s,
            idle_timeout_s=idle_timeout_s,
        )
        self.httpd.app = self
        self._started = False
        self._active = 0
        self._active_lock = threading.Condition()
        self._stopped = False
        self._hurry = threading.Event()

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
        """Start the batcher and serve HTTP on background threads; returns at once."""
        self.batcher.start()
        if not self._started:
            self._started = True
            self.httpd.start()
            log.info("listening on %s (model %s)", self.url, self.model_id)
        return self

    def hurry(self) -> None:
        """End the grace of a running `shutdown` now (a second SIGTERM)."""
        self._hurry.set()

    def shutdown(self, grace: float = 30.0) -> bool:
        """Refuse new generations (503), let the accepted ones finish for up to `grace` seconds, then end
        the rest with 503 (or a stream's error event), stop the worker between two decoding steps and stop
        listening. Returns True when everything in flight finished within the grace.

        Returns only once the worker thread has left torch (see `worker_stopped`), so that the process
        can exit normally: exiting while a thread runs inside torch aborts the interpreter."""
        if self._stopped:
            return True
        self._stopped = True
        deadline = time.monotonic() + grace
        self.httpd.begin_drain()
        self.batcher.begin_shutdown()
        drained = True
        while not self.batcher.join(min(0.1, max(0.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline or self._hurry.is_set():
                drained = False
                break
        if not drained:
            left = self.batcher.in_flight
            log.warning("grace of %.1f s over: ending %d requests still in flight with 503", grace, left)
            self.batcher.abort()
            if not self.batcher.join(WORKER_STOP_S):
                log.error("the generation worker did not stop within %.0f s of the abort", WORKER_STOP_S)
        # let handlers write their last bytes (answers, or the 503s of an abort)
        flush_until = max(deadline, time.monotonic() + FLUSH_S) if drained else time.monotonic() + FLUSH_S
        with self._active_lock:
            while self._active > 0 and time.monotonic() < flush_until:
                self._active_lock.wait(max(0.0, flush_until - time.monotonic()))
            drained = drained and self._active == 0
        if self._started:
            self.httpd.close(FLUSH_S)
        else:
            self.httpd.server_close()
        log.info("stopped", extra={"drained": drained})
        return drained

    @property
    def worker_stopped(self) -> bool:
        """The generation worker is not running (never started, or ended)."""
        return not self.batcher.worker_running

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

    def authorized(self, header: str | None) -> bool:
        """Whether an Authorization header carries the API key (always, without a key)."""
        if self._api_key is None:
            return True
        scheme, _, token = (header or "").strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(token.strip().encode("utf-8", "surrogateescape"), self._api_key)

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


class _HTTPServer(PooledHTTPServer):
    app: ModelServer


# route -> the methods it answers (anything else: 405 with Allow)
ROUTES: dict[str, tuple[str, ...]] = {
    "/": ("POST",),
    "/generate": ("POST",),
    "/generate_stream": ("POST",),
    "/health": ("GET", "HEAD"),
    "/info": ("GET", "HEAD"),
    "/metrics": ("GET", "HEAD"),
}
OPEN_ROUTES = frozenset({"/health"})  # answered without the API key (load balancers, probes)


class _Handler(PooledRequestHandler):
    server_version = f"{ROUTER}/{_version()}"
    server: _HTTPServer

    @property
    def app(self) -> ModelServer:
        return self.server.app

    # -- plumbing
    def _route(self) -> str:
        path = (self.path or "").split("?", 1)[0]
        return path.rstrip("/") or "/"

    def on_response(self, status: int) -> None:
        route = self._route()
        self.app.http_requests.labels(route if route in ROUTES else "other", str(status)).inc()

    def _reject(self, status: int, message: str, error_type: str) -> None:
        """Refuse a generation request before it reaches the batcher (counted like the batcher's refusals)."""
        metrics = self.app.batcher.metrics
        metrics.errors.labels(error_type).inc()
        metrics.requests.labels("rejected").inc()
        self.respond_error(status, message, error_type)

    def dispatch(self) -> None:
        route = self._route()
        allowed = ROUTES.get(route)
        try:
            if route not in OPEN_ROUTES and not self.app.authorized(self.headers.get("Authorization")):
                self.close_connection = True
                self.respond_error(
                    401, "missing or wrong API key (Authorization: Bearer ...)", "unauthorized",
                    {"WWW-Authenticate": "Bearer"},
                )  # fmt: skip
            elif allowed is None:
                self.respond_error(404, f"no route {clip(self.command)} {clip(route)}", "not_found")
            elif self.command not in allowed:
                self.respond_error(
                    405, f"{clip(self.command)} is not allowed on {route}", "method_not_allowed",
                    {"Allow": ", ".join(allowed)},
                )  # fmt: skip
            elif self.command == "POST":
                self._do_post(route)
            else:
                self._do_get(route)
        except OSError:  # the client went away, or stopped reading
            self.close_connection = True

    # -- GET
    def _do_get(self, route: str) -> None:
        if route == "/health":
            if self.app.batcher.is_alive():
                self.respond(200, b"", "text/plain")
            else:
                self.respond_error(503, "the generation worker is not running", "overloaded")
        elif route == "/info":
            self.respond_json(200, self.app.info())
        else:
            self.respond(200, self.app.metrics_text(), CONTENT_TYPE_LATEST)

    # -- POST
    def _do_post(self, route: str) -> None:
        self.app._enter()
        try:
            self._post(route)
        except OSError:
            self.close_connection = True
        except Exception:  # never let a bug kill the connection silently
            log.exception("unexpected error on POST %s", clip(route))
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.respond_error(500, "internal server error", "generation")
        finally:
            self.app._leave()

    def _post(self, route: str) -> None:
        try:
            raw = self.read_body(self.app.max_body_bytes)
        except RequestError as exc:
            if exc.close:
                self.close_connection = True
            self.respond_error(exc.status, str(exc), exc.error_type)
            return
        try:
            body = parse_json(raw) if raw else None
        except RequestError as exc:
            self._reject(exc.status, str(exc), exc.error_type)
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
            self.respond_error(exc.status, str(exc), exc.error_type)
            return
        if stream:
            self._stream(pending, details)
        else:
            self._respond(pending, details, as_list=route == "/")

    def _respond(self, pending: PendingGeneration, details: bool, as_list: bool) -> None:
        try:
            result = pending.result()
        except BatcherError as exc:
            self.respond_error(exc.status, str(exc), exc.error_type)
            return
        body: Any = generate_response(result, details)
        if as_list:
            body = [body]
        self.respond_json(200, body, _result_headers(result, self.app.device_type))

    def _stream(self, pending: PendingGeneration, details: bool) -> None:
        chunked = self.request_version == "HTTP/1.1"  # an HTTP/1.0 client reads until the connection closes
        if not chunked or self.server.draining:
            self.close_connection = True
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        if self.close_connection:
            self.send_header("Connection", "close")
        self.send_header("x-accel-buffering", "no")
        self.send_header("x-compute-type", self.app.device_type)
        self.end_headers()
        write = self._chunk if chunked else self.wfile.write
        status = 200
        try:
            try:
                for event in pending:
                    write(b"data:" + json.dumps(stream_event(event, details)).encode() + b"\n\n")
            except BatcherError as exc:
                status = exc.status
                error = {"error": clip(str(exc), 800), "error_type": exc.error_type}
                write(b"data:" + json.dumps(error).encode() + b"\n\n")
            if chunked:
                self._chunk(b"")  # end of the chunked body
        except OSError:  # gone, reset, or not reading within the write timeout
            pending.cancel()
            self.close_connection = True
            status = 499
            log.info("client went away during a stream; its row stops at the next step")
        self.on_response(status)

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")


# -- command line ---------------------------------------------------------------------------------

_DTYPES = ("float32", "bfloat16", "float16")
API_KEY_ENV = "CHAMELEON_API_KEY_FILE"
# ClientSecurity field -> its serve-model flag (the CHAMELEON_* variables are the defaults)
SIDECAR_SECURITY_FLAGS = {
    "ca_file": "--sidecar-tls-ca",
    "cert_file": "--sidecar-tls-cert",
    "key_file": "--sidecar-tls-key",
    "token_file": "--sidecar-token-file",
    "server_name": "--sidecar-tls-server-name",
}
SIDECAR_SECURITY_ENV = {
    "ca_file": "CHAMELEON_TLS_CA",
    "cert_file": "CHAMELEON_TLS_CERT",
    "key_file": "CHAMELEON_TLS_KEY",
    "token_file": "CHAMELEON_AUTH_TOKEN_FILE",
    "server_name": "CHAMELEON_TLS_SERVER_NAME",
}


def _positive(kind: type, zero: bool = False) -> Any:
    """An argparse type: a finite number > 0 (>= 0 with `zero`); NaN would make a deadline never pass."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or value < 0 or (value == 0 and not zero):
            wanted = "non-negative" if zero else "positive"
            raise argparse.ArgumentTypeError(f"expected a {wanted} {kind.__name__}, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


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
    p.add_argument(
        "--sidecar",
        default=None,
        metavar="ADDRESS",
        help="adapter service address: host:port, unix:PATH, or a gRPC target naming several replicas "
        "(dns:///name:port, ipv4:a:p,b:p)",
    )
    p.add_argument("--deadline-ms", type=float, default=500.0, help="per-batch deadline of the sidecar call")
    p.add_argument("--batch-window-ms", type=float, default=10.0, help="how long a batch collects requests")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-input-tokens", type=int, default=None, help="default: max-total-tokens - 1")
    p.add_argument(
        "--max-total-tokens", type=int, default=None, help="default: the model's max_position_embeddings"
    )
    p.add_argument(
        "--max-new-tokens-limit",
        type=_positive(int),
        default=None,
        help="largest max_new_tokens a request may ask for (422 above; default: only --max-total-tokens "
        "bounds it)",
    )
    p.add_argument(
        "--max-concurrent-requests", type=_positive(int), default=128, help="more are answered 429"
    )
    p.add_argument("--dtype", choices=_DTYPES, default="float32")
    p.add_argument(
        "--no-weights-check",
        action="store_true",
        help="attach even when the embeddings do not hash as the artifact's base model (bf16/fp16 "
        "serving matches artifacts exported since half-precision fingerprints without it)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--grace",
        type=_positive(float, zero=True),
        default=30.0,
        help="seconds to finish in-flight requests on SIGTERM; then they end with 503 (a second SIGTERM "
        "ends the grace at once)",
    )

    http = p.add_argument_group("HTTP connections")
    http.add_argument(
        "--backlog",
        type=_positive(int),
        default=1024,
        help="listen backlog: connections waiting for a worker",
    )
    http.add_argument(
        "--max-connections",
        type=_positive(int),
        default=256,
        help="connections served at once (one thread each); more wait in the backlog",
    )
    http.add_argument(
        "--read-timeout-s",
        type=_positive(float),
        default=10.0,
        help="time to send the request line and headers, and again the body (408 after it)",
    )
    http.add_argument(
        "--idle-timeout-s",
        type=_positive(float),
        default=5.0,
        help="how long a connection may wait before its next request",
    )
    http.add_argument(
        "--max-body-bytes", type=_positive(int), default=MAX_BODY_BYTES, help="larger bodies are answered 413"
    )
    http.add_argument(
        "--api-key-file",
        default=None,
        metavar="FILE",
        help=f"file holding an API key that every route but /health requires as 'Authorization: Bearer "
        f"<key>' (default: ${API_KEY_ENV}; never put the key itself on the command line)",
    )

    sidecar = p.add_argument_group(
        "sidecar security",
        "TLS, mutual TLS and a bearer token towards --sidecar; each defaults to its variable",
    )
    sidecar.add_argument(
        "--sidecar-tls-ca",
        metavar="FILE",
        help="PEM CA of the sidecar's certificate: TLS on ($CHAMELEON_TLS_CA)",
    )
    sidecar.add_argument(
        "--sidecar-tls-cert", metavar="FILE", help="PEM client certificate, mutual TLS ($CHAMELEON_TLS_CERT)"
    )
    sidecar.add_argument(
        "--sidecar-tls-key", metavar="FILE", help="PEM key of --sidecar-tls-cert ($CHAMELEON_TLS_KEY)"
    )
    sidecar.add_argument(
        "--sidecar-token-file",
        metavar="FILE",
        help="file holding the sidecar's bearer token ($CHAMELEON_AUTH_TOKEN_FILE)",
    )
    sidecar.add_argument(
        "--sidecar-tls-server-name",
        metavar="NAME",
        help="TLS name to verify instead of the host ($CHAMELEON_TLS_SERVER_NAME)",
    )
    p.add_argument("--log-level", default="info")
    p.add_argument("--plain-logs", action="store_true", help="human-readable logs instead of JSON lines")
    return p


def read_api_key(path: str) -> str:
    """The API key in `path` (surrounding whitespace removed); ValueError when unreadable, empty or not one
    printable ASCII token."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise ValueError(f"API key file {path!r}: {exc.strerror or exc}") from exc
    try:
        key = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise ValueError(f"API key file {path!r} is not ASCII") from None
    if not key or any(not c.isprintable() or c.isspace() for c in key):
        raise ValueError(f"API key file {path!r} must hold one key (no whitespace inside)")
    return key


def sidecar_security(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> Any:
    """The `ClientSecurity` towards the sidecar from the --sidecar-* flags, each defaulting to its
    CHAMELEON_* variable; None when nothing is set. ValueError names the flag or variable at fault."""
    from adapter_service.client import ClientSecurity

    flags = {
        field: getattr(args, flag[2:].replace("-", "_")) for field, flag in SIDECAR_SECURITY_FLAGS.items()
    }
    if all(value is None for value in flags.values()):
        security = ClientSecurity.from_env(environ)  # its errors name the variables
    else:
        values = {
            field: flag
            if flag is not None
            else (environ.get(SIDECAR_SECURITY_ENV[field]) or "").strip() or None
            for field, flag in flags.items()
        }
        try:
            security = ClientSecurity(**values)
        except ValueError as exc:  # its errors name the fields: name the flags and variables instead
            message = str(exc)
            for field, flag in SIDECAR_SECURITY_FLAGS.items():
                message = message.replace(field, f"{flag} (or ${SIDECAR_SECURITY_ENV[field]})")
            raise ValueError(message) from None
    if all(getattr(security, field) is None for field in SIDECAR_SECURITY_FLAGS):
        return None
    return security


def _attach(
    model: Any,
    tokenizer: Any,
    address: str,
    deadline_s: float,
    check_weights: bool = True,
    security: Any = None,
) -> Any:
    """Attach the plugin; returns None (base model) when that is impossible for a reason other than a
    model/artifact mismatch, which raises."""
    from adapter_service.client import AdapterClient
    from chameleon_torch import ManifestMismatch, PluginConfig, attach

    try:
        client = AdapterClient(address, timeout=deadline_s, security=security)
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

    api_key = None
    key_file = args.api_key_file or os.environ.get(API_KEY_ENV) or None
    security = None
    try:
        if key_file:
            api_key = read_api_key(key_file)
        if args.sidecar:
            security = sidecar_security(args)
            if security is not None:
                security.warn_if_exposed(args.sidecar)
    except ValueError as exc:
        log.error("%s", exc)
        return 2

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
                model, tokenizer, args.sidecar, args.deadline_ms / 1000.0, not args.no_weights_check, security
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
            max_new_tokens_limit=args.max_new_tokens_limit,
            max_body_bytes=args.max_body_bytes,
            backlog=args.backlog,
            max_connections=args.max_connections,
            read_timeout_s=args.read_timeout_s,
            idle_timeout_s=args.idle_timeout_s,
            api_key=api_key,
            sidecar_address=args.sidecar,
        )
    except (OSError, ValueError) as exc:
        log.error("could not start the server: %s", exc)
        return 2

    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        if stop.is_set():
            log.info("received %s again; ending the grace now", signal.Signals(signum).name)
            server.hurry()
            return
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
            log.warning("requests still in flight after %.1f s of grace were ended with 503", args.grace)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if handle is not None:
            handle.detach()
    if not server.worker_stopped:
        # Returning would run the interpreter's exit while the worker is inside torch, which aborts the
        # process (SIGABRT, "terminate called without an active exception"): leave without it.
        log.error("the generation worker is still inside the model; exiting without interpreter clean-up")
        logging.shutdown()
        os._exit(1)
    return 1 if crashed else 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
