"""Assembly: one grpc.aio server with health, reflection, metrics and both protocols over one
batcher and engine; signals and drain.

The server listens before the model is loaded: health says NOT_SERVING (and the model RPCs
UNAVAILABLE) until the engine is loaded and warmed up, then SERVING.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import signal
import ssl
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from gradserve.inference import grpc_service_pb2 as inference_pb2
from gradserve.server.config import ServerConfig
from gradserve.server.core.batcher import Batcher
from gradserve.server.core.budget import Count, MemoryBudget
from gradserve.server.core.contract import Engine, ModelSpec
from gradserve.server.core.errors import Closed, PortTaken
from gradserve.server.core.registry import Models, Served
from gradserve.server.core.repository import Owner, Repository
from gradserve.server.core.scheduler import Watches
from gradserve.server.core.statistics import Statistics
from gradserve.server.engine.startup import open_repository
from gradserve.server.metrics import Metrics, statistics_of
from gradserve.server.multiproc import metrics_gather
from gradserve.server.protocols.http_listener import HttpListener
from gradserve.server.protocols.kserve import SERVER_NAME, SERVER_VERSION, InferenceServicer
from gradserve.server.protocols.native import GradientServicer
from gradserve.server.protocols.rest import RestService
from gradserve.server.serving.control import ControlPlane
from gradserve.server.serving.dataplane import DataPlane
from gradserve.server.tracing import Tracing
from gradserve.server.transport.answering import Streams, StreamWindow
from gradserve.server.transport.intake import Intake
from gradserve.server.transport.routing import Routes
from gradserve.v1 import gradserve_pb2
from gradserve.wire.kinds import Derivative

log = logging.getLogger("gradserve")

_LAST_WRITE_GRACE_S = 1.0
_GATHER_TIMEOUT_S = 5.0
NATIVE_SERVICE = gradserve_pb2.DESCRIPTOR.services_by_name["GradientService"]
INFERENCE_SERVICE = inference_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
SERVICE_NAMES = [NATIVE_SERVICE.full_name, INFERENCE_SERVICE.full_name]
HEALTH_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


def _credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    if not config.tls_cert:
        return None
    pair = (Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes())
    ca = Path(config.tls_client_ca).read_bytes() if config.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [pair], root_certificates=ca, require_client_auth=ca is not None
    )


def _reflection_pool() -> descriptor_pool.DescriptorPool:
    """One pool with every served file: the inference protocol lives in a private pool."""
    pool = descriptor_pool.DescriptorPool()
    for module in (gradserve_pb2, inference_pb2, health_pb2):
        pool.AddSerializedFile(module.DESCRIPTOR.serialized_pb)
    return pool


class GradServer:
    """A running server. `async with GradServer(config) as s:` binds, serves, then drains.

    Its models come from `owner` (a frontend: the engine process's repository), else from
    `engine` (an Engine, or a list of them: version 1 each, no reloads) or `load` (config ->
    list of engines, called on a worker thread), else from the configured repository. A
    frontend of a multi-process server shares its port
    with its siblings (`reuse_port`) and serves its metrics on an ephemeral 127.0.0.1 port
    for the supervisor to gather (`internal_metrics`).
    """

    def __init__(
        self,
        config: ServerConfig,
        engine: Engine | list[Engine] | None = None,
        load: Callable[[ServerConfig], list[Engine]] | None = None,
        *,
        owner: Owner | None = None,
        reuse_port: bool = False,
        internal_metrics: bool = False,
        process: str = "server",
        statistics_port: int = 0,
        memory_count: Count | None = None,
        announce: bool = True,
    ) -> None:
        """`memory_count`: where the memory budget counts (a frontend's: the count every
        frontend of the server shares; None: this process's own); `announce`: report SERVING
        once started (False: a frontend, which reports it through `announce_serving` once
        every frontend of the server serves)."""
        self.config = config
        self._engines = None if engine is None else engine if isinstance(engine, list) else [engine]
        self._load = load
        self.owner = owner
        self._draining = False
        self.models = Models()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reuse_port = reuse_port
        self._internal_metrics = internal_metrics
        self._process = process
        self._statistics_port = statistics_port
        self._announce = announce
        self.tracing: Tracing | None = None
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.metrics = Metrics()
        self.ready = False
        self._server: grpc.aio.Server | None = None
        self._metrics_http = None
        self.batchers: list[Batcher] = []  # one per served model, in serving order
        self.memory = MemoryBudget.for_server(config.max_queue_bytes, memory_count)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="gradserve-engine")
        self._health = health_aio.HealthServicer()
        self._streams = Streams()
        self._routes = Routes(self.metrics, Intake(self.memory, 2 * config.max_message_bytes))
        self._health_update: asyncio.Future | None = None
        self.control = ControlPlane(lambda: self.ready)
        self._rest = RestService(self.metrics, self.control, self.memory)
        self._http: HttpListener | None = None
        self.http_port: int | None = None

    async def __aenter__(self) -> GradServer:
        try:
            await self.start()
        except BaseException:  # e.g. StartRefused: close what listens already, then say why
            await self.stop(grace=0)
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Listen at once (health NOT_SERVING), load the model, then serve (SERVING)."""
        config = self.config
        log.info("starting", extra={"event": "start", **_loggable(config)})
        self._loop = asyncio.get_running_loop()
        self.tracing = Tracing.start(config.trace, self._process, config.trace_hops == "spans")
        await self._listen()
        await asyncio.to_thread(self._start_owner)
        self._serve()
        if self._announce:
            await self._set_health(True)
        self.ready = True
        names = [f"{s.spec.name}:{s.spec.version}" for s in self.models.every_version()]
        log.info("serving", extra={"event": "serving", "port": self.port, "models": names})

    def _start_owner(self) -> None:
        """Worker thread: the owner of the models, and the versions it serves at start."""
        if self.owner is None:
            if self._engines is not None or self._load is not None:
                engines = self._engines or self._load(self.config)
                self.owner = Repository.fixed(engines, self.metrics)
            else:
                self.owner = open_repository(self.config, self.metrics)
        self.owner.start(_LoopHost(self), self.config.poll_seconds)

    async def _listen(self) -> None:
        config = self.config
        limit = config.max_message_bytes
        self._server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                # A second server on a taken port must fail, not silently share it (frontends
                # of one multi-process server share it on purpose; their supervisor checks).
                ("grpc.so_reuseport", int(self._reuse_port)),
                *config.connection_options(),
            ]
        )
        self._routes.while_loading(NATIVE_SERVICE)
        self._routes.while_loading(
            INFERENCE_SERVICE,
            {
                "ServerLive": inference_pb2.ServerLiveResponse(live=True),
                "ServerReady": inference_pb2.ServerReadyResponse(ready=False),
                "ServerMetadata": inference_pb2.ServerMetadataResponse(
                    name=SERVER_NAME, version=SERVER_VERSION
                ),
            },
        )
        self._server.add_generic_rpc_handlers((self._routes,))
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection(
            [*SERVICE_NAMES, HEALTH_NAME, reflection.SERVICE_NAME], self._server, _reflection_pool()
        )
        await self._set_health(False)
        address = f"{config.host}:{config.port}"
        credentials = _credentials(config)
        with bound(config.host, config.port, "--port"):
            if credentials is None:
                self.port = self._server.add_insecure_port(address)
            else:
                self.port = self._server.add_secure_port(address, credentials)
            if not self.port:
                raise OSError("the address is in use")
        await self._server.start()
        if self._internal_metrics:
            self._metrics_http = self.metrics.serve("127.0.0.1", 0)
        elif config.metrics_port:
            with bound(config.host, config.metrics_port, "--metrics-port"):
                self._metrics_http = self.metrics.serve(config.host, config.metrics_port)
        if self._metrics_http is not None:
            self.metrics_port = self._metrics_http.server_port
        if config.http_port:
            await self._listen_http()
        log.info(
            "listening",
            extra={"event": "listen", "port": self.port, "tls": credentials is not None,
                   "metrics_port": self.metrics_port, "http_port": self.http_port},
        )  # fmt: skip

    async def _listen_http(self) -> None:
        """The REST protocol on --http-port, in this event loop (frontends share the port)."""
        config = self.config
        self._http = HttpListener(
            self._rest.application(config.max_message_bytes, config.http_idle_seconds),
            max_connections=config.http_max_connections,
            idle_seconds=config.http_idle_seconds,
        )
        with bound(config.host, config.http_port, "--http-port"):
            await self._http.start(
                config.host, config.http_port, _ssl_context(config), reuse_port=self._reuse_port
            )
        self.http_port = self._http.port

    @property
    def http_connections(self) -> int:
        """HTTP connections open now on the REST port (0 when it is off)."""
        return 0 if self._http is None else self._http.open_connections

    def add_version(self, name: str, version: int, engine: Engine) -> None:
        """Loop: serve `engine` as this version, with its own batcher (queue)."""
        if self._draining:
            raise Closed("the server is draining: it serves no new model version")
        config = self.config
        spec = ModelSpec.of(engine, config.max_batch_size, config.max_queue_rows, version)
        remote = engine.in_flight  # the engine process's: its batches awaited
        statistics = Statistics()
        watch = statistics
        if self.tracing is not None:
            watch = Watches(statistics, self.tracing.batches(spec.name, spec.version))
        batcher = Batcher(
            engine.run,
            max_batch_size=config.max_batch_size,
            max_delay_s=config.max_delay_us / 1e6,
            max_queue_rows=config.max_queue_rows,
            memory=self.memory,
            result_row_bytes={kind: spec.answer_row_bytes(kind) for kind in Derivative},
            fair=config.fairness,
            max_batch_s=0.0 if remote else config.max_batch_ms / 1e3,  # remote: it decides
            ladder=engine.ladder,
            observer=self.metrics,
            watch=watch,
            executor=self._executor,
            hints=engine.takes_hints,
            in_flight=remote,
            engine_cap=engine.batch_cap,
        )
        batcher.start()
        self.batchers.append(batcher)
        self.models.add(Served(spec, batcher, config.max_result_bytes, statistics))

    async def retire_version(self, name: str, version: int) -> None:
        """Loop: route no new request to this version, answer every admitted one, release it."""
        served = self.models.remove(name, str(version))
        if served is None:
            return
        await served.batcher.close()
        self.batchers.remove(served.batcher)

    def _serve(self) -> None:
        config = self.config
        models = self.models
        self.metrics.queue_rows.set_function(lambda: sum(b.queued_rows for b in self.batchers))
        self.metrics.queue_bytes.set_function(lambda: self.memory.held_here)
        self.metrics.watch_costs(lambda: [(s.spec.name, s.batcher.costs()) for s in models])
        self.metrics.watch_serving(lambda: self.ready, config.max_queue_rows, self.memory.limit)
        self.metrics.watch_statistics(
            lambda: [(s.spec.name, s.spec.version, s.statistics) for s in models.every_version()]
        )
        window = StreamWindow(config.stream_window, config.stream_window_bytes)
        plane = DataPlane(self.metrics, self.tracing)
        common = {"stream_window": window, "streams": self._streams, "memory": self.memory,
                  "plane": plane}  # fmt: skip
        self.control.serve(models, self.owner, self.statistics)
        native = GradientServicer(self.control, self.metrics, **common)
        self._routes.add(native, NATIVE_SERVICE, gradserve_pb2)
        inference = InferenceServicer(self.control, self.metrics, **common)
        self._routes.add(inference, INFERENCE_SERVICE, inference_pb2)
        self._rest.serve(plane)

    async def statistics(self) -> dict[tuple[str, str], Statistics]:
        """Every served version's statistics: this process's own, or, in a frontend, the sum
        over every process the supervisor gathers metrics from."""
        if not self._statistics_port:
            return {(s.spec.name, s.spec.version): s.statistics
                    for s in self.models.every_version()}  # fmt: skip
        text = await asyncio.to_thread(
            metrics_gather.fetch, self._statistics_port, _GATHER_TIMEOUT_S
        )
        served = {(s.spec.name, s.spec.version) for s in self.models.every_version()}
        return {key: stats for key, stats in statistics_of(text).items() if key in served}

    async def announce_serving(self) -> None:
        """Report SERVING now (a frontend, told that every frontend serves), unless it no
        longer serves."""
        if self.ready and not self._draining:
            await self._set_health(True)

    async def _set_health(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse
        for name in ["", *SERVICE_NAMES]:
            await self._health.set(name, status.SERVING if serving else status.NOT_SERVING)

    def engine_lost(self) -> None:
        """The engine process died: report NOT_SERVING and refuse new work (UNAVAILABLE) at
        once; the supervisor stops this process next."""
        if not self.ready:
            return
        self.ready = False
        log.error("engine lost: refusing new requests", extra={"event": "engine_lost"})
        for batcher in self.batchers:
            batcher.stop_accepting()
        self._health_update = asyncio.ensure_future(self._set_health(False))

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
        self._draining = True
        log.info("draining", extra={"event": "drain", "grace_seconds": grace})
        await self._health.enter_graceful_shutdown()
        for batcher in self.batchers:
            batcher.stop_accepting()
        self._streams.drain()
        if self.batchers:
            if await _all_idle(self.batchers, grace):
                log.info("drain: every accepted request answered", extra={"event": "drained"})
            else:
                unfinished = sum(b.pending for b in self.batchers)
                log.warning(
                    "drain: %d request(s) unfinished after %.0f s", unfinished, grace,
                    extra={"event": "drain_timeout", "unfinished": unfinished},
                )  # fmt: skip
        if self._server is not None:
            remaining = deadline - asyncio.get_running_loop().time()
            await self._server.stop(max(0.0, min(_LAST_WRITE_GRACE_S, remaining)))
        if self._http is not None:
            await self._http.close()
        if self.owner is not None:
            await asyncio.to_thread(self.owner.close)
        for batcher in list(self.batchers):
            await batcher.close()
        self._executor.shutdown(wait=True)
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
        if self.tracing is not None:
            await asyncio.to_thread(self.tracing.close)
        log.info("stopped", extra={"event": "stop"})


class _LoopHost:
    """The server as the repository's host: each change made on the server's event loop,
    whichever thread asks for it (the loader's, or the loop's own)."""

    def __init__(self, server: GradServer) -> None:
        self._server = server

    def serve(self, name: str, version: int, engine: Engine) -> None:
        if _on(self._server._loop):
            self._server.add_version(name, version, engine)
            return

        async def add() -> None:
            self._server.add_version(name, version, engine)

        asyncio.run_coroutine_threadsafe(add(), self._server._loop).result()

    def retire(self, name: str, version: int) -> concurrent.futures.Future:
        coroutine = self._server.retire_version(name, version)
        return asyncio.run_coroutine_threadsafe(coroutine, self._server._loop)  # any thread


@contextlib.contextmanager
def bound(host: str, port: int, flag: str) -> Iterator[None]:
    """Binding `port` (given by `flag`): a failure to bind is PortTaken, one line, not a
    traceback."""
    try:
        yield
    except (OSError, RuntimeError) as exc:  # grpc.aio says RuntimeError, asyncio OSError
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise PortTaken(host, port, flag, why) from None


def _on(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def _ssl_context(config: ServerConfig) -> ssl.SSLContext | None:
    """TLS for the HTTP port when the gRPC port has it: the same certificate, and with
    --tls-client-ca the same demand for client certificates."""
    if not config.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.tls_cert, config.tls_key)
    if config.tls_client_ca:
        context.load_verify_locations(config.tls_client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


async def _all_idle(batchers: list[Batcher], grace: float) -> bool:
    results = await asyncio.gather(*(b.wait_idle(grace) for b in batchers))
    return all(results)


def _loggable(config: ServerConfig) -> dict[str, object]:
    return {f"config.{k}": str(v) for k, v in dataclasses.asdict(config).items()}


async def serve(config: ServerConfig) -> None:
    """Serve until SIGINT or SIGTERM, then drain and return."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with GradServer(config):
        await stop.wait()
        log.info(
            "signal received: draining for up to %.0f s", config.drain_seconds,
            extra={"event": "signal"},
        )  # fmt: skip
