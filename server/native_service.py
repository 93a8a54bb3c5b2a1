"""The gradserve.v1 GradientService: protobuf <-> numpy, validation and status codes.

No batching logic here: rows go to the named model's Batcher, results come back.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from gradserve.client.tensors import numpy_dtype, to_tensor
from gradserve.server.batcher import Result
from gradserve.server.contract import Derivative, ModelSpec
from gradserve.server.decode import InvalidInput
from gradserve.server.registry import Models
from gradserve.server.status import RequestFailed
from gradserve.server.streaming import Streams, answer_stream, answer_unary
from gradserve.server.wire import Undecodable
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc

_KINDS = {
    pb.GRADIENT: Derivative.GRADIENT,
    pb.JACOBIAN: Derivative.JACOBIAN,
    pb.NONE: Derivative.NONE,
    pb.VJP: Derivative.VJP,
    pb.JVP: Derivative.JVP,
    pb.HESSIAN: Derivative.HESSIAN,
    pb.HVP: Derivative.HVP,
}
_KIND_LIST = ", ".join(f"{pb.Derivative.Name(k)} ({k})" for k in _KINDS)


def _raw(tensor: pb.Tensor, name: str) -> tuple[bytes, list[int], object]:
    dtype = numpy_dtype(tensor.dtype)
    if dtype is None:
        raise InvalidInput(f"{name} has dtype {tensor.dtype}; expected FLOAT32 (0) or FLOAT64 (1)")
    return tensor.data, list(tensor.shape), dtype


class GradientServicer(pb_grpc.GradientServiceServicer):
    """Serves every registered model through its Batcher."""

    def __init__(
        self, models: Models, *, stream_window: int = 256, streams: Streams | None = None
    ) -> None:
        self._models = models
        self._window = stream_window
        self._streams = streams or Streams()

    def _submit(
        self, request: pb.EvaluateRequest, deadline: float | None
    ) -> asyncio.Future[Result]:
        """Validate and queue one request; raises RequestFailed for anything wrong."""
        if isinstance(request, Undecodable):
            raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        try:
            served = self._models.get(request.model)
            kind = _KINDS.get(request.derivative)
            if kind is None:
                raise InvalidInput(
                    f"derivative {request.derivative} is unknown; expected one of {_KIND_LIST}"
                )
            if not request.HasField("x"):
                shape = ", ".join(map(str, served.spec.input_shape))
                raise InvalidInput(f"x is missing; send rows of shape [n, {shape}]")
            v = _raw(request.v, "v") if request.HasField("v") else None
            x, v = served.decode(kind, _raw(request.x, "x"), v)
            return served.batcher.submit(x, kind, deadline, v)
        except Exception as exc:
            raise RequestFailed.of(exc) from exc

    @staticmethod
    def _response(
        request: pb.EvaluateRequest, outcome: Result | RequestFailed
    ) -> pb.EvaluateResponse:
        if isinstance(outcome, RequestFailed):
            error = pb.Error(code=outcome.code.value[0], message=outcome.message)
            return pb.EvaluateResponse(id=request.id, error=error)
        t = outcome.timing
        response = pb.EvaluateResponse(
            id=request.id,
            y=to_tensor(outcome.y),
            timing=pb.Timing(queue_us=t.queue_us, compute_us=t.compute_us, batch_rows=t.batch_rows),
        )
        if outcome.dy_dx is not None:
            response.dy_dx.CopyFrom(to_tensor(outcome.dy_dx))
        return response

    async def Evaluate(
        self, request: pb.EvaluateRequest, context: grpc.aio.ServicerContext
    ) -> pb.EvaluateResponse:
        return await answer_unary(request, context, self._submit, self._response)

    async def EvaluateStream(
        self, request_iterator: AsyncIterator[pb.EvaluateRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.EvaluateResponse]:
        responses = answer_stream(
            request_iterator, context, self._submit, self._response, self._window, self._streams
        )
        async for response in responses:
            yield response

    async def GetModelInfo(
        self, request: pb.ModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        try:
            served = self._models.get(request.model)
        except RequestFailed as failure:
            await context.abort(failure.code, failure.message)
        return model_info(served.spec)

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
        dtype=pb.FLOAT64 if spec.dtype == "float64" else pb.FLOAT32,
        derivatives=list(_KINDS),
        device=spec.device,
        max_batch_size=spec.max_batch_size,
        max_request_rows=spec.max_request_rows,
    )


_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


def stream_code(response: pb.EvaluateResponse) -> str:
    """The status of one stream response, for the metrics."""
    if not response.HasField("error"):
        return "OK"
    return _CODE_NAMES.get(response.error.code, "UNKNOWN")
