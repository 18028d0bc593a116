"""What GET /models/{m}/versions costs per call: reading every manifest (cold) vs the summary cache (warm).

    python -m bench.versions [--quick] [--json results/versions.json]

Manifests are immutable, so the endpoint reads each once; after that a call is one directory listing.
The manifests written here look like the worker's (beautiful_mnist seeds, eight cohorts, an inputs
digest, a metrics block); the weights are a placeholder, since only manifests are read.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench.common import print_table, write_json
from common.version_metrics import ManifestSummaryCache
from marketplace.models import get_model
from marketplace.reconcile import fresh_seeds
from model_store import ModelStore, make_manifest

MODEL = "bench"


def fill(store: ModelStore, n: int) -> None:
    spec = get_model("beautiful_mnist")
    rng = np.random.default_rng(0)
    for v in range(n):
        cohorts = [{"version": max(0, v - k), "records": 256, "loss_mean": 0.4} for k in range(8)]
        manifest = make_manifest(
            version=v, parent=v - 1 if v else None, model=MODEL, architecture=spec.architecture,
            seeds=fresh_seeds(len(spec.groups), 4, rng), probe_scale=0.05, learning_rate=0.5, records=2048,
            cohorts=cohorts, loss={"mean": 0.4, "std": 0.2},
            inputs={"entries": 2048, "entry_ids_sha256": "0" * 64, "dropped": {"entries": 0}},
            metrics={"online_loss": 0.4, "online_accuracy": 0.8, "validation_accuracy": 0.85,
                     "validation_loss": 0.45, "holdout_size": 1000, "records": 2048})
        store.write_version(MODEL, v, {"placeholder": np.zeros(1, np.float32)}, manifest)


def best_of(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="50,200,1000", help="stored versions")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="sizes 50,200 and two repeats (a few seconds)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    sizes = [50, 200] if args.quick else [int(s) for s in args.sizes.split(",")]
    repeats = 2 if args.quick else args.repeats
    rows = []
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            store = ModelStore(tmp)
            fill(store, n)
            cold = best_of(lambda: ManifestSummaryCache(store).rows(MODEL, n), repeats)  # noqa: B023
            cache = ManifestSummaryCache(store)
            cache.rows(MODEL, n)
            warm = best_of(lambda: cache.rows(MODEL, n), repeats * 4)  # noqa: B023
            rows.append({"versions": n, "cold_ms": cold * 1e3, "warm_ms": warm * 1e3, "cold/warm": cold / warm})
    print_table(rows, ["versions", "cold_ms", "warm_ms", "cold/warm"])
    write_json(args.json, {"benchmark": "versions", "rows": rows})


if __name__ == "__main__":
    main()
