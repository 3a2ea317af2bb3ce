"""Registering a service on a grpc.aio server so that a request whose bytes do not parse is refused cleanly.

grpcio's generated ``add_*Servicer_to_server`` parse requests with ``Message.FromString`` before any servicer code
runs: bytes that are not the method's message make grpcio answer ``UNKNOWN`` ("Unexpected <class DecodeError>")
and log a traceback. :func:`add_service` registers the same methods (of the v1 services and of grpc.health.v1)
with a parser that turns such bytes into an :class:`Undecodable` instead; methods with one request then answer
``INVALID_ARGUMENT`` naming the message type, and stream methods see the :class:`Undecodable` as one of their
requests (the servicer decides; the worker ends the stream with ``INVALID_ARGUMENT``).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError
from google.protobuf.message_factory import GetMessageClass

__all__ = ["Undecodable", "add_service"]

log = logging.getLogger(__name__)


class Undecodable:
    """Stands in for a request whose bytes are not a valid message of the method's type; ``message`` says so."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message

    def __repr__(self) -> str:
        return f"Undecodable({self.message!r})"


def _parser(message_class: Any) -> Callable[[bytes], Any]:
    name = message_class.DESCRIPTOR.full_name

    def parse(data: bytes) -> Any:
        try:
            return message_class.FromString(data)
        except DecodeError as e:
            return Undecodable(f"the request ({len(data)} bytes) is not a valid {name}: {e}")

    return parse


def _refusing_undecodable(method: Callable[[Any, Any], Awaitable[Any]], name: str
                          ) -> Callable[[Any, Any], Awaitable[Any]]:
    @functools.wraps(method)
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Undecodable):
            log.info("%s refused (INVALID_ARGUMENT): %s", name, request.message)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return await method(request, context)

    return handler


def add_service(server: grpc.aio.Server, servicer: Any, service: ServiceDescriptor) -> None:
    """Register every method of ``service`` on ``server``, implemented by ``servicer``'s method of the same name.

    Methods with one request (unary-unary, and unary-stream written with ``context.write`` such as health's Watch)
    never see an :class:`Undecodable`: it is answered with INVALID_ARGUMENT first. For stream-stream methods each
    request read may be one. Stream-unary methods (none in v1 or health) are refused.
    """
    handlers = {}
    for method in service.methods:
        parse = _parser(GetMessageClass(method.input_type))
        serialize = GetMessageClass(method.output_type).SerializeToString
        impl = getattr(servicer, method.name)
        if not method.client_streaming:  # one request: refused here when it does not parse
            make = (grpc.unary_stream_rpc_method_handler if method.server_streaming
                    else grpc.unary_unary_rpc_method_handler)
            handlers[method.name] = make(_refusing_undecodable(impl, method.full_name), request_deserializer=parse,
                                         response_serializer=serialize)
        elif method.server_streaming:  # the servicer sees each Undecodable among its requests
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                impl, request_deserializer=parse, response_serializer=serialize)
        else:
            raise NotImplementedError(f"{service.full_name}.{method.name}: stream-unary methods are not supported")
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)
