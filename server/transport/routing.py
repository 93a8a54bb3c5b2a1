"""Routing calls to servicers: per-call lookup, admission before reading, malformed bytes,
unary metrics.

Handlers are looked up when each call arrives, so the server can listen (health, liveness)
while the models load. gRPC's generated registration parses each request before any servicer
code runs and answers UNKNOWN (logging a traceback) when the bytes do not parse; here such a
message becomes an `Undecodable` carrying its InvalidInput error instead: unary calls are
refused with INVALID_ARGUMENT saying what was expected; on a stream that one message gets its
error answer and the stream goes on. Each unary call is counted and timed here by RPC and
status code; stream messages are counted where they are answered (answering.py). A unary
call's message is read only once its bytes are admitted (intake.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from types import ModuleType

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError

from gradserve.server.core.errors import InvalidInput, RequestError, Undecodable
from gradserve.server.metrics import Metrics
from gradserve.server.transport import bulk
from gradserve.server.transport.intake import Intake, Lease, caller_of
from gradserve.server.transport.status import abort


def _parser(message_class, lifted: Mapping[bulk.Path, str] | None = None):
    """A parser of `message_class` that returns Undecodable rather than raising. A large
    message is surveyed first (bounded work whatever it holds, see bulk.py); with `lifted`
    paths, its large payloads there are cut out, and the parser returns bulk.Lifted."""
    descriptor = message_class.DESCRIPTOR

    def parse(data: bytes):
        rest, payloads = data, {}
        try:
            if len(data) >= bulk.LARGE:
                rest, payloads = bulk.survey(data, descriptor, lifted)
            message = message_class.FromString(rest)
        except (bulk.Refused, DecodeError) as error:
            return Undecodable(descriptor.full_name, len(data), str(error))
        return bulk.Lifted(message, payloads) if lifted else message

    return parse


def _code_name(code: object) -> str:
    if isinstance(code, grpc.StatusCode):
        return code.name
    return "UNKNOWN" if code is None else str(code)


async def _receive(context, caller: str, intake: Intake, lease: Lease, parse):
    """Read a unary call's one message, admitted against the memory budget (see intake.py),
    and parse it: the request and the message's size; a refusal or a missing message ends
    the call with its status."""
    try:
        data = await intake.read(context, caller, lease)
        if data is grpc.aio.EOF:
            raise InvalidInput("the call carried no request message; expected exactly one")
    except RequestError as exc:
        await abort(context, exc)
    request = parse(data)
    if isinstance(request, Undecodable):
        await abort(context, request.error)
    return request, len(data)


def _unary(method, name: str, metrics: Metrics, intake: Intake, parse, serialize):
    """A unary method, served as request-streaming (clients see a unary call: the two are
    the same on the wire) so that its message is read only once admitted; its answer is
    encoded here so that the lease counts it until the call is done. (Writing the answer
    from a one-message stream handler instead cost 25 % more CPU per small call.)"""
    latency = metrics.latency.labels(name)
    answered = metrics.requests.labels(name, "OK")

    async def unary(_requests, context) -> bytes:
        started = time.perf_counter()
        lease = Lease(intake.memory)
        context.add_done_callback(lambda _context: lease.release())
        try:
            caller = caller_of(context)
            request, received = await _receive(context, caller, intake, lease, parse)
            response = await method(request, context)
            if isinstance(response, bulk.Spliced) and response.tensors:
                encoded = await asyncio.to_thread(serialize, response)  # large: off the loop
            else:
                encoded = serialize(response)
            lease.keep(received + len(encoded))
            intake.remember(caller, lease.nbytes)
        except BaseException as exc:
            metrics.requests.labels(name, _code_name(context.code())).inc()
            latency.observe(time.perf_counter() - started)
            _forget_frames(exc)
            raise
        answered.inc()
        latency.observe(time.perf_counter() - started)
        return encoded

    return unary


def _forget_frames(exc: BaseException) -> None:
    """Drop the frames an ending call's exception (and those it was raised from) refer to.
    gRPC keeps an aborted call's exception with the call's state, which the exception's
    frames refer to in turn: a cycle, freed only by the garbage collector, that kept every
    refused call's message (15 MB in a flood) alive until a full collection."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        exc.__traceback__ = None
        exc = exc.__context__ or exc.__cause__


class Routes(grpc.GenericRpcHandler):
    """Looks up each call's handler when it arrives, so the server can listen (health,
    liveness) while the model loads: until a service is added, its methods answer
    UNAVAILABLE, except the ones given a stand-in answer."""

    def __init__(self, metrics: Metrics, intake: Intake) -> None:
        self._metrics = metrics
        self._intake = intake
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}
        self._loading: dict[str, grpc.RpcMethodHandler] = {}

    def service(self, handler_call_details):
        method = handler_call_details.method
        return self._handlers.get(method) or self._loading.get(method)

    def while_loading(
        self, service: ServiceDescriptor, standins: dict[str, object] | None = None
    ) -> None:
        """Until `add`: answer `standins[name]` for those methods, UNAVAILABLE for the rest."""
        standins = standins or {}
        for method in service.methods:
            answer = standins.get(method.name)
            serialize = type(answer).SerializeToString if answer is not None else None
            behaviour = _loading_answer(answer)
            if method.client_streaming:
                handler = grpc.stream_stream_rpc_method_handler(
                    _loading_stream, response_serializer=serialize
                )
            else:
                handler = grpc.unary_unary_rpc_method_handler(
                    behaviour, response_serializer=serialize
                )
            self._loading[f"/{service.full_name}/{method.name}"] = handler

    def add(self, servicer: object, service: ServiceDescriptor, messages: ModuleType) -> None:
        """Serve every method of `service` (unary-unary or stream-stream) with `servicer`.
        The methods named in the servicer's `lifted` mapping get their requests as
        bulk.Lifted (large payloads cut out at those paths) and may answer bulk.Spliced."""
        lifted = getattr(servicer, "lifted", {})
        for method in service.methods:
            parse = _parser(getattr(messages, method.input_type.name), lifted.get(method.name))
            serialize = bulk.serializer(
                getattr(messages, method.output_type.name).SerializeToString
            )
            implementation = getattr(servicer, method.name)
            if method.client_streaming and method.server_streaming:
                handler = grpc.stream_stream_rpc_method_handler(implementation, parse, serialize)
            elif not method.client_streaming and not method.server_streaming:
                wrapped = _unary(implementation, method.name, self._metrics, self._intake,
                                 parse, serialize)  # fmt: skip
                handler = grpc.stream_unary_rpc_method_handler(wrapped)  # encoded by it
            else:
                raise ValueError(f"{method.full_name}: only unary and bidirectional RPCs")
            self._handlers[f"/{service.full_name}/{method.name}"] = handler


_LOADING = "the model is still loading; retry when the health service reports SERVING"


def _loading_answer(answer: object | None):
    async def unary(request, context):
        if answer is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, _LOADING)
        return answer

    return unary


async def _loading_stream(request_iterator, context):
    await context.abort(grpc.StatusCode.UNAVAILABLE, _LOADING)
    yield  # pragma: no cover - makes this an async generator
