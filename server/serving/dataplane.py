"""The steps of one model request that do not depend on its transport, written once:

1. `span`: the request's trace span, when tracing is on and the request is sampled;
2. `start`: queue a decoded ticket's rows as its caller's, at its priority, until the
   earliest of its deadlines (the transport's and the request's own `timeout`);
3. `answered`: account an answer (latency breakdown, metrics, the version's statistics, the
   span), returning the breakdown the protocol writes into it;
4. `failed`: account a failure (statistics once the request named a version, the span).

gRPC unary calls and streams (transport/answering.py) and REST (protocols/rest.py) are
adapters around these steps: bytes to a ticket, a result or a failure to bytes. One
instance serves every protocol of a server.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass

from gradserve.server.core import explain
from gradserve.server.core.batcher import RequestResult
from gradserve.server.core.explain import Reduced
from gradserve.server.core.timing import SchedulerTiming
from gradserve.server.metrics import Metrics
from gradserve.server.serving.tickets import Ticket
from gradserve.server.tracing import Tracing, request_attributes
from gradserve.wire.timing import Hops


def breakdown(arrived: float, timing: SchedulerTiming) -> Hops:
    """The hops of a request that arrived at `arrived` (time.perf_counter()) and whose answer,
    computed with `timing`, is built now: they add up to its time in the server."""
    now = time.perf_counter()
    return Hops(
        decode_us=round((timing.queued - arrived) * 1e6),
        queue_us=timing.queue_us,
        handoff_us=timing.handoff_us,
        compute_us=timing.compute_us,
        encode_us=round((now - timing.done) * 1e6),
        total_us=round((now - arrived) * 1e6),
        batch_rows=timing.batch_rows,
    )


@dataclass(frozen=True, slots=True)
class Call:
    """What the transport knows of one request: who sent it (a caller key,
    wire/callers.py), when its answer is due (the event loop's clock; None: never), and its
    span (None: not traced)."""

    caller: str
    deadline: float | None = None
    span: object = None


class DataPlane:
    """Queues requests and accounts their outcomes, for every protocol of one server."""

    def __init__(self, metrics: Metrics, tracing: Tracing | None) -> None:
        """`tracing`: the server's, or None when it is off."""
        self._metrics = metrics
        self._tracing = tracing

    @property
    def traces(self) -> bool:
        """Whether tracing is on: without it, nothing needs building a span's inputs."""
        return self._tracing is not None

    def span(
        self,
        name: str,
        carrier: Iterable[tuple[str, str]] | None,
        arrived: float,
        rpc: tuple[str, str] | None,
        caller: str,
        attributes: dict[str, object],
        parent: object = None,
    ) -> object:
        """A span for one request that arrived at `arrived` (time.perf_counter()), joining
        the trace its `carrier` (headers or metadata) names, or `parent`'s; None when
        tracing is off or the request is not sampled."""
        if self._tracing is None:
            return None
        attributes = request_attributes(rpc, caller, attributes)
        return self._tracing.request(name, carrier, arrived, parent=parent, attributes=attributes)

    def start(self, ticket: Ticket, call: Call) -> asyncio.Future[RequestResult | Reduced]:
        """Queue the ticket's rows (as decoded, or expanded for targets, explanations and k
        tangents, and reduced when they come back) as the call's caller's, at the ticket's
        priority; rows past their deadline are never computed."""
        if call.span is not None:
            Tracing.described(call.span, ticket.attributes)
        deadline = call.deadline
        if ticket.timeout is not None:
            loop_now, waited = asyncio.get_running_loop().time(), time.perf_counter()
            own = loop_now + ticket.timeout - (waited - ticket.arrival.at)
            deadline = own if deadline is None else min(deadline, own)
        return explain.submit(ticket.work, ticket.served.batcher.submit, deadline,
                              caller=call.caller, priority=ticket.priority,
                              trace=call.span)  # fmt: skip

    def answered(self, ticket: Ticket, result: RequestResult | Reduced, call: Call) -> Hops:
        """Account one answer; its latency breakdown, for the protocol to write into it."""
        hops = breakdown(ticket.arrival.at, result.timing)
        self._metrics.hops(hops)
        ticket.served.statistics.answered(ticket.work.rows, hops)
        if call.span is not None:
            self._tracing.answered(call.span, ticket.arrival.at, hops)
        return hops

    @staticmethod
    def failed(
        ticket: Ticket | None, arrived: float, span: object, code: str, message: str
    ) -> None:
        """Account a failed request (one that arrived at `arrived`): in its version's
        statistics once it was decoded for one, and in its span; `code` is the status name
        (INVALID_ARGUMENT, ...)."""
        if ticket is not None:
            ticket.served.statistics.failed(time.perf_counter() - arrived)
        if span is not None:
            Tracing.failed(span, code, message)
