"""The metrics an API replica exports, through `prometheus_client` (the Prometheus project's own client).

Each app gets a registry of its own (tests run several apps in one process). Updates are thread-safe in
the library, so the engine thread records too. `_created` series are off: nothing here needs them and they
double the page.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric

disable_created_metrics()

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


class MirroredCounter:
    """A counter kept elsewhere (Redis), set to its current value at scrape time and exported as a counter.

    A library `Counter` only counts up from what this process saw; the worker counts, the API reports.
    """

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], registry: CollectorRegistry) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, tuple(labelnames)
        self._values: dict[tuple[str, ...], float] = {}
        registry.register(self)

    def set(self, value: float, *labels: str) -> None:
        if len(labels) != len(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {labels}")
        self._values[tuple(str(v) for v in labels)] = float(value)

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, value in sorted(self._values.items()):
            family.add_metric(labels, value)
        yield family


class ServerMetrics:
    """The metrics an API replica exports; one instance (and one registry) per app."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        http = ("method", "route", "status")
        self.requests = Counter("mpserve_http_requests_total", "HTTP requests answered", http, registry=r)
        self.latency = Histogram("mpserve_http_request_duration_seconds", "HTTP request latency", http,
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.batch_inputs = Histogram("mpserve_batch_size", "inputs per engine batch", ("model",),
                                      buckets=SIZE_BUCKETS, registry=r)
        self.batch_requests = Histogram("mpserve_batch_requests", "requests per engine batch", ("model",),
                                        buckets=SIZE_BUCKETS, registry=r)
        self.engine_seconds = Histogram("mpserve_engine_batch_seconds", "engine time per batch", ("model",),
                                        buckets=LATENCY_BUCKETS, registry=r)
        self.version = Gauge("mpserve_model_version", "version this replica serves", ("model",), registry=r)
        self.swaps = Counter("mpserve_version_swaps_total", "version loads by outcome", ("model", "outcome"),
                             registry=r)
        self.records = Counter("mpserve_records_written_total", "prediction records written to Redis", ("model",),
                               registry=r)
        self.labels = Counter("mpserve_labels_total", "labels received, by outcome", ("model", "status"),
                              registry=r)
        self.backlog = Gauge("mpserve_feedback_backlog", "feedback entries not yet used by a version", ("model",),
                             registry=r)
        self.retention_deleted = MirroredCounter(
            "mpserve_retention_deleted_versions_total", "versions the worker's retention deleted (read from Redis)",
            ("model",), r)
        self.stored_versions = Gauge("mpserve_stored_versions", "versions in the model store", ("model",),
                                     registry=r)
        self.version_accuracy = Gauge(
            "mpserve_version_accuracy", "accuracy of the labelled answers behind the serving version: what users got "
            "(served), the leader's, the perturbed paths' (served - leader: the cost of exploration)",
            ("model", "answers"), registry=r)
        self.recent_accuracy = Gauge(
            "mpserve_recent_traffic_accuracy", "accuracy on the recent labelled inputs the guard judged the serving "
            "version on: its own (weights=serving) and the anchor's, the model kept frozen (weights=frozen)",
            ("model", "weights"), registry=r)
        self.redis_up = Gauge("mpserve_redis_up", "whether Redis answered the last scrape", registry=r)

    def render(self) -> str:
        """The Prometheus text format (0.0.4) of every metric."""
        return generate_latest(self.registry).decode()
