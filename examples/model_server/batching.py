"""Batching of concurrent generation requests for one model, on ONE worker thread.

    batcher = Batcher(model, tokenizer, handle=None, batch_window_ms=10, max_batch_size=32).start()
    pending = batcher.submit(GenerationRequest("Hello", max_new_tokens=20))
    for event in pending:               # TokenEvent per generated token, as it is produced
        print(event.text, end="")
    result = pending.result()           # GenerationResult: ids, texts, finish_reason, batch info
    batcher.close()                     # finish what was accepted, refuse new requests

How requests become batches
---------------------------
The worker takes the first waiting request, then keeps collecting for up to `batch_window_ms` or until
`max_batch_size` requests are in hand. The collected requests are split into groups that can share
one `model.generate` call, and each group runs as one batch (groups run one after the other, in order
of arrival). A request that arrives while a batch runs waits for it to end and joins the next one
(batches are formed per window, not per decoding step):

* greedy requests (no sampling) share a batch when their `repetition_penalty` is equal;
* sampling requests without a seed share a batch when temperature, top_k, top_p, typical_p and
  repetition_penalty are all equal; the batch is seeded once (a fresh random seed);
* a sampling request with its own `seed` always runs alone, so that the seed reproduces its output
  whatever else is being served (one `generate` call has one random generator, not one per row).

Within a batch, everything else may differ per row: prompt and its length (left padding),
`max_new_tokens` (generate runs for the largest; each row stops counting at its own), stop
sequences, `return_full_text`, `truncate`, `top_n_tokens`. Each batch enters the plugin's
`handle.adapt(input_ids, attention_mask)` once, so the Chameleon sidecar sees exactly the rows that
run together, and every row reports the batch's fallback reason and its own cluster.

How rows finish
---------------
A `_RowTracker` is both the batch's streamer (`put` / `end`, as transformers calls them) and a
per-row `StoppingCriteria`. Each generation step's tokens are consumed once, by whichever of the two
transformers calls first (the order differs between versions and devices), and routed to their
request as a `TokenEvent`. A row is finished by its own EOS token ("eos_token"), its own
`max_new_tokens` ("length") or a stop sequence appearing in its text ("stop_sequence"; the text
keeps the stop sequence, as TGI does). From then on its tokens are ignored, its result is delivered
at once (it does not wait for the rest of the batch), and the stopping criterion reports the row as
done, so transformers pads it and ends `generate` as soon as every row is done. A client that goes
away (`PendingGeneration.cancel()`) finishes its row the same way.

Logprobs are real: a logits processor placed after the sampling warpers keeps the log-softmax of
the scores each token was chosen from (greedy: of the logits after repetition penalty; sampling: of
the warped distribution, as TGI reports them). Token texts are decoded incrementally (TGI's
prefix/read offsets), so a character split over several byte-level tokens appears whole, on the
token that completes it.

Known limits: a repetition penalty also sees a row's left padding (the pad token is penalised only
in padded rows), so penalised outputs may differ slightly between batched and solo runs; greedy
outputs without penalty are the same batched or alone.

Errors in one batch fail only that batch's unfinished requests (`GenerationError`); the worker
thread keeps serving.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import queue
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

log = logging.getLogger(__name__)

FINISH_REASONS = ("length", "eos_token", "stop_sequence")
DEFAULT_MAX_NEW_TOKENS = 100  # TGI's and InferenceClient's documented default
MAX_STOP_SEQUENCES = 4  # TGI's default --max-stop-sequences
MAX_TOP_N_TOKENS = 5  # TGI's default --max-top-n-tokens
# Below this, a temperature or repetition penalty divides logits into infinities and fails the batch.
MIN_DIVISOR = 1e-4
_DECODE_CONTEXT = 5  # prompt tokens kept as context for incremental decoding (as TGI)


# -- errors ---------------------------------------------------------------------------------------


class BatcherError(Exception):
    """Base of the errors a request can get; `error_type` and `status` follow TGI."""

    error_type = "generation"
    status = 500


class ValidationError(BatcherError, ValueError):
    """The request is malformed or out of the server's limits (HTTP 422)."""

    error_type = "validation"
    status = 422


class Overloaded(BatcherError):
    """Too many requests in flight (HTTP 429)."""

    error_type = "overloaded"
    status = 429


class ShuttingDown(BatcherError):
    """The server is draining and accepts no new request (HTTP 503)."""

    error_type = "overloaded"
    status = 503


class GenerationError(BatcherError):
    """The batch this request ran in failed (HTTP 500)."""

    error_type = "generation"
    status = 500


class Aborted(BatcherError):
    """The server stopped before this request finished: its drain outlasted the grace (HTTP 503)."""

    error_type = "shutdown"
    status = 503


# -- requests and results -------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt and its generation parameters (TGI's names and meanings)."""

    prompt: str
    max_new_tokens: int | None = None  # None: DEFAULT_MAX_NEW_TOKENS, capped by max_total_tokens
    do_sample: bool = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    typical_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    return_full_text: bool = False
    truncate: int | None = None  # keep only the last `truncate` prompt tokens
    top_n_tokens: int | None = None  # also report the n most likely tokens at each step

    @property
    def sampling(self) -> bool:
        """TGI's rule: sampling when asked, or when any sampling warper is set to a non-neutral value."""
        return bool(
            self.do_sample
            or (self.temperature is not None and self.temperature != 1.0)
            or (self.top_k is not None and self.top_k != 0)
            or (self.top_p is not None and self.top_p < 1.0)
            or (self.typical_p is not None and self.typical_p < 1.0)
        )

    def check(self) -> None:
        """Raise ValidationError (TGI's messages where TGI has one) for values out of range."""
        if not isinstance(self.prompt, str):
            raise ValidationError("`inputs` must be a string")
        if self.prompt == "":
            raise ValidationError("`inputs` cannot be empty")
        if self.max_new_tokens is not None and self.max_new_tokens <= 0:
            raise ValidationError("`max_new_tokens` must be strictly positive")
        for name in ("temperature", "top_p", "typical_p", "repetition_penalty"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValidationError(f"`{name}` must be a finite number")
        if self.temperature is not None and self.temperature <= 0:
            raise ValidationError("`temperature` must be strictly positive")
        if self.temperature is not None and self.temperature < MIN_DIVISOR:
            raise ValidationError(f"`temperature` must be >= {MIN_DIVISOR}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValidationError("`top_p` must be > 0.0 and <= 1.0")
        if self.top_k is not None and self.top_k <= 0:
            raise ValidationError("`top_k` must be strictly positive")
        if self.typical_p is not None and not 0.0 < self.typical_p <= 1.0:
            raise ValidationError("`typical_p` must be > 0.0 and <= 1.0")
        if self.repetition_penalty is not None and self.repetition_penalty <= 0:
            raise ValidationError("`repetition_penalty` must be strictly positive")
        if self.repetition_penalty is not None and self.repetition_penalty < MIN_DIVISOR:
            raise ValidationError(f"`repetition_penalty` must be >= {MIN_DIVISOR}")
        if self.truncate is not None and self.truncate <= 0:
            raise ValidationError("`truncate` must be strictly positive")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise ValidationError("`seed` must be an integer in [0, 2^64)")
        if len(self.stop) > MAX_STOP_SEQUENCES:
            raise ValidationError(
                f"`stop` supports up to {MAX_STOP_SEQUENCES} stop sequences. Given: {len(self.stop)}"
            )
        if any(not isinstance(s, str) or s == "" for s in self.stop):
            raise ValidationError("`stop` sequences must be non-empty strings")
        if self.top_n_tokens is not None and not 0 <= self.top_n_tokens <= MAX_TOP_N_TOKENS:
            raise ValidationError(f"`top_n_tokens` must be >= 0 and <= {MAX_TOP_N_TOKENS}")


@dataclass(frozen=True)
class TopToken:
    id: int
    text: str
    logprob: float
    special: bool


@dataclass(frozen=True)
class TokenEvent:
    """One generated token; `final` is set on the request's last token."""

    index: int  # 0-based position among the request's generated tokens
    id: int
    text: str  # incremental text; "" while a multi-token character is incomplete
    logprob: float
    special: bool
    top_tokens: tuple[TopToken, ...] = ()
    final: GenerationResult | None = None


@dataclass(frozen=True)
class GenerationResult:
    generated_text: str  # prompt + text when return_full_text
    token_ids: tuple[int, ...]
    token_texts: tuple[str, ...]
    logprobs: tuple[float, ...]
    specials: tuple[bool, ...]
    top_tokens: tuple[tuple[TopToken, ...], ...]  # empty unless top_n_tokens was asked
    finish_reason: str  # "length" | "eos_token" | "stop_sequence"
    seed: int | None  # the seed that reproduces this output when sent again (sampling only)
    input_length: int  # prompt tokens (after truncation)
    batch_size: int  # rows of the generate call this request ran in
    batch: int  # which generate call (a counter per server): equal numbers ran together
    adapted: bool  # the batch ran with Chameleon adapters
    fallback_reason: str | None  # why not, when a handle is attached
    cluster: int | None  # this row's cluster in the batch, when adapted
    k: int  # clusters in the batch
    queue_seconds: float
    inference_seconds: float  # batch start to this row's end
    total_seconds: float  # submit to this row's end

    @property
    def generated_tokens(self) -> int:
        return len(self.token_ids)


_DONE = object()


class PendingGeneration:
    """What `Batcher.submit` returns: iterate it for TokenEvents, or wait on `result()`. Both may be used."""

    def __init__(self, request: GenerationRequest, input_ids: list[int], max_new_tokens: int) -> None:
        self.request = request
        self.input_ids = input_ids
        self.max_new_tokens = max_new_tokens
        self.submitted = time.perf_counter()
        self.started: float | None = None
        self._events: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._done = threading.Event()
        self._result: GenerationResult | None = None
        self._error: BatcherError | None = None
        self.cancelled = False

    # -- consumer side
    def __iter__(self) -> Iterator[TokenEvent]:
        while True:
            item = self._events.get()
            if item is _DONE:
                if self._error is not None:
                    raise self._error
                return
            yield item

    def result(self, timeout: float | None = None) -> GenerationResult:
        if not self._done.wait(timeout):
            raise TimeoutError("generation still running")
        if self._error is not None:
            raise self._error
        if self._result is None:  # cancelled
            raise GenerationError("request was cancelled")
        return self._result

    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Stop generating for this request (the client went away); its row finishes at the next step."""
        self.cancelled = True

    # -- worker side
    def _emit(self, event: TokenEvent) -> None:
        self._events.put(event)

    def _finish(self, result: GenerationResult | None, error: BatcherError | None = None) -> None:
        if self._done.is_set():
            return
        self._result, self._error = result, error
        self._done.set()
        self._events.put(_DONE)


# -- metrics --------------------------------------------------------------------------------------


class ServerMetrics:
    """Prometheus metrics of the model server, in their own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "chameleon_server_requests",
            "Generation requests that ended, by outcome (a finish reason, error, rejected or cancelled)",
            ["outcome"],
            registry=r,
        )
        self.errors = Counter(
            "chameleon_server_errors", "Requests refused or failed, by error type", ["error_type"], registry=r
        )
        self.batch_size = Histogram(
            "chameleon_server_batch_size",
            "Rows per generate call",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.batches = Counter(
            "chameleon_server_batches",
            "Generate calls, by whether adapters were applied",
            ["adapted"],
            registry=r,
        )
        self.queue_wait = Histogram(
            "chameleon_server_queue_wait_seconds",
            "Submit to start of the request's batch",
            buckets=(0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0),
            registry=r,
        )
        self.latency = Histogram(
            "chameleon_server_request_seconds",
            "Submit to the request's last token",
            buckets=(0.01, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 60.0, 120.0),
            registry=r,
        )
        self.batch_seconds = Histogram(
            "chameleon_server_batch_seconds",
            "Wall time of one batch (adapt + generate)",
            buckets=(0.01, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 60.0, 120.0),
            registry=r,
        )
        self.generated_tokens = Counter(
            "chameleon_server_generated_tokens", "Tokens generated for requests", registry=r
        )
        self.prompt_tokens = Counter(
            "chameleon_server_prompt_tokens", "Prompt tokens of requests", registry=r
        )
        self.in_flight = Gauge(
            "chameleon_server_requests_in_flight", "Requests accepted and not yet finished", registry=r
        )
        for outcome in (*FINISH_REASONS, "error", "rejected", "cancelled"):
            self.requests.labels(outcome)
        for error_type in ("validation", "overloaded", "generation"):
            self.errors.labels(error_type)
        for adapted in ("true", "false"):
            self.batches.labels(adapted)


# -- the per-batch streamer / stopping criterion --------------------------------------------------


class IncrementalDecoder:
    """Text of each new token, emitted only once complete (TGI's prefix/read offsets).

    A character split over several byte-level tokens yields "" for the first ones and the whole
    character with the token that completes it; a few prompt tokens serve as context, so tokenizers
    that mark word starts (SentencePiece's leading space) decode the first token right.
    """

    def __init__(self, decode: Callable[[list[int]], str], context: Sequence[int] = ()) -> None:
        self._decode = decode
        self.ids = list(context)
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix) :]
        return ""


@dataclass
class _Row:
    pending: PendingGeneration
    stop: tuple[str, ...]
    max_new_tokens: int
    decoder: IncrementalDecoder
    top_n: int
    position: int  # row index in the batch (and in the adapter assignments)
    ids: list[int] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    specials: list[bool] = field(default_factory=list)
    tops: list[tuple[TopToken, ...]] = field(default_factory=list)
    text: str = ""
    finished: bool = False


@dataclass
class _BatchInfo:
    size: int
    seed: int | None
    number: int = 0  # the worker's batch counter, to tell which requests ran together
    adapted: bool = False
    fallback_reason: str | None = None
    assignments: Any = None
    k: int = 0
    started: float = 0.0


class _RowTracker:
    """Streamer (`put` / `end`) and per-row StoppingCriteria of one batch; see the module docstring."""

    def __init__(self, batcher: Batcher, rows: list[_Row], prompt_len: int, info: _BatchInfo) -> None:
        self.batcher = batcher
        self.rows = rows
        self.prompt_len = prompt_len
        self.info = info
        self.consumed = 0  # generation steps already routed
        self.puts = 0
        self.logprobs: torch.Tensor | None = None  # [B, V] log-softmax of the scores of the current step
        self.need_top = max(r.top_n for r in rows)

    # logits processor (last in the list): keep what the next token is chosen from
    def record(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.logprobs = torch.log_softmax(scores.float(), dim=-1)
        return scores

    # streamer
    def put(self, value: torch.Tensor) -> None:
        self.puts += 1
        if self.puts == 1:  # the prompt
            return
        step = self.puts - 1
        if step > self.consumed:
            self._consume(value.reshape(-1), step)

    def end(self) -> None:
        pass  # rows still open when generate returns are closed by the batcher

    # stopping criterion: [B] bool, True where the row is done
    def __call__(self, input_ids: torch.Tensor, scores: Any = None, **kwargs: Any) -> torch.Tensor:
        if self.batcher.aborted:  # stop between two decoding steps: the server is going away
            for row in self.rows:
                if not row.finished:
                    row.finished = True
                    self.batcher._fail(row.pending, Aborted(ABORTED_MESSAGE))
            return torch.ones(len(self.rows), dtype=torch.bool, device=input_ids.device)
        step = input_ids.shape[1] - self.prompt_len
        if step > self.consumed:
            self._consume(input_ids[:, -1], step)
        done = [r.finished for r in self.rows]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    def _consume(self, tokens: torch.Tensor, step: int) -> None:
        self.consumed = step
        open_rows = [i for i, r in enumerate(self.rows) if not r.finished]
        if not open_rows:
            return
        tokens = tokens.to("cpu")
        token_list = tokens.tolist()
        logprob_list: list[float] | None = None
        top_ids = top_lps = None
        if self.logprobs is not None:
            lp = self.logprobs
            chosen = lp.gather(1, tokens.to(lp.device).view(-1, 1)).view(-1)
            logprob_list = chosen.cpu().tolist()
            if self.need_top:
                values, indices = lp.topk(self.need_top, dim=-1)
                top_lps, top_ids = values.cpu().tolist(), indices.cpu().tolist()
        for i in open_rows:
            row = self.rows[i]
            if row.pending.cancelled:
                row.finished = True
                self.batcher._deliver(row, self.info, None)
                continue
            token = int(token_list[i])
            logprob = float(logprob_list[i]) if logprob_list is not None else 0.0
            tops: tuple[TopToken, ...] = ()
            if row.top_n and top_ids is not None:
                tops = tuple(
                    self.batcher._top_token(tid, tlp)
                    for tid, tlp in zip(top_ids[i][: row.top_n], top_lps[i][: row.top_n], strict=True)
                )
            self.batcher._advance(row, token, logprob, tops, self.info)


# -- the batcher ----------------------------------------------------------------------------------

_STOP = object()
ABORTED_MESSAGE = "the server shut down before this request finished"


class Batcher:
    """Owns the model, its tokenizer, the optional Chameleon handle and the one worker thread.

    `handle`: an `AdapterHandle` from `chameleon_torch.attach` or None (base model). The tokenizer is
    set to left padding, with eos as pad token when it has none.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        handle: Any = None,
        *,
        batch_window_ms: float = 10.0,
        max_batch_size: int = 32,
        max_input_tokens: int | None = None,
        max_total_tokens: int | None = None,
        max_concurrent_requests: int = 128,
        max_new_tokens_limit: int | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if max_new_tokens_limit is not None and max_new_tokens_limit < 1:
            raise ValueError("max_new_tokens_limit must be >= 1")
        self.max_new_tokens_limit = max_new_tokens_limit
        if batch_window_ms < 0:
            raise ValueError("batch_window_ms must be >= 0")
        self.model = model
        self.tokenizer = tokenizer
        self.handle = handle
        self.batch_window_s = batch_window_ms / 1000.0
        self.max_batch_size = max_batch_size
        self.max_concurrent_requests = max_concurrent_requests
        self.metrics = ServerMetrics(registry)

        positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        self.max_total_tokens = int(max_total_tokens or positions or 4096)
        self.max_input_tokens = int(max_input_tokens or self.max_total_tokens - 1)
        if not 0 < self.max_input_tokens < self.max_total_tokens:
            raise ValueError(
                f"need 0 < max_input_tokens ({self.max_input_tokens}) < max_total_tokens "
                f"({self.max_total_tokens})"
            )

        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            if tokenizer.eos_token is None:
                raise ValueError("the tokenizer has neither a pad nor an eos token to pad with")
            tokenizer.pad_token = tokenizer.eos_token
        self.pad_token_id = int(tokenizer.pad_token_id)
        self.eos_token_ids = self._eos_ids(model, tokenizer)
        self.special_ids = frozenset(int(i) for i in getattr(tokenizer, "all_special_ids", ()))
        self._tok_lock = threading.Lock()  # HF fast tokenizers are not safe to share between threads

        self._queue: queue.Queue[Any] = queue.Queue()
        self._lock = threading.Lock()
        self._in_flight = 0
        self._batches_run = 0
        self._closing = False
        self._abort = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def _eos_ids(model: Any, tokenizer: Any) -> tuple[int, ...]:
        ids: list[int] = []
        config = getattr(model, "generation_config", None)
        eos = getattr(config, "eos_token_id", None)
        if isinstance(eos, int):
            ids.append(eos)
        elif isinstance(eos, (list, tuple)):
            ids.extend(int(i) for i in eos)
        if tokenizer.eos_token_id is not None:
            ids.append(int(tokenizer.eos_token_id))
        return tuple(dict.fromkeys(ids))

    # -- life cycle -------------------------------------------------------------------------------
    def start(self) -> Batcher:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="chameleon-batcher", daemon=True)
            self._thread.start()
        return self

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._closing

    @property
    def closing(self) -> bool:
        return self._closing

    def begin_shutdown(self) -> None:
        """Refuse new requests; the worker finishes every accepted one, then exits."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            self._queue.put(_STOP)

    def close(self, timeout: float | None = None) -> bool:
        """Graceful shutdown: refuse new requests, finish accepted ones. True when the worker ended."""
        self.begin_shutdown()
        return self.join(timeout)

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the worker to end; True when it has (or never started)."""
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def abort(self) -> None:
        """Refuse new requests and end the accepted ones with `Aborted` (503): the running batch stops at
        its next decoding step, queued requests do not start. The worker then exits (see `join`): the
        process must not exit while it is inside torch."""
        self.begin_shutdown()
        self._abort.set()

    @property
    def aborted(self) -> bool:
        return self._abort.is_set()

    @property
    def worker_running(self) -> bool:
        """The worker thread exists and has not ended (also while closing, unlike is_alive)."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    # -- request side -----------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        with self._tok_lock:
            return list(self.tokenizer(text)["input_ids"])

    def submit(self, request: GenerationRequest) -> PendingGeneration:
        """Validate and queue; never waits for generation. Raises ValidationError, Overloaded or
        ShuttingDown."""
        try:
            if self._closing:  # before tokenizing: no new work in a thread the shutdown does not wait for
                raise ShuttingDown("the server is shutting down")
            request.check()
            ids = self.tokenize(request.prompt)
            if request.truncate is not None and len(ids) > request.truncate:
                ids = ids[-request.truncate :]
            if not ids:
                raise ValidationError("`inputs` tokenizes to no tokens")
            if len(ids) > self.max_input_tokens:
                raise ValidationError(
                    f"`inputs` must have less than {self.max_input_tokens} tokens. Given: {len(ids)}"
                )
            max_new = request.max_new_tokens
            limit = self.max_new_tokens_limit
            if max_new is not None and limit is not None and max_new > limit:
                raise ValidationError(f"`max_new_tokens` must be <= {limit}. Given: {max_new}")
            if max_new is None:
                default = min(DEFAULT_MAX_NEW_TOKENS, limit or DEFAULT_MAX_NEW_TOKENS)
                max_new = max(1, min(default, self.max_total_tokens - len(ids)))
            if len(ids) + max_new > self.max_total_tokens:
                raise ValidationError(
                    f"`inputs` tokens + `max_new_tokens` must be <= {self.max_total_tokens}. "
                    f"Given: {len(ids)} `inputs` tokens and {max_new} `max_new_tokens`"
                )
            pending = PendingGeneration(request, ids, max_new)
            with self._lock:
                if self._closing:
                    raise ShuttingDown("the server is shutting down")
                if self._in_flight >= self.max_concurrent_requests:
                    raise Overloaded("Model is overloaded")
                self._in_flight += 1
                self.metrics.in_flight.set(self._in_flight)
                self._queue.put(pending)
        except BatcherError as exc:
            self.metrics.errors.labels(exc.error_type).inc()
            self.metrics.requests.labels("rejected").inc()
            raise
        self.metrics.prompt_tokens.inc(len(ids))
        return pending

    def generate(self, request: GenerationRequest, timeout: float | None = None) -> GenerationResult:
        return self.submit(request).result(timeout)

    # -- worker -----------------------------------------------------------------------------------
    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is _STOP:
                break
            collected = [first]
            deadline = time.perf_counter() + self.batch_window_s
            while len(collected) < self.max_batch_size:
                remaining = deadline - time.perf_counter()
                try:
                    item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stopping = True
                    break
                collected.append(item)
            for group in self.group(collected):
                self._run_batch(group)
            if self._abort.is_set():
                break
        # drain anything accepted after the window closed (submit refuses once _STOP is queued);
        # after an abort, _run_batch fails them without starting them
        leftovers = []
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                leftovers.append(item)
        for group in self.group(leftovers):
            self._run_batch(group)
        log.info("batcher stopped")

    @staticmethod
    def group(pendings: Sequence[PendingGeneration]) -> list[list[PendingGeneration]]:
        """Split collected requests into batches that can share one generate call (see module docstring)."""
        groups: dict[Any, list[PendingGeneration]] = {}
        counter = itertools.count()
        for p in pendings:
            r = p.request
            penalty = r.repetition_penalty or 1.0
            if not r.sampling:
                key: Any = ("greedy", penalty)
            elif r.seed is not None:
                key = ("seeded", next(counter))
            else:
                key = (
                    "sample",
                    r.temperature or 1.0,
                    r.top_k or 0,
                    r.top_p or 1.0,
                    r.typical_p or 1.0,
                    penalty,
                )
            groups.setdefault(key, []).append(p)
        return list(groups.values())

    def _run_batch(self, group: list[PendingGeneration]) -> None:
        """Run one group; any exception fails the group's unfinished requests, never the worker."""
        if self._abort.is_set():
            for p in group:
                self._fail(p, Aborted(ABORTED_MESSAGE))
            return
        started = time.perf_counter()
        first = group[0].request
        sampling = first.sampling
        seed = None
        if sampling:
            seed = first.seed if first.seed is not None else random.getrandbits(63)
        self._batches_run += 1
        info = _BatchInfo(size=len(group), seed=seed, started=started, number=self._batches_run)
        try:
            rows = []
            for position, p in enumerate(group):
                p.started = started
                self.metrics.queue_wait.observe(started - p.submitted)
                rows.append(
                    _Row(
                        pending=p,
                        stop=tuple(p.request.stop),
                        max_new_tokens=p.max_new_tokens,
                        decoder=IncrementalDecoder(self._decode, p.input_ids[-_DECODE_CONTEXT:]),
                        top_n=p.request.top_n_tokens or 0,
                        position=position,
                    )
                )
            self.metrics.batch_size.observe(len(group))
            self._generate(rows, info, sampling, seed)
            for row in rows:  # generate ended without finishing a row: only possible at its length limit
                if not row.finished:
                    row.finished = True
                    self._deliver(row, info, "length")
        except Exception as exc:
            log.exception("batch of %d failed", len(group))
            message = f"generation failed: {type(exc).__name__}: {exc}"
            for p in group:
                self._fail(p, GenerationError(message))
        finally:
            self.metrics.batch_seconds.observe(time.perf_counter() - started)
            self.metrics.batches.labels("true" if info.adapted else "false").inc()

    def _generate(self, rows: list[_Row], info: _BatchInfo, sampling: bool, seed: int | None) -> None:
        from transformers import LogitsProcessorList, StoppingCriteriaList

        device = _model_device(self.model)
        length = max(len(r.pending.input_ids) for r in rows)
        ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, r in enumerate(rows):  # left padding
            n = len(r.pending.input_ids)
            ids[i, length - n :] = torch.tensor(r.pending.input_ids, dtype=torch.long)
            mask[i, length - n :] = 1
        ids, mask = ids.to(device), mask.to(device)

        tracker = _RowTracker(self, rows, length, info)
        request = rows[0].pending.request
        processors = LogitsProcessorList()
        kwargs: dict[str, Any] = {
            "max_new_tokens": max(r.max_new_tokens for r in rows),
            "do_sample": sampling,
            "repetition_penalty": request.repetition_penalty or 1.0,
            "pad_token_id": self.pad_token_id,
            "eos_token_id": list(self.eos_token_ids) or None,
            "num_beams": 1,
            "use_cache": True,
        }
        if sampling:
            # The warpers are ours, so that the recorder runs after them (transformers puts user
            # processors before its own warpers); generate's own warpers are set to neutral values.
            processors.extend(_warpers(request))
            kwargs.update(temperature=1.0, top_k=0, top_p=1.0, typical_p=1.0)
        processors.append(_Recorder(tracker))

        adapt = self.handle.adapt(ids, mask) if self.handle is not None else contextlib.nullcontext(None)
        with torch.no_grad(), adapt as batch:
            if batch is not None:
                info.adapted = bool(getattr(batch, "adapted", False))
                info.fallback_reason = getattr(batch, "fallback_reason", None)
                info.assignments = getattr(batch, "assignments", None)
                info.k = int(getattr(batch, "k", 0) or 0)
            if seed is not None:
                torch.manual_seed(seed)
            self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                streamer=tracker,
                stopping_criteria=StoppingCriteriaList([tracker]),
                logits_processor=processors,
                **kwargs,
            )

    # -- row bookkeeping (worker thread) ----------------------------------------------------------
    def _decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        with self._tok_lock:
            return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def _top_token(self, token: int, logprob: float) -> TopToken:
        return TopToken(int(token), self._decode([token]), float(logprob), int(token) in self.special_ids)

    def _advance(
        self, row: _Row, token: int, logprob: float, tops: tuple[TopToken, ...], info: _BatchInfo
    ) -> None:
        row.ids.append(token)
        piece = row.decoder.push(token)
        row.text += piece
        special = token in self.special_ids
        row.texts.append(piece)
        row.logprobs.append(logprob)
        row.specials.append(special)
        if row.top_n:
            row.tops.append(tops)

        reason = None
        if token in self.eos_token_ids:
            reason = "eos_token"
        elif row.stop and piece and _has_stop(row.text, piece, row.stop):
            reason = "stop_sequence"
        elif len(row.ids) >= row.max_new_tokens:
            reason = "length"
        event = TokenEvent(len(row.ids) - 1, token, piece, logprob, special, tops)
        if reason is None:
            row.pending._emit(event)
            return
        row.finished = True
        self._deliver(row, info, reason, event)

    def _deliver(
        self, row: _Row, info: _BatchInfo, reason: str | None, event: TokenEvent | None = None
    ) -> None:
        pending = row.pending
        if pending.done():
            return
        now = time.perf_counter()
        if reason is None:  # cancelled
            self._release(pending, "cancelled")
            pending._finish(None, None)
            return
        text = self._decode(row.ids, skip_special_tokens=True)
        if pending.request.return_full_text:
            text = pending.request.prompt + text
        cluster = None
        if info.assignments is not None and row.position < len(info.assignments):
            cluster = int(info.assignments[row.position])
        result = GenerationResult(
            generated_text=text,
            token_ids=tuple(row.ids),
            token_texts=tuple(row.texts),
            logprobs=tuple(row.logprobs),
            specials=tuple(row.specials),
            top_tokens=tuple(row.tops),
            finish_reason=reason,
            seed=info.seed if (info.seed is not None and info.size == 1) else None,
            input_length=len(pending.input_ids),
            batch_size=info.size,
            batch=info.number,
            adapted=info.adapted,
            fallback_reason=info.fallback_reason,
            cluster=cluster,
            k=info.k,
            queue_seconds=(pending.started or now) - pending.submitted,
            inference_seconds=now - (pending.started or now),
            total_seconds=now - pending.submitted,
        )
        self.metrics.generated_tokens.inc(len(row.ids))
        self.metrics.latency.observe(result.total_seconds)
        self._release(pending, reason)
        if event is not None:
            pending._emit(replace(event, final=result))
        pending._finish(result)

    def _fail(self, pending: PendingGeneration, error: BatcherError) -> None:
        if pending.done():
            return
        self.metrics.errors.labels(error.error_type).inc()
        self._release(pending, "error")
        pending._finish(None, error)

    def _release(self, pending: PendingGeneration, outcome: str) -> None:
        self.metrics.requests.labels(outcome).inc()
        with self._lock:
            self._in_flight -= 1
            self.metrics.in_flight.set(self._in_flight)


class _Recorder:
    """Logits processor that hands each step's final scores to the tracker (for logprobs)."""

    def __init__(self, tracker: _RowTracker) -> None:
        self.tracker = tracker

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return self.tracker.record(input_ids, scores)


def _warpers(request: GenerationRequest) -> list[Any]:
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
        TypicalLogitsWarper,
    )

    out: list[Any] = []
    if request.temperature is not None and request.temperature != 1.0:
        out.append(TemperatureLogitsWarper(request.temperature))
    if request.top_k:
        out.append(TopKLogitsWarper(top_k=request.top_k))
    if request.top_p is not None and request.top_p < 1.0:
        out.append(TopPLogitsWarper(top_p=request.top_p))
    if request.typical_p is not None and request.typical_p < 1.0:
        out.append(TypicalLogitsWarper(mass=request.typical_p))
    return out


def _has_stop(text: str, piece: str, stops: tuple[str, ...]) -> bool:
    """Whether a stop sequence ends inside the newest piece of text."""
    for stop in stops:
        window = text[max(0, len(text) - len(piece) - len(stop) + 1) :]
        if stop in window:
            return True
    return False


def _model_device(model: Any) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")
