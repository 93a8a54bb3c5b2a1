"""GradientClient: the blocking SDK."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import grpc

from gradserve.client.errors import GradserveError
from gradserve.client.results import ModelInfo, Result, make_request, to_model_info, to_result
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc

DEFAULT_TARGET = "127.0.0.1:50051"
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]


class GradientClient:
    """Evaluate y and dy/dx on a gradserve server. Use as `with GradientClient() as c:`.

    `timeout` (seconds) is the deadline of each call, or of a whole stream.
    """

    def __init__(self, target: str = DEFAULT_TARGET, timeout: float | None = None) -> None:
        self.target = target
        self.timeout = timeout
        self._channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        self._stub = pb_grpc.GradientServiceStub(self._channel)

    def __enter__(self) -> GradientClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def evaluate(self, x: object, derivative: str = "gradient", *, model: str = "") -> Result:
        """y and the derivative for x: a scalar, a 1-D array of rows, or [n, d]."""
        request = make_request(x, derivative, model=model)
        try:
            return to_result(self._stub.Evaluate(request, timeout=self.timeout))
        except grpc.RpcError as error:
            raise GradserveError.from_rpc(error) from None

    def stream(
        self,
        xs: Iterable[object],
        derivative: str = "gradient",
        *,
        model: str = "",
        errors: str = "raise",
    ) -> Iterator[Result | GradserveError]:
        """Pipeline every x of `xs` over one stream; results come back in order.

        A message the server rejects raises GradserveError (errors="raise"), or
        is yielded as that GradserveError in its place (errors="return").
        """
        if errors not in ("raise", "return"):
            raise ValueError(f"errors must be 'raise' or 'return', got {errors!r}")
        requests = (
            make_request(x, derivative, request_id=str(i), model=model) for i, x in enumerate(xs)
        )
        call = self._stub.EvaluateStream(requests, timeout=self.timeout)
        try:
            for response in call:
                try:
                    yield to_result(response)
                except GradserveError as error:
                    if errors == "raise":
                        raise
                    yield error
        except grpc.RpcError as error:
            raise GradserveError.from_rpc(error) from None
        finally:
            call.cancel()

    def model_info(self, model: str = "") -> ModelInfo:
        try:
            info = self._stub.GetModelInfo(pb.ModelInfoRequest(model=model), timeout=self.timeout)
        except grpc.RpcError as error:
            raise GradserveError.from_rpc(error) from None
        return to_model_info(info)
