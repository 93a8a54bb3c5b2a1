"""Names of the standard protocol over HTTP that the server, the SDK's load tester and the
bench all write: Triton's binary tensor data extension."""

from __future__ import annotations

# The length of a request's or answer's JSON header, the binary tensors following it.
HEADER_LENGTH = "Inference-Header-Content-Length"
