"""A frontend process of `--frontends N`: a whole GradServer whose engines are the engine
process's models (RemoteEngines), sharing the port with its siblings.

The supervisor (multiproc/supervisor.py) spawns `run` as the frontend's entry point. Nothing
here imports TensorFlow.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import signal
import sys
import threading
from multiprocessing.connection import Connection

from gradserve.server import logs
from gradserve.server import loop as event_loop
from gradserve.server.app import GradServer
from gradserve.server.config import ServerConfig
from gradserve.server.core.budget import Count
from gradserve.server.core.errors import StartRefused
from gradserve.server.multiproc.remote import EngineLink, RemoteOwner
from gradserve.server.multiproc.supervisor import ALL_SERVING


async def _serve(
    config: ServerConfig,
    address: str,
    parent: Connection,
    name: str,
    statistics_port: int,
    memory_count: Count,
) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    abandon = threading.Event()  # stop waiting for the engine

    def stop_now() -> None:
        abandon.set()
        stop.set()
        loop.remove_reader(parent.fileno())  # at EOF the pipe stays readable

    announcing: set[asyncio.Future] = set()

    def from_supervisor() -> None:
        """The supervisor's word: every frontend serves (report SERVING), or EOF (it is
        gone: stop)."""
        try:
            message = parent.recv()
        except (EOFError, OSError):
            stop_now()
            return
        if message[0] == ALL_SERVING:
            announced = asyncio.ensure_future(server.announce_serving())
            announcing.add(announced)
            announced.add_done_callback(announcing.discard)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop_now)
    loop.add_reader(parent.fileno(), from_supervisor)

    def lost() -> None:
        loop.call_soon_threadsafe(server.engine_lost)

    def connect() -> EngineLink:
        return EngineLink.connect(address, lost, abandon, config.in_flight)

    owner = RemoteOwner(connect, loop)
    server = GradServer(config, owner=owner, reuse_port=True, internal_metrics=True,
                        process=name, statistics_port=statistics_port,
                        memory_count=memory_count, announce=False)  # fmt: skip
    try:
        try:
            await server.start()
        except RuntimeError:
            if not abandon.is_set():
                raise
            await server.stop(grace=0)  # told to stop while it waited for the engine
            return
        parent.send(("ready", server.metrics_port))
        await stop.wait()
        await server.stop()
    finally:
        if owner.link is not None:
            owner.link.close()


def run(
    config: ServerConfig,
    address: str,
    parent: Connection,
    statistics_port: int,
    memory_count: Count,
    standby: bool = False,
) -> None:
    """Entry point of a frontend process. A standby has imported everything (this module,
    unpickled by name when it was spawned, is the expensive part of starting), then waits for
    the supervisor's word to start (and the name of the frontend it replaces), so that it
    replaces a dead frontend at once. `statistics_port`: where every process's metrics are
    gathered on 127.0.0.1 (the statistics extension's answers); `memory_count`: the memory
    budget's count every frontend shares, so that --max-queue-mb bounds the server."""
    logs.configure(config.log_format, config.log_level)
    name = multiprocessing.current_process().name
    if standby:
        try:
            name = parent.recv()[1]
        except (EOFError, OSError):
            return
    try:
        event_loop.run(_serve(config, address, parent, name, statistics_port, memory_count))
    except StartRefused as refusal:  # told once, by the supervisor, without a traceback
        parent.send(("refused", str(refusal), refusal.exit_status))
        sys.exit(refusal.exit_status)
