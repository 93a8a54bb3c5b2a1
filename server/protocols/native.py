"""The gradserve.v1 GradientService: protobuf <-> numpy and the native tensors.

No batching logic here: the Answerer hands decoded rows to the named model's batcher.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import ClassVar

import grpc
import numpy as np

from gradserve.server.core.batcher import Result
from gradserve.server.core.budget import MemoryBudget
from gradserve.server.core.contract import Derivative, ModelSpec, Priority
from gradserve.server.core.errors import InvalidInput, RequestError
from gradserve.server.core.explain import (
    DEFAULT_NOISE,
    DEFAULT_SAMPLES,
    DEFAULT_STEPS,
    Answer,
    Options,
)
from gradserve.server.core.registry import Models, Served
from gradserve.server.metrics import Metrics
from gradserve.server.transport import bulk
from gradserve.server.transport.answering import Answerer, Streams, StreamWindow
from gradserve.server.transport.status import Failure, abort
from gradserve.server.transport.tickets import Hops, Ticket
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.wire import tensors

_KINDS = {
    pb.GRADIENT: Derivative.GRADIENT,
    pb.JACOBIAN: Derivative.JACOBIAN,
    pb.NONE: Derivative.NONE,
    pb.VJP: Derivative.VJP,
    pb.JVP: Derivative.JVP,
    pb.HESSIAN: Derivative.HESSIAN,
    pb.HVP: Derivative.HVP,
    pb.INTEGRATED_GRADIENTS: Derivative.INTEGRATED_GRADIENTS,
    pb.SMOOTH_GRAD: Derivative.SMOOTH_GRAD,
}
_KIND_LIST = ", ".join(f"{pb.Derivative.Name(k)} ({k})" for k in _KINDS)
_PRIORITIES = {pb.NORMAL: Priority.NORMAL, pb.HIGH: Priority.HIGH}


# Tensor bytes read in place (bulk.py): x.data and v.data of a request.
LIFTED = {
    (pb.EvaluateRequest.X_FIELD_NUMBER, pb.Tensor.DATA_FIELD_NUMBER): "x",
    (pb.EvaluateRequest.V_FIELD_NUMBER, pb.Tensor.DATA_FIELD_NUMBER): "v",
}
# Answer tensors written past protobuf when large, by field.
_SPLICED = (
    ("dy_dx", pb.EvaluateResponse.DY_DX_FIELD_NUMBER),
    ("attributions", pb.EvaluateResponse.ATTRIBUTIONS_FIELD_NUMBER),
)


def _raw(tensor: pb.Tensor, name: str, payload: memoryview | None = None) -> tuple:
    kind = tensors.by_wire(tensor.dtype)
    if kind is None:
        raise InvalidInput(f"{name} has dtype {tensor.dtype}; expected FLOAT32 (0) or FLOAT64 (1)")
    data = tensor.data if payload is None else payload
    return data, list(tensor.shape), kind.numpy


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

    def __init__(self, models: Models) -> None:
        self._models = models

    def decode(self, received: bulk.Lifted, ticket: Ticket) -> None:
        request, payloads = received.message, received.payloads
        ticket.id, ticket.model = request.id, request.model
        served = self._models.get(request.model)
        kind = _KINDS.get(request.derivative)
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
        ticket.x, ticket.v = served.decode(kind, _raw(request.x, "x", payloads.get("x")), v)
        ticket.options = _options(request, kind, served)
        ticket.served, ticket.kind, ticket.priority = served, kind, priority

    def encode(self, ticket: Ticket, result: Result | Answer) -> bulk.Spliced:
        response = bulk.Spliced(pb.EvaluateResponse(id=ticket.id, y=tensors.to_tensor(result.y)))
        for name, number in _SPLICED:
            array = getattr(result, name, None)
            if array is not None:
                _answer_tensor(response, name, number, array)
        if isinstance(result, Answer) and result.delta is not None:
            response.message.delta.CopyFrom(tensors.to_tensor(result.delta))
        return response

    def stamp(self, response: bulk.Spliced, breakdown: Hops) -> None:
        t = response.message.timing
        t.decode_us, t.queue_us = breakdown.decode_us, breakdown.queue_us
        t.handoff_us, t.compute_us = breakdown.handoff_us, breakdown.compute_us
        t.encode_us, t.total_us = breakdown.encode_us, breakdown.total_us
        t.batch_rows = breakdown.batch_rows

    def encode_stream(
        self, ticket: Ticket, outcome: bulk.Spliced | Failure
    ) -> bulk.Spliced | pb.EvaluateResponse:
        if isinstance(outcome, Failure):
            error = pb.Error(code=outcome.code.value[0], message=outcome.message)
            return pb.EvaluateResponse(id=ticket.id, error=error)
        return outcome


def _options(request: pb.EvaluateRequest, kind: Derivative, served: Served) -> Options | None:
    """The target and explanation options of a request; None when it has neither."""
    has_explain = request.HasField("explain")
    if has_explain and not kind.explains:
        raise InvalidInput(f"explain options are for integrated_gradients and smooth_grad, "
                           f"not {kind.value}")  # fmt: skip
    target = request.target if request.HasField("target") else None
    if not kind.explains:
        return None if target is None else Options(target=target)
    e = request.explain
    baseline = e.baseline if e.HasField("baseline") else None
    if baseline is not None and kind is not Derivative.INTEGRATED_GRADIENTS:
        raise InvalidInput("baseline is for integrated_gradients only")
    return Options(
        target=target,
        steps=e.steps or DEFAULT_STEPS,
        baseline=None if baseline is None else served.decode_baseline(_raw(baseline, "baseline")),
        samples=e.samples or DEFAULT_SAMPLES,
        noise=e.noise if e.HasField("noise") else DEFAULT_NOISE,
        noise_absolute=e.noise_absolute,
        seed=e.seed,
    )


class GradientServicer:
    """gradserve.v1.GradientService over every registered model."""

    lifted: ClassVar = {"Evaluate": LIFTED, "EvaluateStream": LIFTED}  # see routing.Routes.add

    def __init__(
        self,
        models: Models,
        metrics: Metrics,
        *,
        stream_window: StreamWindow,
        streams: Streams,
        memory: MemoryBudget,
    ) -> None:
        self._models = models
        self._answer = Answerer(
            NativeCodec(models), metrics, streams, stream_rpc="EvaluateStream",
            window=stream_window, memory=memory,
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

    async def GetModelInfo(
        self, request: pb.ModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        try:
            return model_info(self._models.get(request.model).spec)
        except RequestError as exc:
            await abort(context, exc)

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelList:
        return pb.ModelList(models=[model_info(s.spec) for s in self._models])


def model_info(spec: ModelSpec) -> pb.ModelInfo:
    return pb.ModelInfo(
        name=spec.name,
        version=spec.version,
        input_width=spec.input_width,
        output_width=spec.output_width,
        input_shape=spec.input_shape,
        output_shape=spec.output_shape,
        dtype=tensors.float_type(spec.dtype).wire,
        derivatives=list(_KINDS),
        device=spec.device,
        max_batch_size=spec.max_batch_size,
        max_request_rows=spec.max_request_rows,
    )
