"""worker.plan.plan_batch on hand-made feedback entries (pure logic: no Redis, no store)."""

from __future__ import annotations

from redis_io.protocol import FeedbackEntry
from worker.plan import plan_batch

NOW_MS = 1_000_000_000
WINDOW = {0: (2, 4)}  # version 0: 2 groups, 4 vendors


def entry(n: int, client: str | None, version: int = 0, label: int = 1) -> FeedbackEntry:
    return FeedbackEntry(entry_id=f"{1000 + n}-0", id=f"p{n}", version=version, path=(n % 4, (n + 1) % 4),
                         loss=0.5 + n / 100, label=label, ts_ms=NOW_MS - 1000, client=client)


def plan(entries: list[FeedbackEntry], disabled: frozenset[str] = frozenset(), min_cohort: int = 2):
    return plan_batch(entries, base=0, window=WINDOW, min_cohort=min_cohort, max_records=1000,
                      label_window_ms=60_000, now_ms=NOW_MS, num_classes=10, disabled_clients=disabled)


def test_entries_of_disabled_clients_are_invalid_and_the_rest_is_used() -> None:
    entries = [entry(i, c) for i, c in enumerate(["a", "b", None, "b", "a", "c", None, "b"])]
    batch = plan(entries, frozenset({"b"}))
    assert [e.id for e in batch.invalid] == ["p1", "p3", "p7"]
    assert [e.id for e in batch.usable] == ["p0", "p2", "p4", "p5", "p6"]  # anonymous entries are not disabled
    assert batch.counts()["invalid_dropped"] == 3 and batch.dropped == batch.invalid
    assert plan(entries).invalid == [] and len(plan(entries).usable) == len(entries)  # no one disabled


def test_a_cohort_shrunk_by_disabled_entries_waits_and_stale_ones_stay_stale() -> None:
    entries = [entry(0, "a"), entry(1, "b"), entry(2, "b"), entry(3, "b", version=7)]
    batch = plan(entries, frozenset({"b"}))
    assert [e.id for e in batch.invalid] == ["p1", "p2"]
    assert [e.id for e in batch.held] == ["p0"] and batch.usable == []  # one of min_cohort=2 left: it waits
    assert [e.id for e in batch.stale] == ["p3"]  # outside the lineage window: stale whoever labelled it


def test_feedback_records_carry_the_logits_of_paired_entries_and_nan_rows_for_the_rest() -> None:
    import numpy as np

    from worker.summary import feedback_records

    z, zl = np.arange(10, dtype=np.float32), np.ones(10, np.float32)
    paired = [FeedbackEntry(entry_id=f"{n}-0", id=f"p{n}", version=0, path=(0, 1), loss=0.5, label=1, ts_ms=NOW_MS,
                            base_loss=0.4, logits=z + n, leader_logits=zl) for n in range(3)]
    odd = FeedbackEntry(entry_id="9-0", id="odd", version=0, path=(0, 1), loss=0.5, label=1, ts_ms=NOW_MS,
                        base_loss=0.4, logits=z[:3], leader_logits=zl[:3])  # another width: not this model's
    records = feedback_records([*paired, entry(5, None), odd])
    assert records.logits is not None and records.leader_logits is not None
    assert records.logits.shape == (5, 10)
    np.testing.assert_array_equal(records.logits[2], z + 2)
    assert np.isnan(records.logits[3:]).all() and np.isnan(records.leader_logits[3:]).all()
    assert feedback_records([entry(1, None)]).logits is None  # single-path entries: no logits at all
    model = feedback_records([*paired[:1], odd, odd], num_classes=10)  # the model's width, not the majority's
    assert model.logits is not None and model.logits.shape == (3, 10) and np.isnan(model.logits[1:]).all()
