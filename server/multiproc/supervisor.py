"""`gradserve serve --frontends N` (N >= 2): N protocol processes, one engine process.

The supervisor (this module, in the process the user started) spawns:
- the engine process (engine_process.py): TensorFlow, the models, the device, and the
  batchers that merge every frontend's sub-batches into device calls;
- N frontend processes: each a complete gradserve server (both protocols, streams,
  validation, health, reflection, local micro-batching, encoding) whose engines are
  RemoteEngines. They listen on the same port with SO_REUSEPORT, so the kernel spreads
  connections over them. They never import TensorFlow.

It keeps them running: a frontend that dies after it served is replaced at once by a
standby frontend that has already started and imported everything (only the calls the dead
one held fail), then with a growing delay, and the server stops after RESTART_LIMIT deaths
within RESTART_WINDOW_S (a crash loop is not a service). A frontend that fails before it
ever served is never replaced: its error (a port taken, say) would only repeat, so the
server stops with it at once. Ports are checked before anything is spawned. If the engine
process dies, every frontend is told to stop (they answer
UNAVAILABLE and report NOT_SERVING while they do) and the supervisor exits with status 1,
so that an orchestrator restarts the whole server. On SIGTERM/SIGINT it drains the frontends (each
finishes what it accepted), then stops the engine, and exits 0. One /metrics endpoint
gathers every process's metrics with a `process` label.
"""

from __future__ import annotations

import contextlib
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
from gradserve.server.core.errors import PortTaken, StartRefused
from gradserve.server.multiproc import engine_process, shm
from gradserve.server.multiproc.engine_process import Load
from gradserve.server.multiproc.metrics_gather import MetricsGatherer
from gradserve.server.multiproc.shared_count import SharedCount

log = logging.getLogger("gradserve")

_STOP_MARGIN_S = 10.0
RESTART_LIMIT = 5  # frontend deaths within RESTART_WINDOW_S that stop the server
RESTART_WINDOW_S = 60.0


def restart_delay(recent: int) -> float:
    """How long to wait before replacing a frontend, `recent` deaths into the window: at once
    the first time, then 0.5, 1, 2, 4 s."""
    return 0.0 if recent == 0 else min(0.5 * 2 ** (recent - 1), 4.0)


ALL_SERVING = "all_serving"  # supervisor -> frontend: every frontend serves; report SERVING


@dataclasses.dataclass
class _Child:
    """A child process, the supervisor's end of its pipe, its metrics port, whether it has
    served, and why it refused to start (what it said before it exited)."""

    name: str
    process: multiprocessing.process.BaseProcess
    pipe: Connection
    metrics_port: int = 0
    served: bool = False
    told: bool = False  # that every frontend serves
    refusal: StartRefused | None = None
    count: SharedCount | None = None  # its slot of the memory budget's count


# A process's entry point, spawned with (config, engine address, pipe to the supervisor, ...).
Entry = Callable[..., None]


class Supervisor:
    """Starts, watches and stops the engine process and the frontends.

    `load` is how the engine process loads its models (config -> engines) and `frontend` the
    entry point of a frontend process (config, engine address, pipe, statistics port, its
    slot of the memory count, standby): the
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
        # The memory budget's count, in shared memory, a slot per frontend process (and the
        # standby): every frontend admits against the server's whole --max-queue-mb.
        self._memory_slots = self._context.Array("q", frontends + 2)
        self._free_slots = list(range(frontends + 2))
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
        self._deaths: list[float] = []  # when frontends that had served died, recent ones
        self._due: dict[int, float] = {}  # frontend index -> when to replace it

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
        """Each frontend admits an equal share of the queue's rows, so that together they stay
        within the server's bound; bytes are counted once for all of them (the shared
        count)."""
        rows = max(1, self.config.max_queue_rows // self.frontends)
        return dataclasses.replace(self.config, max_queue_rows=rows)

    def _spawn_protocol_process(self, name: str, *extra: object) -> _Child:
        """A frontend or the standby, with a slot of the memory budget's count."""
        count = SharedCount(self._memory_slots, self._free_slots.pop())
        child = self._spawn(name, self._frontend_entry, self._frontend_config(),
                            self._gathered.port, count, *extra)  # fmt: skip
        child.count = count
        return child

    def _spawn_frontend(self, index: int) -> None:
        self._frontends[index] = self._spawn_protocol_process(f"frontend-{index}")

    def _spawn_standby(self) -> None:
        self._standby = self._spawn_protocol_process("standby", True)

    def _gone(self, child: _Child) -> None:
        """A frontend (or the standby) exited: the bytes it held are free, its slot too."""
        child.pipe.close()
        if child.count is not None:
            child.count.clear()
            self._free_slots.append(child.count.slot)
            child.count = None

    def _replace_frontend(self, index: int) -> None:
        """Start the standby in the dead frontend's place, and a new standby."""
        standby = self._standby
        if standby is None or not standby.process.is_alive():
            if standby is not None:
                self._gone(standby)  # its slot and pipe, before its successor takes them
            self._spawn_frontend(index)
        else:
            standby.name = f"frontend-{index}"
            standby.pipe.send(("start", standby.name))
            self._frontends[index] = standby
        self._spawn_standby()

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT (exit 0 after a drain) or the engine dies (exit 1);
        StartRefused for a port taken or a frontend that failed before it served."""
        host = self.config.host
        check_free(host, self.config.http_port, "--http-port")
        check_free(host, self.config.metrics_port, "--metrics-port")
        reserved = _reserve_port(host, self.config.port)
        config = dataclasses.replace(self.config, port=reserved.getsockname()[1])
        self.config = config
        signals = _SignalFlag()
        try:
            if config.metrics_port:
                try:
                    self._metrics.serve(host, config.metrics_port)
                except OSError as exc:
                    raise PortTaken(host, config.metrics_port, "--metrics-port",
                                    exc.strerror or exc) from None  # fmt: skip
            self._gathered.serve("127.0.0.1", 0)
            self._engine = self._spawn("engine", engine_process.run, config, self._load)
            for i in range(self.frontends):
                self._spawn_frontend(i)
            self._spawn_standby()
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
                dead = child is not None and child.process.sentinel in ready
                if dead and not self._frontend_died(i, child):
                    return 1
            now = time.monotonic()
            for i, due in list(self._due.items()):
                if now >= due:
                    del self._due[i]
                    self._replace_frontend(i)
            if self._standby is not None and self._standby.process.sentinel in ready:
                self._gone(self._standby)
                self._spawn_standby()
        log.info("signal received: draining every frontend", extra={"event": "signal"})
        return 0

    def _frontend_died(self, i: int, child: _Child) -> bool:
        """A frontend exited: StartRefused if it never served; False (stop the server) at
        the RESTART_LIMIT-th death within the window; else True, its replacement due."""
        while child.pipe.poll() and self._message(child):  # what it said before it exited
            pass
        self._gone(child)
        code = child.process.exitcode
        if not child.served:
            raise child.refusal or StartRefused(
                f"{child.name} failed before it served (exit code {code}); its error is above"
            )
        now = time.monotonic()
        self._deaths = [t for t in self._deaths if now - t < RESTART_WINDOW_S]
        if len(self._deaths) + 1 >= RESTART_LIMIT:
            log.error(
                "frontend %d exited (code %s), the %d-th frontend death within %.0f s: "
                "stopping the server; exit 1", i, code, len(self._deaths) + 1,
                RESTART_WINDOW_S, extra={"event": "frontend_crash_loop"},
            )  # fmt: skip
            return False
        delay = restart_delay(len(self._deaths))
        self._deaths.append(now)
        log.warning(
            "frontend %d exited (code %s): replacing it in %.1f s", i, code, delay,
            extra={"event": "frontend_replaced"},
        )  # fmt: skip
        self.replaced += 1
        self._frontends[i] = None
        self._due[i] = now + delay
        return True

    def _message(self, child: _Child) -> bool:
        """Read one message of a child; False at the end of its pipe."""
        try:
            message = child.pipe.recv()
        except (EOFError, OSError):
            return False
        if message[0] == "ready":
            child.metrics_port = message[1]
            child.served = True
            self._tell_serving()
        elif message[0] == "refused":
            child.refusal = StartRefused(message[1])
            child.refusal.exit_status = message[2]
        elif message[0] == "failed":
            log.error("%s failed: %s", child.name, message[1], extra={"event": "child_failed"})
        return True

    def _tell_serving(self) -> None:
        """Once every frontend serves, tell each one not told yet to report SERVING, so that
        a health check on one connection speaks for every frontend a new connection may
        reach (each reported SERVING as it started, and a caller that saw it on one frontend
        could meet UNAVAILABLE on a frontend still starting)."""
        if not all(child is not None and child.served for child in self._frontends):
            return
        for child in self._frontends:
            if not child.told:
                child.told = True
                with contextlib.suppress(OSError):
                    child.pipe.send((ALL_SERVING,))

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
    """Hold the gRPC port for the frontends (SO_REUSEPORT, not listening), after checking that
    no other server listens there: a second server must fail, not silently share the port."""
    _not_listening(host, port, "--port")
    reserved = socket.socket()
    reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        reserved.bind((host, port))
    except OSError as exc:
        reserved.close()
        raise PortTaken(host, port, "--port", exc.strerror or exc) from None
    return reserved


def check_free(host: str, port: int, flag: str) -> None:
    """PortTaken unless the frontends will be able to listen on `port` (0: off): nothing
    listens there, and a bind as theirs (SO_REUSEPORT) succeeds, tried and let go."""
    if port:
        _not_listening(host, port, flag)
        with socket.socket() as trial:
            trial.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            try:
                trial.bind((host, port))
            except OSError as exc:
                raise PortTaken(host, port, flag, exc.strerror or exc) from None


def _not_listening(host: str, port: int, flag: str) -> None:
    with socket.socket() as probe:
        if port and probe.connect_ex((host if host != "0.0.0.0" else "127.0.0.1", port)) == 0:
            raise PortTaken(host, port, flag, "another server is listening there")


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
