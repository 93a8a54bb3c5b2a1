"""The gradserve.v1 GradientService: protobuf <-> numpy and the native tensors.

No batching logic here: the Answerer hands decoded rows to the named model's batcher.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import ClassVar

import grpc
import numpy as np

from gradserve.server.core.batcher import RequestResult
from gradserve.server.core.budget import MemoryBudget
from gradserve.server.core.contract import ModelSpec, Priority
from gradserve.server.core.errors import InvalidInput
from gradserve.server.core.explain import Options, Reduced, check_applicable
from gradserve.server.core.registry import Served
from gradserve.server.metrics import Metrics
from gradserve.server.serving.control import ControlPlane
from gradserve.server.serving.dataplane import DataPlane
from gradserve.server.serving.tickets import Arrival, Ticket
from gradserve.server.transport import bulk
from gradserve.server.transport.answering import Answerer, Streams, StreamWindow
from gradserve.server.transport.status import Failure, refusing
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.wire import native, tensors
from gradserve.wire.kinds import BASELINE, EXPLANATIONS, Derivative
from gradserve.wire.status import status_number
from gradserve.wire.timing import FIELDS, Hops

SERVICE = pb.DESCRIPTOR.services_by_name["GradientService"].full_name
_KIND_LIST = ", ".join(f"{pb.Derivative.Name(k)} ({k})" for k in sorted(native.KIND))
_PRIORITIES = {pb.Priority.Value(priority.name): priority for priority in Priority}
_EXPLAINING = " and ".join(kind.value for kind in EXPLANATIONS)


# Tensor bytes read in place (bulk.py): x.data and v.data of a request.
LIFTED = {
    (pb.EvaluateRequest.X_FIELD_NUMBER, pb.Tensor.DATA_FIELD_NUMBER): "x",
    (pb.EvaluateRequest.V_FIELD_NUMBER, pb.Tensor.DATA_FIELD_NUMBER): "v",
}
# Answer tensors written past protobuf when large, by field.
_SPLICED = (
    ("y", pb.EvaluateResponse.Y_FIELD_NUMBER),
    ("dy_dx", pb.EvaluateResponse.DY_DX_FIELD_NUMBER),
    ("attributions", pb.EvaluateResponse.ATTRIBUTIONS_FIELD_NUMBER),
)


def _raw(tensor: pb.Tensor, name: str, payload: memoryview | None = None) -> tuple:
    kind = tensors.by_wire(tensor.dtype)
    if kind is None:
        raise InvalidInput(f"{name} has dtype {tensor.dtype}; expected FLOAT32 (0) or FLOAT64 (1)")
    data = tensor.data if payload is None else payload
    return data, tensor.shape, kind.numpy


def _answer_tensor(response: bulk.Spliced, name: str, number: int, array: np.ndarray) -> None:
    """Set tensor `name` of the answer: in the message when small, spliced when large."""
    if array.nbytes < bulk.LARGE:
        getattr(response.message, name).CopyFrom(tensors.to_tensor(array))
        return
    kind = tensors.float_type(array.dtype)
    head = pb.Tensor(shape=array.shape, dtype=kind.wire).SerializeToString()
    data = np.ascontiguousarray(array, dtype=kind.numpy)
    response.tensors.append((number, head, pb.Tensor.DATA_FIELD_NUMBER, data))


class NativeCodec:
    """gradserve.v1 messages <-> tickets and results."""

    def __init__(self, control: ControlPlane) -> None:
        self._control = control

    def arrival(self, received: bulk.Lifted) -> Arrival:
        return Arrival(received.message.id, received.message.model)

    def decode(self, received: bulk.Lifted, arrival: Arrival) -> Ticket:
        request, payloads = received.message, received.payloads
        served = self._control.served(request.model, request.version, named=False)
        kind = native.KIND.get(request.derivative)
        if kind is None:
            raise InvalidInput(
                f"derivative {request.derivative} is unknown; expected one of {_KIND_LIST}"
            )
        if not request.HasField("x"):
            shape = ", ".join(map(str, served.spec.input_shape))
            raise InvalidInput(f"x is missing; send rows of shape [n, {shape}]")
        priority = _PRIORITIES.get(request.priority)
        if priority is None:
            raise InvalidInput(
                f"priority {request.priority} is unknown; expected NORMAL (0) or HIGH (1)"
            )
        v = _raw(request.v, "v", payloads.get("v")) if request.HasField("v") else None
        x, v = served.decode(kind, _raw(request.x, "x", payloads.get("x")), v)
        work = served.expand(kind, x, v, _options(request, kind, served))
        return Ticket(arrival, served, work, priority)

    def encode(self, ticket: Ticket, result: RequestResult | Reduced) -> bulk.Spliced:
        message = pb.EvaluateResponse(id=ticket.arrival.id)
        response = bulk.Spliced(message)
        for name, number in _SPLICED:
            array = getattr(result, name, None)
            if array is not None:
                _answer_tensor(response, name, number, array)
        if isinstance(result, Reduced) and result.delta is not None:
            message.delta.CopyFrom(tensors.to_tensor(result.delta))
        return response

    def add_timing(self, response: bulk.Spliced, hops: Hops) -> None:
        timing = response.message.timing
        for name in FIELDS:
            setattr(timing, name, getattr(hops, name))

    def encode_stream(
        self, arrival: Arrival, outcome: bulk.Spliced | Failure
    ) -> bulk.Spliced | pb.EvaluateResponse:
        if isinstance(outcome, Failure):
            error = pb.Error(code=status_number(outcome.code), message=outcome.message)
            return pb.EvaluateResponse(id=arrival.id, error=error)
        return outcome


def _options(request: pb.EvaluateRequest, kind: Derivative, served: Served) -> Options | None:
    """The target and explanation options of a request; None when it has neither. An
    `Explain` field left at its default (unset) takes the option's default."""
    if request.HasField("explain") and not kind.explains:
        raise InvalidInput(f"explain options are for {_EXPLAINING}, not {kind.value}")
    target = request.target if request.HasField("target") else None
    if not kind.explains:
        return None if target is None else Options(target=target)
    given = {field.name: value for field, value in request.explain.ListFields()}
    check_applicable(kind, given, "explain option")
    if BASELINE.name in given:
        given[BASELINE.name] = served.decode_baseline(_raw(given[BASELINE.name], "baseline"))
    return Options(target=target, **given)


class GradientServicer:
    """gradserve.v1.GradientService over every registered model: its calls, answered by the
    server's control plane and data plane."""

    lifted: ClassVar = {"Evaluate": LIFTED, "EvaluateStream": LIFTED}  # see routing.Routes.add

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
            NativeCodec(control), metrics, streams, service=SERVICE, unary_rpc="Evaluate",
            stream_rpc="EvaluateStream", window=stream_window, memory=memory, plane=plane,
        )  # fmt: skip

    async def Evaluate(
        self, request: bulk.Lifted, context: grpc.aio.ServicerContext
    ) -> bulk.Spliced:
        return await self._answer.unary(request, context)

    async def EvaluateStream(
        self, requests: AsyncIterator[bulk.Lifted], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bulk.Spliced | pb.EvaluateResponse]:
        async for response in self._answer.stream(requests, context):
            yield response

    @refusing
    async def GetModelInfo(
        self, request: pb.ModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        return model_info(self._control.served(request.model, request.version, named=False).spec)

    @refusing
    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelList:
        served = self._control.models.every_version()
        return pb.ModelList(models=[model_info(s.spec) for s in served])

    @refusing
    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        return pb.RepositoryIndexResponse(
            versions=[pb.ModelVersionStatus(model=s.name, version=str(s.version), state=s.state,
                                            reason=s.reason)
                      for s in self._control.index()]
        )  # fmt: skip

    @refusing
    async def LoadModel(
        self, request: pb.LoadModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.LoadModelResponse:
        await self._control.control("load", request.model)
        return pb.LoadModelResponse()

    @refusing
    async def UnloadModel(
        self, request: pb.UnloadModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.UnloadModelResponse:
        await self._control.control("unload", request.model)
        return pb.UnloadModelResponse()


def model_info(spec: ModelSpec) -> pb.ModelInfo:
    return pb.ModelInfo(
        name=spec.name,
        version=spec.version,
        input_width=spec.input_width,
        output_width=spec.output_width,
        input_shape=spec.input_shape,
        output_shape=spec.output_shape,
        dtype=tensors.float_type(spec.dtype).wire,
        derivatives=sorted(native.KIND),
        device=spec.device,
        max_batch_size=spec.max_batch_size,
        max_request_rows=spec.max_request_rows,
    )
