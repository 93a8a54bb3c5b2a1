"""The standard inference protocol (KServe v2 `inference.GRPCInferenceService`), with
Triton's ModelStreamInfer and ModelConfig extensions, on the same batcher as the native API.

Tensors: input `x` (FP32 or FP64, [n, d]); outputs `y` (FP32, [n, m]) and `dy_dx` (FP32,
[n, d] for the gradient, [n, m, d] with request parameter derivative="jacobian").
Requesting only `y` computes no derivative.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc
import numpy as np

from gradserve.inference import grpc_service_pb2 as pb
from gradserve.inference import grpc_service_pb2_grpc as pb_grpc
from gradserve.server.batcher import Batcher, Result
from gradserve.server.contract import Derivative, ModelSpec
from gradserve.server.decode import InvalidInput, check_shape, decode_rows
from gradserve.server.status import RequestFailed, deadline_of, not_found
from gradserve.server.streaming import Streams, pipelined
from gradserve.server.wire import Undecodable

SERVER_NAME = "gradserve"
SERVER_VERSION = "0.1.0"
PLATFORM = "tensorflow_keras"
INPUT, OUTPUT, DERIVATIVE = "x", "y", "dy_dx"
_DTYPES = {"FP32": np.dtype("<f4"), "FP64": np.dtype("<f8")}
_DERIVATIVES = {
    "gradient": Derivative.GRADIENT,
    "jacobian": Derivative.JACOBIAN,
    "none": Derivative.NONE,
}
_INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class _Plan:
    """What one ModelInfer request asks for: derivative kind, outputs in order, encoding."""

    kind: Derivative
    outputs: tuple[str, ...]
    raw: bool


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Serves one model through the shared Batcher; `is_ready` reports the server's state."""

    def __init__(
        self,
        batcher: Batcher,
        spec: ModelSpec,
        is_ready: Callable[[], bool],
        *,
        stream_window: int = 256,
        streams: Streams | None = None,
    ) -> None:
        self._batcher = batcher
        self._spec = spec
        self._is_ready = is_ready
        self._window = stream_window
        self._streams = streams or Streams()

    # -- health and metadata ---------------------------------------------------------------

    def _check_model(self, name: str, version: str) -> None:
        if name != self._spec.name:
            raise not_found("model", name, self._spec.name)
        if version not in ("", self._spec.version):
            raise RequestFailed(
                grpc.StatusCode.NOT_FOUND,
                f"version {version!r} of model {name!r} is not served; "
                f"available: {self._spec.version!r}",
            )

    async def _checked(self, context: grpc.aio.ServicerContext, name: str, version: str) -> None:
        try:
            self._check_model(name, version)
        except RequestFailed as failure:
            await context.abort(failure.code, failure.message)

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
        await self._checked(context, request.name, request.version)
        spec = self._spec
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=spec.name,
            versions=[spec.version],
            platform=PLATFORM,
            inputs=[tensor(name=INPUT, datatype="FP32", shape=[-1, spec.input_width])],
            outputs=[
                tensor(name=OUTPUT, datatype="FP32", shape=[-1, spec.output_width]),
                tensor(name=DERIVATIVE, datatype="FP32", shape=[-1, spec.input_width]),
            ],
        )

    async def ModelConfig(self, request, context) -> pb.ModelConfigResponse:
        await self._checked(context, request.name, request.version)
        spec = self._spec
        config = pb.ModelConfig(
            name=spec.name,
            platform=PLATFORM,
            backend="tensorflow",
            max_batch_size=min(spec.max_request_rows, _INT32_MAX),
            input=[pb.ModelInput(name=INPUT, data_type=pb.TYPE_FP32, dims=[spec.input_width])],
            output=[
                pb.ModelOutput(name=OUTPUT, data_type=pb.TYPE_FP32, dims=[spec.output_width]),
                pb.ModelOutput(name=DERIVATIVE, data_type=pb.TYPE_FP32, dims=[spec.input_width]),
            ],
        )
        return pb.ModelConfigResponse(config=config)

    # -- inference -------------------------------------------------------------------------

    def _plan(self, request: pb.ModelInferRequest) -> _Plan:
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
                f'parameter "derivative" is {derivative!r}; expected "gradient", "jacobian" '
                'or "none"'
            )
        names = tuple(o.name for o in request.outputs)
        for name in names:
            if name not in (OUTPUT, DERIVATIVE):
                raise InvalidInput(
                    f"unknown output {name!r}; the model's outputs are {OUTPUT!r} and "
                    f"{DERIVATIVE!r}"
                )
        if not names:
            names = (OUTPUT,) if kind is Derivative.NONE else (OUTPUT, DERIVATIVE)
        elif DERIVATIVE not in names:
            kind = Derivative.NONE
        elif kind is Derivative.NONE:
            raise InvalidInput(f'output {DERIVATIVE!r} requested with derivative "none"')
        return _Plan(kind, names, raw=bool(request.raw_input_contents))

    def _decode(self, request: pb.ModelInferRequest) -> np.ndarray:
        if len(request.inputs) != 1 or request.inputs[0].name != INPUT:
            names = [i.name for i in request.inputs]
            raise InvalidInput(f"expected exactly one input tensor {INPUT!r}, got {names}")
        tensor = request.inputs[0]
        dtype = _DTYPES.get(tensor.datatype)
        if dtype is None:
            raise InvalidInput(
                f"input {INPUT!r} has datatype {tensor.datatype!r}; expected FP32 or FP64"
            )
        width = self._spec.input_width
        if request.raw_input_contents:
            if len(request.raw_input_contents) != 1:
                raise InvalidInput(
                    f"raw_input_contents has {len(request.raw_input_contents)} entries; "
                    "expected one per input (1)"
                )
            return decode_rows(request.raw_input_contents[0], tensor.shape, dtype, width, INPUT)
        n, d = check_shape(tensor.shape, width, INPUT)
        field = "fp32_contents" if tensor.datatype == "FP32" else "fp64_contents"
        values = getattr(tensor.contents, field)
        if len(values) != n * d:
            raise InvalidInput(
                f"input {INPUT!r} has {len(values)} values in contents.{field}, but shape "
                f"{[n, d]} needs {n * d}"
            )
        return decode_rows(np.asarray(values, dtype).tobytes(), [n, d], dtype, width, INPUT)

    def _submit(
        self, request: pb.ModelInferRequest, deadline: float | None
    ) -> asyncio.Future[Result]:
        if isinstance(request, Undecodable):
            raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        try:
            self._check_model(request.model_name, request.model_version)
            plan = self._plan(request)
            return self._batcher.submit(self._decode(request), plan.kind, deadline)
        except Exception as exc:
            raise RequestFailed.of(exc) from exc

    def _response(self, request: pb.ModelInferRequest, result: Result) -> pb.ModelInferResponse:
        plan = self._plan(request)
        response = pb.ModelInferResponse(
            model_name=self._spec.name, model_version=self._spec.version, id=request.id
        )
        timing = result.timing
        for key, value in (
            ("queue_us", timing.queue_us),
            ("compute_us", timing.compute_us),
            ("batch_rows", timing.batch_rows),
        ):
            response.parameters[key].int64_param = value
        arrays = {OUTPUT: result.y, DERIVATIVE: result.dy_dx}
        for name in plan.outputs:
            array = np.ascontiguousarray(arrays[name], dtype="<f4")
            output = response.outputs.add(name=name, datatype="FP32", shape=array.shape)
            if plan.raw:
                response.raw_output_contents.append(array.tobytes())
            else:
                output.contents.fp32_contents.extend(array.ravel().tolist())
        return response

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        try:
            result = await self._submit(request, deadline_of(context))
        except Exception as exc:
            failure = RequestFailed.of(exc)
            await context.abort(failure.code, failure.message)
        return self._response(request, result)

    def _stream_response(
        self, request: pb.ModelInferRequest, outcome: Result | RequestFailed
    ) -> pb.ModelStreamInferResponse:
        if isinstance(outcome, RequestFailed):
            return pb.ModelStreamInferResponse(
                error_message=f"{outcome.code.name}: {outcome.message}",
                infer_response=pb.ModelInferResponse(model_name=request.model_name, id=request.id),
            )
        return pb.ModelStreamInferResponse(infer_response=self._response(request, outcome))

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        deadline = deadline_of(context)
        responses = pipelined(
            request_iterator,
            lambda r: self._submit(r, deadline),
            self._stream_response,
            self._window,
            self._streams,
        )
        try:
            async with contextlib.aclosing(responses):
                async for response in responses:
                    yield response
        except RequestFailed as failure:
            await context.abort(failure.code, failure.message)


def stream_code(response: pb.ModelStreamInferResponse) -> str:
    """The status of one stream response, for the metrics (errors start with the code name)."""
    if not response.error_message:
        return "OK"
    name = response.error_message.split(":", 1)[0]
    return name if name in grpc.StatusCode.__members__ else "UNKNOWN"
