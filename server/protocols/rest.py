"""The standard inference protocol over HTTP/JSON (KServe v2 REST), on the same models,
batchers and bounds as gRPC, served by aiohttp in the gRPC server's event loop, with
Triton's binary tensor data extension (inputs with `binary_data_size` after a JSON header of
`Inference-Header-Content-Length` bytes; outputs with `binary_data` answered the same way; a
zero-length header: the body is the one input's rows).

A JSON request is read into the standard protocol's message, its tensors as raw contents (one
array per tensor, never a protobuf value per number), and answered through the same codec as
gRPC's ModelInfer: the same tensors, parameters, checks and messages. Errors are
`{"error": "..."}` with the HTTP status of the gRPC code (400, 404, 429, 503, ...).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable

import grpc
import numpy as np
import orjson
from aiohttp import web

from gradserve.inference import grpc_service_pb2 as pb
from gradserve.server.core.budget import MemoryBudget
from gradserve.server.core.contract import ModelSpec
from gradserve.server.core.errors import Closed, InvalidInput, RequestError
from gradserve.server.metrics import Metrics
from gradserve.server.protocols import openapi
from gradserve.server.protocols.explorer import Explorer
from gradserve.server.protocols.kserve import (
    EXTENSIONS,
    INPUT,
    PLATFORM,
    SERVER_NAME,
    SERVER_VERSION,
    InferenceCodec,
    model_config,
    model_metadata,
    statistics_document,
)
from gradserve.server.serving.control import ControlPlane
from gradserve.server.serving.dataplane import Call, DataPlane
from gradserve.server.serving.tickets import Arrival
from gradserve.server.transport.intake import Lease, caller_key
from gradserve.server.transport.status import Failure
from gradserve.wire import tensors
from gradserve.wire.callers import CALLER_HEADER
from gradserve.wire.http import HEADER_LENGTH
from gradserve.wire.timing import FIELDS

RPC = "rest/infer"  # the metrics' label of this protocol's inference requests
_ROUTE = openapi.MODEL + "/infer"  # its span's name
_STATUS = {  # the HTTP status of each gRPC code a request can end with
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.CANCELLED: 499,
}
_RETRY_AFTER = {429: "1", 503: "1"}
_HTTP_CODES = {  # the metrics' code of each refusal of a body, as gRPC would count it
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
}
_JSON = "application/json"
_BINARY = "application/octet-stream"

_ALL = frozenset({"*"})  # every output in binary (the request's binary_data_output)


class RestService:
    """The v2 REST endpoints, answered by the server's control plane and data plane. Health
    answers from the start; the model endpoints once the control plane has the models
    (before: 503)."""

    def __init__(self, metrics: Metrics, control: ControlPlane, memory: MemoryBudget) -> None:
        self._memory = memory  # the server's: a body is reserved against it before it is read
        self._control = control
        self._codec = InferenceCodec(control)
        self._metrics = metrics
        self._latency = metrics.latency.labels(RPC)
        self._answered = metrics.requests.labels(RPC, "OK")
        self._body: _BodyReader | None = None  # the application's
        self._plane: DataPlane | None = None

    def serve(self, plane: DataPlane) -> None:
        """Answer inference requests through the server's data plane."""
        self._plane = plane

    def application(self, max_body_bytes: int, idle_seconds: float) -> web.Application:
        """The aiohttp application of these endpoints: bodies up to `max_body_bytes` (413),
        each part of a body within `idle_seconds` of the last (408)."""
        self._body = _BodyReader(max_body_bytes, idle_seconds)
        application = web.Application(client_max_size=max_body_bytes, middlewares=[refusals])
        application.add_routes(self._routes())
        application.add_routes(Explorer().routes())
        return application

    @property
    def paths(self) -> set[str]:
        """Every path these endpoints answer."""
        return {route.path for route in self._routes()}

    def _routes(self) -> list[web.RouteDef]:
        model, versioned = openapi.MODEL, openapi.VERSIONED
        return [
            web.get(openapi.HEALTH_LIVE, self.live),
            web.get(openapi.HEALTH_READY, self.ready),
            web.get(openapi.SERVER, self.server_metadata),
            web.get(openapi.OPENAPI, self.openapi),
            web.get(openapi.STATISTICS, self.statistics),  # before the model named "stats"
            *(web.get(path + "/stats", self.statistics) for path in (model, versioned)),
            *(web.get(path + "/ready", self.model_ready) for path in (model, versioned)),
            *(web.get(path, self.model_metadata) for path in (model, versioned)),
            *(web.get(path + "/config", self.model_config) for path in (model, versioned)),
            *(web.post(path + "/infer", self.infer) for path in (model, versioned)),
            web.post(openapi.REPOSITORY_INDEX, self.repository_index),
            *(web.post(f"{openapi.REPOSITORY_MODEL}/{operation}", self._controller(operation))
              for operation in openapi.CONTROL),
        ]  # fmt: skip

    async def live(self, request: web.Request) -> web.Response:
        return _json({"live": True})

    async def ready(self, request: web.Request) -> web.Response:
        ready = self._control.is_ready()
        return _json({"ready": ready}, 200 if ready else 503)

    async def server_metadata(self, request: web.Request) -> web.Response:
        return _json({"name": SERVER_NAME, "version": SERVER_VERSION,
                      "extensions": list(EXTENSIONS)})  # fmt: skip

    async def openapi(self, request: web.Request) -> web.Response:
        """The OpenAPI document of these endpoints and the served models."""
        try:
            specs = [served.spec for served in self._control.models]
        except Closed:  # still loading: the endpoints, without models
            specs = []
        return _json(openapi.document(specs, SERVER_VERSION, HEADER_LENGTH))

    async def model_ready(self, request: web.Request) -> web.Response:
        """200 ready; 503 known to the repository but not serving (or the server not ready);
        404 unknown."""
        name, version = request.match_info["model"], request.match_info.get("version", "")
        ready = self._control.model_ready(name, version)
        return _json({"name": name, "ready": ready}, 200 if ready else 503)

    async def statistics(self, request: web.Request) -> web.Response:
        """The statistics extension: every served version, a model's, or one version's."""
        name, version = request.match_info.get("model", ""), request.match_info.get("version", "")
        chosen = await self._control.statistics(name, version)
        return _json({"model_stats": [statistics_document(*c) for c in chosen]})

    async def repository_index(self, request: web.Request) -> web.Response:
        asked = await _json_object(request)
        if not isinstance(asked.get("ready", False), bool):
            raise InvalidInput('the index request is a JSON object, {"ready": true|false}')
        return _json([{"name": s.name, "version": str(s.version), "state": s.state,
                       "reason": s.reason}
                      for s in self._control.index(asked.get("ready", False))])  # fmt: skip

    def _controller(self, operation: str) -> Callable:
        async def control(request: web.Request) -> web.Response:
            parameters = (await _json_object(request)).get("parameters", {})
            if not isinstance(parameters, dict):
                raise InvalidInput(f'"parameters" of a {operation} is a JSON object (or absent)')
            await self._control.control(operation, request.match_info["model"], parameters)
            return _json({})

        return control

    async def model_metadata(self, request: web.Request) -> web.Response:
        served = self._served(request)
        meta = model_metadata(served.spec, self._control.models.versions(served.spec.name))
        return _json({"name": meta.name, "versions": list(meta.versions), "platform": PLATFORM,
                      "inputs": [_described(t) for t in meta.inputs],
                      "outputs": [_described(t) for t in meta.outputs]})  # fmt: skip

    async def model_config(self, request: web.Request) -> web.Response:
        """Triton's model configuration extension, as JSON (perf_analyzer reads it)."""
        config = model_config(self._served(request).spec)
        return _json({"name": config.name, "platform": config.platform,
                      "backend": config.backend, "max_batch_size": config.max_batch_size,
                      "input": [_configured(t) for t in config.input],
                      "output": [_configured(t) for t in config.output]})  # fmt: skip

    def _served(self, request: web.Request):
        return self._control.served(request.match_info["model"],
                                    request.match_info.get("version", ""))  # fmt: skip

    async def infer(self, request: web.Request) -> web.Response:
        """One inference request: JSON in, the batcher, JSON out. Its body and an answer as
        large are held against the server's memory budget from before the body is read
        until the answer is written (refused, 429, when they do not fit)."""
        lease = Lease(self._memory)
        try:
            response = await self._infer(request, lease)
            await response.prepare(request)
            await response.write_eof()
        except ConnectionError:  # the caller went away: nobody to answer
            pass
        finally:
            lease.release()
        return response

    async def _infer(self, request: web.Request, lease: Lease) -> web.Response:
        started = time.perf_counter()
        ticket = call = None
        plane = self._plane
        try:
            call = Call(caller_key(request.headers.get(CALLER_HEADER), _connection(request)))
            if plane is not None and plane.traces:
                route = request.match_info.route.resource.canonical
                attributes = {"http.request.method": "POST", "http.route": route}
                span = plane.span(f"POST {_ROUTE}", request.headers.items(), started, None,
                                  call.caller, attributes)  # fmt: skip
                call = Call(call.caller, None, span)
            served = self._served(request)  # the model exists (404) and the server serves (503)
            header = request.headers.get(HEADER_LENGTH)
            body = await self._body.read(request, lease)
            if header == "0":
                message, binary = _raw_body(request.match_info, body, served.spec), frozenset()
            else:
                length = _header_length(header, body)
                message, binary = _message(request.match_info, body, length)
            ticket = self._codec.decode(message, Arrival(message.id, message.model_name, started))
            result = await plane.start(ticket, call)
            hops = plane.answered(ticket, result, call)
            response = _respond(_answer(ticket, self._codec.outputs(ticket, result), hops, binary))
            self._answered.inc()
        except web.HTTPException as exc:  # the body's size or pace: before any model work
            response = _http_failed(exc)
            code = _HTTP_CODES[exc.status]
            self._metrics.requests.labels(RPC, code.name).inc()
            span = None if call is None else call.span
            DataPlane.failed(ticket, started, span, code.name, exc.text or exc.reason)
        except Exception as exc:  # every failure is the caller's answer, never the server's
            failure = Failure.of(exc)
            response = _failed(failure)
            self._metrics.requests.labels(RPC, failure.code.name).inc()
            span = None if call is None else call.span
            DataPlane.failed(ticket, started, span, failure.code.name, failure.message)
        self._latency.observe(time.perf_counter() - started)
        return response


def _connection(request: web.Request) -> str:
    """The request's connection (address and port), as gRPC names its peers."""
    peer = request.transport.get_extra_info("peername") if request.transport else None
    return f"http:{peer[0]}:{peer[1]}" if peer else f"http:{request.remote}"


class _BodyReader:
    """A request's body, refused early: a declared or received size over `limit` (413) and a
    client that stops sending for `idle_seconds` (408) cost no more than what has arrived."""

    def __init__(self, limit: int, idle_seconds: float) -> None:
        self._limit, self._idle = limit, idle_seconds

    async def read(self, request: web.Request, lease: Lease) -> bytes:
        """The body, `lease` holding twice its size (it and an answer as large, as for a
        gRPC message): reserved from the declared size before anything is read, else as
        each part arrives."""
        declared = request.content_length
        if declared is not None and declared > self._limit:
            raise self._too_large(declared)
        if declared is not None:
            lease.reserve(2 * declared)
        if request.content.is_eof():  # it has all arrived (most small bodies): no timer
            return await request.read()
        chunks, size = [], 0
        while True:
            try:
                async with asyncio.timeout(self._idle):
                    chunk = await request.content.readany()
            except TimeoutError:
                raise web.HTTPRequestTimeout(
                    text=f"the request body stalled: nothing arrived for {self._idle:g} s "
                    f"after {size} bytes (--http-idle-seconds)"
                ) from None
            if not chunk:
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)
            size += len(chunk)
            if size > self._limit:
                raise self._too_large(size, "at least ")
            if declared is None:
                lease.reserve(2 * len(chunk))
            chunks.append(chunk)

    def _too_large(self, size: int, bound: str = "") -> web.HTTPRequestEntityTooLarge:
        return web.HTTPRequestEntityTooLarge(
            max_size=self._limit, actual_size=size,
            text=f"the request body is {bound}{size} bytes; the most this server takes is "
            f"{self._limit} bytes (--max-message-mb)",
        )  # fmt: skip


def _raw_body(match: dict, body: bytes, spec: ModelSpec) -> pb.ModelInferRequest:
    """A zero-length header: the whole body is the input x of the model's float type, its
    rows [n, *X] told by its length; the default derivative, answered in JSON."""
    kind = tensors.float_type(spec.dtype)
    row_bytes = math.prod(spec.input_shape) * np.dtype(kind.numpy).itemsize
    if not body or len(body) % row_bytes:
        raise InvalidInput(
            f"a raw body (zero-length {HEADER_LENGTH}) holds whole rows of x: "
            f"{row_bytes} bytes each ({kind.kserve}, {list(spec.input_shape)}); "
            f"got {len(body)} bytes"
        )
    message = pb.ModelInferRequest(
        model_name=match["model"], model_version=match.get("version", "")
    )
    shape = [len(body) // row_bytes, *spec.input_shape]
    message.inputs.add(name=INPUT, datatype=kind.kserve, shape=shape)
    message.raw_input_contents.append(body)
    return message


def _header_length(header: str | None, body: bytes) -> int | None:
    """The JSON header's length from Inference-Header-Content-Length (None: all JSON)."""
    if header is None:
        return None
    if not header.isdigit() or not 0 < int(header) <= len(body):
        raise InvalidInput(
            f"{HEADER_LENGTH} is {header!r}; expected the JSON header's length in bytes, "
            f"1 to the body's {len(body)}"
        )
    return int(header)


def _message(
    match: dict, body: bytes, header_length: int | None
) -> tuple[pb.ModelInferRequest, frozenset[str]]:
    """The request as the standard protocol's message, tensors as raw contents (JSON data
    parsed into one array, binary data sliced from the body), and the outputs to answer in
    binary."""
    json_part = body if header_length is None else memoryview(body)[:header_length]
    binary = _Binary(body, header_length or len(body))
    try:
        document = orjson.loads(json_part)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"the request body is not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise InvalidInput('the request body must be a JSON object with an "inputs" list')
    message = pb.ModelInferRequest(
        model_name=match["model"], model_version=match.get("version", ""),
        id=str(document.get("id", "")),
    )  # fmt: skip
    _parameters(message.parameters, document.get("parameters", {}))
    inputs = document.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidInput('the request needs "inputs": a list of tensors')
    for entry in inputs:
        name, datatype, shape = _input_fields(entry)
        message.inputs.add(name=name, datatype=datatype, shape=shape)
        size = _binary_size(entry, name)
        if size is None:
            if "data" not in entry:
                raise InvalidInput(f'input {name!r} has neither "data" nor binary_data_size')
            raw = _raw(name, datatype, shape, entry["data"])
        else:
            raw = binary.take(name, size, _nbytes(name, datatype, shape))
        message.raw_input_contents.append(raw)
    binary.check_used()
    all_binary = document.get("parameters", {}).get("binary_data_output") is True
    in_binary = set()
    for entry in document.get("outputs", []) or []:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise InvalidInput('each of "outputs" must be an object with a "name"')
        message.outputs.add(name=entry["name"])
        if (entry.get("parameters") or {}).get("binary_data") is True:
            in_binary.add(entry["name"])
    return message, _ALL if all_binary else frozenset(in_binary)


class _Binary:
    """The body after the JSON header: each binary input's bytes, in the inputs' order."""

    def __init__(self, body: bytes, start: int) -> None:
        self._body, self._at = body, start

    def take(self, name: str, size: int, expected: int) -> bytes:
        if size != expected:
            raise InvalidInput(
                f"input {name!r} declares binary_data_size {size}; its datatype and shape "
                f"need {expected} bytes"
            )
        end = self._at + size
        if end > len(self._body):
            raise InvalidInput(
                f"input {name!r} needs {size} bytes of binary data; the body has "
                f"{len(self._body) - self._at} left"
            )
        raw = self._body[self._at : end]
        self._at = end
        return raw

    def check_used(self) -> None:
        if self._at != len(self._body):
            raise InvalidInput(
                f"{len(self._body) - self._at} bytes after the last binary input: the "
                "binary_data_size of the inputs must add up to the binary part of the body"
            )


def _binary_size(entry: dict, name: str) -> int | None:
    size = (entry.get("parameters") or {}).get("binary_data_size")
    if size is None:
        return None
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidInput(f"input {name!r}: binary_data_size must be an integer >= 0")
    return size


def _input_fields(entry: object) -> tuple[str, str, list[int]]:
    if not isinstance(entry, dict):
        raise InvalidInput('each of "inputs" must be an object (name, datatype, shape, data)')
    name, datatype, shape = entry.get("name"), entry.get("datatype"), entry.get("shape")
    if not isinstance(name, str) or not isinstance(datatype, str):
        raise InvalidInput('each input needs a string "name" and "datatype"')
    sizes = isinstance(shape, list) and all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    )
    if not sizes:
        raise InvalidInput(f'input {name!r}: "shape" must be a list of sizes >= 0')
    return name, datatype, shape


def _float_kind(name: str, datatype: str):
    kind = tensors.by_kserve(datatype)
    if kind is None:
        raise InvalidInput(f"input {name!r} has datatype {datatype!r}; expected FP32 or FP64")
    return kind


def _nbytes(name: str, datatype: str, shape: list[int]) -> int:
    return math.prod(shape) * np.dtype(_float_kind(name, datatype).numpy).itemsize


def _raw(name: str, datatype: str, shape: list[int], data: object) -> bytes:
    """The input's values (nested or flat, row-major) as bytes of its float type."""
    kind = _float_kind(name, datatype)
    try:
        values = np.asarray(data, dtype=kind.numpy).ravel()
    except (TypeError, ValueError):
        raise InvalidInput(f'input {name!r}: "data" must hold numbers only') from None
    needed = math.prod(shape)
    if values.size != needed:
        raise InvalidInput(
            f"input {name!r} has {values.size} values, but shape {shape} needs {needed}"
        )
    return values.tobytes()


def _parameters(target, given: object) -> None:
    """JSON parameters into the message's: strings, bools, integers and numbers."""
    if not isinstance(given, dict):
        raise InvalidInput('"parameters" must be an object')
    for key, value in given.items():
        param = target[key]
        if isinstance(value, bool):
            param.bool_param = value
        elif isinstance(value, int):
            param.int64_param = value
        elif isinstance(value, float):
            param.double_param = value
        elif isinstance(value, str):
            param.string_param = value
        else:
            raise InvalidInput(f'parameter "{key}" must be a string, bool or number')


def _answer(
    ticket, outputs: list[tuple[str, np.ndarray]], hops, binary: frozenset[str]
) -> tuple[dict, list]:
    """The answer as v2 REST JSON (outputs' data flat, row-major), and the outputs answered
    in binary, in order (arrays: their bytes are written as they are)."""
    spec = ticket.served.spec
    datatype = tensors.float_type(spec.dtype).kserve
    entries, chunks = [], []
    for name, array in outputs:
        entry = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary is _ALL or name in binary:
            entry["parameters"] = {"binary_data_size": array.nbytes}
            chunks.append(array)
        else:
            entry["data"] = array.ravel()
        entries.append(entry)
    document = {"model_name": spec.name, "model_version": spec.version,
                "id": ticket.arrival.id, "outputs": entries,
                "parameters": {name: getattr(hops, name) for name in FIELDS}}  # fmt: skip
    return document, chunks


def _respond(answer: tuple[dict, list]) -> web.Response:
    document, chunks = answer
    if not chunks:
        return _json(document)
    header = orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)
    response = web.Response(body=b"".join([header, *chunks]), content_type=_BINARY)
    response.headers[HEADER_LENGTH] = str(len(header))
    return response


def _json(document: dict, status: int = 200) -> web.Response:
    body = orjson.dumps(document, option=orjson.OPT_SERIALIZE_NUMPY)
    return web.Response(body=body, status=status, content_type=_JSON)


async def _json_object(request: web.Request) -> dict:
    """A small JSON-object body (or none: {}), as the repository endpoints take."""
    body = await request.read()
    try:
        document = orjson.loads(body) if body.strip() else {}
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"the request body is not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise InvalidInput("the request body must be a JSON object")
    return document


@web.middleware
async def refusals(request: web.Request, handler) -> web.StreamResponse:
    """A request error raised by an endpoint (an unknown model, a server still loading) or by
    routing (no such path, method not allowed) as a JSON answer; the inference endpoint
    answers its own failures, to count them."""
    try:
        return await handler(request)
    except RequestError as exc:
        return _failed(Failure.of(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _http_failed(exc)


def _http_failed(exc: web.HTTPException) -> web.Response:
    """An HTTP-level refusal as {"error": ...}, its headers (Allow, ...) kept; a refused
    body is not read further, so the connection closes after the answer."""
    message = exc.text if exc.text and exc.text != f"{exc.status}: {exc.reason}" else exc.reason
    response = _json({"error": message}, exc.status)
    for name in ("Allow", "Retry-After"):
        if name in exc.headers:
            response.headers[name] = exc.headers[name]
    if exc.status in _HTTP_CODES:
        response.force_close()
    return response


def _described(tensor) -> dict:
    """A tensor of the model metadata as JSON."""
    return {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}


def _configured(tensor) -> dict:
    """An input or output of the model configuration as JSON."""
    return {"name": tensor.name, "data_type": pb.DataType.Name(tensor.data_type),
            "dims": list(tensor.dims)}  # fmt: skip


def _failed(failure: Failure) -> web.Response:
    status = _STATUS.get(failure.code, 500)
    response = _json({"error": failure.message}, status)
    if status in _RETRY_AFTER:
        response.headers["Retry-After"] = _RETRY_AFTER[status]
    return response
