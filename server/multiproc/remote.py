"""The engine process as a frontend sees it: one RemoteEngine per served model.

A frontend process runs the same servicers and batchers as a single-process server; only
its engines are these stand-ins, whose `run` hands the frontend's micro-batch (a sub-batch)
to the engine process and waits for its outputs. The engine process merges sub-batches
from every frontend into its own device calls. No TensorFlow here.

All of a frontend's batchers share one engine thread, so a frontend has at most one
sub-batch in flight; the connection is used from that thread only (and read by nobody
else), which keeps the protocol a plain request/answer exchange.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from multiprocessing.connection import Client, Connection

import numpy as np

from gradserve.server.core.contract import BatchHints, Outputs
from gradserve.server.core.errors import EngineUnavailable
from gradserve.server.multiproc import messages
from gradserve.server.multiproc.messages import EngineModel, SubBatch
from gradserve.server.multiproc.shm import Mapped, Segment
from gradserve.wire.kinds import Derivative

log = logging.getLogger(__name__)
_GONE = "the engine process is gone; this server is stopping: retry (another replica)"
_CONNECT_RETRY_S = 0.05
_NO_HINTS = BatchHints()


class EngineLink:
    """A frontend's connection to the engine process, shared by its RemoteEngines."""

    def __init__(self, address: str, on_lost: Callable[[], None]) -> None:
        self._conn: Connection = Client(address, family="AF_UNIX")
        self._segment = Segment(f"gradserve-{os.getppid()}-f{os.getpid()}")
        self._answers = Mapped()
        self._lock = threading.Lock()
        self._on_lost = on_lost
        self.lost = False
        self.models: list[EngineModel] = messages.decode(self._conn.recv_bytes())

    @classmethod
    def connect(
        cls, address: str, on_lost: Callable[[], None], abandon: threading.Event
    ) -> EngineLink:
        """Wait until the engine process listens at `address`, then connect; give up
        (RuntimeError) if `abandon` is set first."""
        while not abandon.is_set():
            try:
                return cls(address, on_lost)
            except (FileNotFoundError, ConnectionRefusedError):
                abandon.wait(_CONNECT_RETRY_S)
        raise RuntimeError("stopped before the engine process was ready")

    def engines(self) -> list[RemoteEngine]:
        return [RemoteEngine(self, info) for info in self.models]

    def exchange(
        self, model: str, kind: Derivative, x: np.ndarray, v: np.ndarray | None, hints: BatchHints
    ) -> Outputs:
        """Send one sub-batch and wait for its outputs (copied out of the engine's segment,
        which it reuses for the next answer)."""
        with self._lock:
            if self.lost:
                raise EngineUnavailable(_GONE)
            path, (x_ref, v_ref) = self._segment.write([x, v])
            message = SubBatch(model, kind.value, path, x_ref, v_ref, int(hints.priority),
                               hints.deadline)  # fmt: skip
            try:
                self._conn.send_bytes(messages.encode(message))
                answer = messages.decode(self._conn.recv_bytes())
            except (EOFError, OSError, messages.BadFrame) as exc:
                self._lose(exc)
                raise EngineUnavailable(_GONE) from exc
            answer.raise_error()
            y = np.array(self._answers.view(answer.path, answer.y))
            dy_dx = self._answers.view(answer.path, answer.dy_dx)
            return Outputs(y, None if dy_dx is None else np.array(dy_dx))

    def _lose(self, exc: BaseException) -> None:
        if not self.lost:
            self.lost = True
            log.error("lost the engine process: %s", exc, extra={"event": "engine_lost"})
            self._on_lost()

    def close(self) -> None:
        self._conn.close()
        self._segment.close()
        self._answers.close()


class RemoteEngine:
    """One model of the engine process, with the interface of a local Engine; its batcher
    passes it each batch's BatchHints, for the engine process's queue."""

    takes_hints = True

    def __init__(self, link: EngineLink, info: EngineModel) -> None:
        self._link = link
        self.name = info.name
        self.input_shape = info.input_shape
        self.output_shape = info.output_shape
        self.device = info.device
        self.numpy_dtype = np.dtype(info.dtype)

    def run(
        self,
        kind: Derivative,
        x: np.ndarray,
        v: np.ndarray | None = None,
        hints: BatchHints | None = None,
    ) -> Outputs:
        return self._link.exchange(self.name, kind, x, v, hints or _NO_HINTS)
