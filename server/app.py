"""Assembly: engine + batcher + servicers on one grpc.aio server, health, signals, drain."""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from gradserve.inference import grpc_service_pb2 as inference_pb2
from gradserve.server.batcher import Batcher
from gradserve.server.config import ServerConfig
from gradserve.server.contract import ModelSpec
from gradserve.server.inference_service import InferenceServicer
from gradserve.server.native_service import GradientServicer
from gradserve.server.streaming import Streams
from gradserve.server.wire import register
from gradserve.v1 import gradserve_pb2

log = logging.getLogger("gradserve")

_LAST_WRITE_GRACE_S = 1.0

NATIVE_SERVICE = gradserve_pb2.DESCRIPTOR.services_by_name["GradientService"]
INFERENCE_SERVICE = inference_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
SERVICE_NAMES = [NATIVE_SERVICE.full_name, INFERENCE_SERVICE.full_name]


def load_engine(config: ServerConfig):  # -> Engine; typed loosely to keep TensorFlow lazy
    """Load and warm up the model; the only place the app touches the engine module."""
    from gradserve.server.engine import Engine

    engine = Engine(
        config.model,
        device=config.device,
        xla=config.xla,
        max_batch_size=config.max_batch_size,
        name=config.model_name or None,
    )
    seconds = engine.warm_up()
    log.info(
        "model %s on %s warmed up in %.1f s (xla=%s)",
        engine.name,
        engine.device,
        seconds,
        engine.xla,
    )
    return engine


class GradServer:
    """A running server. `async with GradServer(config) as s:` binds, serves, then drains."""

    def __init__(self, config: ServerConfig, engine=None) -> None:
        self.config = config
        self._engine = engine
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._batcher: Batcher | None = None
        self._health = HealthServicer()
        self.ready = False
        self._streams = Streams()

    async def __aenter__(self) -> GradServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        config = self.config
        engine = self._engine or await asyncio.to_thread(load_engine, config)
        spec = ModelSpec(
            name=engine.name,
            version="1",
            input_width=engine.input_width,
            output_width=engine.output_width,
            device=engine.device,
            max_batch_size=config.max_batch_size,
            max_request_rows=config.max_queue_rows,
        )
        self._batcher = Batcher(
            engine.run,
            max_batch_size=config.max_batch_size,
            max_delay_s=config.max_delay_us / 1e6,
            max_queue_rows=config.max_queue_rows,
        )
        self._batcher.start()
        limit = config.max_message_bytes
        self._server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
            ]
        )
        window = config.stream_window
        register(
            self._server,
            GradientServicer(self._batcher, spec, stream_window=window, streams=self._streams),
            NATIVE_SERVICE,
            gradserve_pb2,
        )
        register(
            self._server,
            InferenceServicer(
                self._batcher, spec, lambda: self.ready, stream_window=window, streams=self._streams
            ),
            INFERENCE_SERVICE,
            inference_pb2,
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        self.port = self._server.add_insecure_port(f"{config.host}:{config.port}")
        if not self.port:
            raise OSError(f"cannot bind {config.host}:{config.port}")
        await self._server.start()
        for name in ["", *SERVICE_NAMES]:
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.ready = True
        log.info("serving %s on %s:%d", spec.name, config.host, self.port)

    async def stop(self, grace: float | None = None) -> None:
        """Drain: report NOT_SERVING, refuse new requests and stream messages (UNAVAILABLE),
        answer every accepted one (up to `grace` s, default --drain-seconds), then stop.

        Long-lived calls that hold no work (health Watch streams) do not hold the drain:
        once the accepted work is answered, the gRPC server gets a short last grace for the
        final responses to be written, then cancels what is left.
        """
        grace = self.config.drain_seconds if grace is None else grace
        deadline = asyncio.get_running_loop().time() + grace
        self.ready = False
        await self._health.enter_graceful_shutdown()
        if self._batcher is not None:
            self._batcher.stop_accepting()
            self._streams.drain()
            if await self._batcher.wait_idle(grace):
                log.info("drain: every accepted request answered")
            else:
                unfinished = self._batcher.pending
                log.warning("drain: %d request(s) unfinished after %.0f s", unfinished, grace)
        if self._server is not None:
            remaining = deadline - asyncio.get_running_loop().time()
            await self._server.stop(max(0.0, min(_LAST_WRITE_GRACE_S, remaining)))
        if self._batcher is not None:
            await self._batcher.close()
        log.info("stopped")


async def serve(config: ServerConfig) -> None:
    """Serve until SIGINT or SIGTERM, then drain and return."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with GradServer(config):
        await stop.wait()
        log.info("signal received: draining for up to %.0f s", config.drain_seconds)
