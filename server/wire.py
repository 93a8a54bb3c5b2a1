"""Registering servicers so that bytes which are not a valid message get INVALID_ARGUMENT.

gRPC's generated registration parses each request before any servicer code runs and answers
UNKNOWN (logging a traceback) when the bytes do not parse. Here a message that does not parse
becomes an `Undecodable` marker instead: unary calls are refused with INVALID_ARGUMENT saying
what was expected; on a stream the servicer answers that one message with its error and the
stream goes on.
"""

from __future__ import annotations

import functools
from types import ModuleType

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError


class Undecodable:
    """Stands in for a request message whose bytes did not parse."""

    id = ""
    model_name = ""

    def __init__(self, type_name: str, size: int, error: str) -> None:
        self.message = f"the request ({size} bytes) is not a valid {type_name} message: {error}"


def _tolerant(message_class):
    type_name = message_class.DESCRIPTOR.full_name

    def parse(data: bytes):
        try:
            return message_class.FromString(data)
        except DecodeError as error:
            return Undecodable(type_name, len(data), str(error))

    return parse


def _refuse_undecodable(method):
    @functools.wraps(method)
    async def unary(request, context):
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return await method(request, context)

    return unary


def register(
    server: grpc.aio.Server, servicer: object, service: ServiceDescriptor, messages: ModuleType
) -> None:
    """Add every method of `service` (unary-unary or stream-stream) implemented by `servicer`."""
    handlers = {}
    for method in service.methods:
        parse = _tolerant(getattr(messages, method.input_type.name))
        serialize = getattr(messages, method.output_type.name).SerializeToString
        implementation = getattr(servicer, method.name)
        if method.client_streaming and method.server_streaming:
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                implementation, parse, serialize
            )
        elif not method.client_streaming and not method.server_streaming:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                _refuse_undecodable(implementation), parse, serialize
            )
        else:
            raise ValueError(f"{method.full_name}: only unary and bidirectional RPCs are served")
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
