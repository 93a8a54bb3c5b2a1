"""Prometheus metrics: what the operators of an inference server expect to scrape.

The batcher reports through the small observer interface below (it knows nothing of
Prometheus); the RPC layer counts requests and latency per RPC and status code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from gradserve.server.core.batcher import KindCost
from gradserve.server.core.statistics import Statistics
from gradserve.wire.kinds import Derivative
from gradserve.wire.timing import HOP_FIELDS, HOPS, Hops

_LATENCY_BUCKETS = (
    0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30,
)  # fmt: skip
_HOP_BUCKETS = (0.00001, 0.00002, 0.00005, 0.0001, *_LATENCY_BUCKETS)
_ROW_BUCKETS = tuple(float(2**i) for i in range(15))


class Metrics:
    """All gradserve metrics, in a registry of their own (several servers per process in tests)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)  # process_cpu_seconds_total, memory: per process of a server
        self.requests = Counter(
            "gradserve_requests", "Requests and stream messages answered, by RPC and status code",
            ["rpc", "code"], registry=r,
        )  # fmt: skip
        self.latency = Histogram(
            "gradserve_request_duration_seconds",
            "Server-side time from a request's (or stream message's) arrival to its answer",
            ["rpc"], buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_wait = Histogram(
            "gradserve_queue_wait_seconds", "Time a request's rows waited for the engine",
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.compute = Histogram(
            "gradserve_compute_seconds", "Engine time of each batch",
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_rows = Histogram(
            "gradserve_batch_rows", "Rows per engine call", buckets=_ROW_BUCKETS, registry=r
        )
        self.rows = Counter(
            "gradserve_rows_computed", "Rows computed by the engine, by derivative",
            ["derivative"], registry=r,
        )  # fmt: skip
        self.engine_calls = Counter(
            "gradserve_engine_calls", "Engine calls (batches), by derivative",
            ["derivative"], registry=r,
        )  # fmt: skip
        self.hop = Histogram(
            "gradserve_request_hop_seconds",
            "Each request's time per hop: decode (arrival to queued), queue (to dispatched "
            "in a batch), handoff (to engine start), compute (engine), encode (engine end to "
            "answer)",
            ["hop"], buckets=_HOP_BUCKETS, registry=r,
        )  # fmt: skip
        self._hops = [
            (field, self.hop.labels(hop)) for hop, field in zip(HOPS, HOP_FIELDS, strict=True)
        ]
        self.queue_rows = Gauge("gradserve_queue_rows", "Rows waiting in the queue", registry=r)
        self.queue_bytes = Gauge(
            "gradserve_queue_bytes",
            "Bytes held by admitted, unanswered requests (counted against --max-queue-mb)",
            registry=r,
        )
        self.streams = Gauge("gradserve_streams_in_flight", "Open streams", registry=r)
        self.worker_restarts = Counter(
            "gradserve_batch_worker_restarts",
            "Times a batch worker failed on its own (a bug, not an engine error) and was "
            "restarted; the requests of the batch it held failed",
            registry=r,
        )

        self.version_loads = Counter(
            "gradserve_model_version_loads",
            "Model versions loaded and warmed up (outcome ok) or that failed to (failed)",
            ["model", "outcome"],
            registry=r,
        )
        self.load_seconds = Histogram(
            "gradserve_model_version_load_seconds",
            "Time to load and warm up a model version, beside the versions serving",
            ["model"],
            buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300),
            registry=r,
        )
        self.versions = Gauge(
            "gradserve_model_versions_served", "Versions of a model served now", ["model"],
            registry=r,
        )  # fmt: skip
        self.selfchecks = Gauge(
            "gradserve_deterministic_selfcheck",
            "1 if a deterministic version's every kind computed the same row alike at every "
            "position of a tile at warm-up, 0 if not (that version is not served)",
            ["model", "version"], registry=r,
        )  # fmt: skip
        self.swap_seconds = Histogram(
            "gradserve_model_swap_seconds",
            "From the start of a new version's load to the release of the version it replaced "
            "(its last admitted request answered)",
            ["model"],
            buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300),
            registry=r,
        )

    def watch_statistics(self, source: Callable[[], list[tuple[str, str, Statistics]]]) -> None:
        """Export, at each scrape, the statistics of every served version: (model name,
        version, Statistics) from `source` (what the statistics extension reports, and how a
        frontend learns its siblings' share)."""
        self.registry.register(_StatisticsCollector(source))

    def watch_serving(
        self, serving: Callable[[], bool], queue_rows_limit: int, queue_bytes_limit: int
    ) -> None:
        """Export whether this server serves now (the engine loaded and reachable; 0 while
        loading, draining or once the engine process is lost), and its queue bounds, to
        compare gradserve_queue_rows and gradserve_queue_bytes with."""
        up = Gauge(
            "gradserve_serving",
            "1 while the server serves requests; 0 while loading, draining, or after losing "
            "the engine process", registry=self.registry,
        )  # fmt: skip
        up.set_function(lambda: 1.0 if serving() else 0.0)
        rows = Gauge("gradserve_queue_rows_limit", "Most rows the queue admits (--max-queue-rows)",
                     registry=self.registry)  # fmt: skip
        rows.set(queue_rows_limit)
        held = Gauge(
            "gradserve_queue_bytes_limit", "Most bytes admitted requests may hold (--max-queue-mb)",
            registry=self.registry,
        )  # fmt: skip
        held.set(queue_bytes_limit)

    def watch_costs(self, source: Callable[[], list[tuple[str, list[KindCost]]]]) -> None:
        """Report, at each scrape, what every model's batcher has learned of its engine
        cost per kind: (model name, its KindCosts) from `source`."""
        self.registry.register(_CostCollector(source))

    # -- the batcher's observer interface ---------------------------------------------------

    def batch(self, kind: Derivative, rows: int, seconds: float) -> None:
        self.engine_calls.labels(kind.value).inc()
        self.rows.labels(kind.value).inc(rows)
        self.batch_rows.observe(rows)
        self.compute.observe(seconds)

    def queued(self, seconds: float) -> None:
        self.queue_wait.observe(seconds)

    def restarted(self) -> None:
        self.worker_restarts.inc()

    # -- the model repository's observer interface -------------------------------------------

    def version_loaded(self, name: str, ok: bool, seconds: float) -> None:
        self.version_loads.labels(name, "ok" if ok else "failed").inc()
        if ok:
            self.load_seconds.labels(name).observe(seconds)

    def versions_served(self, name: str, count: int) -> None:
        self.versions.labels(name).set(count)

    def swap_finished(self, name: str, seconds: float) -> None:
        self.swap_seconds.labels(name).observe(seconds)

    def selfcheck(self, name: str, version: int, passed: bool) -> None:
        self.selfchecks.labels(name, str(version)).set(1 if passed else 0)

    def hops(self, breakdown: Hops) -> None:
        """One answered request's latency breakdown."""
        for field, histogram in self._hops:
            histogram.observe(getattr(breakdown, field) * 1e-6)

    def serve(self, host: str, port: int):
        """Expose /metrics over HTTP; returns the HTTP server (call .shutdown() to stop)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server


class _CostCollector(Collector):
    """The learned engine costs and batch caps, read from the batchers at scrape time."""

    def __init__(self, source: Callable[[], list[tuple[str, list[KindCost]]]]) -> None:
        self._source = source

    def collect(self) -> Iterator[GaugeMetricFamily]:
        labels = ["model", "derivative"]
        fixed = GaugeMetricFamily(
            "gradserve_batch_cost_fixed_seconds",
            "Learned engine seconds per call, whatever its rows (fit of fixed + per-row cost)",
            labels=labels,
        )
        per_row = GaugeMetricFamily(
            "gradserve_batch_cost_per_row_seconds",
            "Learned engine seconds per row of a call (fit of fixed + per-row cost)",
            labels=labels,
        )
        cap = GaugeMetricFamily(
            "gradserve_batch_row_cap",
            "Most rows a batch takes now: --max-batch-size, or fewer to fit --max-batch-ms",
            labels=labels,
        )
        for model, costs in self._source():
            for cost in costs:
                key = [model, cost.kind.value]
                fixed.add_metric(key, cost.estimate.fixed_s)
                per_row.add_metric(key, cost.estimate.per_row_s)
                cap.add_metric(key, cost.row_cap)
        yield from (fixed, per_row, cap)


_STATISTICS = "gradserve_statistics"
_VERSION_LABELS = ["model", "version"]


class _StatisticsCollector(Collector):
    """The statistics extension's counters of every served version, read at scrape time."""

    def __init__(self, source: Callable[[], list[tuple[str, str, Statistics]]]) -> None:
        self._source = source

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        per_request = ["model", "version", "statistic"]
        per_batch = ["model", "version", "batch_size", "statistic"]
        families = {
            "requests": CounterMetricFamily(
                f"{_STATISTICS}_requests", "Requests per statistic (success, fail: every "
                "request; queue, compute_*: successful ones)", labels=per_request),
            "request_ns": CounterMetricFamily(
                f"{_STATISTICS}_request_ns", "Nanoseconds summed per request statistic",
                labels=per_request),
            "inferences": CounterMetricFamily(
                f"{_STATISTICS}_inferences", "Rows answered by successful requests",
                labels=_VERSION_LABELS),
            "executions": CounterMetricFamily(
                f"{_STATISTICS}_executions", "Engine calls (batches)", labels=_VERSION_LABELS),
            "last": GaugeMetricFamily(
                f"{_STATISTICS}_last_inference_ms", "Epoch milliseconds of the last answer",
                labels=_VERSION_LABELS),
            "batches": CounterMetricFamily(
                f"{_STATISTICS}_batches", "Engine calls per batch size and statistic",
                labels=per_batch),
            "batch_ns": CounterMetricFamily(
                f"{_STATISTICS}_batch_ns", "Nanoseconds summed per batch size and statistic",
                labels=per_batch),
        }  # fmt: skip
        for model, version, stats in self._source():
            key = [model, version]
            for name, duration in stats.requests.items():
                families["requests"].add_metric([*key, name], duration.count)
                families["request_ns"].add_metric([*key, name], duration.ns)
            families["inferences"].add_metric(key, stats.inference_count)
            families["executions"].add_metric(key, stats.execution_count)
            families["last"].add_metric(key, stats.last_inference_ms)
            for size, durations in stats.batches.items():
                for name, duration in durations.items():
                    families["batches"].add_metric([*key, str(size), name], duration.count)
                    families["batch_ns"].add_metric([*key, str(size), name], duration.ns)
        yield from families.values()


def statistics_of(text: str) -> dict[tuple[str, str], Statistics]:
    """The statistics exported in a Prometheus text exposition, per (model, version), summed
    over every process that exported a share of them (a gathered /metrics)."""
    shares: dict[tuple[str, ...], Statistics] = {}
    for family in text_string_to_metric_families(text):
        if not family.name.startswith(_STATISTICS):
            continue
        what = family.name.removeprefix(_STATISTICS + "_")
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            labels = sample.labels
            share = (labels["model"], labels["version"], labels.get("process", ""))
            stats = shares.setdefault(share, Statistics())
            _read_sample(stats, what, labels, round(sample.value))
    summed: dict[tuple[str, str], Statistics] = {}
    for (model, version, _process), stats in shares.items():
        summed.setdefault((model, version), Statistics()).add(stats)
    return summed


def _read_sample(stats: Statistics, what: str, labels: dict[str, str], value: int) -> None:
    if what == "inferences":
        stats.inference_count = value
    elif what == "executions":
        stats.execution_count = value
    elif what == "last_inference_ms":
        stats.last_inference_ms = value
    elif what in ("requests", "request_ns"):
        duration = stats.requests[labels["statistic"]]
        _set(duration, what.endswith("_ns"), value)
    elif what in ("batches", "batch_ns"):
        batch = stats.batches.setdefault(int(labels["batch_size"]), Statistics.batch_durations())
        _set(batch[labels["statistic"]], what.endswith("_ns"), value)


def _set(duration, is_ns: bool, value: int) -> None:
    if is_ns:
        duration.ns = value
    else:
        duration.count = value
