"""One /metrics endpoint for a server made of several processes.

Each process (the engine and every frontend) keeps its own Prometheus registry, served on
an internal port on 127.0.0.1. The supervisor's endpoint fetches them all when scraped and
merges the text: one HELP/TYPE header per metric family, every sample labelled with the
`process` it came from (`engine`, `frontend-0`, ...). Sum over `process` for totals.
"""

from __future__ import annotations

import logging
import threading
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

log = logging.getLogger(__name__)

_FETCH_TIMEOUT_S = 2.0


def fetch(port: int, timeout: float = _FETCH_TIMEOUT_S) -> str:
    """The Prometheus text a process (or the gatherer) serves on 127.0.0.1:`port`."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as response:
        return response.read().decode()


def merge(texts: dict[str, str]) -> str:
    """Merge Prometheus text expositions, adding a `process` label to every sample."""
    headers: dict[str, list[str]] = {}
    samples: dict[str, list[str]] = {}
    for process, text in texts.items():
        family = ""
        for line in text.splitlines():
            if line.startswith("# HELP ") or line.startswith("# TYPE "):
                family = line.split(" ", 3)[2]
                lines = headers.setdefault(family, [])
                if len(lines) < 2 and line not in lines:
                    lines.append(line)
                samples.setdefault(family, [])
            elif line and not line.startswith("#"):
                samples.setdefault(family, []).append(_labelled(line, process))
    out = []
    for family, lines in samples.items():
        out += headers.get(family, [])
        out += lines
    return "\n".join(out) + "\n"


def _labelled(sample: str, process: str) -> str:
    label = f'process="{process}"'
    name, brace, rest = sample.partition("{")
    if brace:
        return f"{name}{{{label},{rest}"
    name, _, value = sample.partition(" ")
    return f"{name}{{{label}}} {value}"


class MetricsGatherer:
    """Serves the merged metrics of the processes `ports()` names (process -> port)."""

    def __init__(self, ports: Callable[[], dict[str, int]]) -> None:
        self._ports = ports
        self._http: ThreadingHTTPServer | None = None
        self.port: int | None = None

    def gather(self) -> str:
        texts = {}
        for process, port in sorted(self._ports().items()):
            try:
                texts[process] = fetch(port)
            except OSError as exc:  # a process being replaced: its figures return with it
                log.debug("metrics of %s unavailable: %s", process, exc)
        return merge(texts)

    def serve(self, host: str, port: int) -> None:
        gatherer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404)
                    return
                body = gatherer.gather().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._http = ThreadingHTTPServer((host, port), Handler)
        self.port = self._http.server_port
        threading.Thread(target=self._http.serve_forever, daemon=True).start()

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
