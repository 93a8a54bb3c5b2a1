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

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc
import numpy as np

from gradserve.inference import grpc_service_pb2 as pb
from gradserve.server.core.batcher import Result
from gradserve.server.core.budget import MemoryBudget
from gradserve.server.core.contract import Derivative, Priority
from gradserve.server.core.errors import InvalidInput, RequestError, UnknownModel
from gradserve.server.core.explain import (
    DEFAULT_NOISE,
    DEFAULT_SAMPLES,
    DEFAULT_STEPS,
    Answer,
    Options,
)
from gradserve.server.core.registry import Models, Served
from gradserve.server.core.validation import check_shape
from gradserve.server.metrics import Metrics
from gradserve.server.transport.answering import Answerer, Streams, StreamWindow
from gradserve.server.transport.status import Failure, abort
from gradserve.server.transport.tickets import Hops, Ticket
from gradserve.wire import tensors

SERVER_NAME = "gradserve"
SERVER_VERSION = "0.1.0"
PLATFORM = "tensorflow_keras"
INPUT, VECTOR, OUTPUT, DERIVATIVE = "x", "v", "y", "dy_dx"
BASELINE, ATTRIBUTIONS, DELTA = "baseline", "attributions", "delta"
# What each kind answers besides `y` (requesting none of them computes y only).
_ANSWERS = {
    Derivative.INTEGRATED_GRADIENTS: (ATTRIBUTIONS, DELTA),
    Derivative.SMOOTH_GRAD: (ATTRIBUTIONS,),
}
_INT_PARAMETERS = ("target", "steps", "samples", "seed")
_EXPLAIN_PARAMETERS = {
    Derivative.INTEGRATED_GRADIENTS: ("steps",),
    Derivative.SMOOTH_GRAD: ("samples", "noise", "noise_absolute", "seed"),
}
_DERIVATIVES = {kind.value: kind for kind in Derivative}
_KIND_NAMES = ", ".join(f'"{k}"' for k in _DERIVATIVES)
_INT32_MAX = 2**31 - 1


@dataclass(frozen=True, slots=True)
class _Plan:
    """What one ModelInfer request asks for besides its rows: outputs in order, encoding."""

    outputs: tuple[str, ...]
    raw: bool


class InferenceServicer:
    """The standard protocol over every registered model; `is_ready` reports readiness."""

    def __init__(
        self,
        models: Models,
        metrics: Metrics,
        is_ready: Callable[[], bool],
        *,
        stream_window: StreamWindow,
        streams: Streams,
        memory: MemoryBudget,
    ) -> None:
        self._models = models
        self._is_ready = is_ready
        self._answer = Answerer(
            InferenceCodec(models), metrics, streams, stream_rpc="ModelStreamInfer",
            window=stream_window, memory=memory,
        )  # fmt: skip

    # -- health and metadata ---------------------------------------------------------------

    async def _checked(self, context: grpc.aio.ServicerContext, name: str, version: str) -> Served:
        try:
            return _model(self._models, name, version)
        except RequestError as exc:
            await abort(context, exc)

    async def ServerLive(self, request, context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._is_ready())

    async def ModelReady(self, request, context) -> pb.ModelReadyResponse:
        await self._checked(context, request.name, request.version)
        return pb.ModelReadyResponse(ready=self._is_ready())

    async def ServerMetadata(self, request, context) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=SERVER_VERSION, extensions=["model_configuration"]
        )

    async def ModelMetadata(self, request, context) -> pb.ModelMetadataResponse:
        spec = (await self._checked(context, request.name, request.version)).spec
        tensor = pb.ModelMetadataResponse.TensorMetadata
        datatype = tensors.float_type(spec.dtype).kserve
        return pb.ModelMetadataResponse(
            name=spec.name,
            versions=[spec.version],
            platform=PLATFORM,
            inputs=[tensor(name=INPUT, datatype=datatype, shape=[-1, *spec.input_shape])],
            outputs=[
                tensor(name=OUTPUT, datatype=datatype, shape=[-1, *spec.output_shape]),
                tensor(name=DERIVATIVE, datatype=datatype, shape=[-1, *spec.input_shape]),
            ],
        )

    async def ModelConfig(self, request, context) -> pb.ModelConfigResponse:
        spec = (await self._checked(context, request.name, request.version)).spec
        data_type = pb.DataType.Value(tensors.float_type(spec.dtype).triton_config)
        config = pb.ModelConfig(
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
        return pb.ModelConfigResponse(config=config)

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


def _model(models: Models, name: str, version: str) -> Served:
    """The standard protocol always names the model."""
    if not name:
        raise UnknownModel(f"no model named; this server serves {[s.spec.name for s in models]}")
    return models.get(name, version)


class InferenceCodec:
    """Standard-protocol messages <-> tickets and results."""

    def __init__(self, models: Models) -> None:
        self._models = models

    def decode(self, request: pb.ModelInferRequest, ticket: Ticket) -> None:
        ticket.id, ticket.model = request.id, request.model_name
        served = _model(self._models, request.model_name, request.model_version)
        kind, outputs = _plan(request)
        names = [i.name for i in request.inputs]
        wanted = [INPUT, VECTOR] if kind.needs_vector else [INPUT]
        if kind is Derivative.INTEGRATED_GRADIENTS and BASELINE in names:
            wanted.append(BASELINE)
        if sorted(names) != sorted(wanted):
            raise InvalidInput(f"expected input tensor(s) {wanted}, got {names}")
        x = _tensor(request, names.index(INPUT), served.spec.input_shape)
        v = None
        if kind.needs_vector:
            v = _tensor(request, names.index(VECTOR), served.spec.vector_shape(kind), tangents=True)
        ticket.x, ticket.v = served.decode(kind, x, v)
        baseline = None
        if BASELINE in wanted:
            raw = _tensor(request, names.index(BASELINE), served.spec.input_shape)
            baseline = served.decode_baseline(raw)
        ticket.options = _options(request, kind, baseline)
        ticket.served, ticket.kind, ticket.priority = served, kind, _priority(request)
        ticket.plan = _Plan(outputs, raw=bool(request.raw_input_contents))

    def encode(self, ticket: Ticket, result: Result | Answer) -> pb.ModelInferResponse:
        spec, plan = ticket.served.spec, ticket.plan
        response = pb.ModelInferResponse(
            model_name=spec.name, model_version=spec.version, id=ticket.id
        )
        arrays = {OUTPUT: result.y, DERIVATIVE: result.dy_dx}
        if isinstance(result, Answer):
            arrays.update({ATTRIBUTIONS: result.attributions, DELTA: result.delta})
        kind = tensors.float_type(spec.dtype)
        for name in plan.outputs:
            array = np.ascontiguousarray(arrays[name], dtype=kind.numpy)
            output = response.outputs.add(name=name, datatype=kind.kserve, shape=array.shape)
            if plan.raw:
                response.raw_output_contents.append(array.tobytes())
            elif kind is tensors.FLOAT64:
                output.contents.fp64_contents.extend(array.ravel().tolist())
            else:
                output.contents.fp32_contents.extend(array.ravel().tolist())
        return response

    def stamp(self, response: pb.ModelInferResponse, breakdown: Hops) -> None:
        parameters = response.parameters
        for key in TIMING_PARAMETERS:
            parameters[key].int64_param = getattr(breakdown, key)

    def encode_stream(
        self, ticket: Ticket, outcome: pb.ModelInferResponse | Failure
    ) -> pb.ModelStreamInferResponse:
        if isinstance(outcome, Failure):
            return pb.ModelStreamInferResponse(
                error_message=f"{outcome.code.name}: {outcome.message}",
                infer_response=pb.ModelInferResponse(model_name=ticket.model, id=ticket.id),
            )
        return pb.ModelStreamInferResponse(infer_response=outcome)


TIMING_PARAMETERS = (
    "decode_us", "queue_us", "handoff_us", "compute_us", "encode_us", "total_us", "batch_rows",
)  # fmt: skip


def _plan(request: pb.ModelInferRequest) -> tuple[Derivative, tuple[str, ...]]:
    """Which derivative and outputs the request asks for; InvalidInput if inconsistent."""
    derivative = "gradient"
    if "derivative" in request.parameters:
        param = request.parameters["derivative"]
        if param.WhichOneof("parameter_choice") != "string_param":
            raise InvalidInput('parameter "derivative" must be a string')
        derivative = param.string_param.lower()
    kind = _DERIVATIVES.get(derivative)
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
    if "priority" not in request.parameters:
        return Priority.NORMAL
    param = request.parameters["priority"]
    choice = param.WhichOneof("parameter_choice")
    if choice not in ("int64_param", "uint64_param"):
        raise InvalidInput('parameter "priority" must be an integer (1: high, 0 or 2+: normal)')
    level = getattr(param, choice)
    if level < 0:
        raise InvalidInput(f'parameter "priority" is {level}; expected 0 or more')
    return Priority.HIGH if level == 1 else Priority.NORMAL


def _options(
    request: pb.ModelInferRequest, kind: Derivative, baseline: np.ndarray | None
) -> Options | None:
    """The target and explanation options from the request parameters (None: neither)."""
    given = {key: _parameter(request, key) for key in (*_INT_PARAMETERS, "noise",
             "noise_absolute") if key in request.parameters}  # fmt: skip
    allowed = (*_EXPLAIN_PARAMETERS.get(kind, ()), *(("target",) if kind.takes_target else ()))
    extra = sorted(set(given) - set(allowed))
    if extra:
        raise InvalidInput(f"parameter(s) {extra} do not apply to derivative {kind.value!r}")
    if not kind.explains:
        return Options(target=given["target"]) if "target" in given else None
    return Options(
        target=given.get("target"),
        steps=given.get("steps", DEFAULT_STEPS),
        baseline=baseline,
        samples=given.get("samples", DEFAULT_SAMPLES),
        noise=given.get("noise", DEFAULT_NOISE),
        noise_absolute=given.get("noise_absolute", False),
        seed=given.get("seed", 0),
    )


def _parameter(request: pb.ModelInferRequest, key: str) -> int | float | bool:
    param = request.parameters[key]
    which = param.WhichOneof("parameter_choice")
    value = getattr(param, which) if which else None
    if key == "noise_absolute":
        if which != "bool_param":
            raise InvalidInput(f'parameter "{key}" must be a bool')
        return value
    if key == "noise" and which in ("double_param", "int64_param", "uint64_param"):
        return float(value)
    if key != "noise" and which in ("int64_param", "uint64_param"):
        return int(value)
    wanted = "a number" if key == "noise" else "an integer"
    raise InvalidInput(f'parameter "{key}" must be {wanted}, got {which or "nothing"}')


def _tensor(
    request: pb.ModelInferRequest, index: int, shape, tangents: bool = False
) -> tuple[bytes, list, np.dtype]:
    """(bytes, shape, dtype) of input `index`, from raw or typed contents; `tangents`: the
    input may carry k vectors per row ([n, k, *shape])."""
    tensor = request.inputs[index]
    if tangents and len(tensor.shape) == len(shape) + 2:
        shape = (tensor.shape[1], *shape)
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
        return request.raw_input_contents[index], list(tensor.shape), kind.numpy
    dims = check_shape(tensor.shape, shape, tensor.name)
    field = "fp32_contents" if kind is tensors.FLOAT32 else "fp64_contents"
    values = getattr(tensor.contents, field)
    needed = int(np.prod(dims))
    if len(values) != needed:
        raise InvalidInput(
            f"input {tensor.name!r} has {len(values)} values in contents.{field}, but "
            f"shape {dims} needs {needed}"
        )
    return np.asarray(values, kind.numpy).tobytes(), dims, kind.numpy
