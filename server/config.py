"""Server configuration: one dataclass, built from flags with GRADSERVE_<FLAG> env fallbacks."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, fields
from pathlib import Path

from gradserve.server.core.repository import CONTROLS, Source, VersionPolicy, scan
from gradserve.wire.callers import CALLER_HEADER
from gradserve.wire.limits import MAX_MESSAGE_MB, MIB

BACKENDS = ("tensorflow", "jax", "torch")  # one module each under server/engine
BUNDLED_DIR = Path(__file__).resolve().parent / "models"
BUNDLED_MODEL = BUNDLED_DIR / "quadratic.keras"
MAX_IN_FLIGHT = 64  # sub-batches per frontend: each slot holds a segment on both sides
AUTO_MIN_CORES = 2  # from here on, 2 frontends measured faster than one process (benchmarks)


@dataclass(frozen=True)
class ServerConfig:
    model: str = "quadratic"
    model_repository: str = ""
    model_control: str = "none"
    poll_seconds: float = 10.0
    version_policy: str = "latest 1"
    model_name: str = ""
    unsafe_deserialization: bool = False
    input: str = ""
    output: str = ""
    max_result_mb: int = 64
    host: str = "127.0.0.1"
    port: int = 50051
    backend: str = "tensorflow"
    device: str = "auto"
    xla: bool = True
    deterministic: bool = False
    max_batch_size: int = 4096
    max_delay_us: int = 0
    max_queue_rows: int = 262144
    max_queue_mb: int = 256
    max_batch_ms: float = 20.0
    fairness: bool = True
    max_message_mb: int = MAX_MESSAGE_MB
    stream_window: int = 256
    stream_window_mb: int = 64
    drain_seconds: float = 30.0
    frontends: str = "auto"
    in_flight: int = 1
    max_connection_age: float = 0.0
    max_connection_age_grace: float = 0.0
    bdp_probe: bool = False
    metrics_port: int = 9400
    http_port: int = 8000
    http_max_connections: int = 1024
    http_idle_seconds: float = 60.0
    log_format: str = "text"
    log_level: str = "INFO"
    trace: bool = False
    trace_hops: str = "events"
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""

    def frontend_count(self) -> int:
        """How many frontend processes: 1 means today's single process."""
        if self.frontends == "auto":
            cores = len(os.sched_getaffinity(0))  # the cores this process may run on
            return 1 if cores < AUTO_MIN_CORES else max(2, cores // 2)
        return int(self.frontends)

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb * MIB

    def connection_options(self) -> list[tuple[str, int]]:
        """gRPC server options: HTTP/2 bandwidth probing, --max-connection-age and its grace."""
        options = [("grpc.http2.bdp_probe", int(self.bdp_probe))]
        if self.max_connection_age > 0:
            options.append(("grpc.max_connection_age_ms", round(self.max_connection_age * 1000)))
        if self.max_connection_age_grace > 0:
            grace_ms = round(self.max_connection_age_grace * 1000)
            options.append(("grpc.max_connection_age_grace_ms", grace_ms))
        return options

    @property
    def max_result_bytes(self) -> int:
        return self.max_result_mb * MIB

    @property
    def max_queue_bytes(self) -> int:
        return self.max_queue_mb * MIB

    @property
    def stream_window_bytes(self) -> int:
        return self.stream_window_mb * MIB

    def model_sources(self) -> dict[str, Source]:
        """Every model to serve by name, with its versions: each --model entry (comma-separated;
        a bare bundled name such as `quadratic`, `quadratic_tanh` or `digits` means the bundled
        file) as version 1, and the models of --model-repository (rescanned on each call)."""
        policy = VersionPolicy.parse(self.version_policy)
        paths = [_resolve_model(entry) for entry in self.model.split(",") if entry.strip()]
        if self.model_name and len(paths) != 1:
            raise ValueError("--model-name names one --model entry; several are given")
        sources = {
            self.model_name or path.stem: Source({1: path}, policy, static=True) for path in paths
        }
        if self.model_repository:
            sources.update(scan(Path(self.model_repository), policy))
        return sources


_HELP = {
    "model": "models to serve, comma-separated: .keras or .h5 files, SavedModel folders, or "
    "bundled names (quadratic, quadratic_tanh, digits)",
    "model_repository": "a model repository: DIR/<name>/<version>/<model file or SavedModel> "
    "(a model file or SavedModel directly in DIR is version 1); alias --model-dir",
    "model_control": "none (load the repository at start), poll (rescan it every "
    "--poll-seconds) or explicit (load and unload only when asked: RepositoryModelLoad/Unload)",
    "poll_seconds": "with --model-control poll: seconds between rescans of the repository",
    "version_policy": "versions to serve of a model without its own model.toml: 'latest N', "
    "'all' or 'specific V [V ...]'",
    "model_name": "name of the model for clients when one is served; default: its file name",
    "unsafe_deserialization": "allow Keras Lambda layers (runs code from the file: trusted files "
    "only)",
    "input": "SavedModel signature input to differentiate by, when it has several",
    "output": "SavedModel signature output to serve, when it has several",
    "max_result_mb": "refuse Jacobians/Hessians (and explanations whose expanded gradients) that "
    "would exceed this many MiB",
    "host": "address to bind; 0.0.0.0 exposes the server on every interface",
    "port": "port to bind; 0 picks a free one",
    "backend": "the framework that computes: tensorflow (every model format), jax (Keras 3 "
    ".keras and .h5 files, through Keras on JAX; needs the jax extra) or torch (Keras files "
    "through Keras on PyTorch, and torch.export .pt2 programs; needs the torch extra)",
    "device": "auto (first GPU, else CPU), cpu, or gpu:N (with torch also cuda[:N])",
    "xla": "compile with XLA, padding batches to a ladder of power-of-two sizes",
    "deterministic": "compute every batch in fixed tiles of rows, so a row's answer is the "
    "same in every bit whatever else is in its batch (costs engine time: see the documentation's "
    "Reproducible answers)",
    "max_batch_size": "most rows per engine call; larger requests are split",
    "max_delay_us": "hold an idle engine up to this long to gather a larger batch (0: never)",
    "max_queue_rows": "most rows waiting at once (and per request, counting an explanation's "
    "expanded rows); beyond: RESOURCE_EXHAUSTED",
    "max_queue_mb": "most MiB that admitted requests may hold at once (messages, rows, "
    "vectors, explanations' expanded rows, results), over every model; beyond: RESOURCE_EXHAUSTED",
    "max_batch_ms": "engine-time budget per batch, from each kind's learned cost per row; "
    "larger requests are split (0: rows only)",
    "fairness": f"fill batches round robin across callers (the {CALLER_HEADER} header or "
    "metadata, else the connection); off: first come, first served",
    "max_message_mb": "largest request or response message, in MiB",
    "stream_window": "messages of one stream read ahead while earlier ones compute",
    "stream_window_mb": "MiB of one stream's messages read ahead and not yet answered",
    "drain_seconds": "on SIGTERM/SIGINT, how long accepted requests may take to finish",
    "frontends": "protocol processes sharing the port, fed to one engine process: a number, "
    "or auto (1, one process, on 1 core; else half the cores, at least 2)",
    "in_flight": "with --frontends N >= 2: sub-batches each frontend keeps in flight to the "
    "engine process, which queues and schedules them (more: smaller sub-batches, more CPU "
    "per request; for an engine with cores to spare)",
    "max_connection_age": "seconds after which a client connection is asked to reconnect "
    "(GOAWAY, +-10%% jitter), so balancing clients re-resolve and spread over new replicas "
    "(0: never)",
    "max_connection_age_grace": "seconds the calls in flight on such a connection may still "
    "take before it is closed (0: no limit)",
    "bdp_probe": "let HTTP/2 bandwidth probing widen each connection's windows: faster large "
    "messages on long links, but then most of a message is in the server's memory before it "
    "is admitted or refused, beyond --max-queue-mb (off: the memory bound holds)",
    "metrics_port": "Prometheus /metrics HTTP port, on --host (0: off)",
    "http_port": "the standard inference protocol over HTTP/JSON (KServe v2 REST), on --host "
    "(0: off; 8000, as Triton)",
    "http_max_connections": "most HTTP connections open at once; beyond, a new one is "
    "answered 503 (Retry-After) and closed",
    "http_idle_seconds": "an HTTP connection without a request for this long is closed, and a "
    "request body that stalls this long is answered 408",
    "log_format": "text or json (one JSON object per line)",
    "log_level": "DEBUG, INFO, WARNING or ERROR",
    "trace": "export OpenTelemetry traces over OTLP/gRPC (to OTEL_EXPORTER_OTLP_ENDPOINT, "
    "default localhost:4317); setting that variable also turns tracing on; the other OTEL_* "
    "variables (sampler, service name, batching) apply",
    "trace_hops": "a traced request's hops (decode, queue, handoff, compute, encode) as "
    "events on its span (cheaper) or as child spans: events or spans",
    "tls_cert": "PEM certificate chain: serve TLS (needs --tls-key)",
    "tls_key": "PEM private key of --tls-cert",
    "tls_client_ca": "PEM CA bundle: require client certificates signed by it (mTLS)",
}


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected on/off, got {text!r}")


def _resolve_model(entry: str) -> Path:
    entry = entry.strip()
    bundled = BUNDLED_DIR / f"{entry}.keras"
    if "/" not in entry and not Path(entry).exists() and bundled.exists():
        return bundled
    return Path(entry)


_ALIASES = {"model_repository": ("--model-dir",)}  # earlier names of a flag, still accepted
_TYPES = {"Path": Path, "str": str, "int": int, "float": float, "bool": _parse_bool}


@dataclass(frozen=True)
class Flag:
    """One `gradserve serve` flag as the parser and the documentation's reference both see
    it: written once here, from a ServerConfig field and its help."""

    field: str
    flag: str
    aliases: tuple[str, ...]
    env: str
    type: str
    default: object
    help: str


def flags() -> list[Flag]:
    """Every server flag, in ServerConfig's order, with its built-in default (not the
    environment's)."""
    return [
        Flag(
            field=f.name,
            flag="--" + f.name.replace("_", "-"),
            aliases=_ALIASES.get(f.name, ()),
            env="GRADSERVE_" + f.name.upper(),
            type=f.type,
            default=f.default,
            help=_HELP[f.name],
        )
        for f in fields(ServerConfig)
    ]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per ServerConfig field; GRADSERVE_<FIELD> in the environment sets its default."""
    for flag in flags():
        kind = _TYPES[flag.type]
        default = kind(os.environ[flag.env]) if flag.env in os.environ else flag.default
        parser.add_argument(
            flag.flag,
            *flag.aliases,
            type=kind,
            default=default,
            help=f"{flag.help} (env {flag.env}; default: {default})",
        )


def from_namespace(args: argparse.Namespace) -> ServerConfig:
    config = ServerConfig(**{f.name: getattr(args, f.name) for f in fields(ServerConfig)})
    if config.max_batch_size < 1 or config.max_queue_rows < 1 or config.max_delay_us < 0:
        raise ValueError("max-batch-size and max-queue-rows must be >= 1, max-delay-us >= 0")
    if config.max_connection_age < 0 or config.max_connection_age_grace < 0:
        raise ValueError("--max-connection-age and --max-connection-age-grace must be >= 0")
    if config.max_queue_mb < 1 or config.stream_window_mb < 1 or config.max_batch_ms < 0:
        raise ValueError("max-queue-mb and stream-window-mb must be >= 1, max-batch-ms >= 0")
    if bool(config.tls_cert) != bool(config.tls_key):
        raise ValueError("--tls-cert and --tls-key go together")
    if config.tls_client_ca and not config.tls_cert:
        raise ValueError("--tls-client-ca (mTLS) needs --tls-cert and --tls-key")
    if not 1 <= config.in_flight <= MAX_IN_FLIGHT:
        raise ValueError(f"--in-flight must be 1 to {MAX_IN_FLIGHT}, got {config.in_flight}")
    count = config.frontends
    if count != "auto" and not (count.isdigit() and int(count) >= 1):
        raise ValueError(f"--frontends must be a number >= 1 or auto, got {config.frontends!r}")
    if config.http_max_connections < 1 or config.http_idle_seconds <= 0:
        raise ValueError("--http-max-connections must be >= 1, --http-idle-seconds > 0")
    if config.backend not in BACKENDS:
        raise ValueError(f"--backend must be one of {BACKENDS}, got {config.backend!r}")
    if config.model_control not in CONTROLS:
        raise ValueError(f"--model-control must be one of {CONTROLS}, got {config.model_control!r}")
    if config.poll_seconds <= 0:
        raise ValueError("--poll-seconds must be > 0")
    VersionPolicy.parse(config.version_policy)  # RepositoryError is a ValueError
    if config.trace_hops not in ("events", "spans"):
        raise ValueError(f"--trace-hops must be events or spans, got {config.trace_hops!r}")
    if config.log_format not in ("text", "json"):
        raise ValueError(f"--log-format must be text or json, got {config.log_format!r}")
    return config
