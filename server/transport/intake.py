"""Admission before a message is read: who is calling, and whether their message may come in.

gRPC reads a unary call's whole message before any handler runs, so a server that refuses
only after decoding has already paid for every refused message: forty callers sending 15 MB
each put 600 MB in memory before one of them can be told the queue is full. Here a unary
call's message is read only after the bytes it will hold are reserved against the server's
memory budget; a call that does not fit is refused with RESOURCE_EXHAUSTED before its
message is read (HTTP/2 flow control keeps the rest of it in the caller's memory).

How big a message (and its answer) will be is known only once it is read (answered), so what
each caller's last call held stands in for its next one. A caller not seen yet (a new
connection) reserves nothing before its first message is read; it is refused then if that
message and an answer as large do not fit. (New callers are not made to take turns: a
client that opens a call and never sends its message would hold a turn and stall every
other newcomer.) A message larger than its estimate is settled once read the same way.

The reservation (a `Lease`) lives as long as the call: the message while it is served, then
the encoded answer until gRPC has sent it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

import grpc

from gradserve.server.core.budget import MemoryBudget

CLIENT_ID_KEY = "x-gradserve-client"


def caller_of(context: grpc.aio.ServicerContext) -> str:
    """Who is calling, for fair batching and admission: the client id the call's metadata
    names, else the connection (gRPC's peer address)."""
    for key, value in context.invocation_metadata() or ():
        if key == CLIENT_ID_KEY:
            return f"client:{value}"
    return f"peer:{context.peer()}"


class Lease:
    """Bytes one call holds against the memory budget, until `release`."""

    __slots__ = ("_memory", "nbytes")

    def __init__(self, memory: MemoryBudget) -> None:
        self._memory = memory
        self.nbytes = 0

    def reserve(self, nbytes: int) -> None:
        """Hold `nbytes` more, or raise QueueFull/RequestTooLarge holding nothing more."""
        self._memory.reserve(nbytes)
        self.nbytes += nbytes

    def resize(self, nbytes: int) -> None:
        """The call holds `nbytes` from now on: give back the excess of the estimate, or
        reserve what it fell short by, which may refuse the call (QueueFull,
        RequestTooLarge)."""
        if nbytes > self.nbytes:
            self._memory.reserve(nbytes - self.nbytes)
            self.nbytes = nbytes
        else:
            self.keep(nbytes)

    def keep(self, nbytes: int) -> None:
        """The call holds `nbytes` from now on, bytes that exist already (its encoded
        answer): counted whatever the limit, never refused."""
        if nbytes > self.nbytes:
            self._memory.hold(nbytes - self.nbytes)
        else:
            self._memory.release(self.nbytes - nbytes)
        self.nbytes = nbytes

    def release(self) -> None:
        self._memory.release(self.nbytes)
        self.nbytes = 0


class Intake:
    """What each caller's last call held (its message and its encoded answer), and the
    reservation made from it before a unary message is read."""

    def __init__(self, memory: MemoryBudget, remembered: int = 4096) -> None:
        self.memory = memory
        self._sizes: OrderedDict[Hashable, int] = OrderedDict()
        self._remembered = remembered

    def expected(self, caller: Hashable) -> int | None:
        """The bytes `caller`'s last call held (message and answer), or None before its
        first."""
        size = self._sizes.get(caller)
        if size is not None:
            self._sizes.move_to_end(caller)
        return size

    def remember(self, caller: Hashable, nbytes: int) -> None:
        """`caller`'s call held `nbytes` (message and answer) at its end."""
        self._sizes[caller] = nbytes
        self._sizes.move_to_end(caller)
        if len(self._sizes) > self._remembered:
            self._sizes.popitem(last=False)

    def admit(self, caller: Hashable, lease: Lease) -> None:
        """Before reading a unary call's message: reserve what the caller's last call held
        (message and answer, so that the answer's bytes are not taken by others meanwhile),
        raising QueueFull (RequestTooLarge) at once when it does not fit; nothing for a
        caller not seen yet."""
        lease.reserve(self.expected(caller) or 0)
