"""`gradserve serve --frontends N` (N >= 2): N protocol processes, one engine process.

The supervisor (this module, in the process the user started) spawns:
- the engine process (engine_process.py): TensorFlow, the models, the device, and the
  batchers that merge every frontend's sub-batches into device calls;
- N frontend processes: each a complete gradserve server (both protocols, streams,
  validation, health, reflection, local micro-batching, encoding) whose engines are
  RemoteEngines. They listen on the same port with SO_REUSEPORT, so the kernel spreads
  connections over them. They never import TensorFlow.

It keeps them running: a frontend that dies is replaced at once by a standby frontend
that has already started and imported everything (only the calls the dead one held
fail); if the engine process dies, every frontend is told to stop (they answer
UNAVAILABLE and report NOT_SERVING while they do) and the supervisor exits with status 1,
so that an orchestrator restarts the whole server. On SIGTERM/SIGINT it drains the frontends (each
finishes what it accepted), then stops the engine, and exits 0. One /metrics endpoint
gathers every process's metrics with a `process` label.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import signal
import socket
import tempfile
import time
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from pathlib import Path

from gradserve.server.config import ServerConfig
from gradserve.server.multiproc import engine_process, shm
from gradserve.server.multiproc.engine_process import Load
from gradserve.server.multiproc.metrics_gather import MetricsGatherer

log = logging.getLogger("gradserve")

_STOP_MARGIN_S = 10.0


@dataclasses.dataclass
class _Child:
    """A child process, the supervisor's end of its pipe, and its metrics port."""

    name: str
    process: multiprocessing.process.BaseProcess
    pipe: Connection
    metrics_port: int = 0


# A process's entry point, spawned with (config, engine address, pipe to the supervisor, ...).
Entry = Callable[..., None]


class Supervisor:
    """Starts, watches and stops the engine process and the frontends.

    `load` is how the engine process loads its models (config -> engines) and `frontend` the
    entry point of a frontend process (config, engine address, pipe, standby): the
    assembly's, passed in, so that this module knows neither the engine nor the servers.
    Both are module-level functions, pickled by name when a process is spawned.
    """

    def __init__(
        self, config: ServerConfig, frontends: int, *, load: Load, frontend: Entry
    ) -> None:
        self.config = config
        self.frontends = frontends
        self._load = load
        self._frontend_entry = frontend
        self._context = multiprocessing.get_context("spawn")
        self._run_dir = Path(tempfile.mkdtemp(prefix="gradserve-"))
        self._address = str(self._run_dir / "engine.sock")
        self._engine: _Child | None = None
        self._frontends: list[_Child | None] = [None] * frontends
        self._standby: _Child | None = None
        self._stopping = False
        self._metrics = MetricsGatherer(self._metrics_ports)
        # The same, on 127.0.0.1 only and always on: where frontends read every process's
        # statistics (the statistics extension answers for the whole server).
        self._gathered = MetricsGatherer(self._metrics_ports)
        self.replaced = 0

    def _metrics_ports(self) -> dict[str, int]:
        children = [self._engine, *self._frontends]
        return {c.name: c.metrics_port for c in children if c is not None and c.metrics_port}

    def _spawn(self, name: str, target, config: ServerConfig, *extra: object) -> _Child:
        ours, theirs = self._context.Pipe()
        process = self._context.Process(
            target=target, args=(config, self._address, theirs, *extra), name=name, daemon=False
        )
        process.start()
        theirs.close()
        return _Child(name, process, ours)

    def _frontend_config(self) -> ServerConfig:
        """Each frontend admits an equal share of the queue bounds, so that together they
        stay within the server's bounds (rows and bytes)."""
        rows = max(1, self.config.max_queue_rows // self.frontends)
        mib = max(1, self.config.max_queue_mb // self.frontends)
        return dataclasses.replace(self.config, max_queue_rows=rows, max_queue_mb=mib)

    def _spawn_frontend(self, index: int) -> None:
        self._frontends[index] = self._spawn(
            f"frontend-{index}", self._frontend_entry, self._frontend_config(), self._gathered.port
        )

    def _spawn_standby(self) -> None:
        self._standby = self._spawn(
            "standby", self._frontend_entry, self._frontend_config(), self._gathered.port, True
        )

    def _replace_frontend(self, index: int) -> None:
        """Start the standby in the dead frontend's place, and a new standby."""
        standby = self._standby
        if standby is None or not standby.process.is_alive():
            self._spawn_frontend(index)
        else:
            standby.name = f"frontend-{index}"
            standby.pipe.send(("start", standby.name))
            self._frontends[index] = standby
        self._spawn_standby()

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT (exit 0 after a drain) or the engine dies (exit 1)."""
        reserved = _reserve_port(self.config.host, self.config.port)
        config = dataclasses.replace(self.config, port=reserved.getsockname()[1])
        self.config = config
        signals = _SignalFlag()
        try:
            self._gathered.serve("127.0.0.1", 0)
            self._engine = self._spawn("engine", engine_process.run, config, self._load)
            for i in range(self.frontends):
                self._spawn_frontend(i)
            self._spawn_standby()
            if config.metrics_port:
                self._metrics.serve(config.host, config.metrics_port)
            log.info(
                "supervising", extra={"event": "supervise", "frontends": self.frontends,
                                      "port": config.port},
            )  # fmt: skip
            return self._watch(signals)
        finally:
            self._shutdown()
            reserved.close()
            signals.restore()

    def _watch(self, signals: _SignalFlag) -> int:
        while not signals.raised:
            children = [c for c in (self._engine, self._standby, *self._frontends) if c is not None]
            ready = wait([c.process.sentinel for c in children] + [c.pipe for c in children], 0.2)
            for child in children:
                if child.pipe in ready:
                    self._message(child)
            if self._engine.process.sentinel in ready:
                log.error(
                    "the engine process exited (code %s): stopping every frontend; exit 1",
                    self._engine.process.exitcode, extra={"event": "engine_died"},
                )  # fmt: skip
                return 1
            for i, child in enumerate(self._frontends):
                if child is not None and child.process.sentinel in ready:
                    log.warning(
                        "frontend %d exited (code %s): replacing it", i, child.process.exitcode,
                        extra={"event": "frontend_replaced"},
                    )  # fmt: skip
                    child.pipe.close()
                    self.replaced += 1
                    self._replace_frontend(i)
            if self._standby is not None and self._standby.process.sentinel in ready:
                self._standby.pipe.close()
                self._spawn_standby()
        log.info("signal received: draining every frontend", extra={"event": "signal"})
        return 0

    def _message(self, child: _Child) -> None:
        try:
            message = child.pipe.recv()
        except (EOFError, OSError):
            return
        if message[0] == "ready":
            child.metrics_port = message[1]
        elif message[0] == "failed":
            log.error("%s failed: %s", child.name, message[1], extra={"event": "child_failed"})

    def _shutdown(self) -> None:
        """Drain the frontends, then stop the engine; kill what does not stop in time."""
        frontends = [c for c in (self._standby, *self._frontends) if c is not None]
        grace = self.config.drain_seconds + _STOP_MARGIN_S
        _stop(frontends, grace)
        if self._engine is not None:
            _stop([self._engine], _STOP_MARGIN_S)
        self._metrics.close()
        self._gathered.close()
        removed = shm.remove_leftovers(f"gradserve-{os.getpid()}-")
        if removed:
            log.info("removed %d shared-memory segment(s) of stopped processes", removed)
        for path in self._run_dir.iterdir():
            path.unlink(missing_ok=True)
        self._run_dir.rmdir()
        log.info("stopped", extra={"event": "stop"})


def _stop(children: list[_Child], grace: float) -> None:
    for child in children:
        if child.process.is_alive():
            child.process.terminate()
    end = time.monotonic() + grace
    for child in children:
        child.process.join(max(0.0, end - time.monotonic()))
        if child.process.is_alive():
            log.warning("%s did not stop in time: killing it", child.name)
            child.process.kill()
            child.process.join(5)
        child.pipe.close()


def _reserve_port(host: str, port: int) -> socket.socket:
    """Hold the port for the frontends (SO_REUSEPORT, not listening), after checking that no
    other server listens there: a second server must fail, not silently share the port."""
    with socket.socket() as probe:
        if port and probe.connect_ex((host if host != "0.0.0.0" else "127.0.0.1", port)) == 0:
            raise OSError(f"cannot bind {host}:{port}: another server is listening there")
    reserved = socket.socket()
    reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    reserved.bind((host, port))
    return reserved


class _SignalFlag:
    """SIGTERM and SIGINT set a flag (the watch loop checks it every 0.2 s)."""

    def __init__(self) -> None:
        self.raised = False
        self._previous = {
            sig: signal.signal(sig, self._set) for sig in (signal.SIGINT, signal.SIGTERM)
        }

    def _set(self, signum, frame) -> None:
        self.raised = True

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def serve(config: ServerConfig, frontends: int, *, load: Load, frontend: Entry) -> int:
    """Run a multi-process server until stopped; returns the process exit status."""
    return Supervisor(config, frontends, load=load, frontend=frontend).run()
