"""Seconds to reconcile 10^3 … 10^6 records (V vendors, one and eight cohorts), side by side.

    python bench/reconcile.py [--quick] [--json results/reconcile.json]

The per-record work is O(records) (bincount of attributions per vendor); the direction regenerates
each vendor's delta once per cohort, O(cohorts · V · params), whatever the number of records. So
10^6 records should cost little more than 10^3.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from bench.common import print_table, write_json
from marketplace.models import get_model
from marketplace.reconcile import ReconcileConfig, Records, VersionSeeds, fresh_seeds, reconcile


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="beautiful_mnist")
    ap.add_argument("--vendors", type=int, default=4)
    ap.add_argument("--sizes", default="1000,10000,100000,1000000")
    ap.add_argument("--cohorts", default="1,8")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="one repeat (under 60 s)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    repeats = 1 if args.quick else args.repeats

    spec = get_model(args.model)
    params = spec.init_params(0)
    S, V = len(spec.groups), args.vendors
    rng = np.random.default_rng(0)
    rows = []
    for cohorts in (int(c) for c in args.cohorts.split(",")):
        sources = {n: VersionSeeds(fresh_seeds(S, V, rng), 0.05) for n in range(cohorts)}
        for size in (int(s) for s in args.sizes.split(",")):
            records = Records(rng.integers(0, cohorts, size), rng.integers(0, V, (size, S)),
                              rng.gamma(2.0, 0.5, size), rng.integers(0, spec.num_classes, size))
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                reconcile(spec, params, records, sources, ReconcileConfig(min_cohort=1))
                times.append(time.perf_counter() - start)
            rows.append({"records": size, "cohorts": cohorts, "seconds": min(times)})
            print_table(rows[-1:], ["records", "cohorts", "seconds"])
    for cohorts in sorted({r["cohorts"] for r in rows}):
        mine = [r for r in rows if r["cohorts"] == cohorts]
        for r in mine:
            r["vs_smallest"] = r["seconds"] / mine[0]["seconds"]
    print()
    print_table(rows, ["records", "cohorts", "seconds", "vs_smallest"])
    write_json(args.json, {"benchmark": "reconcile", "model": args.model, "vendors": V, "rows": rows})


if __name__ == "__main__":
    main()
