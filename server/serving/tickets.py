"""A Ticket: one request from the moment a protocol has decoded it to its answer.

A protocol's codec reads what a request says of itself first (its `Arrival`: id, model name,
when it came), then decodes the rest into a complete Ticket: the served model, the rows to
queue (expanded for explanations, targets and k tangents), the priority and how the answer
is to be encoded. The answering loop queues the ticket's rows and hands the ticket and its
result back to the same codec to encode. Nothing is looked up twice, and a stream answer is
paired with its own request, an error answer with the arrival it echoes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from gradserve.server.core.contract import Priority
from gradserve.server.core.explain import Work
from gradserve.server.core.registry import Served


@dataclass(frozen=True, slots=True)
class Arrival:
    """What a request says of itself, read before anything of it is checked: echoed in its
    answer, an error answer included."""

    id: str = ""
    model: str = ""  # the model name as the request gave it
    at: float = field(default_factory=time.perf_counter)


@dataclass(frozen=True, slots=True)
class Ticket:
    """One decoded request (or stream message)."""

    arrival: Arrival
    served: Served
    work: Work  # the rows to queue, their kind, and how their result becomes the answer
    priority: Priority = Priority.NORMAL
    encoding: object = None  # the protocol's own: which outputs, in which form
    timeout: float | None = None  # seconds from arrival the request itself allows (None: any)

    @property
    def attributes(self) -> dict[str, object]:
        """What the request is, as its span records it."""
        spec, work = self.served.spec, self.work
        attributes: dict[str, object] = {
            "gradserve.model": spec.name,
            "gradserve.model_version": spec.version,
            "gradserve.derivative": work.kind.value,
            "gradserve.rows": work.rows,
            "gradserve.queued_rows": work.x.shape[0],
            "gradserve.priority": self.priority.name,
        }
        if work.expanded:
            attributes["gradserve.expansion"] = work.what
        return attributes

    @property
    def nbytes(self) -> int:
        """What the request holds while queued and computed: its rows as queued, their
        vectors and results (its message is counted by whoever read it)."""
        work = self.work
        return self.served.batcher.request_bytes(work.x, work.kind, work.v)
