"""The transport ceiling: the same grpc.aio stack and messages, no model and no batcher.

Answers every Evaluate/EvaluateStream message (native protocol) and every ModelInfer /
ModelStreamInfer message (standard protocol, for perf_analyzer: with the metadata and
config it asks for first) with zero-filled y and dy_dx of the sizes gradserve would send,
so only gRPC, protobuf and Python remain. With --http-port, the same for the REST
protocol on gradserve's HTTP stack (aiohttp behind its connection gate, orjson): the bare
HTTP echo that REST is measured against.
"""

from __future__ import annotations

import argparse
import asyncio

import grpc
import orjson
from aiohttp import web

from gradserve.inference import grpc_service_pb2 as kserve
from gradserve.inference import grpc_service_pb2_grpc as kserve_grpc
from gradserve.server.protocols.http_listener import HttpListener
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc
from gradserve.wire.http import HEADER_LENGTH


def _answer(request: pb.EvaluateRequest) -> pb.EvaluateResponse:
    n = request.x.shape[0] if request.x.shape else 1
    zeros = bytes(4 * n)
    return pb.EvaluateResponse(
        id=request.id,
        y=pb.Tensor(shape=[n, 1], data=zeros),
        dy_dx=pb.Tensor(shape=[n, 1], data=zeros),
        timing=pb.Timing(batch_rows=n),
    )


class EchoServicer(pb_grpc.GradientServiceServicer):
    async def Evaluate(self, request, context):
        return _answer(request)

    async def EvaluateStream(self, request_iterator, context):
        async for request in request_iterator:
            yield _answer(request)

    async def GetModelInfo(self, request, context):
        return pb.ModelInfo(name="transport", input_width=1, output_width=1)


def _infer_answer(request: kserve.ModelInferRequest) -> kserve.ModelInferResponse:
    n = request.inputs[0].shape[0] if request.inputs and request.inputs[0].shape else 1
    response = kserve.ModelInferResponse(model_name=request.model_name, id=request.id)
    for name in ("y", "dy_dx"):
        response.outputs.add(name=name, datatype="FP32", shape=[n, 1])
        response.raw_output_contents.append(bytes(4 * n))
    return response


class InferenceEchoServicer(kserve_grpc.GRPCInferenceServiceServicer):
    """The standard protocol's calls perf_analyzer makes, answered without a model."""

    async def ServerLive(self, request, context):
        return kserve.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        return kserve.ServerReadyResponse(ready=True)

    async def ServerMetadata(self, request, context):
        return kserve.ServerMetadataResponse(name="transport", version="0", extensions=[])

    async def ModelReady(self, request, context):
        return kserve.ModelReadyResponse(ready=True)

    async def ModelMetadata(self, request, context):
        tensor = kserve.ModelMetadataResponse.TensorMetadata
        return kserve.ModelMetadataResponse(
            name=request.name, versions=["1"], platform="tensorflow_keras",
            inputs=[tensor(name="x", datatype="FP32", shape=[-1, 1])],
            outputs=[tensor(name=n, datatype="FP32", shape=[-1, 1]) for n in ("y", "dy_dx")],
        )  # fmt: skip

    async def ModelConfig(self, request, context):
        fp32 = kserve.DataType.Value("TYPE_FP32")
        config = kserve.ModelConfig(
            name=request.name, platform="tensorflow_keras", max_batch_size=4096,
            input=[kserve.ModelInput(name="x", data_type=fp32, dims=[1])],
            output=[kserve.ModelOutput(name=n, data_type=fp32, dims=[1]) for n in ("y", "dy_dx")],
        )  # fmt: skip
        return kserve.ModelConfigResponse(config=config)

    async def ModelInfer(self, request, context):
        return _infer_answer(request)

    async def ModelStreamInfer(self, request_iterator, context):
        async for request in request_iterator:
            yield kserve.ModelStreamInferResponse(infer_response=_infer_answer(request))


_TENSORS = {
    "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 1]}],
    "outputs": [{"name": n, "datatype": "FP32", "shape": [-1, 1]} for n in ("y", "dy_dx")],
}
_CONFIG = {
    "name": "quadratic",
    "platform": "tensorflow_keras",
    "max_batch_size": 4096,
    "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": [1]}],
    "output": [{"name": n, "data_type": "TYPE_FP32", "dims": [1]} for n in ("y", "dy_dx")],
}


async def _http_infer(request: web.Request) -> web.Response:
    """Zero-filled y and dy_dx for the rows of the request's first input, in binary when
    the request asks for it, as JSON numbers otherwise."""
    body = await request.read()
    length = request.headers.get(HEADER_LENGTH)
    document = orjson.loads(body if length is None else body[: int(length)])
    n = document["inputs"][0]["shape"][0]
    asked = document.get("outputs") or []
    binary = (document.get("parameters") or {}).get("binary_data_output") or any(
        (o.get("parameters") or {}).get("binary_data") for o in asked
    )
    outputs = []
    for name in ("y", "dy_dx"):
        entry = {"name": name, "datatype": "FP32", "shape": [n, 1]}
        entry.update({"parameters": {"binary_data_size": 4 * n}} if binary else {"data": [0.0] * n})
        outputs.append(entry)
    header = orjson.dumps({"model_name": request.match_info["model"], "outputs": outputs})
    if not binary:
        return web.Response(body=header, content_type="application/json")
    response = web.Response(body=header + bytes(8 * n), content_type="application/octet-stream")
    response.headers[HEADER_LENGTH] = str(len(header))
    return response


def _http_echo() -> web.Application:
    def answer(document: dict):
        async def handler(request: web.Request) -> web.Response:
            return web.Response(body=orjson.dumps(document), content_type="application/json")

        return handler

    application = web.Application(client_max_size=64 << 20)
    model = "/v2/models/{model}"
    application.add_routes([
        web.get("/v2/health/ready", answer({"ready": True})),
        web.get("/v2", answer({"name": "transport", "version": "0", "extensions": []})),
        web.get(model, answer({"name": "quadratic", "versions": ["1"], **_TENSORS})),
        web.get(model + "/config", answer(_CONFIG)),
        web.post(model + "/infer", _http_infer),
    ])  # fmt: skip
    return application


async def serve(port: int, http_port: int) -> None:
    server = grpc.aio.server()
    pb_grpc.add_GradientServiceServicer_to_server(EchoServicer(), server)
    kserve_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceEchoServicer(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    if http_port:
        listener = HttpListener(_http_echo(), max_connections=1024, idle_seconds=60.0)
        await listener.start("127.0.0.1", http_port, None, reuse_port=False)
    await server.wait_for_termination()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--http-port", type=int, default=0)
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.http_port))
