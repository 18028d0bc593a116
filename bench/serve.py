"""Requests/s of `POST /predict` through the whole stack, with and without labels, and the cost of one
reconciliation of 256 records — measured against the processes `mpserve up` runs (Redis, API, worker;
bench.common.LocalStack), driven by the shipped async client.

    python -m bench.serve [--quick] [--json results/serve.json] [--clients 8 --inputs 8]

The worker is told to reconcile only when asked, so the figures of each phase are not mixed with
background updates. Inputs are Fashion-MNIST test images.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import LocalStack, print_table, write_json
from marketplace.data import load_fashion_mnist
from mpserve.client import AsyncMPServeClient, MPServeClient

TOKEN = "bench-token"
# reconcile only when asked, so the figures of each phase are not mixed with background updates
WORKER_ENV = {"MPSERVE_MIN_RECORDS": "1000000000", "MPSERVE_INTERVAL_S": "1000000", "MPSERVE_MIN_COHORT": "8"}


async def load(url: str, images: np.ndarray, labels: np.ndarray, clients: int, inputs: int, seconds: float,
               with_labels: bool) -> dict:
    """`clients` concurrent clients, each sending requests of `inputs` images back to back."""
    latencies: list[float] = []
    stop_at = time.perf_counter() + seconds

    async def one(c: int) -> None:
        rng = np.random.default_rng(c)
        async with AsyncMPServeClient(url, timeout=60) as client:
            while time.perf_counter() < stop_at:
                idx = rng.integers(0, len(images), inputs)
                start = time.perf_counter()
                await client.predict(images[idx], labels=labels[idx].tolist() if with_labels else None)
                latencies.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(one(c) for c in range(clients)))
    elapsed = time.perf_counter() - start
    lat = np.array(latencies) * 1000
    return {"phase": "predict+labels" if with_labels else "predict", "clients": clients, "inputs": inputs,
            "requests_per_s": len(lat) / elapsed, "inputs_per_s": len(lat) * inputs / elapsed,
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--inputs", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--records", type=int, default=256, help="records in the timed reconciliation")
    ap.add_argument("--quick", action="store_true", help="5 s per phase")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    seconds = 5.0 if args.quick else args.seconds
    test = load_fashion_mnist()["test"]
    images, labels = test.x.astype(np.float32), test.y

    with tempfile.TemporaryDirectory() as tmp, LocalStack(Path(tmp), admin_token=TOKEN) as stack:
        stack.start_redis()
        url = stack.start_api("api")
        stack.start_worker(WORKER_ENV)  # it answers POST /admin/reconcile (the API runs no reconciler)
        stack.wait_ready()
        client = MPServeClient(url, admin_token=TOKEN, timeout=600)
        for _ in range(3):  # warm-up
            asyncio.run(load(url, images, labels, args.clients, args.inputs, 1.0, False))
        rows = [asyncio.run(load(url, images, labels, args.clients, args.inputs, seconds, flag))
                for flag in (False, True)]
        print_table(rows, list(rows[0]))
        client.reconcile()  # consume what the load phase labelled
        for i in range(0, args.records, args.inputs):
            n = min(args.inputs, args.records - i)
            client.predict(images[i:i + n], labels=labels[i:i + n].tolist())
        start = time.perf_counter()
        outcome = client.reconcile()
        wall = time.perf_counter() - start
        rec = {"records": outcome["stats"]["records"], "http_seconds": wall,
               "version": outcome["version"], "loss_mean": outcome["stats"].get("loss_mean")}
        print()
        print_table([rec], list(rec))
    write_json(args.json, {"benchmark": "serve", "rows": rows, "reconcile": rec})


if __name__ == "__main__":
    main()
