"""The standard inference protocol (KServe v2 `inference.GRPCInferenceService`), with
Triton's ModelStreamInfer and ModelConfig extensions, on the same batcher as the native API.

Tensors: input `x` ([n, *X], FP32 or FP64) and, for derivative="vjp", "jvp" or "hvp", input
`v`; outputs `y` ([n, *Y]) and `dy_dx` (shaped per derivative: [n, *X] for the default
gradient, [n, *Y, *X] for "jacobian", ...), in the model's float type. Requesting only `y`
computes no derivative.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc
import numpy as np

from gradserve.inference import grpc_service_pb2 as pb
from gradserve.inference import grpc_service_pb2_grpc as pb_grpc
from gradserve.server.batcher import Result
from gradserve.server.contract import Derivative
from gradserve.server.decode import InvalidInput, check_shape
from gradserve.server.registry import Models, Served
from gradserve.server.status import RequestFailed
from gradserve.server.streaming import Streams, answer_stream, answer_unary
from gradserve.server.wire import Undecodable

SERVER_NAME = "gradserve"
SERVER_VERSION = "0.1.0"
PLATFORM = "tensorflow_keras"
INPUT, VECTOR, OUTPUT, DERIVATIVE = "x", "v", "y", "dy_dx"
_DTYPES = {"FP32": np.dtype("<f4"), "FP64": np.dtype("<f8")}
_DERIVATIVES = {kind.value: kind for kind in Derivative}
_KIND_NAMES = ", ".join(f'"{k}"' for k in _DERIVATIVES)
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
        models: Models,
        is_ready: Callable[[], bool],
        *,
        stream_window: int = 256,
        streams: Streams | None = None,
    ) -> None:
        self._models = models
        self._is_ready = is_ready
        self._window = stream_window
        self._streams = streams or Streams()

    # -- health and metadata ---------------------------------------------------------------

    def _model(self, name: str, version: str) -> Served:
        served = self._models.get(name or "\0")  # the standard protocol always names the model
        if version not in ("", served.spec.version):
            raise RequestFailed(
                grpc.StatusCode.NOT_FOUND,
                f"version {version!r} of model {name!r} is not served; "
                f"available: {served.spec.version!r}",
            )
        return served

    async def _checked(self, context: grpc.aio.ServicerContext, name: str, version: str) -> Served:
        try:
            return self._model(name, version)
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
        spec = (await self._checked(context, request.name, request.version)).spec
        tensor = pb.ModelMetadataResponse.TensorMetadata
        datatype = _datatype(spec.dtype)
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
        data_type = pb.TYPE_FP64 if spec.dtype == "float64" else pb.TYPE_FP32
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
                f'parameter "derivative" is {derivative!r}; expected one of {_KIND_NAMES}'
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

    @staticmethod
    def _tensor(request: pb.ModelInferRequest, index: int, shape) -> tuple[bytes, list, object]:
        """(bytes, shape, dtype) of input `index`, from raw or typed contents."""
        tensor = request.inputs[index]
        dtype = _DTYPES.get(tensor.datatype)
        if dtype is None:
            raise InvalidInput(
                f"input {tensor.name!r} has datatype {tensor.datatype!r}; expected FP32 or FP64"
            )
        if request.raw_input_contents:
            if len(request.raw_input_contents) != len(request.inputs):
                raise InvalidInput(
                    f"raw_input_contents has {len(request.raw_input_contents)} entries; "
                    f"expected one per input ({len(request.inputs)})"
                )
            return request.raw_input_contents[index], list(tensor.shape), dtype
        dims = check_shape(tensor.shape, shape, tensor.name)
        field = "fp32_contents" if tensor.datatype == "FP32" else "fp64_contents"
        values = getattr(tensor.contents, field)
        needed = int(np.prod(dims))
        if len(values) != needed:
            raise InvalidInput(
                f"input {tensor.name!r} has {len(values)} values in contents.{field}, but "
                f"shape {dims} needs {needed}"
            )
        return np.asarray(values, dtype).tobytes(), dims, dtype

    def _decode(self, served: Served, kind: Derivative, request: pb.ModelInferRequest):
        names = [i.name for i in request.inputs]
        wanted = [INPUT, VECTOR] if kind.needs_vector else [INPUT]
        if sorted(names) != sorted(wanted):
            raise InvalidInput(f"expected input tensor(s) {wanted}, got {names}")
        x = self._tensor(request, names.index(INPUT), served.spec.input_shape)
        v = None
        if kind.needs_vector:
            v = self._tensor(request, names.index(VECTOR), served.spec.vector_shape(kind))
        return served.decode(kind, x, v)

    def _submit(
        self, request: pb.ModelInferRequest, deadline: float | None
    ) -> asyncio.Future[Result]:
        if isinstance(request, Undecodable):
            raise RequestFailed(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        try:
            served = self._model(request.model_name, request.model_version)
            plan = self._plan(request)
            x, v = self._decode(served, plan.kind, request)
            return served.batcher.submit(x, plan.kind, deadline, v)
        except Exception as exc:
            raise RequestFailed.of(exc) from exc

    def _response(self, request: pb.ModelInferRequest, result: Result) -> pb.ModelInferResponse:
        plan = self._plan(request)
        spec = self._model(request.model_name, request.model_version).spec
        response = pb.ModelInferResponse(
            model_name=spec.name, model_version=spec.version, id=request.id
        )
        timing = result.timing
        for key, value in (
            ("queue_us", timing.queue_us),
            ("compute_us", timing.compute_us),
            ("batch_rows", timing.batch_rows),
        ):
            response.parameters[key].int64_param = value
        arrays = {OUTPUT: result.y, DERIVATIVE: result.dy_dx}
        datatype = _datatype(spec.dtype)
        for name in plan.outputs:
            array = np.ascontiguousarray(arrays[name], dtype=_DTYPES[datatype])
            output = response.outputs.add(name=name, datatype=datatype, shape=array.shape)
            if plan.raw:
                response.raw_output_contents.append(array.tobytes())
            elif datatype == "FP64":
                output.contents.fp64_contents.extend(array.ravel().tolist())
            else:
                output.contents.fp32_contents.extend(array.ravel().tolist())
        return response

    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInferResponse:
        return await answer_unary(request, context, self._submit, self._response)

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
        responses = answer_stream(
            request_iterator,
            context,
            self._submit,
            self._stream_response,
            self._window,
            self._streams,
        )
        async for response in responses:
            yield response


def _datatype(dtype: str) -> str:
    return "FP64" if dtype == "float64" else "FP32"


def stream_code(response: pb.ModelStreamInferResponse) -> str:
    """The status of one stream response, for the metrics (errors start with the code name)."""
    if not response.error_message:
        return "OK"
    name = response.error_message.split(":", 1)[0]
    return name if name in grpc.StatusCode.__members__ else "UNKNOWN"
