"""Admission before a message is read: who is calling, and whether their message may come in.

gRPC reads a unary call's whole message before any handler runs, so a server that refuses
only after decoding has already paid for every refused message: forty callers sending 15 MB
each put 600 MB in memory before one of them can be told the queue is full. Here a unary
call's message is read only after the bytes it will hold are reserved against the server's
memory budget; a call that does not fit is refused with RESOURCE_EXHAUSTED before its
message is read (HTTP/2 flow control keeps the rest of it in the caller's memory).

How big a message (and its answer) will be is known only once it is read (answered), so what
each caller's last call held stands in for its next one; every message read is remembered,
whatever becomes of its call. A caller not seen yet (a new connection) may send the largest
message allowed: it reserves that much and an answer as large when that fits; otherwise it
takes the one turn for reads not reserved ahead, so that beyond the budget at most one
message (up to --max-message-mb) is arriving at a time: forty new connections sending at
once are read one after another, not all at once, and a 1-row newcomer waits for one
message, not for the flood to drain. A message that has not arrived HOLD_S after its read
began gives its reservation (turn) back, so a caller that opens a call and sends nothing (or
sends slowly, its bytes arriving as slowly) holds up other new callers for at most that
long; every first message is settled to its real size once read, and refused then if that
does not fit.

The reservation (a `Lease`) lives as long as the call: the message while it is served, then
the encoded answer until gRPC reports the call done.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Hashable
from contextvars import ContextVar

import grpc

from gradserve.server.core.budget import MemoryBudget, size_text
from gradserve.server.core.errors import QueueFull
from gradserve.wire.callers import CALLER_HEADER

WAIT_S = 10.0  # the longest a new caller waits for the newcomers' turn before it is refused
HOLD_S = 0.5  # how long a new caller's reservation waits for its message to arrive


def caller_key(named: str | None, connection: str) -> str:
    """The server's key for a caller, whatever the protocol: the name it gave in
    CALLER_HEADER, else its connection (one caller per connection)."""
    return f"client:{named}" if named else f"peer:{connection}"


# The caller of the call this task serves, once the routes have read it (a unary call's
# handler runs in a task of its own, so the value is the call's alone).
_CALLER: ContextVar[str | None] = ContextVar("gradserve_caller", default=None)


def caller_of(context: grpc.aio.ServicerContext) -> str:
    """Who is calling, for fair batching and admission: the client id the call's metadata
    names, else the connection (gRPC's peer address). Read once per call."""
    known = _CALLER.get()
    if known is not None:
        return known
    named = None
    for key, value in context.invocation_metadata() or ():
        if key == CALLER_HEADER:
            named = value
            break
    caller = caller_key(named, context.peer())
    _CALLER.set(caller)
    return caller


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline on the event loop's clock, or None when the caller set none."""
    remaining = context.time_remaining()
    if remaining is None:
        return None
    return asyncio.get_running_loop().time() + remaining


class Lease:
    """Bytes one call holds against the memory budget, until `release`."""

    __slots__ = ("memory", "nbytes")

    def __init__(self, memory: MemoryBudget) -> None:
        self.memory = memory
        self.nbytes = 0

    def reserve(self, nbytes: int) -> None:
        """Hold `nbytes` more, or raise QueueFull/RequestTooLarge holding nothing more."""
        self.memory.reserve(nbytes)
        self.nbytes += nbytes

    def resize(self, nbytes: int) -> None:
        """The call holds `nbytes` from now on: give back the excess of the estimate, or
        reserve what it fell short by, which may refuse the call (QueueFull,
        RequestTooLarge)."""
        if nbytes > self.nbytes:
            self.memory.reserve(nbytes - self.nbytes)
            self.nbytes = nbytes
        else:
            self.keep(nbytes)

    def keep(self, nbytes: int) -> None:
        """The call holds `nbytes` from now on, bytes that exist already (its encoded
        answer): counted whatever the limit, never refused."""
        if nbytes > self.nbytes:
            self.memory.hold(nbytes - self.nbytes)
        else:
            self.memory.release(self.nbytes - nbytes)
        self.nbytes = nbytes

    def release(self) -> None:
        self.memory.release(self.nbytes)
        self.nbytes = 0


class Intake:
    """What each caller's last call held (its message and its encoded answer), and the
    reservation made from it before a unary message is read."""

    def __init__(self, memory: MemoryBudget, first_bytes: int, remembered: int = 4096) -> None:
        """`first_bytes`: what a caller not seen yet may hold (the largest message allowed
        and an answer as large)."""
        self.memory = memory
        self.first_bytes = first_bytes
        self._sizes: OrderedDict[Hashable, int] = OrderedDict()
        self._remembered = remembered
        self._turn = asyncio.Lock()  # held by the one unreserved first read

    def expected(self, caller: Hashable) -> int | None:
        """The bytes `caller`'s last call held (message and answer), or None before its
        first."""
        size = self._sizes.get(caller)
        if size is not None:
            self._sizes.move_to_end(caller)
        return size

    def remember(self, caller: Hashable, nbytes: int) -> None:
        """`caller`'s call held `nbytes` (message and answer)."""
        self._sizes[caller] = nbytes
        self._sizes.move_to_end(caller)
        if len(self._sizes) > self._remembered:
            self._sizes.popitem(last=False)

    async def read(self, context: grpc.aio.ServicerContext, caller: Hashable, lease: Lease):
        """A unary call's message (or grpc.aio.EOF), read once admitted: the lease holds what
        the caller's last call held, or, for a caller not seen yet, see `_read_first`.
        Raises QueueFull or RequestTooLarge, reading nothing, when that does not fit. The
        lease then holds at least the message and an answer as large, which is remembered
        as what this caller's calls hold."""
        expected = self.expected(caller)
        if expected is not None:
            lease.reserve(expected)
            data = await context.read()
        else:
            data = await self._read_first(context, lease)
        if data is not grpc.aio.EOF:
            # Until a caller's answers are seen, assume one as large as its message (a
            # gradient's is).
            lease.resize(max(expected or 0, 2 * len(data)))
            self.remember(caller, lease.nbytes)
        return data

    async def _read_first(self, context: grpc.aio.ServicerContext, lease: Lease):
        """A new caller's message, whose size is not known before it is read: with a
        reservation for the largest first message when that fits now; otherwise on the
        one turn for unreserved reads, so that at most one uncounted message arrives at a
        time (a 1-row newcomer behind a flood waits for one message, not for room for the
        largest). Either is given back after HOLD_S if the message has not arrived. A
        caller that gets no turn by its deadline (at most WAIT_S) is refused."""
        first = min(self.first_bytes, self.memory.large_limit)
        if self.memory.fits(first):
            lease.reserve(first)
            return await _read_holding(context, lambda: lease.keep(0))
        wait = min(context.time_remaining() or WAIT_S, WAIT_S)
        try:
            await asyncio.wait_for(self._turn.acquire(), wait)
        except TimeoutError:
            raise QueueFull(
                f"queue full: {size_text(self.memory.held)} of {size_text(self.memory.limit)} "
                "are held, and new connections' first messages, read one at a time meanwhile, "
                f"left no turn for this one within {wait:.1f} s; retry later"
            ) from None
        turn = _Once(self._turn.release)
        try:
            return await _read_holding(context, turn)
        finally:
            turn()


class _Once:
    """Calls `action` the first time it is called, never again."""

    __slots__ = ("_action",)

    def __init__(self, action) -> None:
        self._action = action

    def __call__(self) -> None:
        action, self._action = self._action, None
        if action is not None:
            action()


async def _read_holding(context: grpc.aio.ServicerContext, give_back):
    """Read the message; if it has not arrived within HOLD_S, `give_back()` what its read
    holds (a reservation, a turn) and wait on: a caller that sends nothing, or slowly,
    holds it up for others that long at most."""
    read = asyncio.ensure_future(context.read())
    try:
        return await asyncio.wait_for(asyncio.shield(read), HOLD_S)
    except TimeoutError:
        give_back()
        return await read
    finally:
        read.cancel()  # when the call itself was cancelled meanwhile
