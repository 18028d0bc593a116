"""API replicas behind nginx: throughput and CPU per input for 1 and 2 replicas while versions are published.

    python -m bench.scaleout [--quick] [--seconds 8] [--clients 16] [--inputs 8] [--json docs/figures/scaleout.json]

Starts Redis and two learning API replicas of the shipped `fashion` model on loopback (bench.common.LocalStack,
the processes `mpserve up` runs) and nginx with the shipped deploy/nginx/mpserve.conf (bench.balancer), first
over one replica, then over both. Clients (bench.loadgen: closed loop, one keep-alive connection each, each with
its own X-Client-Id) send `POST /predict` through nginx while a new version is published every
`--publish-every` s, as the worker publishes (the store, then the fenced pointer script). Per phase: inputs/s,
latency, failed requests, versions published and seen, and whether every client saw its versions only move
forward; CPU per input of the replicas and of nginx, from /proc. Each replica's engine runs one thread of
tinygrad kernels plus its event loop, so on this 2-core machine two replicas share the cores one nearly fills:
the ratio 2 : 1 replicas is bounded by the cores here; CPU per input, which stays flat as replicas are added,
is the figure that carries to a larger machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import redis

from bench.balancer import Nginx
from bench.common import LocalStack, print_table, proc_cpu_s, write_json
from bench.load import MODEL, predict_bodies
from bench.loadgen import closed_loop
from common.loading import load_version, write_next_version
from marketplace.data import load_fashion_mnist
from model_store import ModelStore
from mpserve.stack import free_port
from redis_io.keys import ModelKeys
from redis_io.recordlog import RecordLog


def publish_next(store: ModelStore, client: redis.Redis) -> int:
    """What the worker does after a reconciliation: store version n+1 of the serving version, then publish it."""
    log = RecordLog(client, MODEL)
    current = log.current_version() or 0
    parent = load_version(store, MODEL, current)
    version = (store.latest(MODEL) or 0) + 1
    params = {k: v + np.float32(1e-4) for k, v in parent.params.items()}  # a new version, its answers the same
    write_next_version(store, parent, version, params, {"records": 0, "by": "bench.scaleout"}, 0.5,
                       np.random.default_rng(version))
    token = int(client.get(ModelKeys(MODEL).fence) or 0)
    log.publish(token, version, {"parent": parent.version, "by": "bench.scaleout"}, [], expected_version=current)
    return version


def client_id(c: int) -> dict[str, str]:
    """Client c's header: nginx keeps each client on one replica by it (deploy/nginx/mpserve.conf)."""
    return {"X-Client-Id": f"client-{c}"}


def cpu_s(pids: list[int]) -> float:
    return sum(proc_cpu_s(p) for p in pids)


async def phase(url: str, clients: int, inputs: int, bodies: Any, seconds: float, publish_every: float,
                store: ModelStore, client: redis.Redis) -> dict[str, Any]:
    """Closed-loop /predict through the balancer while versions are published; what each client saw."""
    seen: dict[int, list[int]] = {c: [] for c in range(clients)}
    published: list[int] = []

    async def publisher() -> None:
        while True:
            await asyncio.sleep(publish_every)
            published.append(await asyncio.to_thread(publish_next, store, client))

    def make(c: int, i: int) -> tuple[str, bytes, int]:
        return (*bodies.requests[(c * 7 + i) % len(bodies.requests)], inputs)

    task = asyncio.create_task(publisher())
    res = await closed_loop(url, clients, seconds, make, lambda c, payload: seen[c].append(
        json.loads(payload)["version"]), bodies.content_type, client_id)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    forward = all(v == sorted(v) for v in seen.values())
    return {**res.row(), "published": len(published), "versions_seen": len({v for s in seen.values() for v in s}),
            "forward_only": forward}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=16, help="concurrent clients (each its own X-Client-Id)")
    ap.add_argument("--inputs", type=int, default=8, help="inputs per request")
    ap.add_argument("--seconds", type=float, default=8.0, help="per phase")
    ap.add_argument("--publish-every", type=float, default=1.0, help="seconds between published versions")
    ap.add_argument("--quick", action="store_true", help="3 s phases")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.quick:
        args.seconds = 3.0
    test = load_fashion_mnist()["test"]
    bodies = predict_bodies(test.x.astype(np.float32), test.y, args.inputs, False, 7)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, LocalStack(Path(tmp)) as stack:
        stack.start_redis()
        urls = [stack.start_api(f"api-{i}") for i in range(2)]
        stack.wait_ready()
        api_pids = [stack.pid(f"api-{i}") for i in range(2)]
        store, client = ModelStore(Path(tmp) / "store"), redis.Redis.from_url(stack.redis_url)
        for n in (1, 2):
            replicas = [u.removeprefix("http://") for u in urls[:n]]
            with Nginx(Path(tmp) / f"nginx-{n}", replicas, free_port()) as lb:
                asyncio.run(closed_loop(lb.url, args.clients, 2.0, lambda c, i: (*bodies.requests[0], args.inputs),
                                        None, bodies.content_type, client_id))  # warm each replica's buckets
                lb_pids = lb.pids()
                before_api, before_lb = cpu_s(api_pids), cpu_s(lb_pids)
                row = asyncio.run(phase(lb.url, args.clients, args.inputs, bodies, args.seconds, args.publish_every,
                                        store, client))
                items = max(row["requests"] * args.inputs, 1)
                rows.append({"replicas": n, **row,
                             "api_cpu_ms_per_input": (cpu_s(api_pids) - before_api) * 1000 / items,
                             "nginx_cpu_ms_per_input": (cpu_s(lb_pids) - before_lb) * 1000 / items})
    for r in rows:
        r["vs_one_replica"] = r["inputs_per_s"] / rows[0]["inputs_per_s"]
    print(f"POST /predict through nginx: {args.clients} clients x {args.inputs} inputs, {args.seconds:g} s a phase, a "
          f"version published every {args.publish_every:g} s; {os.cpu_count()} cores\n")
    print_table(rows, ["replicas", "inputs_per_s", "vs_one_replica", "p50_ms", "p99_ms", "errors", "published",
                       "versions_seen", "forward_only", "api_cpu_ms_per_input", "nginx_cpu_ms_per_input"],
                markdown=True)
    write_json(args.json, {"benchmark": "scaleout", "model": MODEL, "clients": args.clients, "inputs": args.inputs,
                           "seconds_per_phase": args.seconds, "publish_every_s": args.publish_every, "phases": rows,
                           "cpus": os.cpu_count(), "load_average": os.getloadavg()})


if __name__ == "__main__":
    main()
