"""Who is calling: the header a client names itself with (gRPC metadata key and HTTP header
alike), so that the server's fair batching and admission see one client as one caller over
every protocol and connection. The SDK sends it (`client_id=`); any client may."""

from __future__ import annotations

CALLER_HEADER = "x-gradserve-client"


def caller_key(named: str | None, connection: str) -> str:
    """The server's key for a caller: the name it gave in CALLER_HEADER, else its connection
    (one caller per connection)."""
    return f"client:{named}" if named else f"peer:{connection}"
