"""Per-version learning metrics, read from manifests: what the dashboard and `mpserve plot` show.

A published version's manifest carries ``metrics`` (online loss/accuracy of the served predictions whose
labels went into it, validation figures of the candidate on a holdout set, and on the recent labelled inputs
the guard judged it on, beside the frozen anchor's on the same inputs). Older manifests have no
``metrics``: their figures are taken from the fields they do have (``loss.mean`` of the reconciled
records; the offline test accuracy of a trained base version), so a store written before the metrics
existed still plots. Manifests are immutable, so a summary is computed once per version and cached.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from model_store import ModelStore, ModelStoreError, VersionNotFound

log = logging.getLogger(__name__)

#: The figures plotted per version (all but ``records`` may be null).
METRIC_FIELDS: tuple[str, ...] = ("online_loss", "online_accuracy", "validation_accuracy", "validation_loss",
                                  "holdout_size", "records", "leader_accuracy", "probe_accuracy",
                                  "traffic_accuracy", "traffic_anchor_accuracy")
#: The curves drawn against version, in the order of their legend.
CURVES: tuple[str, ...] = ("online_loss", "online_accuracy", "validation_accuracy")
DEFAULT_LIMIT = 200
MAX_LIMIT = 2000


def _number(value: Any) -> float | None:
    """A finite float, or None for anything else (null, missing, a string, a bool, NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    f = float(value)
    return f if math.isfinite(f) else None


def _count(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def _first_number(blocks: Sequence[Any], keys: Sequence[str]) -> float | None:
    for block in blocks:
        if isinstance(block, Mapping):
            for key in keys:
                if (v := _number(block.get(key))) is not None:
                    return v
    return None


def metrics_of(manifest: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """The version's figures and where they came from: ``"metrics"`` (the manifest's block) or ``"legacy"``."""
    records = _count(manifest.get("records")) or 0
    block = manifest.get("metrics")
    if isinstance(block, Mapping):
        out: dict[str, Any] = {k: _number(block.get(k)) for k in METRIC_FIELDS}
        out["holdout_size"] = _count(block.get("holdout_size"))
        out["records"] = _count(block.get("records"))
        if out["records"] is None:
            out["records"] = records
        return out, "metrics"
    # Before the metrics block: the loss of the reconciled records, and the base model's offline test figures.
    loss = manifest.get("loss")
    evaluated = (manifest.get("validation"), manifest.get("training"))
    return {
        "online_loss": _number(loss.get("mean")) if isinstance(loss, Mapping) and records else None,
        "online_accuracy": None,
        "validation_accuracy": _first_number(evaluated, ("accuracy", "test_accuracy")),
        "validation_loss": _first_number(evaluated, ("loss", "test_loss")),
        "holdout_size": None,
        "records": records,
        "leader_accuracy": None,
        "probe_accuracy": None,
        "traffic_accuracy": None,
        "traffic_anchor_accuracy": None,
    }, "legacy"


def summarize(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """One row of the version table: version, parent, created, records, metrics and their source."""
    metrics, source = metrics_of(manifest)
    return {
        "version": int(manifest["version"]),
        "parent": manifest.get("parent"),
        "created": _number(manifest.get("created")),
        "records": _count(manifest.get("records")) or 0,
        "metrics": metrics,
        "source": source,
        "error": None,
    }


def refused_entries(history: Sequence[Mapping[str, Any]], limit: int) -> list[dict[str, Any]]:
    """Candidates the validation guard refused (history records of type "refused"), newest ``limit``."""
    out = []
    for rec in history:
        if rec.get("type") != "refused" or _count(rec.get("version")) is None:
            continue
        block = rec.get("metrics")
        metrics = metrics_of({"metrics": block})[0] if isinstance(block, Mapping) else None
        reason = rec.get("reason")
        out.append({"version": rec["version"], "ts_ms": _count(rec.get("ts_ms")), "metrics": metrics,
                    "reason": reason if isinstance(reason, str) else None})
    return out[-limit:] if limit else []


def unreadable(version: int, reason: str) -> dict[str, Any]:
    """The row of a version whose manifest cannot be read: listed (so it is noticed) with no figures."""
    return {"version": version, "parent": None, "created": None, "records": 0,
            "metrics": dict.fromkeys(METRIC_FIELDS), "source": "unreadable", "error": reason}


class ManifestSummaryCache:
    """Summaries of stored versions, computed once per (model, version): manifests never change.

    Entries of versions that are no longer listed (deleted by retention) are dropped on the next read,
    so the cache never holds more than the store does. Thread-safe: routes call it from worker threads.
    """

    def __init__(self, store: ModelStore) -> None:
        self.store = store
        self._cache: dict[str, dict[int, dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self.reads = 0  # manifests read from disk (a test checks that a second listing reads none)

    def rows(self, model: str, limit: int) -> tuple[list[dict[str, Any]], int]:
        """Summaries of the newest ``limit`` stored versions of ``model`` (ascending) and how many are stored."""
        listed = self.store.versions(model)
        wanted = listed[-limit:] if limit else []
        with self._lock:
            cached = self._cache.setdefault(model, {})
            for gone in set(cached) - set(listed):
                del cached[gone]
            missing = [v for v in wanted if v not in cached]
        fresh: dict[int, dict[str, Any] | None] = {}
        for v in missing:
            try:
                fresh[v] = summarize(self.store.read_manifest(model, v))
            except VersionNotFound:
                fresh[v] = None  # deleted (retention) since the listing: left out
            except (ModelStoreError, OSError) as exc:  # shown as unreadable, not cached: a fixed file is read again
                log.warning("%s version %d: cannot read its manifest: %s", model, v, exc)
                reason = str(exc) if isinstance(exc, ModelStoreError) else f"{type(exc).__name__} (see the log)"
                fresh[v] = unreadable(v, reason)
        with self._lock:
            self.reads += len(missing)
            for v, row in fresh.items():
                if row is not None and row["source"] != "unreadable":
                    cached[v] = row
            out = [row for v in wanted if (row := fresh.get(v) or cached.get(v)) is not None]
        return out, len(listed)


def series(rows: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    """Columns for plotting: ``version`` and one list per metric (None where a version has no value)."""
    ordered = sorted(rows, key=lambda r: r["version"])
    cols: dict[str, list[Any]] = {"version": [int(r["version"]) for r in ordered]}
    for name in METRIC_FIELDS:
        cols[name] = [(r.get("metrics") or {}).get(name) for r in ordered]
    return cols
