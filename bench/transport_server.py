"""The transport ceiling: the same grpc.aio stack and messages, no model and no batcher.

Answers every Evaluate/EvaluateStream message with zero-filled y and dy_dx of the sizes
gradserve would send, so only gRPC, protobuf and Python remain.
"""

from __future__ import annotations

import argparse
import asyncio

import grpc

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


async def serve(port: int) -> None:
    server = grpc.aio.server()
    pb_grpc.add_GradientServiceServicer_to_server(EchoServicer(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    asyncio.run(serve(parser.parse_args().port))
