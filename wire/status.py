"""gRPC status numbers as they travel inside messages (a native stream's error answer), once
for the server and the SDK.
"""

from __future__ import annotations

import grpc

_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def status_code(number: int) -> grpc.StatusCode:
    """The grpc.StatusCode of a wire status number (UNKNOWN for one grpc does not know)."""
    return _BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)


def status_number(code: grpc.StatusCode) -> int:
    """The wire number of a grpc.StatusCode."""
    return code.value[0]
