"""Who is calling: the header a client names itself with (gRPC metadata key and HTTP header
alike), so that the server's fair batching and admission see one client as one caller over
every protocol and connection. The SDK sends it (`client_id=`); any client may."""

from __future__ import annotations

CALLER_HEADER = "x-gradserve-client"
