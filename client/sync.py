"""GradientClient: the blocking SDK."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

import grpc

from gradserve.client.channel import ClientBase
from gradserve.client.errors import GradserveError
from gradserve.client.readiness import OVERALL, ReadinessWait
from gradserve.client.results import (
    ModelInfo,
    ModelVersion,
    Result,
    make_request,
    stream_request,
    to_model_info,
    to_result,
    to_versions,
)
from gradserve.v1 import gradserve_pb2 as pb
from gradserve.wire.kinds import DEFAULT_NOISE, DEFAULT_SAMPLES, DEFAULT_STEPS


class GradientClient(ClientBase):
    """Evaluate y and dy/dx on a gradserve server. Use as `with GradientClient() as c:`.

    `target` is one address, a `dns:///name:port` that resolves to several replicas, or a
    list of IP:port; calls are balanced over them (round_robin). `tls` turns on TLS (and
    mTLS with a client certificate). `timeout` (seconds) is the deadline of each call
    (retries included), or of a whole stream. `evaluate` and `model_info` retry
    UNAVAILABLE and RESOURCE_EXHAUSTED per `retry` (evaluation is idempotent); pass
    RetryPolicy(attempts=1) to disable. `wait_for_ready=True` makes calls wait, within
    their timeout, for a server that is still starting instead of failing. `client_id`
    names the client to the server's fair batching (one caller over every connection).
    """

    def __enter__(self) -> GradientClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def evaluate(
        self,
        x: object,
        derivative: str = "gradient",
        *,
        v: object = None,
        model: str = "",
        target: int | None = None,
        version: str = "",
    ) -> Result:
        """y and the derivative for x: a scalar, a 1-D array of rows, or [n, *X]; `v` is the
        vector of vjp, jvp and hvp ([n, k, ...] for k tangents per row); `target` selects one
        output (index into the flattened output) for gradient instead of the sum."""
        request = make_request(x, derivative, model=model, v=v, target=target, version=version)
        return to_result(self._call(self._stub.Evaluate, request))

    def integrated_gradients(
        self,
        x: object,
        baseline: object = None,
        steps: int = DEFAULT_STEPS,
        target: int | None = None,
        model: str = "",
        version: str = "",
    ) -> Result:
        """Integrated gradients of each row from `baseline` (one row for all, or one per row;
        default zeros) with `steps` Simpson-rule intervals: `.attributions` [n, *X], `.delta` [n]
        (sum of attributions - (F(x) - F(baseline))), `.y` = F(x)."""
        request = make_request(
            x, "integrated_gradients", model=model, target=target, baseline=baseline, steps=steps,
            version=version,
        )  # fmt: skip
        return to_result(self._call(self._stub.Evaluate, request))

    def smooth_grad(
        self,
        x: object,
        samples: int = DEFAULT_SAMPLES,
        noise: float = DEFAULT_NOISE,
        seed: int = 0,
        target: int | None = None,
        model: str = "",
        noise_absolute: bool = False,
        version: str = "",
    ) -> Result:
        """SmoothGrad: the mean gradient over `samples` copies of each row with Gaussian noise
        of sigma = noise * (the row's max - min), or sigma = noise when `noise_absolute`;
        the same `seed` gives the same answer. `.attributions` [n, *X], `.y` = F(x)."""
        request = make_request(x, "smooth_grad", model=model, target=target, samples=samples,
                               noise=noise, seed=seed, noise_absolute=noise_absolute,
                               version=version)  # fmt: skip
        return to_result(self._call(self._stub.Evaluate, request))

    def wait_until_ready(self, timeout: float | None = None) -> None:
        """Block until the server reports SERVING on the standard health service (overall
        server ""), i.e. its models are loaded and warmed up.

        `timeout` in seconds defaults to the client's (None: wait as long as it takes).
        Raises GradserveError DEADLINE_EXCEEDED, naming the last health answer, if the
        server is not ready in time. With several targets, one ready replica suffices.
        """
        wait = ReadinessWait(self.timeout if timeout is None else timeout)
        while True:
            try:
                answer = self._health.Check(
                    OVERALL, timeout=wait.check_timeout(), wait_for_ready=True
                )
                if wait.answered(answer):
                    return
            except grpc.RpcError as error:
                wait.failed(error)
            time.sleep(wait.next_pause())

    def _call(self, method, request):
        """One unary call with retries, within the client's timeout."""
        attempts = self._attempts()
        while True:
            try:
                return method(
                    request,
                    timeout=attempts.remaining(),
                    wait_for_ready=self.wait_for_ready,
                    metadata=self._metadata(),
                )
            except grpc.RpcError as error:
                delay = attempts.backoff(error.code())
                if delay is None:
                    raise GradserveError.from_rpc(error, attempts.made) from None
                time.sleep(delay)

    def stream(
        self,
        xs: Iterable[object],
        derivative: str = "gradient",
        *,
        model: str = "",
        errors: str = "raise",
        **options: object,
    ) -> Iterator[Result | GradserveError]:
        """Pipeline every x of `xs` over one stream; results come back in order.

        For vjp, jvp and hvp each item is a pair (x, v). `options` apply to every message:
        target, and the options of integrated_gradients and smooth_grad (baseline, steps;
        samples, noise, seed, noise_absolute). A message the server rejects raises
        GradserveError (errors="raise"), or is yielded as that GradserveError in its place
        (errors="return").
        """
        if errors not in ("raise", "return"):
            raise ValueError(f"errors must be 'raise' or 'return', got {errors!r}")
        timeout = self.timeout
        if self.wait_for_ready:  # a stream is not retried: wait for readiness before it
            started = time.monotonic()
            self.wait_until_ready(timeout)
            waited = time.monotonic() - started
            timeout = None if timeout is None else max(timeout - waited, 0.001)
        requests = (stream_request(x, derivative, str(i), model, options) for i, x in enumerate(xs))
        call = self._stub.EvaluateStream(
            requests, timeout=timeout, wait_for_ready=self.wait_for_ready, metadata=self._metadata()
        )
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

    def list_models(self) -> list[ModelInfo]:
        """Every version of every model the server serves."""
        models = self._call(self._stub.ListModels, pb.ListModelsRequest())
        return [to_model_info(m) for m in models.models]

    def model_info(self, model: str = "", version: str = "") -> ModelInfo:
        """One model (version "": its default, the highest served)."""
        return to_model_info(
            self._call(
                self._stub.GetModelInfo, pb.ModelInfoRequest(model=model, version=str(version))
            )
        )

    def repository_index(self) -> list[ModelVersion]:
        """Every model version the server's repository knows, with its state."""
        index = self._call(self._stub.RepositoryIndex, pb.RepositoryIndexRequest())
        return to_versions(index)

    def load_model(self, model: str) -> None:
        """Load (or reload) `model` as its version policy says; returns once its versions
        serve. Needs --model-control explicit. GradserveError FAILED_PRECONDITION, with the
        reason, when a version failed to load (the versions served before still are)."""
        self._call(self._stub.LoadModel, pb.LoadModelRequest(model=model))

    def unload_model(self, model: str) -> None:
        """Stop serving `model` (--model-control explicit); requests it admitted finish."""
        self._call(self._stub.UnloadModel, pb.UnloadModelRequest(model=model))
