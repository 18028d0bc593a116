"""Soak: mixed predict/label traffic for a while with the worker reconciling, watching memory for growth.

    python -m bench.soak [--quick] [--seconds 600] [--json docs/figures/soak.json] [--plot docs/figures/soak.png]

Starts Redis, one API replica and the worker on loopback (bench.common.LocalStack), with a short label
window (MPSERVE_LABEL_WINDOW_S, default 30 s, for both) and a reconciliation every few seconds
(MPSERVE_INTERVAL_S, MPSERVE_MIN_RECORDS). Open-loop traffic at a fixed rate (`--rate` requests/s of
`--inputs` images): a share of the requests carries its labels, most of the other ids are labelled
later through batch `POST /label`, a few only after the window (they must come back not_found), the rest
never. Every `--sample-s` it records the resident memory (VmRSS) of the API, the worker and
redis-server, Redis `INFO memory` used_memory, the number of keys, the feedback stream's length and the
serving version.

**Flat** (the verdict per memory series): after the first third of the run (warm-up: the label window
fills, the first versions are published), the mean of the last third is at most `--tolerance` (default
5%) above the mean of the middle third. A leak grows without bound and fails this; a series that merely
fluctuates around a level passes. The number of keys (records expire after the window) and the stream
length (trimmed of acknowledged entries on every publish) are shown with the same figures plus the
last third's minimum and maximum: they saw-tooth, so they are reported, not judged, and a leak of either
would show in Redis used_memory anyway.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any

import numpy as np
import redis

from bench.common import LocalStack, print_table, rss_bytes, write_json
from bench.loadgen import Connection
from marketplace.data import load_fashion_mnist
from redis_io.keys import ModelKeys

MODEL = "fashion"
MEMORY = ("api_rss_mb", "worker_rss_mb", "redis_rss_mb", "redis_used_mb")  # judged: must be flat
COUNTS = ("keys", "stream_len")  # shown: they saw-tooth (expiry, trim on publish), so their thirds are noisy


def flatness(values: list[float], tolerance: float) -> dict[str, Any]:
    """Middle-third and last-third means, the growth between them, and whether it is within `tolerance`."""
    n = len(values)
    middle, last = values[n // 3: 2 * n // 3], values[2 * n // 3:]
    if n < 3:  # no warm-up third to leave out
        return {"middle_mean": None, "last_mean": None, "growth": None, "flat": None}
    m, lst = float(np.mean(middle)), float(np.mean(last))
    growth = (lst - m) / m if m else 0.0
    return {"middle_mean": m, "last_mean": lst, "growth": growth, "last_min": float(min(last)),
            "last_max": float(max(last)), "flat": growth <= tolerance}


class Traffic:
    """Open-loop predict/label traffic and its tallies."""

    def __init__(self, url: str, images: np.ndarray, labels: np.ndarray, inputs: int, window_s: float,
                 seed: int = 0) -> None:
        self.url, self.images, self.labels, self.inputs, self.window_s = url, images, labels, inputs, window_s
        self.rng = random.Random(seed)
        self.due: deque[tuple[float, str, int]] = deque()  # (when, id, label) to label later, in time order
        self.late: deque[tuple[float, str, int]] = deque()  # labelled after the window on purpose
        self.counts: Counter[str] = Counter()
        self.label_status: Counter[str] = Counter()
        self.late_status: Counter[str] = Counter()

    def _body(self) -> tuple[bytes, list[int], bool]:
        idx = [self.rng.randrange(len(self.images)) for _ in range(self.inputs)]
        ys = [int(self.labels[i]) for i in idx]
        with_labels = self.rng.random() < 1 / 3
        body: dict[str, Any] = {"inputs": self.images[idx].tolist()}
        if with_labels:
            body["labels"] = ys
        return json.dumps(body).encode(), ys, with_labels

    async def predictor(self, rate: float, stop_at: float) -> None:
        """One connection sending `rate` requests/s on a fixed schedule (it never sends faster to catch up)."""
        conn = Connection(self.url)
        next_at = time.perf_counter()
        try:
            while (now := time.perf_counter()) < stop_at:
                if now < next_at:
                    await asyncio.sleep(next_at - now)
                next_at = max(next_at + 1 / rate, time.perf_counter() - 1 / rate)
                body, ys, with_labels = self._body()
                status, payload = await conn.post("/predict", body)
                self.counts[f"predict {status}"] += 1
                if status != 200 or with_labels:
                    continue
                now = time.perf_counter()
                for p, y in zip(json.loads(payload)["predictions"], ys, strict=True):
                    u = self.rng.random()
                    if u < 0.75:  # labelled a little later, within the window
                        self.due.append((now + self.rng.uniform(0.5, min(5.0, self.window_s / 3)), p["id"], y))
                    elif u < 0.80:  # labelled after the window: must be not_found
                        self.late.append((now + self.window_s + 5.0, p["id"], y))
        finally:
            await conn.close()

    async def labeller(self, stop_at: float, batch: int = 32) -> None:
        """Labels what is due, in batches; runs a little past `stop_at` only to drain nothing new."""
        conn = Connection(self.url)
        try:
            while time.perf_counter() < stop_at:
                now = time.perf_counter()
                for queue, tally in ((self.due, self.label_status), (self.late, self.late_status)):
                    items = []
                    while queue and queue[0][0] <= now and len(items) < batch:
                        items.append(queue.popleft())
                    if not items:
                        continue
                    body = json.dumps({"labels": [{"id": rid, "label": y} for _, rid, y in items]}).encode()
                    status, payload = await conn.post("/label", body)
                    self.counts[f"label {status}"] += 1
                    if status == 200:
                        tally.update(r["status"] for r in json.loads(payload)["results"])
                await asyncio.sleep(0.2)
        finally:
            await conn.close()


async def sample(stack: LocalStack, client: redis.Redis, keys: ModelKeys, every_s: float, stop_at: float,
                 t0: float, out: list[dict[str, float]]) -> None:
    """One row of readings every `every_s` until `stop_at`."""
    mb = 1024 * 1024
    while (now := time.perf_counter()) < stop_at:
        info = await asyncio.to_thread(client.info, "memory")
        row = {"t_s": now - t0, "api_rss_mb": rss_bytes(stack.pid("api")) / mb,
               "worker_rss_mb": rss_bytes(stack.pid("worker")) / mb, "redis_rss_mb": rss_bytes(stack.pid("redis")) / mb,
               "redis_used_mb": info["used_memory"] / mb, "keys": float(await asyncio.to_thread(client.dbsize)),
               "stream_len": float(await asyncio.to_thread(client.xlen, keys.feedback)),
               "version": float(int(await asyncio.to_thread(client.get, keys.version) or -1))}
        out.append(row)
        await asyncio.sleep(max(0.0, every_s - (time.perf_counter() - now)))


async def soak(stack: LocalStack, traffic: Traffic, seconds: float, rate: float, connections: int,
               sample_s: float) -> list[dict[str, float]]:
    client = redis.Redis.from_url(stack.redis_url)
    rows: list[dict[str, float]] = []
    t0 = time.perf_counter()
    stop_at = t0 + seconds
    try:
        await asyncio.gather(*(traffic.predictor(rate / connections, stop_at) for _ in range(connections)),
                             traffic.labeller(stop_at), sample(stack, client, ModelKeys(MODEL), sample_s, stop_at,
                                                               t0, rows))
    finally:
        client.close()
    return rows


def plot(rows: list[dict[str, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r["t_s"] for r in rows]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    panels = [("resident memory (MB)", ("api_rss_mb", "worker_rss_mb", "redis_rss_mb")),
              ("Redis used_memory (MB)", ("redis_used_mb",)), ("Redis keys", ("keys",)),
              ("feedback stream length", ("stream_len",))]
    for ax, (label, names) in zip(axes.flat, panels, strict=True):
        for name in names:
            ax.plot(t, [r[name] for r in rows], label=name)
        for frac in (1 / 3, 2 / 3):
            ax.axvline(t[-1] * frac, color="grey", lw=0.5, ls="--")
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        if len(names) > 1:
            ax.legend(fontsize=8)
    for ax in axes[1]:
        ax.set_xlabel("seconds")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=600.0, help="duration of the traffic")
    ap.add_argument("--rate", type=float, default=12.0, help="predict requests per second (open loop)")
    ap.add_argument("--inputs", type=int, default=8, help="images per predict request")
    ap.add_argument("--connections", type=int, default=4, help="client connections sharing the rate")
    ap.add_argument("--label-window", type=int, default=30, help="MPSERVE_LABEL_WINDOW_S of the API and worker")
    ap.add_argument("--interval", type=float, default=5.0, help="MPSERVE_INTERVAL_S of the worker")
    ap.add_argument("--min-records", type=int, default=256, help="MPSERVE_MIN_RECORDS of the worker")
    ap.add_argument("--sample-s", type=float, default=2.0, help="seconds between readings")
    ap.add_argument("--tolerance", type=float, default=0.05, help="largest growth, last third over middle third")
    ap.add_argument("--quick", action="store_true", help="60 s with a 10 s label window")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None, help="PNG of the series")
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.label_window, args.sample_s = 60.0, 10, 1.0

    test = load_fashion_mnist()["test"]
    images, labels = test.x.astype(np.float32), test.y
    window = {"MPSERVE_LABEL_WINDOW_S": str(args.label_window)}
    with tempfile.TemporaryDirectory() as tmp, LocalStack(Path(tmp)) as stack:
        stack.start_redis()
        url = stack.start_api("api", window)
        stack.start_worker({**window, "MPSERVE_INTERVAL_S": str(args.interval),
                            "MPSERVE_MIN_RECORDS": str(args.min_records)})
        stack.wait_ready()
        traffic = Traffic(url, images, labels, args.inputs, args.label_window)
        rows = asyncio.run(soak(stack, traffic, args.seconds, args.rate, args.connections, args.sample_s))

    verdicts = [{"series": name, **flatness([r[name] for r in rows], args.tolerance)} for name in MEMORY]
    counts = [{"series": name, **flatness([r[name] for r in rows], args.tolerance)} for name in COUNTS]
    for c in counts:
        c["flat"] = "(not judged)"
    published = int(rows[-1]["version"] - rows[0]["version"])  # versions are numbered in sequence
    summary = {"seconds": args.seconds, "rate": args.rate, "inputs": args.inputs, "label_window_s": args.label_window,
               "interval_s": args.interval, "min_records": args.min_records, "samples": len(rows),
               "requests": dict(traffic.counts), "labels": dict(traffic.label_status),
               "late_labels": dict(traffic.late_status), "versions_published": published,
               "all_flat": all(v["flat"] for v in verdicts)}
    print_table(verdicts + counts, ["series", "middle_mean", "last_mean", "growth", "last_min", "last_max", "flat"],
                markdown=True)
    print(f"\n{json.dumps(summary)}")
    write_json(args.json, {"benchmark": "soak", "summary": summary, "verdicts": verdicts, "counts": counts,
                           "series": rows})
    if args.plot:
        plot(rows, args.plot, f"soak: {args.seconds:.0f} s at {args.rate:g} req/s x {args.inputs} inputs, "
                              f"label window {args.label_window} s, {published} versions published")


if __name__ == "__main__":
    main()
