"""The transport ceiling: the same grpc.aio stack and messages, no model and no batcher.

Answers every Evaluate/EvaluateStream message (native protocol) and every ModelInfer /
ModelStreamInfer message (standard protocol, for perf_analyzer: with the metadata and
config it asks for first) with zero-filled y and dy_dx of the sizes gradserve would send,
so only gRPC, protobuf and Python remain.
"""

from __future__ import annotations

import argparse
import asyncio

import grpc

from gradserve.inference import grpc_service_pb2 as kserve
from gradserve.inference import grpc_service_pb2_grpc as kserve_grpc
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc


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


async def serve(port: int) -> None:
    server = grpc.aio.server()
    pb_grpc.add_GradientServiceServicer_to_server(EchoServicer(), server)
    kserve_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceEchoServicer(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    asyncio.run(serve(parser.parse_args().port))
