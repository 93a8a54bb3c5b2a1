"""The REST port: aiohttp's connection handlers behind a gate that holds at most
--http-max-connections open at once, with the gRPC port's TLS, in the running event loop.

A connection beyond the limit is answered 503 with Retry-After and closed, without reaching
aiohttp: it costs one canned write. A connection that sends no complete request for
--http-idle-seconds is closed (aiohttp's keep-alive timer runs from the connection's start).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable

import orjson
from aiohttp import web


def _busy_response() -> bytes:
    body = orjson.dumps({"error": "too many open HTTP connections; retry after 1 s"})
    head = (
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


BUSY = _busy_response()


class _Gate:
    """How many connections are open, and how many may be."""

    def __init__(self, limit: int) -> None:
        self.limit, self.open = limit, 0


class _Gated(asyncio.Protocol):
    """One connection: aiohttp's handler while the gate has room, else a refusal (503 to
    its first bytes, then close). Counted from connection_made to connection_lost, the
    calls asyncio makes once each for every connection that was made."""

    def __init__(self, make_handler: Callable[[], asyncio.Protocol], gate: _Gate) -> None:
        self._make_handler, self._gate = make_handler, gate
        self._handler: asyncio.Protocol | None = None
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        gate = self._gate
        if gate.open >= gate.limit:
            self._transport = transport
            return
        gate.open += 1
        self._handler = self._make_handler()
        self._handler.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._handler is not None:
            self._handler.data_received(data)
        elif self._transport is not None:
            self._transport.write(BUSY)
            self._transport.close()
            self._transport = None

    def eof_received(self) -> bool | None:
        if self._handler is not None:
            return self._handler.eof_received()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._handler is not None:
            self._gate.open -= 1
            self._handler.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._handler is not None:
            self._handler.pause_writing()

    def resume_writing(self) -> None:
        if self._handler is not None:
            self._handler.resume_writing()


class HttpListener:
    """`application` on one port until `close`, at most `max_connections` open at once,
    each closed after `idle_seconds` without a request."""

    def __init__(
        self, application: web.Application, *, max_connections: int, idle_seconds: float
    ) -> None:
        self._gate = _Gate(max_connections)
        self._runner = web.AppRunner(
            application, access_log=None, handle_signals=False, keepalive_timeout=idle_seconds
        )
        self._server: asyncio.Server | None = None
        self.port: int | None = None

    @property
    def open_connections(self) -> int:
        return self._gate.open

    async def start(
        self, host: str, port: int, tls: ssl.SSLContext | None, *, reuse_port: bool
    ) -> None:
        """Listen; frontends of one server share the port (`reuse_port`), the kernel
        spreading connections over them as for gRPC."""
        await self._runner.setup()
        handlers, gate = self._runner.server, self._gate
        self._server = await asyncio.get_running_loop().create_server(
            lambda: _Gated(handlers, gate), host, port, ssl=tls, reuse_port=reuse_port
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Stop accepting, let the requests in progress finish, close every connection."""
        if self._server is not None:
            self._server.close()
        await self._runner.cleanup()
