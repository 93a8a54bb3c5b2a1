"""How the SDK and the load-test script connect: targets, balancing, TLS.

Several targets (or a DNS name resolving to several replicas) are balanced per call with
gRPC's own round_robin policy; a replica that goes away answers UNAVAILABLE, which the SDK
retries on another.
"""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2_grpc

from gradserve.client.retry import Attempts, RetryPolicy
from gradserve.client.tracing import trace_metadata
from gradserve.v1 import gradserve_pb2_grpc as pb_grpc
from gradserve.wire.callers import CALLER_HEADER
from gradserve.wire.limits import MAX_MESSAGE_MB, MIB

DEFAULT_TARGET = "127.0.0.1:50051"
MAX_MESSAGE_BYTES = MAX_MESSAGE_MB * MIB
OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.lb_policy_name", "round_robin"),
    # Each client (and each load-test connection) gets connections of its own rather than
    # sharing one per address across the process: a server whose frontend processes share
    # a port is spread over them per connection.
    ("grpc.use_local_subchannel_pool", 1),
]


@dataclass(frozen=True)
class Tls:
    """Client TLS: `ca` verifies the server (None: the system roots); `cert`/`key` for mTLS.

    Paths to PEM files. `server_name` overrides the name checked in the server's certificate.
    """

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: str | None) -> bytes | None:
            return Path(path).read_bytes() if path else None

        return grpc.ssl_channel_credentials(read(self.ca), read(self.key), read(self.cert))

    def ssl_context(self) -> ssl.SSLContext:
        """The same settings for an HTTPS client (the REST protocol); `server_name` is a
        gRPC option only."""
        context = ssl.create_default_context(cafile=self.ca)
        if self.cert:
            context.load_cert_chain(self.cert, self.key)
        return context

    def options(self) -> list[tuple[str, str]]:
        if not self.server_name:
            return []
        return [("grpc.ssl_target_name_override", self.server_name)]


def channel_target(target: str | Sequence[str]) -> str:
    """One gRPC target for one address, a name (dns:///...), or a list of host:port."""
    if isinstance(target, str):
        return target
    targets = list(target)
    if len(targets) == 1:
        return targets[0]
    hosts = [t.rsplit(":", 1)[0].strip("[]") for t in targets]
    try:
        versions = {ipaddress.ip_address(h).version for h in hosts}
    except ValueError:
        raise ValueError(
            "several targets must be IP:port (or use one dns:/// name that resolves to all of "
            f"them); got {targets}"
        ) from None
    if len(versions) != 1:
        raise ValueError(f"several targets must be all IPv4 or all IPv6; got {targets}")
    return f"ipv{versions.pop()}:" + ",".join(targets)


def open_channel(target: str | Sequence[str], tls: Tls | None, *, aio: bool):
    """A blocking or asyncio channel to `target`, with TLS when `tls` is given."""
    module = grpc.aio if aio else grpc
    address = channel_target(target)
    if tls is None:
        return module.insecure_channel(address, options=OPTIONS)
    return module.secure_channel(address, tls.credentials(), options=OPTIONS + tls.options())


class ClientBase:
    """What both SDK clients hold: target, deadline, retry policy, channel and stubs.

    `wait_for_ready=True` makes each call wait, within its timeout, for a server that is
    not reachable yet (gRPC's wait_for_ready) or still loading its models (UNAVAILABLE,
    retried until the deadline); the default fails fast as gRPC does. `client_id` names the
    client to the server's fair batching: every call under one name is one caller, over any
    number of connections (default: each connection is a caller of its own).
    """

    _aio = False

    def __init__(
        self,
        target: str | Sequence[str] = DEFAULT_TARGET,
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
        tls: Tls | None = None,
        wait_for_ready: bool = False,
        client_id: str | None = None,
    ) -> None:
        self.target = target
        self.client_id = client_id
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.wait_for_ready = wait_for_ready
        self._channel = open_channel(target, tls, aio=self._aio)
        self._stub = pb_grpc.GradientServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def _metadata(self) -> tuple[tuple[str, str], ...] | None:
        """Every call's metadata: the client's name (CALLER_HEADER: the server's fair
        batching treats every call with one name as one caller, whatever the connection or
        protocol) and the caller's trace context."""
        named = ((CALLER_HEADER, self.client_id),) if self.client_id else ()
        return (*named, *(trace_metadata() or ())) or None

    def _attempts(self) -> Attempts:
        """The retry state of one call, bounded by the client's timeout."""
        return Attempts(self.retry, self.timeout, self.wait_for_ready)
