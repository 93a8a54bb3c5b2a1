"""What can go wrong with one request, in the server's own terms (no gRPC here).

Every layer raises these; `status.py` is the one table that maps them to gRPC codes.
"""

from __future__ import annotations


class RequestError(Exception):
    """Base of every error that ends one request (and only that request)."""


class InvalidInput(RequestError, ValueError):
    """The request is malformed; the message says what was expected."""


class UnknownModel(RequestError):
    """The request names a model (or version) this server does not serve."""


class QueueFull(RequestError):
    """The queue holds too many rows to admit this request now; retrying later may work."""


class RequestTooLarge(RequestError):
    """The request has more rows than the queue can ever hold."""


class DeadlineExpired(RequestError):
    """The caller's deadline passed before the request's rows were computed."""


class EngineFailed(RequestError):
    """The engine raised on this request's rows (isolated from the rest of its batch)."""


class EngineUnavailable(RequestError):
    """The engine (process) is gone: nothing was computed; another replica may answer."""


class Closed(RequestError):
    """The server is shutting down and accepts no new requests or stream messages."""


class LoadFailed(RequestError):
    """A model version could not be loaded or warmed up; the versions served before still
    are."""


class ControlRefused(RequestError):
    """A repository operation this server's --model-control does not allow."""


# Errors a computation may end with that are nobody's fault in its batch: the batch is not
# bisected, each of its requests gets the error as it is (DeadlineExpired: from the engine
# process, for a batch whose every request's deadline had passed).
NOT_BLAMED = (EngineUnavailable, Closed, QueueFull, DeadlineExpired)

# Every error by its name, the name being how it crosses a process boundary.
BY_NAME: dict[str, type[RequestError]] = {
    cls.__name__: cls
    for cls in (InvalidInput, UnknownModel, QueueFull, RequestTooLarge, DeadlineExpired,
                EngineFailed, EngineUnavailable, Closed, LoadFailed, ControlRefused)
}  # fmt: skip


class Undecodable:
    """Stands in for a request message whose bytes did not parse: what it was meant to be and
    why it is not, as the InvalidInput its call or stream message is answered with."""

    __slots__ = ("error",)

    def __init__(self, type_name: str, size: int, error: str) -> None:
        self.error = InvalidInput(
            f"the request ({size} bytes) is not a valid {type_name} message: {error}"
        )


class StartRefused(Exception):
    """The server cannot start as its flags ask: a model version failed in a way that says
    this machine cannot keep a promise the flags make (not a fault of the version's files;
    a version loaded later fails like any other), or a port cannot be bound. The server stops
    with this message, one line, rather than serve without the promise."""

    exit_status = 1  # of `gradserve serve`, refused this way


class PortTaken(StartRefused):
    """A port the server was told to listen on cannot be bound: a usage error, exit 2, one
    line naming the port and its flag."""

    exit_status = 2

    def __init__(self, host: str, port: int, flag: str, why: object) -> None:
        off = "" if flag == "--port" else ", or 0 to turn it off"
        super().__init__(
            f"cannot listen on {host}:{port} ({flag}): {why}; stop what holds it, or choose "
            f"another port with {flag}{off}"
        )
