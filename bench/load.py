"""HTTP load on a running API, against the raw engine and a static (learning off) replica, in one run.

    python -m bench.load [--quick] [--json docs/figures/load.json] [--seconds 5]

Starts Redis and two API replicas of the shipped `fashion` model on loopback (bench.common.LocalStack:
the processes `mpserve up` runs): one learning (vendor paths, records in Redis) and one with
MPSERVE_LEARNING=false (the leader only, V=1, nothing recorded). This process is the client
(bench.loadgen: closed loop, one keep-alive connection per client). It measures

- `POST /predict` at 1, 8 and 64 concurrent clients with 1 and 8 inputs per request: on the learning
  replica without and with labels in the request, and with the inputs as one .npy array
  (`application/x-npy`) instead of JSON lists; and on the static replica;
- `POST /label`, single and batch, on ids the predict phases produced;
- the raw engine in this process (marketplace.engine.Engine with the server's V and buckets, and V=1), running
  what the replica runs (the paired forward for the learning replica under the default paired exploration), at
  the batch each load can offer at most: min(clients x inputs, max_batch);
- the stall of a hot swap: `POST /predict` latency on the learning replica (8 clients x 8 inputs) without and
  with `POST /admin/rollback` toggling between version 0 and a version 1 (version 0's weights under fresh
  seeds, written into the stack's store) every `--swap-every` s, so the replicas load, materialize and swap
  a version while they serve (both replicas swap; the static one idles meanwhile).

Ratios: `http_vs_raw` = HTTP inputs/s over the raw engine's at that batch (target >= 0.8 at 64 clients x 8
inputs with JSON bodies, >= 0.9 with .npy bodies: `npy_http_vs_raw`); `p99/p50` (target <= 3 at 8 clients);
`learning_vs_static` = learning over static inputs/s
(target >= 0.9: learning costs at most 10%), and the same in CPU per input, `cpu_static_vs_learning`
(steadier when other processes share the machine). The raw engine is measured right before the HTTP phases of
its cell, and the phases of one cell run back to back on both replicas, so background load on the
machine hits them alike; the replica not being driven idles. Each figure is the best of `--rounds`.

CPU columns, steadier than wall-clock rates on a shared machine: `api_cpu_ms_per_input` is the replica's
CPU (all threads, /proc/PID/stat) per input served, to compare with the raw engine's `cpu_ms_per_input`;
`loop_cpu_ms_per_request` is its main thread only: the event loop (HTTP, JSON, validation, Redis,
answers), i.e. what the server adds around the engine. `--quick` runs one round of 1 s phases with the
replicas' max batch at 32 (fewer buckets to compile at start-up; larger cells then run at batch 32).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import resource
import tempfile
import time
import urllib.request
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import LocalStack, print_table, proc_cpu_s, rate, write_json
from bench.loadgen import PhaseResult, closed_loop
from common.loading import load_version, shipped_store
from marketplace.data import load_fashion_mnist
from marketplace.engine import Engine, leader_seeds
from marketplace.reconcile import fresh_seeds
from model_store import ModelStore
from server.settings import ServerSettings

MODEL = "fashion"
BODIES = 64  # distinct request bodies per phase, encoded up front


NPY = "application/x-npy"


@dataclass(frozen=True)
class Bodies:
    """A phase's request bodies, encoded up front, and how they travel: JSON lists (as the shipped client sends
    them by default) or one .npy array each (``binary``: the labels then ride in the query string)."""

    requests: list[tuple[str, bytes]]  # (path, body)
    content_type: str = "application/json"


def predict_bodies(images: np.ndarray, labels: np.ndarray, inputs: int, with_labels: bool, seed: int,
                   binary: bool = False) -> Bodies:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(BODIES):
        idx = rng.integers(0, len(images), inputs)
        if binary:
            buf = io.BytesIO()
            np.save(buf, images[idx].astype(np.float32), allow_pickle=False)
            query = "?labels=" + ",".join(map(str, labels[idx].tolist())) if with_labels else ""
            out.append(("/predict" + query, buf.getvalue()))
            continue
        body: dict[str, Any] = {"inputs": images[idx].tolist()}
        if with_labels:
            body["labels"] = labels[idx].tolist()
        out.append(("/predict", json.dumps(body).encode()))
    return Bodies(out, NPY if binary else "application/json")


async def predict_phase(url: str, clients: int, inputs: int, bodies: Bodies, seconds: float,
                        ids: deque[tuple[str, int]] | None = None, labels_of: list[int] | None = None) -> PhaseResult:
    """Closed-loop /predict; with `ids`, the ids served are collected (with a label to give them later)."""

    def make(c: int, i: int) -> tuple[str, bytes, int]:
        return (*bodies.requests[(c * 7 + i) % len(bodies.requests)], inputs)

    def keep(c: int, payload: bytes) -> None:
        assert ids is not None and labels_of is not None
        for p in json.loads(payload)["predictions"]:
            ids.append((p["id"], labels_of[len(ids) % len(labels_of)]))

    return await closed_loop(url, clients, seconds, make, keep if ids is not None else None, bodies.content_type)


async def label_phase(url: str, clients: int, per_request: int, ids: deque[tuple[str, int]], seconds: float
                      ) -> PhaseResult:
    """Closed-loop /label on fresh ids; single (`per_request` 1) or batch bodies. Stops when ids run out."""

    def make(c: int, i: int) -> tuple[str, bytes, int] | None:
        if len(ids) < per_request:
            return None
        items = [ids.popleft() for _ in range(per_request)]
        if per_request == 1:
            body = {"id": items[0][0], "label": items[0][1]}
        else:
            body = {"labels": [{"id": rid, "label": y} for rid, y in items]}
        return "/label", json.dumps(body).encode(), per_request

    return await closed_loop(url, clients, seconds, make)


def add_swap_version(store: ModelStore) -> None:
    """Version 1 of MODEL: version 0's weights under fresh seeds, a version for rollbacks to swap to and fro."""
    params, manifest = store.read_version(MODEL, 0)
    manifest = {k: v for k, v in manifest.items() if k not in ("weights_sha256", "weights_file", "version", "created")}
    seeds = np.asarray(manifest["seeds"], dtype=np.uint64)
    manifest.update(parent=0, seeds=fresh_seeds(*seeds.shape, np.random.default_rng(1),
                                                bool(manifest.get("antithetic", False))).tolist())
    store.write_version(MODEL, 1, params, manifest)


def rollback(url: str, token: str, version: int) -> None:
    req = urllib.request.Request(f"{url}/admin/rollback", data=json.dumps({"version": version}).encode(),
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as answer:
        answer.read()


async def swap_phase(url: str, token: str, bodies: Bodies, seconds: float, every: float | None
                     ) -> tuple[PhaseResult, int, int]:
    """/predict at 8 clients x 8 inputs; with `every`, a rollback to the other version every `every` s.

    Returns the phase, the rollbacks sent and the version changes the answers show (in answer order).
    """
    versions: list[int] = []
    sent = 0

    async def swapper() -> None:
        nonlocal sent
        target = 1
        while True:
            await asyncio.sleep(every)
            await asyncio.to_thread(rollback, url, token, target)
            sent, target = sent + 1, 1 - target

    task = asyncio.create_task(swapper()) if every else None
    res = await closed_loop(url, 8, seconds, lambda c, i: (*bodies.requests[(c * 7 + i) % len(bodies.requests)], 8),
                            lambda c, payload: versions.append(json.loads(payload)["version"]), bodies.content_type)
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return res, sent, sum(a != b for a, b in zip(versions, versions[1:], strict=False))


def raw_engines(max_batch: int, batches: list[int]) -> dict[str, tuple[Engine, Any]]:
    """The shipped version on the engine as each replica builds it: V vendors (learning) and V=1 (static).

    Only the buckets the benchmark uses are warmed up (the others are never run here).
    """
    loaded = load_version(shipped_store(), MODEL, 0)
    learn = Engine(loaded.spec, loaded.vendors, max_batch)
    static = Engine(loaded.spec, 1, max_batch)
    out = {"learning": (learn, learn.materialize(loaded.params, loaded.seeds, loaded.eps)),
           "static": (static, static.materialize(loaded.params, leader_seeds(loaded.spec), loaded.eps))}
    for kind, (engine, weights) in out.items():
        engine.warmup(weights, sorted({engine.bucket_for(b) for b in batches}), paired=raw_paired(kind))
    return out


def raw_paired(kind: str) -> bool:
    """Whether a replica of this kind runs the paired forward (the learning one with paired exploration, the
    server's default: every input through its vendor path and the leader), so the raw engine runs it too."""
    return kind == "learning" and ServerSettings().exploration == "paired"


def raw_rate(engine: Engine, weights: Any, images: np.ndarray, batch: int, seconds: float, paired: bool = False
             ) -> tuple[float, float]:
    """Inputs/s of the engine's forward (paired or not, as the replica runs it) at `batch`, and CPU ms per input
    (this thread)."""
    rng = np.random.default_rng(0)
    x = images[:batch]
    calls = 0
    forward = engine.forward_paired if paired else engine.forward

    def step() -> int:
        nonlocal calls
        forward(weights, x, rng)
        calls += 1
        return batch

    cpu = time.thread_time()
    r = rate(step, seconds)
    return r, (time.thread_time() - cpu) * 1000 / (calls * batch)


def best(store: dict[Any, dict[str, Any]], key: Any, row: dict[str, Any], by: str) -> None:
    """Keep the row with the highest `by` (best of rounds: background load only ever slows a phase down)."""
    if key not in store or row[by] > store[key][by]:
        store[key] = row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", default="1,8,64", help="concurrent clients, comma-separated")
    ap.add_argument("--inputs", default="1,8", help="inputs per request, comma-separated")
    ap.add_argument("--seconds", type=float, default=4.0, help="per phase")
    ap.add_argument("--rounds", type=int, default=2, help="rounds over all phases; each figure is the best round's")
    ap.add_argument("--max-batch", type=int, default=ServerSettings().max_batch,
                    help="the replicas' MPSERVE_MAX_BATCH (default: the server's default)")
    ap.add_argument("--label-batch", type=int, default=8, help="labels per batch /label request")
    ap.add_argument("--swap-seconds", type=float, default=None,
                    help="each swap-stall phase, without and with swaps (default 10, 4 with --quick)")
    ap.add_argument("--swap-every", type=float, default=1.0, help="seconds between rollbacks in the swap phase")
    ap.add_argument("--quick", action="store_true", help="1 round of 1 s phases, max batch 32, 4 s swap phases")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.rounds, args.max_batch = 1.0, 1, min(args.max_batch, 32)
        args.swap_seconds = args.swap_seconds or 4.0
    args.swap_seconds = args.swap_seconds or 10.0
    raw_seconds = min(args.seconds / 2, 1.0)
    clients_list = [int(c) for c in args.clients.split(",")]
    inputs_list = [int(k) for k in args.inputs.split(",")]
    max_batch = args.max_batch

    t0 = time.perf_counter()
    test = load_fashion_mnist()["test"]
    images, labels = test.x.astype(np.float32), test.y
    label_pool = labels.tolist()
    predict: dict[Any, dict[str, Any]] = {}
    raw: dict[Any, dict[str, Any]] = {}
    label: dict[Any, dict[str, Any]] = {}
    ids: deque[tuple[str, int]] = deque(maxlen=500_000)
    env = {"MPSERVE_MAX_BATCH": str(max_batch)}
    with tempfile.TemporaryDirectory() as tmp, LocalStack(Path(tmp)) as stack:
        stack.start_redis()
        urls = {"learning": stack.start_api("api", env),
                "static": stack.start_api("api-static", {**env, "MPSERVE_LEARNING": "false"})}
        pids = {"learning": stack.pid("api"), "static": stack.pid("api-static")}
        batches = sorted({min(c * k, max_batch) for c in clients_list for k in inputs_list})
        engines = raw_engines(max_batch, batches)  # builds while the replicas warm up
        stack.wait_ready()
        startup_s = time.perf_counter() - t0
        warm = predict_bodies(images, labels, 8, False, 0)
        for url in urls.values():
            asyncio.run(predict_phase(url, 8, 8, warm, 0.5))
        for _ in range(args.rounds):
            for clients in clients_list:
                for k in inputs_list:
                    b = min(clients * k, max_batch)
                    for kind, (engine, weights) in engines.items():  # right before the HTTP phases it is compared to
                        r, cpu = raw_rate(engine, weights, images, b, raw_seconds, raw_paired(kind))
                        best(raw, (kind, b), {"engine": kind, "V": engine.V, "paired": raw_paired(kind), "batch": b,
                                              "inputs_per_s": r,
                                              "cpu_ms_per_input": cpu}, "inputs_per_s")
                    plain, labelled = (predict_bodies(images, labels, k, flag, clients * 10 + k)
                                       for flag in (False, True))
                    binary = predict_bodies(images, labels, k, False, clients * 10 + k, binary=True)
                    for server, with_labels, bodies in [("learning", False, plain), ("static", False, plain),
                                                        ("learning", True, labelled), ("learning", False, binary)]:
                        collect = server == "learning" and not with_labels and bodies is plain
                        cpu, loop = proc_cpu_s(pids[server]), proc_cpu_s(pids[server], main_thread_only=True)
                        res = asyncio.run(predict_phase(urls[server], clients, k, bodies, args.seconds,
                                                        ids if collect else None, label_pool))
                        cpu = proc_cpu_s(pids[server]) - cpu
                        loop = proc_cpu_s(pids[server], main_thread_only=True) - loop
                        body = "npy" if bodies.content_type == NPY else "json"
                        row = {"server": server, "labels": with_labels, "body": body, "inputs": k, **res.row(),
                               "api_cpu_ms_per_input": cpu * 1000 / max(res.items, 1),
                               "loop_cpu_ms_per_request": loop * 1000 / max(res.requests, 1)}
                        best(predict, (server, with_labels, body, clients, k), row, "inputs_per_s")
            for per_request in (1, args.label_batch):
                cpu = proc_cpu_s(pids["learning"])
                res = asyncio.run(label_phase(urls["learning"], 8, per_request, ids, args.seconds))
                cpu = proc_cpu_s(pids["learning"]) - cpu
                row = {"mode": "single" if per_request == 1 else f"batch of {per_request}", **res.row("labels"),
                       "api_cpu_ms_per_request": cpu * 1000 / max(res.requests, 1)}
                best(label, per_request, row, "labels_per_s")
        add_swap_version(ModelStore(Path(tmp) / "store"))
        swap_bodies = predict_bodies(images, labels, 8, False, 99)
        swap = []
        for every in (None, args.swap_every):
            res, sent, seen = asyncio.run(swap_phase(urls["learning"], stack.admin_token, swap_bodies,
                                                     args.swap_seconds, every))
            swap.append({"swaps": "none" if every is None else f"every {every:g} s", "rollbacks": sent,
                         "version_changes_seen": seen, **res.row(), "max_ms": max(res.latencies_s, default=0) * 1e3})
        bench_s = time.perf_counter() - t0 - startup_s

    rows = list(predict.values())
    for row in rows:
        b = min(row["clients"] * row["inputs"], max_batch)
        ref = raw[(row["server"], b)]
        row["raw_batch"], row["raw_inputs_per_s"] = b, ref["inputs_per_s"]
        row["http_vs_raw"] = row["inputs_per_s"] / ref["inputs_per_s"]
        row["p99/p50"] = row["p99_ms"] / row["p50_ms"]
    cost = []
    for row in rows:
        if row["server"] == "learning" and not row["labels"] and row["body"] == "json":
            static = predict[("static", False, "json", row["clients"], row["inputs"])]
            cost.append({"clients": row["clients"], "inputs": row["inputs"],
                         "learning_inputs_per_s": row["inputs_per_s"], "static_inputs_per_s": static["inputs_per_s"],
                         "learning_vs_static": row["inputs_per_s"] / static["inputs_per_s"],
                         "learning_cpu_ms_per_input": row["api_cpu_ms_per_input"],
                         "static_cpu_ms_per_input": static["api_cpu_ms_per_input"],
                         "cpu_static_vs_learning": static["api_cpu_ms_per_input"] / row["api_cpu_ms_per_input"]})
    binary_rows = []
    for row in rows:
        if row["server"] == "learning" and not row["labels"] and row["body"] == "npy":
            js = predict[("learning", False, "json", row["clients"], row["inputs"])]
            binary_rows.append({"clients": row["clients"], "inputs": row["inputs"],
                                "json_inputs_per_s": js["inputs_per_s"], "npy_inputs_per_s": row["inputs_per_s"],
                                "npy_vs_json": row["inputs_per_s"] / js["inputs_per_s"],
                                "json_http_vs_raw": js["http_vs_raw"], "npy_http_vs_raw": row["http_vs_raw"],
                                "json_loop_ms_per_request": js["loop_cpu_ms_per_request"],
                                "npy_loop_ms_per_request": row["loop_cpu_ms_per_request"]})
    label_rows, raw_rows = list(label.values()), list(raw.values())

    print(f"POST /predict: closed loop, best of {args.rounds} round(s) of {args.seconds:g} s; raw = the engine's "
          f"forward as the replica runs it (paired for learning), in this process at batch min(clients x inputs, "
          f"{max_batch}), measured right before\n")
    print_table(rows, ["server", "labels", "body", "clients", "inputs", "requests_per_s", "inputs_per_s", "p50_ms",
                       "p99_ms", "p99/p50", "raw_inputs_per_s", "http_vs_raw", "api_cpu_ms_per_input",
                       "loop_cpu_ms_per_request", "errors"], markdown=True)
    print("\nWhat learning costs: the same load on the learning and the static replica\n")
    print_table(cost, list(cost[0]), markdown=True)
    print("\nBinary bodies: the learning replica with the same inputs as JSON lists and as one .npy array\n")
    print_table(binary_rows, list(binary_rows[0]), markdown=True)
    print("\nPOST /label: 8 clients, fresh ids\n")
    print_table(label_rows, list(label_rows[0]), markdown=True)
    print("\nRaw engine (this process)\n")
    print_table(raw_rows, list(raw_rows[0]), markdown=True)
    print(f"\nThe stall of a hot swap: learning replica, 8 clients x 8 inputs, {args.swap_seconds:g} s each\n")
    print_table(swap, list(swap[0]), markdown=True)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(f"\nstartup {startup_s:.1f} s, phases {bench_s:.1f} s, total {time.perf_counter() - t0:.1f} s; this process "
          f"(client + raw engine) used {usage.ru_utime + usage.ru_stime:.1f} s CPU; {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}")
    write_json(args.json, {
        "benchmark": "load", "model": MODEL, "max_batch": max_batch, "seconds_per_phase": args.seconds,
        "rounds": args.rounds, "predict": rows, "learning_cost": cost, "binary_bodies": binary_rows,
        "label": label_rows, "raw_engine": raw_rows,
        "swap_stall": swap, "startup_s": startup_s, "cpus": os.cpu_count(), "load_average": os.getloadavg()})


if __name__ == "__main__":
    main()
