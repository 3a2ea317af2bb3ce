"""Registering a service on a grpc.aio server so that a request whose bytes do not parse is refused cleanly.

grpcio's generated ``add_*Servicer_to_server`` parse requests with ``Message.FromString`` before any servicer code
runs: bytes that are not the method's message make grpcio answer ``UNKNOWN`` ("Unexpected <class DecodeError>")
and log a traceback. :func:`add_service` registers the same methods (of the v1 services and of grpc.health.v1)
with a parser that turns such bytes into an :class:`Undecodable` instead; methods with one request then answer
``INVALID_ARGUMENT`` naming the message type, and stream methods see the :class:`Undecodable` as one of their
requests (the servicer decides; the worker ends the stream with ``INVALID_ARGUMENT``).

Requests can also be refused early: ``screens`` from a message's bytes before it is parsed, ``header_screens``
from a call's metadata before its message is even received (:mod:`moevit_rpc.headers`).
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError
from google.protobuf.message_factory import GetMessageClass

__all__ = ["BoundedHealthServicer", "HeaderScreen", "Refused", "Undecodable", "add_service"]

log = logging.getLogger(__name__)


class Undecodable:
    """Stands in for a request whose bytes are not a valid message of the method's type; ``message`` says so."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message

    def __repr__(self) -> str:
        return f"Undecodable({self.message!r})"


class Refused:
    """Stands in for a request a screen refused from its bytes, before parsing (see :func:`add_service`): the
    status ``code``, ``message`` and the ``request_id`` the bytes carried (for an in-band answer on a stream)."""

    __slots__ = ("code", "message", "request_id")

    def __init__(self, code: grpc.StatusCode, message: str, request_id: str = "") -> None:
        self.code, self.message, self.request_id = code, message, request_id

    def __repr__(self) -> str:
        return f"Refused({self.code.name}, {self.message!r})"


Screen = Callable[[bytes], "Refused | None"]
# A screen of a call's metadata (``context.invocation_metadata()``: (key, value) pairs), run before its message is
# received
HeaderScreen = Callable[[tuple], "Refused | None"]


def _parser(message_class: Any, screen: Screen | None = None,
            on_bytes: Callable[[int], None] | None = None) -> Callable[[bytes], Any]:
    name = message_class.DESCRIPTOR.full_name

    def parse(data: bytes) -> Any:
        if on_bytes is not None:
            on_bytes(len(data))
        if screen is not None:
            refused = screen(data)
            if refused is not None:
                return refused
        try:
            return message_class.FromString(data)
        except DecodeError as e:
            # protobuf's text repeats the type ("Error parsing message with type '...': Wire format was corrupt")
            reason = str(e).rpartition(": ")[2] or "it does not parse"
            return Undecodable(f"the request ({len(data)} bytes) is not a valid {name}: {reason}")

    return parse


def _refusing_undecodable(method: Callable[[Any, Any], Awaitable[Any]], name: str
                          ) -> Callable[[Any, Any], Awaitable[Any]]:
    @functools.wraps(method)
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Undecodable):
            log.info("%s refused (INVALID_ARGUMENT): %s", name, request.message)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        if isinstance(request, Refused):
            log.info("%s refused (%s): %s", name, request.code.name, request.message)
            await context.abort(request.code, request.message)
        return await method(request, context)

    return handler


def _screening_headers(handler: Callable[[Any, Any], Awaitable[Any]], screen: HeaderScreen, name: str
                       ) -> Callable[[Any, Any], Awaitable[Any]]:
    """A method with one request, as a request-streaming handler that screens the call's metadata before it reads
    the request: gRPC's unary handling receives the whole message (and copies it into one ``bytes`` on the event
    loop) before any code of ours runs; a call refused here never has its message received."""

    async def screened(request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
        refused = screen(context.invocation_metadata() or ())
        if refused is not None:
            log.info("%s refused from its headers (%s): %s", name, refused.code.name, refused.message)
            await context.abort(refused.code, refused.message)
        request = await context.read()  # the one message of a unary call, through the method's parser
        if request is grpc.aio.EOF:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{name}: the call carried no request message")
        return await handler(request, context)

    return screened


def _screening_stream_headers(method: Callable[[Any, Any], Awaitable[Any]], screen: HeaderScreen, name: str
                              ) -> Callable[[Any, Any], Awaitable[Any]]:
    @functools.wraps(method)
    async def screened(request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
        refused = screen(context.invocation_metadata() or ())
        if refused is not None:
            log.info("%s refused from its headers (%s): %s", name, refused.code.name, refused.message)
            await context.abort(refused.code, refused.message)
        return await method(request_iterator, context)

    return screened


def _unimplemented(name: str) -> Callable[[Any, Any], Awaitable[Any]]:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{name} is not implemented by this server")

    return handler


class _CallerGone(logging.Filter):
    """When a handler's answer cannot be sent because its caller has already gone (cancelled, past its deadline,
    connection lost), grpc.aio logs the ``ExecuteBatchError`` of the failed send at ERROR with its traceback, for a
    call nobody waits for any more (seen once in 264 attacks of the 420 s soak: a Classify caller giving up after
    0.1 s as its answer was sent). This makes it one line at INFO, shown only where moevit_rpc logs at INFO."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None or type(exc).__name__ != "ExecuteBatchError":
            return True
        what = record.getMessage()
        record.msg, record.args = "%s: the caller went away before its answer was sent", (what,)
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        record.levelno, record.levelname = logging.INFO, "INFO"
        return log.isEnabledFor(logging.INFO)


_CALLER_GONE = _CallerGone()


def add_service(server: grpc.aio.Server, servicer: Any, service: ServiceDescriptor,
                screens: dict[str, Screen] | None = None, on_bytes: Callable[[int], None] | None = None,
                header_screens: dict[str, HeaderScreen] | None = None) -> None:
    """Register every method of ``service`` on ``server``, implemented by ``servicer``'s method of the same name.

    Coroutine methods with one request (unary-unary, and unary-stream written with ``context.write`` such as
    health's Watch) never see an :class:`Undecodable`: it is answered with INVALID_ARGUMENT first. For stream-stream
    methods each request read may be one. A method with one request that is not a coroutine function is taken for
    the generated servicer's stub (health's List in grpcio-health-checking's asyncio servicer is one) and answered
    UNIMPLEMENTED, without the traceback grpcio would log for the stub's NotImplementedError. A stream-unary method
    (none in v1 or health) raises NotImplementedError here.

    ``screens`` (method name -> function of the request's bytes) refuse requests before they are parsed: parsing
    runs on the event loop, and a message of millions of entries takes it for a second or more. A screen returns
    a :class:`Refused` (answered with its status by methods with one request, seen by stream methods among their
    requests) or None to parse as usual. ``on_bytes`` is called with the size of every request received (before the
    screen), e.g. :meth:`moevit_rpc.memory.HeapTrimmer.note`.

    ``header_screens`` (method name -> function of the call's metadata) refuse a call from its headers, before its
    message is received: a returned :class:`Refused` is answered with ``context.abort`` at once. A method with one
    request is then registered request-streaming (the same bytes on the wire; its handler reads the one message
    itself), since gRPC's unary handling receives the message before any of our code runs. A caller that goes away
    as its answer is sent is logged in one line, not with gRPC's traceback (:class:`_CallerGone`).
    """
    cygrpc_log = logging.getLogger("grpc._cython.cygrpc")
    if _CALLER_GONE not in cygrpc_log.filters:
        cygrpc_log.addFilter(_CALLER_GONE)
    handlers = {}
    for method in service.methods:
        request_class = GetMessageClass(method.input_type)
        serialize = GetMessageClass(method.output_type).SerializeToString
        impl = getattr(servicer, method.name)
        if method.client_streaming and not method.server_streaming:
            raise NotImplementedError(f"{service.full_name}.{method.name}: stream-unary methods are not supported")
        parse = _parser(request_class, (screens or {}).get(method.name), on_bytes)
        header_screen = (header_screens or {}).get(method.name)
        if method.client_streaming:  # stream-stream: the servicer sees each Undecodable among its requests
            if header_screen is not None:
                impl = _screening_stream_headers(impl, header_screen, method.full_name)
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                impl, request_deserializer=parse, response_serializer=serialize)
            continue
        handler = (_refusing_undecodable(impl, method.full_name) if inspect.iscoroutinefunction(impl)
                   else _unimplemented(method.full_name))
        if header_screen is not None:  # the message is read by the handler, after the headers passed
            if method.server_streaming:
                raise NotImplementedError(f"{method.full_name}: header screens of unary-stream methods are not "
                                          "supported")
            make, handler = grpc.stream_unary_rpc_method_handler, _screening_headers(handler, header_screen,
                                                                                     method.full_name)
        else:
            make = (grpc.unary_stream_rpc_method_handler if method.server_streaming
                    else grpc.unary_unary_rpc_method_handler)
        handlers[method.name] = make(handler, request_deserializer=parse, response_serializer=serialize)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


class BoundedHealthServicer:
    """grpc.health.v1 for the workers and the Classify server with its ``Watch`` streams bounded, so that idle
    watches (health needs no token) cannot take the server's RPC slots from every other call.

    A watch carrying the server's bearer token (the coordinator sends it), or any watch where no token is
    configured, counts against ``max_watches``; one without it, where a token is configured, against
    ``max_untrusted`` as well. A watch over its budget gets ``RESOURCE_EXHAUSTED`` at once; ``Check`` ends at
    once and is not bounded. ``max_watches`` must stay well below the server's ``maximum_concurrent_rpcs``.
    """

    def __init__(self, *, token: str | None = None, max_watches: int = 64, max_untrusted: int = 8) -> None:
        from grpc_health.v1 import health

        self._inner = health.aio.HealthServicer()
        self._expected = f"Bearer {token}".encode() if token else None
        self.max_watches, self.max_untrusted = max_watches, max_untrusted
        self.watches = self.untrusted = 0
        self.refused = 0

    async def Check(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802 (gRPC name)
        return await self._inner.Check(request, context)

    async def Watch(self, request: Any, context: grpc.aio.ServicerContext) -> None:  # noqa: N802 (gRPC name)
        import hmac

        trusted = self._expected is None or hmac.compare_digest(
            dict(context.invocation_metadata() or ()).get("authorization", "").encode(), self._expected)
        if self.watches >= self.max_watches or (not trusted and self.untrusted >= self.max_untrusted):
            self.refused += 1
            which = "" if trusted else " without the server's token"
            context.set_code(grpc.StatusCode.RESOURCE_EXHAUSTED)
            context.set_details(f"too many health watches{which} open (at most {self.max_watches}, "
                                f"{self.max_untrusted} without a token); use Check")
            return
        self.watches += 1
        self.untrusted += not trusted
        try:
            await self._inner.Watch(request, context)
        finally:
            self.watches -= 1
            self.untrusted -= not trusted

    def List(self, request: Any, context: Any) -> Any:  # noqa: N802 - a stub, as grpcio-health-checking's
        raise NotImplementedError  # not a coroutine: add_service answers it UNIMPLEMENTED

    async def set(self, service: str, status: Any) -> None:
        await self._inner.set(service, status)

    async def enter_graceful_shutdown(self) -> None:
        await self._inner.enter_graceful_shutdown()
