"""AsyncGradientClient: the asyncio SDK, same surface as GradientClient."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable

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


class AsyncGradientClient(ClientBase):
    """`async with AsyncGradientClient() as c: r = await c.evaluate(0.2)`."""

    _aio = True

    async def __aenter__(self) -> AsyncGradientClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def evaluate(
        self,
        x: object,
        derivative: str = "gradient",
        *,
        v: object = None,
        model: str = "",
        target: int | None = None,
        version: str = "",
    ) -> Result:
        """Like GradientClient.evaluate."""
        request = make_request(x, derivative, model=model, v=v, target=target, version=version)
        return to_result(await self._call(self._stub.Evaluate, request))

    async def integrated_gradients(
        self,
        x: object,
        baseline: object = None,
        steps: int = DEFAULT_STEPS,
        target: int | None = None,
        model: str = "",
        version: str = "",
    ) -> Result:
        """Like GradientClient.integrated_gradients."""
        request = make_request(
            x, "integrated_gradients", model=model, target=target, baseline=baseline, steps=steps,
            version=version,
        )  # fmt: skip
        return to_result(await self._call(self._stub.Evaluate, request))

    async def smooth_grad(
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
        """Like GradientClient.smooth_grad."""
        request = make_request(x, "smooth_grad", model=model, target=target, samples=samples,
                               noise=noise, seed=seed, noise_absolute=noise_absolute,
                               version=version)  # fmt: skip
        return to_result(await self._call(self._stub.Evaluate, request))

    async def wait_until_ready(self, timeout: float | None = None) -> None:
        """Like GradientClient.wait_until_ready: return once the health service reports
        SERVING for the overall server; DEADLINE_EXCEEDED after `timeout` seconds."""
        wait = ReadinessWait(self.timeout if timeout is None else timeout)
        while True:
            try:
                answer = await self._health.Check(
                    OVERALL, timeout=wait.check_timeout(), wait_for_ready=True
                )
                if wait.answered(answer):
                    return
            except grpc.RpcError as error:
                wait.failed(error)
            await asyncio.sleep(wait.next_pause())

    async def _call(self, method, request):
        attempts = self._attempts()
        while True:
            try:
                return await method(
                    request,
                    timeout=attempts.remaining(),
                    wait_for_ready=self.wait_for_ready,
                    metadata=self._metadata(),
                )
            except grpc.RpcError as error:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise asyncio.CancelledError() from None  # our caller cancelled us
                delay = attempts.backoff(error.code())
                if delay is None:
                    raise GradserveError.from_rpc(error, attempts.made) from None
                await asyncio.sleep(delay)

    async def stream(
        self,
        xs: Iterable[object] | AsyncIterable[object],
        derivative: str = "gradient",
        *,
        model: str = "",
        errors: str = "raise",
        **options: object,
    ) -> AsyncIterator[Result | GradserveError]:
        """Like GradientClient.stream; xs may be a plain or an async iterable."""
        if errors not in ("raise", "return"):
            raise ValueError(f"errors must be 'raise' or 'return', got {errors!r}")

        async def requests() -> AsyncIterator[pb.EvaluateRequest]:
            i = 0
            async for x in _aiter(xs):
                yield stream_request(x, derivative, str(i), model, options)
                i += 1

        timeout = self.timeout
        if self.wait_for_ready:  # a stream is not retried: wait for readiness before it
            started = time.monotonic()
            await self.wait_until_ready(timeout)
            waited = time.monotonic() - started
            timeout = None if timeout is None else max(timeout - waited, 0.001)
        call = self._stub.EvaluateStream(
            requests(),
            timeout=timeout,
            wait_for_ready=self.wait_for_ready,
            metadata=self._metadata(),
        )
        try:
            async for response in call:
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

    async def list_models(self) -> list[ModelInfo]:
        """Every version of every model the server serves."""
        models = await self._call(self._stub.ListModels, pb.ListModelsRequest())
        return [to_model_info(m) for m in models.models]

    async def model_info(self, model: str = "", version: str = "") -> ModelInfo:
        """One model (version "": its default, the highest served)."""
        info = await self._call(
            self._stub.GetModelInfo, pb.ModelInfoRequest(model=model, version=str(version))
        )
        return to_model_info(info)

    async def repository_index(self) -> list[ModelVersion]:
        """Every model version the server's repository knows, with its state."""
        index = await self._call(self._stub.RepositoryIndex, pb.RepositoryIndexRequest())
        return to_versions(index)

    async def load_model(self, model: str) -> None:
        """Load (or reload) `model` as its version policy says; returns once its versions
        serve. Needs --model-control explicit. GradserveError FAILED_PRECONDITION, with the
        reason, when a version failed to load (the versions served before still are)."""
        await self._call(self._stub.LoadModel, pb.LoadModelRequest(model=model))

    async def unload_model(self, model: str) -> None:
        """Stop serving `model` (--model-control explicit); requests it admitted finish."""
        await self._call(self._stub.UnloadModel, pb.UnloadModelRequest(model=model))


async def _aiter(xs: Iterable[object] | AsyncIterable[object]) -> AsyncIterator[object]:
    if isinstance(xs, AsyncIterable):
        async for x in xs:
            yield x
    else:
        for x in xs:
            yield x
