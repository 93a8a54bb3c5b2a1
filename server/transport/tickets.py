"""A Ticket: one request from the moment a servicer has it to its answer.

The servicer decodes a request once into a ticket (which model, which derivative, the
validated rows, how the answer is to be encoded); the answering loop hands the rows to the
model's batcher and gives the ticket and its result back to the same servicer to encode.
Nothing is looked up twice, and a stream answer is paired with its own ticket, not with an
arrival recorded elsewhere. The ticket also carries when each hop began, for the latency
breakdown every response reports.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from gradserve.server.core.batcher import Timing
from gradserve.server.core.contract import Derivative, Priority
from gradserve.server.core.explain import Options
from gradserve.server.core.registry import Served


@dataclass(slots=True, eq=False)
class Ticket:
    """What was decoded from one request (or stream message), and when."""

    arrived: float = field(default_factory=time.perf_counter)
    id: str = ""
    model: str = ""  # the model name as the request gave it (echoed in error answers)
    served: Served | None = None
    kind: Derivative = Derivative.GRADIENT
    x: np.ndarray | None = None
    v: np.ndarray | None = None
    options: Options | None = None  # target and explanation options; None: plain rows
    plan: object = None  # the protocol's own: which outputs, in which encoding
    priority: Priority = Priority.NORMAL
    nbytes: int = 0  # what it holds while queued and computed (message, arrays, answer)


@dataclass(frozen=True, slots=True)
class Hops:
    """A request's latency breakdown in microseconds, arrival to answer."""

    decode_us: int  # arrival -> queued: parsing checks, validation, decoding
    queue_us: int  # queued -> dispatched in a batch
    handoff_us: int  # dispatched -> engine started
    compute_us: int  # inside the engine
    encode_us: int  # engine ended -> answer built: split and encode
    total_us: int  # arrival -> answer built
    batch_rows: int


def hops(ticket: Ticket, timing: Timing) -> Hops:
    """The breakdown of a ticket answered now with `timing` from the batcher."""
    now = time.perf_counter()
    return Hops(
        decode_us=round((timing.queued - ticket.arrived) * 1e6),
        queue_us=timing.queue_us,
        handoff_us=timing.handoff_us,
        compute_us=timing.compute_us,
        encode_us=round((now - timing.done) * 1e6),
        total_us=round((now - ticket.arrived) * 1e6),
        batch_rows=timing.batch_rows,
    )
