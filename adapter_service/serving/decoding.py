"""Request decoding that never raises: bytes that are not the expected message become INVALID_ARGUMENT
and one warning line, on every service the server hosts.

grpc's default deserializer raises, and grpc then answers UNKNOWN and logs a traceback per call, on the
health service too, which answers callers without a token: a cheap way to flood the log.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import grpc

from adapter_service.serving.errors import clip

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Undecodable:
    """What a tolerant deserializer hands the method instead of a message it could not parse."""

    expected: str  # what the bytes should have been, e.g. "chameleon.v1.AdaptRequest message"
    error: str

    def details(self) -> str:
        return f"request: not a valid {self.expected} ({self.error})"


def tolerant_deserializer(deserialize: Callable[[bytes], object], expected: str) -> Callable[[bytes], object]:
    """`deserialize` that returns an Undecodable instead of raising."""

    def tolerant(data: bytes) -> object:
        try:
            return deserialize(data)
        except Exception as exc:  # DecodeError, or the recursion limit of deeply nested garbage
            return Undecodable(expected, clip(f"{type(exc).__name__}: {exc}"))

    return tolerant


def message_deserializer(message_class: type) -> Callable[[bytes], object]:
    """The tolerant `message_class.FromString`."""
    return tolerant_deserializer(message_class.FromString, f"{message_class.DESCRIPTOR.full_name} message")


async def refuse_undecodable(method: str, request: Undecodable, context: grpc.aio.ServicerContext) -> None:
    log.warning("undecodable request", extra={"method": method, "error": request.error})
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.details())


class TolerantDecodingInterceptor(grpc.aio.ServerInterceptor):
    """Gives the handlers of other services (health, reflection) tolerant deserializers. Methods under
    `own_prefix` are skipped: they take Undecodable themselves (to count and audit it)."""

    def __init__(self, own_prefix: str) -> None:
        self._own_prefix = own_prefix
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(self._own_prefix) or handler.request_deserializer is None:
            return handler
        cached = self._wrapped.get(method)
        if cached is None or cached[0] is not handler:  # built once per method, not per call
            cached = self._wrapped[method] = (handler, _tolerant_handler(handler, method))
        return cached[1]


def _tolerant_handler(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    """`handler` with a tolerant deserializer, refusing Undecodable requests before its behaviour."""
    deserializer = tolerant_deserializer(handler.request_deserializer, f"request message of {method}")
    if handler.request_streaming:

        async def checked(requests: AsyncIterator, context: grpc.aio.ServicerContext) -> AsyncIterator:
            async for request in requests:
                if isinstance(request, Undecodable):
                    await refuse_undecodable(method, request, context)
                yield request

        inner, prepare = handler.stream_stream or handler.stream_unary, checked
        streaming = (grpc.stream_unary_rpc_method_handler, grpc.stream_stream_rpc_method_handler)
    else:

        async def check(request: object, context: grpc.aio.ServicerContext) -> object:
            if isinstance(request, Undecodable):
                await refuse_undecodable(method, request, context)
            return request

        inner, prepare = handler.unary_stream or handler.unary_unary, check
        streaming = (grpc.unary_unary_rpc_method_handler, grpc.unary_stream_rpc_method_handler)
    make = streaming[bool(handler.response_streaming)]
    return make(
        _wrap(inner, prepare),
        request_deserializer=deserializer,
        response_serializer=handler.response_serializer,
    )


def _wrap(inner: Callable, prepare: Callable) -> Callable:
    """`inner` with its request (or request iterator) passed through `prepare` first; keeps the shape of
    `inner` (async generator, or coroutine using context.write or returning the answer)."""
    if inspect.isasyncgenfunction(inner):

        async def generator(request: object, context: grpc.aio.ServicerContext) -> AsyncIterator:
            prepared = prepare(request, context)
            if inspect.isawaitable(prepared):
                prepared = await prepared
            async for item in inner(prepared, context):
                yield item

        return generator

    async def coroutine(request: object, context: grpc.aio.ServicerContext) -> object:
        prepared = prepare(request, context)
        if inspect.isawaitable(prepared):
            prepared = await prepared
        result = inner(prepared, context)
        return await result if inspect.isawaitable(result) else result

    return coroutine
