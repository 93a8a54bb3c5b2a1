"""The standard inference protocol (KServe v2 `inference.GRPCInferenceService`), with
Triton's ModelStreamInfer and ModelConfig extensions, on the same batcher as the native API.

Tensors: input `x` ([n, *X], FP32 or FP64) and, for derivative="vjp", "jvp" or "hvp", input
`v` ([n, *V], or [n, k, *V] for k tangents per row); outputs `y` ([n, *Y]) and `dy_dx` (shaped
per derivative: [n, *X] for the default gradient, [n, *Y, *X] for "jacobian", ...), in the
model's float type. Requesting only `y` computes no derivative.

Explanations: derivative="integrated_gradients" (optional input `baseline`, [n, *X] or
[1, *X]; parameter `steps`) answers outputs `y`, `attributions` [n, *X] and `delta` [n];
derivative="smooth_grad" (parameters `samples`, `noise`, `noise_absolute`, `seed`) answers `y`
and `attributions`. Parameter `target` (an output index) applies to "gradient" and both.
"""

from __future__ import annotations

import importlib.metadata
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import numpy as np
from google.protobuf import json_format

from gradserve.inference import grpc_service_pb2 as pb
from gradserve.server.core.batcher import RequestResult
from gradserve.server.core.budget import MemoryBudget
from gradserve.server.core.contract import ModelSpec, Priority, vectors_per_row
from gradserve.server.core.errors import InvalidInput
from gradserve.server.core.explain import Options, Reduced, check_applicable
from gradserve.server.core.statistics import BATCH_STATISTICS, REQUEST_STATISTICS, Statistics
from gradserve.server.core.validation import check_shape
from gradserve.server.metrics import Metrics
from gradserve.server.serving.control import ControlPlane
from gradserve.server.serving.dataplane import DataPlane
from gradserve.server.serving.tickets import Arrival, Ticket
from gradserve.server.transport.answering import Answerer, Streams, StreamWindow
from gradserve.server.transport.status import Failure, refusing
from gradserve.wire import tensors
from gradserve.wire.kinds import BASELINE, OPTIONS, TARGET, Derivative, Option
from gradserve.wire.timing import FIELDS, Hops

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SERVER_NAME = "gradserve"
SERVER_VERSION = importlib.metadata.version("gradserve")
# of the protocol, both transports
EXTENSIONS = ("model_configuration", "model_repository", "statistics")
PLATFORM = "tensorflow_keras"
INPUT, VECTOR, OUTPUT, DERIVATIVE = "x", "v", "y", "dy_dx"
ATTRIBUTIONS, DELTA = "attributions", "delta"
# What each kind answers besides `y` (requesting none of them computes y only).
_ANSWERS = {
    Derivative.INTEGRATED_GRADIENTS: (ATTRIBUTIONS, DELTA),
    Derivative.SMOOTH_GRAD: (ATTRIBUTIONS,),
}
# The options that travel as request parameters (a baseline is an input tensor).
_PARAMETERS = (TARGET, *(o for kind in OPTIONS.values() for o in kind if o.type is not None))
_KIND_NAMES = ", ".join(f'"{kind.value}"' for kind in Derivative)
_INT32_MAX = 2**31 - 1
# Values one tensor may carry in typed contents (`fp32_contents`, ...), in a request and in an
# answer: each is a Python object on the way through protobuf (about 17 ms for this many on
# this kind of machine, on the event loop). Larger tensors travel as raw contents: a request
# is refused with that advice, an answer is sent raw whatever the request used.
MAX_TYPED_VALUES = 1 << 18


@dataclass(frozen=True, slots=True)
class _Encoding:
    """What one ModelInfer request asks for besides its rows: outputs in order, encoding."""

    outputs: tuple[str, ...]
    raw: bool


class InferenceServicer:
    """The standard protocol over every registered model: its calls, answered by the server's
    control plane and data plane."""

    def __init__(
        self,
        control: ControlPlane,
        metrics: Metrics,
        *,
        stream_window: StreamWindow,
        streams: Streams,
        memory: MemoryBudget,
        plane: DataPlane,
    ) -> None:
        self._control = control
        self._answer = Answerer(
            InferenceCodec(control), metrics, streams, service=SERVICE, unary_rpc="ModelInfer",
            stream_rpc="ModelStreamInfer", window=stream_window, memory=memory, plane=plane,
        )  # fmt: skip

    # -- health and metadata ---------------------------------------------------------------

    async def ServerLive(self, request, context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._control.is_ready())

    @refusing
    async def ModelReady(self, request, context) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self._control.model_ready(request.name,
                                                                     request.version))  # fmt: skip

    async def ServerMetadata(self, request, context) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=SERVER_VERSION, extensions=list(EXTENSIONS)
        )

    @refusing
    async def ModelMetadata(self, request, context) -> pb.ModelMetadataResponse:
        spec = self._control.served(request.name, request.version).spec
        return model_metadata(spec, self._control.models.versions(spec.name))

    @refusing
    async def ModelConfig(self, request, context) -> pb.ModelConfigResponse:
        spec = self._control.served(request.name, request.version).spec
        return pb.ModelConfigResponse(config=model_config(spec))

    @refusing
    async def ModelStatistics(self, request, context) -> pb.ModelStatisticsResponse:
        chosen = await self._control.statistics(request.name, request.version)
        return pb.ModelStatisticsResponse(model_stats=[_statistics_message(*c) for c in chosen])

    # -- the model repository --------------------------------------------------------------

    @refusing
    async def RepositoryIndex(self, request, context) -> pb.RepositoryIndexResponse:
        entry = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(
            models=[entry(name=s.name, version=str(s.version), state=s.state, reason=s.reason)
                    for s in self._control.index(request.ready)]
        )  # fmt: skip

    @refusing
    async def RepositoryModelLoad(self, request, context) -> pb.RepositoryModelLoadResponse:
        await self._control.control("load", request.model_name, request.parameters)
        return pb.RepositoryModelLoadResponse()

    @refusing
    async def RepositoryModelUnload(self, request, context) -> pb.RepositoryModelUnloadResponse:
        await self._control.control("unload", request.model_name, request.parameters)
        return pb.RepositoryModelUnloadResponse()

    # -- inference -------------------------------------------------------------------------

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        return await self._answer.unary(request, context)

    async def ModelStreamInfer(
        self, requests: AsyncIterator[pb.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        async for response in self._answer.stream(requests, context):
            yield response


def model_metadata(spec: ModelSpec, versions: list[str]) -> pb.ModelMetadataResponse:
    """A model's tensors as the standard protocol describes them (gRPC and REST), with every
    version it serves."""
    tensor = pb.ModelMetadataResponse.TensorMetadata
    datatype = tensors.float_type(spec.dtype).kserve
    return pb.ModelMetadataResponse(
        name=spec.name,
        versions=versions,
        platform=PLATFORM,
        inputs=[tensor(name=INPUT, datatype=datatype, shape=[-1, *spec.input_shape])],
        outputs=[
            tensor(name=OUTPUT, datatype=datatype, shape=[-1, *spec.output_shape]),
            tensor(name=DERIVATIVE, datatype=datatype, shape=[-1, *spec.input_shape]),
        ],
    )


def model_config(spec: ModelSpec) -> pb.ModelConfig:
    """A model's configuration as Triton's extension describes it (gRPC and REST)."""
    data_type = pb.DataType.Value(tensors.float_type(spec.dtype).triton_config)
    return pb.ModelConfig(
        name=spec.name,
        platform=PLATFORM,
        backend="tensorflow",
        max_batch_size=min(spec.max_request_rows, _INT32_MAX),
        input=[pb.ModelInput(name=INPUT, data_type=data_type, dims=spec.input_shape)],
        output=[
            pb.ModelOutput(name=OUTPUT, data_type=data_type, dims=spec.output_shape),
            pb.ModelOutput(name=DERIVATIVE, data_type=data_type, dims=spec.input_shape),
        ],
    )


def statistics_document(name: str, version: str, stats: Statistics) -> dict:
    """One version's statistics under the extension's names (the REST answer's entry)."""

    def duration(d) -> dict:
        return {"count": d.count, "ns": d.ns}

    return {
        "name": name,
        "version": version,
        "last_inference": stats.last_inference_ms,
        "inference_count": stats.inference_count,
        "execution_count": stats.execution_count,
        "inference_stats": {n: duration(stats.requests[n]) for n in REQUEST_STATISTICS},
        "batch_stats": [
            {"batch_size": size, **{n: duration(durations[n]) for n in BATCH_STATISTICS}}
            for size, durations in sorted(stats.batches.items())
        ],
    }


def _statistics_message(name: str, version: str, stats: Statistics) -> pb.ModelStatistics:
    return json_format.ParseDict(statistics_document(name, version, stats), pb.ModelStatistics())


class InferenceCodec:
    """Standard-protocol messages <-> tickets and results."""

    def __init__(self, control: ControlPlane) -> None:
        self._control = control

    def arrival(self, request: pb.ModelInferRequest) -> Arrival:
        return Arrival(request.id, request.model_name)

    def decode(self, request: pb.ModelInferRequest, arrival: Arrival) -> Ticket:
        served = self._control.served(request.model_name, request.model_version)
        kind, outputs = _asked(request)
        names = [i.name for i in request.inputs]
        wanted = [INPUT, VECTOR] if kind.needs_vector else [INPUT]
        if BASELINE in kind.options and BASELINE.name in names:
            wanted.append(BASELINE.name)
        if sorted(names) != sorted(wanted):
            raise InvalidInput(f"expected input tensor(s) {wanted}, got {names}")
        x = _tensor(request, names.index(INPUT), served.spec.input_shape)
        v = None
        if kind.needs_vector:
            v = _tensor(request, names.index(VECTOR), served.spec.vector_shape(kind), kind)
        x, v = served.decode(kind, x, v)
        baseline = None
        if BASELINE.name in wanted:
            raw = _tensor(request, names.index(BASELINE.name), served.spec.input_shape)
            baseline = served.decode_baseline(raw)
        work = served.expand(kind, x, v, _options(request, kind, baseline))
        encoding = _Encoding(outputs, raw=bool(request.raw_input_contents))
        return Ticket(arrival, served, work, _priority(request), encoding, _timeout(request))

    def outputs(
        self, ticket: Ticket, result: RequestResult | Reduced
    ) -> list[tuple[str, np.ndarray]]:
        """The answer's outputs, in the order asked: (name, contiguous array of the model's
        float type). Every encoding of the standard protocol (gRPC, REST) starts here."""
        arrays = {OUTPUT: result.y, DERIVATIVE: result.dy_dx}
        if isinstance(result, Reduced):
            arrays.update({ATTRIBUTIONS: result.attributions, DELTA: result.delta})
        numpy = tensors.float_type(ticket.served.spec.dtype).numpy
        return [(name, np.ascontiguousarray(arrays[name], dtype=numpy))
                for name in ticket.encoding.outputs]  # fmt: skip

    def encode(self, ticket: Ticket, result: RequestResult | Reduced) -> pb.ModelInferResponse:
        spec, plan = ticket.served.spec, ticket.encoding
        response = pb.ModelInferResponse(
            model_name=spec.name, model_version=spec.version, id=ticket.arrival.id
        )
        outputs = self.outputs(ticket, result)
        kind = tensors.float_type(spec.dtype)
        raw = plan.raw or any(array.size > MAX_TYPED_VALUES for _, array in outputs)
        for name, array in outputs:
            output = response.outputs.add(name=name, datatype=kind.kserve, shape=array.shape)
            if raw:
                response.raw_output_contents.append(array.tobytes())
            elif kind is tensors.FLOAT64:
                output.contents.fp64_contents.extend(array.ravel().tolist())
            else:
                output.contents.fp32_contents.extend(array.ravel().tolist())
        return response

    def add_timing(self, response: pb.ModelInferResponse, hops: Hops) -> None:
        parameters = response.parameters
        for name in FIELDS:
            parameters[name].int64_param = getattr(hops, name)

    def encode_stream(
        self, arrival: Arrival, outcome: pb.ModelInferResponse | Failure
    ) -> pb.ModelStreamInferResponse:
        if isinstance(outcome, Failure):
            return pb.ModelStreamInferResponse(
                error_message=f"{outcome.code.name}: {outcome.message}",
                infer_response=pb.ModelInferResponse(model_name=arrival.model, id=arrival.id),
            )
        return pb.ModelStreamInferResponse(infer_response=outcome)


def _asked(request: pb.ModelInferRequest) -> tuple[Derivative, tuple[str, ...]]:
    """Which derivative and outputs the request asks for; InvalidInput if inconsistent."""
    derivative = "gradient"
    if "derivative" in request.parameters:
        param = request.parameters["derivative"]
        if param.WhichOneof("parameter_choice") != "string_param":
            raise InvalidInput('parameter "derivative" must be a string')
        derivative = param.string_param
    kind = Derivative.named(derivative)
    if kind is None:
        raise InvalidInput(
            f'parameter "derivative" is {derivative!r}; expected one of {_KIND_NAMES}'
        )
    answers = () if kind is Derivative.NONE else _ANSWERS.get(kind, (DERIVATIVE,))
    names = tuple(o.name for o in request.outputs)
    for name in names:
        if name not in (OUTPUT, *answers):
            known = ", ".join(repr(n) for n in (OUTPUT, *answers))
            raise InvalidInput(
                f"unknown output {name!r}; derivative {kind.value!r} answers {known}"
            )
    if not names:
        names = (OUTPUT, *answers)
    elif not set(names) & set(answers):
        kind = Derivative.NONE
    return kind, names


def _priority(request: pb.ModelInferRequest) -> Priority:
    """The request's `priority` parameter, Triton's way: 1 is the highest level (HIGH here);
    0 or absent is the default (NORMAL), as is any lower level (2 and up)."""
    level = _count(request, "priority", "1: high, 0 or 2+: normal")
    return Priority.HIGH if level == 1 else Priority.NORMAL


def _timeout(request: pb.ModelInferRequest) -> float | None:
    """The request's `timeout` parameter, Triton's way: microseconds from its arrival after
    which it is not computed (DEADLINE_EXCEEDED); 0 or absent: no timeout of its own."""
    return _count(request, "timeout", "microseconds, 0: none") / 1e6 or None


def _count(request: pb.ModelInferRequest, key: str, meaning: str) -> int:
    """Integer parameter `key`, 0 or more (0 when absent); InvalidInput saying `meaning`."""
    if key not in request.parameters:
        return 0
    param = request.parameters[key]
    choice = param.WhichOneof("parameter_choice")
    if choice not in ("int64_param", "uint64_param"):
        raise InvalidInput(f'parameter "{key}" must be an integer ({meaning})')
    value = getattr(param, choice)
    if value < 0:
        raise InvalidInput(f'parameter "{key}" is {value}; expected 0 or more ({meaning})')
    return value


def _options(
    request: pb.ModelInferRequest, kind: Derivative, baseline: np.ndarray | None
) -> Options | None:
    """The target and explanation options from the request parameters (None: neither)."""
    given = {o.name: _parameter(request, o) for o in _PARAMETERS if o.name in request.parameters}
    check_applicable(kind, given, "parameter")
    if not kind.explains:
        return Options(**given) if given else None
    return Options(baseline=baseline, **given)


def _parameter(request: pb.ModelInferRequest, option: Option) -> int | float | bool:
    """The value of parameter `option`, of the option's type: a bool, a number (an integer
    parameter is taken as one) or an integer."""
    key = option.name
    param = request.parameters[key]
    which = param.WhichOneof("parameter_choice")
    value = getattr(param, which) if which else None
    if option.type is bool:
        if which != "bool_param":
            raise InvalidInput(f'parameter "{key}" must be a bool')
        return value
    if option.type is float and which in ("double_param", "int64_param", "uint64_param"):
        return float(value)
    if option.type is int and which in ("int64_param", "uint64_param"):
        return int(value)
    wanted = "a number" if option.type is float else "an integer"
    raise InvalidInput(f'parameter "{key}" must be {wanted}, got {which or "nothing"}')


def _tensor(
    request: pb.ModelInferRequest, index: int, shape, vectors_of: Derivative | None = None
) -> tuple[bytes, list, np.dtype]:
    """(bytes, shape, dtype) of input `index`, from raw or typed contents; `vectors_of`: the
    input is that kind's vector v, which may carry k per row ([n, k, *shape])."""
    tensor = request.inputs[index]
    if vectors_of is not None:
        shape = vectors_per_row(vectors_of, shape, tensor.shape)
    kind = tensors.by_kserve(tensor.datatype)
    if kind is None:
        raise InvalidInput(
            f"input {tensor.name!r} has datatype {tensor.datatype!r}; expected FP32 or FP64"
        )
    if request.raw_input_contents:
        if len(request.raw_input_contents) != len(request.inputs):
            raise InvalidInput(
                f"raw_input_contents has {len(request.raw_input_contents)} entries; "
                f"expected one per input ({len(request.inputs)})"
            )
        return request.raw_input_contents[index], tensor.shape, kind.numpy
    dims = check_shape(tensor.shape, shape, tensor.name)
    field = "fp32_contents" if kind is tensors.FLOAT32 else "fp64_contents"
    values = getattr(tensor.contents, field)
    needed = math.prod(dims)
    if len(values) != needed:
        raise InvalidInput(
            f"input {tensor.name!r} has {len(values)} values in contents.{field}, but "
            f"shape {dims} needs {needed}"
        )
    if needed > MAX_TYPED_VALUES:
        raise InvalidInput(
            f"input {tensor.name!r} has {needed} values in contents.{field}; typed contents "
            f"carry at most {MAX_TYPED_VALUES} values per tensor: send larger tensors in "
            "raw_input_contents"
        )
    return np.asarray(values, kind.numpy).tobytes(), dims, kind.numpy
