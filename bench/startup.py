"""Seconds from launching an API replica to its first answer, with the shipped kernel table and without.

    python -m bench.startup [--rounds 1] [--json results/startup.json]

What `mpserve up` waits on before it prints "mpserve is up": the API (`mpserve serve`, defaults: learning on,
paired probes, the shipped model) loads its serving version and compiles one JIT'd graph per bucket before
/readyz answers 200. Each start runs against the same Redis (started the way `mpserve up` starts it) and gets a
fresh tinygrad disk cache (``CACHEDB``) unless ``warm``: a cold start compiles every kernel with clang, a warm
one (the same cache, a second start) reads the compiled binaries back. Variants alternate within each round,
so background load hits them alike; the table gives each variant's best (shortest) start.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from bench.common import LocalStack, print_table, write_json
from mpserve.client import MPServeClient


def start_once(stack: LocalStack, name: str, env: dict[str, str], x: np.ndarray) -> dict[str, float]:
    """Launch one API replica; seconds until /readyz says ready, and the first /predict's own seconds."""
    from mpserve.stack import stop, wait_ready

    t0 = time.monotonic()
    url = stack.start_api(name, env)
    wait_ready(url, {name: stack.children[name]}, 600.0, stack.logs)
    ready = time.monotonic() - t0
    t1 = time.monotonic()
    with MPServeClient(url) as client:
        client.predict(x)
    first = time.monotonic() - t1
    proc = stack.children.pop(name)
    stack.urls.pop(name)
    stop({name: proc})
    return {"ready_s": ready, "first_predict_s": first}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--tables", default="shipped,off", help="MPSERVE_KERNEL_TABLE values to compare")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    x = np.zeros((1, 1, 28, 28), np.float32)
    rows: dict[tuple[str, str], dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="mpserve-startup-") as tmp, LocalStack(Path(tmp)) as stack:
        stack.start_redis()
        for r in range(args.rounds):
            for table in args.tables.split(","):
                cache = Path(tmp) / f"cache-{table.replace('/', '_')}-{r}.db"
                for start in ("cold", "warm"):  # the same fresh cache twice: clang's binaries are in it the 2nd time
                    env = {"MPSERVE_KERNEL_TABLE": table, "CACHEDB": str(cache), "MPSERVE_LOG_LEVEL": "warning"}
                    got = start_once(stack, f"api-{table}-{start}-{r}".replace("/", "_"), env, x)
                    key = (table, start)
                    best = rows.get(key)
                    if best is None or got["ready_s"] < best["ready_s"]:
                        rows[key] = got
                    print(f"round {r}: kernel table {table}, {start} start: ready in {got['ready_s']:.1f} s, "
                          f"first /predict {got['first_predict_s'] * 1e3:.0f} ms", flush=True)
    table_rows = [{"kernel_table": t, "start": s, "ready_s": v["ready_s"],
                   "first_predict_ms": v["first_predict_s"] * 1e3} for (t, s), v in rows.items()]
    print()
    print_table(table_rows, list(table_rows[0]))
    write_json(args.json, {"benchmark": "startup", "rounds": args.rounds, "rows": table_rows})


if __name__ == "__main__":
    try:
        main()
    except httpx.HTTPError as exc:
        raise SystemExit(f"bench.startup: {exc}") from exc
