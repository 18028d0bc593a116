"""Which buffered feedback entries one reconciliation uses, holds back, or drops (pure, no I/O).

Kept apart from the Redis and store plumbing so the rules can be read (and tested) in one place:

- an entry whose version is not within ``max_cohort_age`` steps of the base's lineage (too old, a
  rolled-back branch, or a version that no longer exists) is *stale*: its delta was measured at
  weights too far from the ones being updated;
- an entry whose path does not fit its version (groups, vendors), whose label is not a class of the
  model, or whose loss is not finite is *invalid* (a poison entry must not stop every reconciliation);
  so is an entry labelled by a disabled API client (its labels are not trusted, whenever it gave them);
- a cohort (entries of one version) smaller than ``min_cohort`` waits for more records, unless an
  entry is older than the label window: no more labels can join it, so it is *expired*;
- the rest is *usable*, oldest first, up to ``max_records``; whatever does not fit waits.
Dropped entries (stale, expired, invalid) are acknowledged with the next publish, never applied.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from redis_io.protocol import FeedbackEntry


def entry_order(entry_id: str) -> tuple[int, int]:
    """Stream order of an entry id ``ms-seq`` (string order is wrong once the digits differ in count)."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


@dataclass(frozen=True)
class Batch:
    """The split of the buffer against one base version; every list is in stream order."""

    base: int
    usable: list[FeedbackEntry]
    held: list[FeedbackEntry]
    stale: list[FeedbackEntry]
    expired: list[FeedbackEntry]
    invalid: list[FeedbackEntry]

    @property
    def dropped(self) -> list[FeedbackEntry]:
        """Entries to acknowledge without using them."""
        return self.stale + self.expired + self.invalid

    def counts(self) -> dict[str, int]:
        return {"usable": len(self.usable), "held_back": len(self.held), "stale_dropped": len(self.stale),
                "expired_dropped": len(self.expired), "invalid_dropped": len(self.invalid)}


def _fits(entry: FeedbackEntry, shape: tuple[int, int], num_classes: int | None) -> bool:
    groups, vendors = shape
    return (len(entry.path) == groups and all(0 <= v < vendors for v in entry.path) and math.isfinite(entry.loss)
            and (num_classes is None or 0 <= entry.label < num_classes))


def plan_batch(entries: Iterable[FeedbackEntry], base: int, window: Mapping[int, tuple[int, int]],
               min_cohort: int, max_records: int, label_window_ms: int, now_ms: int,
               num_classes: int | None = None, disabled_clients: Collection[str] = ()) -> Batch:
    """Split ``entries``; ``window`` maps each version a cohort may come from to its (groups, vendors)."""
    ordered = sorted(entries, key=lambda e: entry_order(e.entry_id))
    stale, invalid = [], []
    by_version: dict[int, list[FeedbackEntry]] = defaultdict(list)
    for e in ordered:
        if e.version not in window:
            stale.append(e)
        elif not _fits(e, window[e.version], num_classes) or (e.client is not None and e.client in disabled_clients):
            invalid.append(e)
        else:
            by_version[e.version].append(e)

    candidates, held, expired = [], [], []
    for cohort in by_version.values():
        if len(cohort) >= min_cohort:
            candidates += cohort
            continue
        for e in cohort:
            (expired if now_ms - e.ts_ms > label_window_ms else held).append(e)

    candidates.sort(key=lambda e: entry_order(e.entry_id))
    taken, held_over = candidates[:max_records], candidates[max_records:]
    sizes = Counter(e.version for e in taken)  # the cut may leave a cohort too small: it waits
    usable = [e for e in taken if sizes[e.version] >= min_cohort]
    held += [e for e in taken if sizes[e.version] < min_cohort] + held_over
    held.sort(key=lambda e: entry_order(e.entry_id))
    return Batch(base, usable, held, stale, expired, invalid)
