"""N gradserve replicas behind nginx (gRPC load balancing), all on 127.0.0.1.

    python deploy/cluster.py                     # 3 replicas + nginx, until Ctrl-C
    python deploy/cluster.py --replicas 2 --xla off -- --max-batch-size 512
    python deploy/cluster.py --load              # 1 replica direct vs N through nginx

Each replica is a `gradserve serve` subprocess with its own free port and metrics port;
nginx (`nginx -c <run dir>/nginx.conf -p <run dir>/`, from deploy/nginx/nginx.conf.template)
listens on one more free port and balances calls over them round robin. The script waits until
every replica reports SERVING and nginx answers a health check, prints the addresses, and on
Ctrl-C or SIGTERM stops nginx (graceful) and then the replicas (SIGTERM: they drain). Arguments
after `--` go to every replica's `gradserve serve`.

As a module:

    with Cluster(3, xla=False) as cluster:
        GradientClient(cluster.target).evaluate([0.2])
        cluster.replicas[0].requests()   # its gradserve_requests_total{rpc,code}
        cluster.kill(0)                  # SIGKILL one replica
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "deploy" / "nginx" / "nginx.conf.template"
HOST = "127.0.0.1"
# Debian installs nginx in /usr/sbin, which is not on an ordinary user's PATH.
NGINX_DIRS = ("/usr/sbin", "/usr/local/sbin", "/usr/local/nginx/sbin")
INSTALL_HINT = "install it with `apt-get install nginx` (as root) or `make nginx`"


class NginxNotFound(RuntimeError):
    """nginx is not installed (or not where it was said to be)."""


def find_nginx(nginx: str | None = None) -> str:
    """The nginx binary: `nginx` argument, else $NGINX, else PATH and the usual sbin dirs."""
    wanted = nginx or os.environ.get("NGINX")
    if wanted:
        found = shutil.which(wanted)
        if not found:
            raise NginxNotFound(f"nginx not found at {wanted!r}; {INSTALL_HINT}")
        return found
    search = os.pathsep.join([os.environ.get("PATH", ""), *NGINX_DIRS])
    found = shutil.which("nginx", path=search)
    if not found:
        raise NginxNotFound(f"nginx is not on PATH; {INSTALL_HINT}")
    return found


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports on 127.0.0.1 (held together, so none is handed out twice:
    gRPC binds with SO_REUSEPORT, so two replicas given one port would silently share it)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind((HOST, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _stop_process(process: subprocess.Popen, sig: int | None, timeout: float) -> None:
    """Send `sig` (None: already sent), wait up to `timeout`, then SIGKILL; a process already
    gone is fine."""
    if sig is not None and process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(sig)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def health_status(target: str, timeout: float = 1.0) -> int | None:
    """The standard gRPC health status at `target` (1 = SERVING), or None if unreachable."""
    with grpc.insecure_channel(target) as channel:
        try:
            check = health_pb2_grpc.HealthStub(channel).Check
            return check(health_pb2.HealthCheckRequest(), timeout=timeout).status
        except grpc.RpcError:
            return None


@dataclass
class Replica:
    """One `gradserve serve` subprocess."""

    index: int
    port: int
    metrics_port: int
    process: subprocess.Popen
    log: Path

    @property
    def target(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{HOST}:{self.metrics_port}/metrics"

    def alive(self) -> bool:
        return self.process.poll() is None

    def scrape(self, timeout: float = 5.0) -> str:
        """The replica's Prometheus metrics, as text."""
        with urllib.request.urlopen(self.metrics_url, timeout=timeout) as response:
            return response.read().decode()

    def requests(self, rpc: str = "Evaluate", code: str = "OK", timeout: float = 5.0) -> float:
        """gradserve_requests_total{rpc, code} now (0 before the first such request)."""
        from prometheus_client.parser import text_string_to_metric_families

        for family in text_string_to_metric_families(self.scrape(timeout)):
            for sample in family.samples:
                if sample.name == "gradserve_requests_total" and sample.labels == {
                    "rpc": rpc,
                    "code": code,
                }:
                    return sample.value
        return 0.0


class Cluster:
    """`replicas` gradserve servers behind one nginx; `with Cluster(3) as c:` starts and stops.

    `xla` (None: the server's default) and `server_args` go to every replica; `listen_port`
    is nginx's port (0: a free one); `run_dir` holds the nginx config, pid, temp files and
    every log (default: a temporary directory, removed on stop). Raises NginxNotFound at once
    if nginx is not installed.
    """

    def __init__(
        self,
        replicas: int = 3,
        *,
        xla: bool | None = None,
        server_args: Sequence[str] = (),
        listen_port: int = 0,
        run_dir: str | Path | None = None,
        nginx: str | None = None,
        start_timeout: float = 180.0,
        drain_timeout: float = 40.0,
    ) -> None:
        if replicas < 1:
            raise ValueError("a cluster needs at least one replica")
        self.nginx_bin = find_nginx(nginx)
        self.size = replicas
        self.xla = xla
        self.server_args = list(server_args)
        self.listen_port = listen_port
        self.start_timeout = start_timeout
        self.drain_timeout = drain_timeout
        self._own_run_dir = run_dir is None
        self.run_dir = Path(run_dir) if run_dir else None
        self.replicas: list[Replica] = []
        self.nginx: subprocess.Popen | None = None
        self.target = ""

    # -- lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> Cluster:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> Cluster:
        """Start the replicas and nginx; return once all replicas and nginx answer SERVING."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        if self.run_dir is None:
            self.run_dir = Path(tempfile.mkdtemp(prefix="gradserve-cluster-"))
        (self.run_dir / "tmp").mkdir(parents=True, exist_ok=True)
        # nginx started as root runs its worker as an unprivileged user, which must reach the
        # temp directories nginx creates (and chowns) in here.
        self.run_dir.chmod(0o755)
        ports = free_ports(2 * self.size + (0 if self.listen_port else 1))
        listen = self.listen_port or ports.pop()
        self.target = f"{HOST}:{listen}"
        for i in range(self.size):
            self.replicas.append(self._spawn_replica(i, ports[2 * i], ports[2 * i + 1]))
        conf = self._write_config(listen)
        self._check_config(conf)
        log = (self.run_dir / "nginx.out").open("w")
        with log:
            self.nginx = subprocess.Popen(
                [self.nginx_bin, *self._nginx_flags(conf)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + self.start_timeout
        for replica in self.replicas:
            self._wait_replica(replica, deadline)
        self._wait_nginx(listen, deadline)

    def _spawn_replica(self, index: int, port: int, metrics_port: int) -> Replica:
        argv = [sys.executable, "-m", "gradserve.server.cli", "serve", *self.server_args]
        if not any(a.startswith("--frontends") for a in self.server_args):
            argv += ["--frontends", "1"]  # replicas share this machine's cores: one process each
        if self.xla is not None:
            argv += ["--xla", "on" if self.xla else "off"]
        # last, so they win over anything in server_args: loopback, the ports handed out here
        argv += ["--host", HOST, "--port", str(port), "--metrics-port", str(metrics_port)]
        argv += ["--http-port", "0"]  # nginx balances gRPC; REST is not routed here
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
        log = self.run_dir / f"replica-{index}.log"
        with log.open("w") as out:
            process = subprocess.Popen(
                argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        return Replica(index, port, metrics_port, process, log)

    def _write_config(self, listen: int) -> Path:
        servers = "\n".join(
            f"        server {r.target} max_fails=1 fail_timeout=2s;" for r in self.replicas
        )
        values = {
            "@RUN_DIR@": str(self.run_dir),
            "@LISTEN@": str(listen),
            "@SERVERS@": servers,
            "@TRIES@": str(self.size),
        }
        lines = []
        for line in TEMPLATE.read_text().splitlines():
            if not line.lstrip().startswith("#"):  # the comments name the tokens too
                for token, value in values.items():
                    line = line.replace(token, value)
            lines.append(line)
        conf = self.run_dir / "nginx.conf"
        conf.write_text("\n".join(lines) + "\n")
        return conf

    def _nginx_flags(self, conf: Path) -> list[str]:
        # -e: the log nginx writes before it has read the config (the default may be a root path)
        return ["-c", str(conf), "-p", f"{self.run_dir}/", "-e", str(self.run_dir / "error.log")]

    def _check_config(self, conf: Path) -> None:
        check = subprocess.run(
            [self.nginx_bin, "-t", "-q", *self._nginx_flags(conf)],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        if check.returncode != 0:
            raise RuntimeError(f"nginx rejected {conf}:\n{check.stderr}{check.stdout}")

    def _wait_replica(self, replica: Replica, deadline: float) -> None:
        while time.monotonic() < deadline:
            if not replica.alive():
                raise RuntimeError(
                    f"replica {replica.index} exited with {replica.process.returncode}:\n"
                    + _tail(replica.log)
                )
            if health_status(replica.target) == health_pb2.HealthCheckResponse.SERVING:
                return
            time.sleep(0.2)
        raise TimeoutError(f"replica {replica.index} not SERVING in time:\n{_tail(replica.log)}")

    def _wait_nginx(self, listen: int, deadline: float) -> None:
        while time.monotonic() < deadline:
            if self.nginx.poll() is not None:
                raise RuntimeError(
                    f"nginx exited with {self.nginx.returncode}:\n"
                    + _tail(self.run_dir / "error.log")
                    + "\n"
                    + _tail(self.run_dir / "nginx.out")
                )
            with contextlib.suppress(OSError), socket.create_connection((HOST, listen), 1):
                if health_status(self.target) == health_pb2.HealthCheckResponse.SERVING:
                    return
            time.sleep(0.1)
        raise TimeoutError(f"nginx not answering on {self.target}:\n{_tail(self.nginx_log)}")

    def stop(self) -> None:
        """nginx first (SIGQUIT: finish open calls), then every replica (SIGTERM: drain).

        Safe to call twice, and after a partial start; anything that does not stop in time is
        killed."""
        if self.nginx is not None:
            _stop_process(self.nginx, signal.SIGQUIT, timeout=15)
        for replica in self.replicas:
            if replica.alive():
                with contextlib.suppress(ProcessLookupError):
                    replica.process.send_signal(signal.SIGTERM)
        for replica in self.replicas:  # signalled together above, so they drain in parallel
            _stop_process(replica.process, None, timeout=self.drain_timeout)
        if self._own_run_dir and self.run_dir is not None:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    # -- operating it -------------------------------------------------------------------------

    def kill(self, index: int) -> Replica:
        """SIGKILL replica `index` (a hard failure: no drain) and reap it."""
        replica = self.replicas[index]
        replica.process.kill()
        replica.process.wait(timeout=10)
        return replica

    @property
    def nginx_log(self) -> Path:
        return self.run_dir / "error.log"

    def describe(self) -> str:
        lines = [
            f"nginx      {self.target}   balancing {self.size} replica(s); "
            f"config {self.run_dir / 'nginx.conf'}, log {self.nginx_log}"
        ]
        for r in self.replicas:
            lines.append(
                f"replica {r.index}  {r.target}  metrics {r.metrics_url}  pid {r.process.pid}  "
                f"log {r.log}"
            )
        return "\n".join(lines)


# -- the command line ---------------------------------------------------------------------------


def _loadtest(target: str, label: str, args: argparse.Namespace, out: Path) -> int:
    """`gradserve loadtest` against `target` (its own process); its table goes to stdout."""
    argv = [
        sys.executable, "-m", "gradserve.server.cli", "loadtest", "--target", target,
        "--concurrency", args.concurrency, "--duration", str(args.duration),
        "--warmup", str(args.warmup), "--rows", str(args.rows), "--label", label,
        "--json", str(out), "--no-progress",
    ]  # fmt: skip
    print(f"\n== {label}: gradserve loadtest --target {target}", flush=True)
    return subprocess.run(argv, cwd=ROOT, check=False).returncode


def run_load(args: argparse.Namespace, server_args: list[str]) -> int:
    """1 replica direct and through nginx, then N replicas through nginx; one table at the end."""
    from gradserve.client.loadtest import StepResult, format_table

    n = args.replicas
    results: list[StepResult] = []
    failed = 0
    with tempfile.TemporaryDirectory(prefix="gradserve-load-") as tmp:

        def measure(target: str, label: str) -> None:
            nonlocal failed
            out = Path(tmp) / f"{len(results)}-{label.replace(' ', '_')}.json"
            failed |= _loadtest(target, label, args, out)
            if out.exists():
                results.extend(StepResult(**step) for step in json.loads(out.read_text()))

        print("starting 1 replica + nginx ...", flush=True)
        with Cluster(1, xla=args.xla, server_args=server_args) as one:
            print(one.describe(), flush=True)
            measure(one.replicas[0].target, "1 direct")
            measure(one.target, "1 via nginx")
        print(f"\nstarting {n} replicas + nginx ...", flush=True)
        with Cluster(n, xla=args.xla, server_args=server_args) as many:
            print(many.describe(), flush=True)
            measure(many.target, f"{n} via nginx")
            shares = [int(r.requests()) for r in many.replicas]
    print(f"\n== all runs ({os.cpu_count()} CPU cores on this machine)")
    print(format_table(results))
    print(f"Evaluate calls answered per replica in the {n}-replica run: {shares}")
    by = {(r.label, r.concurrency): r.rows_per_s for r in results}
    for c in sorted({r.concurrency for r in results}):
        base = by.get(("1 direct", c))
        scaled = by.get((f"{n} via nginx", c))
        if base and scaled:
            print(
                f"concurrency {c:>3}: 1 replica direct {base:>8.0f} rows/s, "
                f"{n} via nginx {scaled:>8.0f} rows/s ({scaled / base:.2f}x)"
            )
    if args.json:
        args.json.write_text(json.dumps([vars(r) for r in results], indent=2))
    return 1 if failed else 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--replicas", type=int, default=3, help="gradserve replicas (default 3)")
    parser.add_argument(
        "--xla", choices=("on", "off"), help="pass --xla to every replica (off: faster start)"
    )
    parser.add_argument("--port", type=int, default=0, help="nginx's port (default: a free one)")
    parser.add_argument("--run-dir", type=Path, help="keep config, pid and logs here")
    parser.add_argument("--nginx", help="the nginx binary (default: nginx on PATH or /usr/sbin)")
    load = parser.add_argument_group("--load: measure instead of serving")
    load.add_argument(
        "--load", action="store_true", help="1 replica direct and via nginx vs N via nginx"
    )
    load.add_argument("--concurrency", default="1,16,64", help="loadtest steps (default 1,16,64)")
    load.add_argument("--duration", type=float, default=5.0, help="seconds per step")
    load.add_argument("--warmup", type=float, default=1.0, help="unrecorded seconds per step")
    load.add_argument("--rows", type=int, default=1, help="rows per request")
    load.add_argument("--json", type=Path, help="write every step's result here")
    return parser


class _Stop(Exception):
    """SIGTERM, turned into an exception so the `with Cluster` blocks stop what they started."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    server_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, server_args = argv[:cut], argv[cut + 1 :]
    args = _parser().parse_args(argv)
    args.xla = None if args.xla is None else args.xla == "on"
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        if stopping:  # a second Ctrl-C must not interrupt the clean-up
            return
        stopping = True
        raise _Stop(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        if args.load:
            return run_load(args, server_args)
        cluster = Cluster(
            args.replicas, xla=args.xla, server_args=server_args, listen_port=args.port,
            run_dir=args.run_dir, nginx=args.nginx,
        )  # fmt: skip
        print(f"starting {args.replicas} replica(s) + nginx ...", flush=True)
        with cluster:
            print(cluster.describe())
            print(f"\nready: GradientClient({cluster.target!r}); Ctrl-C stops", flush=True)
            while True:
                time.sleep(3600)
    except NginxNotFound as error:
        print(f"cluster: {error}", file=sys.stderr)
        return 2
    except (RuntimeError, TimeoutError) as error:
        print(f"cluster: could not start: {error}", file=sys.stderr)
        return 1
    except _Stop as stop:
        print(f"\n{stop}: stopped nginx and the replicas", file=sys.stderr)
        return 0


if __name__ == "__main__":
    sys.exit(main())
