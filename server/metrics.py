"""A tiny Prometheus client: counters, gauges and histograms with labels, rendered as text format 0.0.4.

Enough for one process's /metrics without a dependency. Updates take a lock, so the engine thread
may record too; rendering is a snapshot.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Iterable, Sequence

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)

Labels = tuple[str, ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


def _label_str(names: Sequence[str], values: Sequence[str], extra: tuple[str, str] | None = None) -> str:
    pairs = [f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra is not None:
        pairs.append(f'{extra[0]}="{extra[1]}"')
    return "{" + ",".join(pairs) + "}" if pairs else ""


class _Metric:
    kind = ""

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        self.name, self.help, self.label_names = name, help_text, tuple(labels)
        self._lock = threading.Lock()

    def _key(self, labels: Sequence[str]) -> Labels:
        if len(labels) != len(self.label_names):
            raise ValueError(f"{self.name} takes labels {self.label_names}, got {tuple(labels)}")
        return tuple(str(v) for v in labels)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]

    def render(self) -> list[str]:
        raise NotImplementedError


class Counter(_Metric):
    """A monotonically increasing count per label set."""

    kind = "counter"

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, help_text, labels)
        self._values: dict[Labels, float] = {}

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, *labels: str) -> float:
        return self._values.get(self._key(labels), 0.0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return [f"{self.name}{_label_str(self.label_names, k)} {_fmt(v)}" for k, v in items]


class Gauge(Counter):
    """A value that goes up and down, set per label set."""

    kind = "gauge"

    def set(self, value: float, *labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)

    def remove(self, *labels: str) -> None:
        with self._lock:
            self._values.pop(self._key(labels), None)


class MirroredCounter(Gauge):
    """A counter kept elsewhere (Redis), set to its current value at scrape time: rendered as a counter."""

    kind = "counter"


class Histogram(_Metric):
    """Cumulative bucket counts, sum and count per label set."""

    kind = "histogram"

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = (),
                 buckets: Iterable[float] = LATENCY_BUCKETS) -> None:
        super().__init__(name, help_text, labels)
        self.buckets = tuple(sorted(float(b) for b in buckets))
        self._data: dict[Labels, tuple[list[int], list[float]]] = {}  # counts per bucket (+Inf last), [sum]

    def observe(self, value: float, *labels: str) -> None:
        key = self._key(labels)
        i = bisect.bisect_left(self.buckets, value)
        with self._lock:
            counts, total = self._data.setdefault(key, ([0] * (len(self.buckets) + 1), [0.0]))
            counts[i] += 1
            total[0] += value

    def count(self, *labels: str) -> int:
        data = self._data.get(self._key(labels))
        return sum(data[0]) if data else 0

    def render(self) -> list[str]:
        with self._lock:
            items = sorted((k, (list(c), s[0])) for k, (c, s) in self._data.items())
        lines = []
        for key, (counts, total) in items:
            cumulative = 0
            for bound, n in zip((*self.buckets, math.inf), counts, strict=True):
                cumulative += n
                le = ("le", "+Inf" if math.isinf(bound) else _fmt(bound))
                lines.append(f"{self.name}_bucket{_label_str(self.label_names, key, le)} {cumulative}")
            lines.append(f"{self.name}_sum{_label_str(self.label_names, key)} {_fmt(total)}")
            lines.append(f"{self.name}_count{_label_str(self.label_names, key)} {cumulative}")
        return lines


class Registry:
    """The metrics of one process, rendered in registration order."""

    def __init__(self) -> None:
        self._metrics: list[_Metric] = []

    def add(self, metric: _Metric) -> _Metric:
        self._metrics.append(metric)
        return metric

    def render(self) -> str:
        lines: list[str] = []
        for m in self._metrics:
            lines += m.header() + m.render()
        return "\n".join(lines) + "\n"


class ServerMetrics:
    """The metrics an API replica exports; one instance per app."""

    def __init__(self) -> None:
        r = self.registry = Registry()
        self.requests = r.add(Counter("mpserve_http_requests_total", "HTTP requests answered",
                                      ("method", "route", "status")))
        self.latency = r.add(Histogram("mpserve_http_request_duration_seconds", "HTTP request latency",
                                       ("method", "route", "status")))
        self.batch_inputs = r.add(Histogram("mpserve_batch_size", "inputs per engine batch", ("model",),
                                            SIZE_BUCKETS))
        self.batch_requests = r.add(Histogram("mpserve_batch_requests", "requests per engine batch", ("model",),
                                              SIZE_BUCKETS))
        self.engine_seconds = r.add(Histogram("mpserve_engine_batch_seconds", "engine time per batch", ("model",)))
        self.version = r.add(Gauge("mpserve_model_version", "version this replica serves", ("model",)))
        self.swaps = r.add(Counter("mpserve_version_swaps_total", "version loads by outcome", ("model", "outcome")))
        self.records = r.add(Counter("mpserve_records_written_total", "prediction records written to Redis",
                                     ("model",)))
        self.labels = r.add(Counter("mpserve_labels_total", "labels received, by outcome", ("model", "status")))
        self.backlog = r.add(Gauge("mpserve_feedback_backlog", "feedback entries not yet used by a version",
                                   ("model",)))
        self.retention_deleted = r.add(MirroredCounter(
            "mpserve_retention_deleted_versions_total", "versions the worker's retention deleted (read from Redis)",
            ("model",)))
        self.stored_versions = r.add(Gauge("mpserve_stored_versions", "versions in the model store", ("model",)))
        self.version_accuracy = r.add(Gauge(
            "mpserve_version_accuracy", "accuracy of the labelled answers behind the serving version: what users got "
            "(served), the leader's, the perturbed paths' (served - leader: the cost of exploration)",
            ("model", "answers")))
        self.redis_up = r.add(Gauge("mpserve_redis_up", "whether Redis answered the last scrape"))

    def render(self) -> str:
        return self.registry.render()
