"""The gradserve.v1 GradientService: protobuf <-> numpy, validation and status codes.

No batching logic here: rows go to the shared Batcher, results come back.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc

from gradserve.client.tensors import numpy_dtype, to_tensor
from gradserve.server import batcher as b
from gradserve.server.contract import Derivative, ModelSpec
from gradserve.server.decode import InvalidInput, decode_rows
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc

_KINDS = {
    pb.GRADIENT: Derivative.GRADIENT,
    pb.JACOBIAN: Derivative.JACOBIAN,
    pb.NONE: Derivative.NONE,
}

_STATUS = {
    InvalidInput: grpc.StatusCode.INVALID_ARGUMENT,
    b.RequestTooLarge: grpc.StatusCode.INVALID_ARGUMENT,
    b.QueueFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    b.DeadlineExpired: grpc.StatusCode.DEADLINE_EXCEEDED,
    b.EngineFailed: grpc.StatusCode.INTERNAL,
    b.Closed: grpc.StatusCode.UNAVAILABLE,
}


class RequestFailed(Exception):
    """A request's outcome as a gRPC status code and message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    @classmethod
    def of(cls, exc: Exception) -> RequestFailed:
        if isinstance(exc, RequestFailed):
            return exc
        for kind, code in _STATUS.items():
            if isinstance(exc, kind):
                return cls(code, str(exc))
        return cls(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline on the event loop's clock, or None when the caller set none."""
    remaining = context.time_remaining()
    if remaining is None:
        return None
    return asyncio.get_running_loop().time() + remaining


class GradientServicer(pb_grpc.GradientServiceServicer):
    """Serves one model through one Batcher."""

    def __init__(self, batcher: b.Batcher, spec: ModelSpec, *, stream_window: int = 256) -> None:
        self._batcher = batcher
        self._spec = spec
        self._window = stream_window

    def _check_model(self, name: str) -> None:
        if name and name != self._spec.name:
            raise RequestFailed(
                grpc.StatusCode.NOT_FOUND,
                f"model {name!r} is not served here; this server serves {self._spec.name!r}",
            )

    def _submit(
        self, request: pb.EvaluateRequest, deadline: float | None
    ) -> tuple[Derivative, asyncio.Future[b.Result]]:
        """Validate and queue one request; raises RequestFailed for anything wrong."""
        try:
            self._check_model(request.model)
            kind = _KINDS.get(request.derivative)
            if kind is None:
                raise InvalidInput(
                    f"derivative {request.derivative} is unknown; expected GRADIENT (0), "
                    "JACOBIAN (1) or NONE (2)"
                )
            if not request.HasField("x"):
                raise InvalidInput(
                    f"x is missing; send rows of shape [n, {self._spec.input_width}]"
                )
            dtype = numpy_dtype(request.x.dtype)
            if dtype is None:
                raise InvalidInput(
                    f"x has dtype {request.x.dtype}; expected FLOAT32 (0) or FLOAT64 (1)"
                )
            x = decode_rows(request.x.data, request.x.shape, dtype, self._spec.input_width)
            return kind, self._batcher.submit(x, kind, deadline)
        except Exception as exc:
            raise RequestFailed.of(exc) from exc

    @staticmethod
    def _response(request_id: str, result: b.Result) -> pb.EvaluateResponse:
        t = result.timing
        response = pb.EvaluateResponse(
            id=request_id,
            y=to_tensor(result.y),
            timing=pb.Timing(queue_us=t.queue_us, compute_us=t.compute_us, batch_rows=t.batch_rows),
        )
        if result.dy_dx is not None:
            response.dy_dx.CopyFrom(to_tensor(result.dy_dx))
        return response

    async def Evaluate(
        self, request: pb.EvaluateRequest, context: grpc.aio.ServicerContext
    ) -> pb.EvaluateResponse:
        try:
            _, future = self._submit(request, deadline_of(context))
            result = await future
        except Exception as exc:
            failure = RequestFailed.of(exc)
            await context.abort(failure.code, failure.message)
        return self._response(request.id, result)

    async def EvaluateStream(
        self, request_iterator: AsyncIterator[pb.EvaluateRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.EvaluateResponse]:
        """Read ahead while earlier messages compute; answer in order, errors per message."""
        deadline = deadline_of(context)
        inflight: asyncio.Queue[tuple[str, asyncio.Future | RequestFailed] | None] = asyncio.Queue(
            self._window
        )

        async def read() -> None:
            try:
                async for request in request_iterator:
                    try:
                        _, outcome = self._submit(request, deadline)
                    except RequestFailed as failure:
                        outcome = failure
                    await inflight.put((request.id, outcome))
            finally:
                await inflight.put(None)

        reader = asyncio.create_task(read())
        try:
            while (item := await inflight.get()) is not None:
                yield await self._stream_answer(*item)
            await reader
        finally:
            reader.cancel()
            while not inflight.empty():
                item = inflight.get_nowait()
                if item is not None and isinstance(item[1], asyncio.Future):
                    item[1].cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader

    async def _stream_answer(
        self, request_id: str, outcome: asyncio.Future | RequestFailed
    ) -> pb.EvaluateResponse:
        try:
            if isinstance(outcome, RequestFailed):
                raise outcome
            return self._response(request_id, await outcome)
        except Exception as exc:
            failure = RequestFailed.of(exc)
            return pb.EvaluateResponse(
                id=request_id, error=pb.Error(code=failure.code.value[0], message=failure.message)
            )

    async def GetModelInfo(
        self, request: pb.ModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        try:
            self._check_model(request.model)
        except RequestFailed as failure:
            await context.abort(failure.code, failure.message)
        spec = self._spec
        return pb.ModelInfo(
            name=spec.name,
            version=spec.version,
            input_width=spec.input_width,
            output_width=spec.output_width,
            derivatives=list(_KINDS),
            device=spec.device,
            max_batch_size=spec.max_batch_size,
            max_request_rows=spec.max_request_rows,
        )
