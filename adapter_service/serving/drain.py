"""Graceful drain: count the calls in flight, refuse new ones with UNAVAILABLE once draining, and let
the server stop only when the last one has answered (or the grace period is over).

Why not just `grpc.aio.Server.stop(grace)`: it shuts gRPC core down at once, and core cancels the calls
that have arrived but that the Python layer has not picked up yet (clients see CANCELLED, which they do
not retry, instead of UNAVAILABLE), and it returns as soon as core has no live call, while a handler's
Python coroutine may still be running (grpc/grpc#37239), which the executor shutdown and the end of the
event loop then cut short. Draining here first leaves core nothing to cancel.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable

import grpc

from adapter_service.serving.security import HEALTH_METHOD_PREFIX, refusing_handler

DRAINING_DETAILS = "draining: the sidecar is shutting down; retry on another instance"


class DrainGate(grpc.aio.ServerInterceptor):
    """Tracks unary calls in flight (all of this service's methods are unary); health stays open so
    probes can see NOT_SERVING while the drain runs."""

    def __init__(self, on_refuse: Callable[[], None] | None = None) -> None:
        self.draining = False
        self.in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._on_refuse = on_refuse
        self._counted: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(HEALTH_METHOD_PREFIX):
            return handler
        if self.draining:
            return refusing_handler(handler, grpc.StatusCode.UNAVAILABLE, DRAINING_DETAILS, self._on_refuse)
        if handler.request_streaming or handler.response_streaming:
            return handler  # reflection: nothing to drain
        cached = self._counted.get(handler_call_details.method)
        if cached is None or cached[0] is not handler:  # built once per method, not per call
            cached = self._counted[handler_call_details.method] = (handler, self._counting(handler))
        return cached[1]

    def _counting(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        inner = handler.unary_unary

        async def counted(request: object, context: grpc.aio.ServicerContext) -> object:
            self._enter()
            try:
                result = inner(request, context)
                return await result if inspect.isawaitable(result) else result
            finally:
                self._exit()

        return grpc.unary_unary_rpc_method_handler(
            counted,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _enter(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def _exit(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def drain(self, grace: float, hurry: asyncio.Event | None = None) -> int:
        """Refuse new calls and wait up to `grace` seconds (or until `hurry` is set) for those in flight
        to finish; returns how many are still running."""
        self.draining = True
        waiters = [asyncio.ensure_future(self._idle.wait())]
        if hurry is not None:
            waiters.append(asyncio.ensure_future(hurry.wait()))
        try:
            await asyncio.wait(waiters, timeout=max(0.0, grace), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        return self.in_flight
