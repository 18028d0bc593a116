"""The http mode of bench/continual.py: a client that drives a running stack exactly as client apps would.

Each step sends the step's inputs to `POST /predict` without labels (requests of `--request-size` inputs,
`--clients` at a time, so the API micro-batches them as it batches any traffic), labels every prediction with
`POST /label` `--label-delay-s` later, and then either asks for a reconciliation (`POST /admin/reconcile`) or
waits for the worker's own trigger (`min_records`) to publish. The online figures come from the served
probabilities (loss = −log p[label]); the validation figures from the published version's weights in the store
(see the module docstring of bench/continual.py for why).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from bench.common import LocalStack
from bench.continual import LEARNING_KEYS, Curve, Drift, Streams, eval_steps, step_batch, validation, worker_settings
from bench.serve import TOKEN
from common.loading import load_version
from marketplace.engine import Engine, leader_logits
from marketplace.models import ModelSpec
from marketplace.reconcile import cross_entropy, fresh_seeds, learned_groups
from model_store import ModelStore, make_manifest
from mpserve.client import AsyncMPServeClient, MPServeClient, MPServeError


def stack_env(options: dict[str, Any], reconcile: str, per_step: int, holdout: Path | None) -> dict[str, str]:
    """The worker's settings for this run, as the MPSERVE_* variables `mpserve up` passes on."""
    env = {f"MPSERVE_{k.upper()}": json.dumps(v) if isinstance(v, bool) else str(v)
           for k, v in options.items() if k != "guard" and v is not None}
    env["MPSERVE_MIN_RECORDS"] = str(per_step) if reconcile == "worker" else "1000000000"
    if holdout is not None:
        env["MPSERVE_HOLDOUT_PATH"] = str(holdout)
    return env


def stack_settings(args: argparse.Namespace, options: dict[str, Any]) -> dict[str, Any]:
    """The learning settings of the run: all of the worker's when the bench started the stack, else those given."""
    given = {k: v for k, v in options.items() if k != "guard"}
    if args.http != "local":
        return given
    effective = worker_settings(options)
    return {**{k: getattr(effective, k) for k in LEARNING_KEYS}, **given}


@contextmanager
def own_stack(spec: ModelSpec, base: dict[str, np.ndarray], streams: Streams, options: dict[str, Any],
              args: argparse.Namespace) -> Iterator[tuple[str, Path]]:
    """`mpserve up` on a temporary data dir whose store holds the base model as version 0."""
    with tempfile.TemporaryDirectory(prefix="mpserve-continual-") as tmp:
        root = Path(tmp)
        learned = learned_groups(worker_settings(options).learn_groups, len(spec.groups))  # as the worker seeds
        seeds = fresh_seeds(len(spec.groups), args.vendors or 4, np.random.default_rng([args.seed, 1]),
                            bool(options.get("antithetic")), learned)
        extra = {"antithetic": True} if options.get("antithetic") else {}
        manifest = make_manifest(version=0, parent=None, model=args.http_model, architecture=spec.architecture,
                                 seeds=seeds, probe_scale=options.get("probe_scale", 0.05), learning_rate=0.0,
                                 training={"kind": "bench.continual base model"}, **extra)
        ModelStore(root / "store").write_version(args.http_model, 0, base, manifest)
        holdout = None
        if options.get("guard"):
            holdout = root / "holdout.npz"
            np.savez(holdout, inputs=streams.holdout.inputs, labels=streams.holdout.labels)
        env = stack_env(options, args.reconcile, args.old_per_step + args.new_per_step, holdout)
        env["MPSERVE_MODELS"] = args.http_model
        with LocalStack(root, admin_token=TOKEN, default_model=args.http_model) as stack:
            stack.start_redis()
            url = stack.start_api("api", env)
            stack.start_worker(env)
            stack.wait_ready()
            yield url, root / "store"


async def serve_batch(url: str, x: np.ndarray, model: str, request_size: int, clients: int
                      ) -> tuple[list[str], np.ndarray, list[int]]:
    """Predict every input (no labels); returns the ids, the served probabilities, and the versions that served."""
    chunks = [slice(i, i + request_size) for i in range(0, len(x), request_size)]
    gate = asyncio.Semaphore(clients)
    async with AsyncMPServeClient(url, timeout=120) as client:
        async def one(sl: slice) -> Any:
            async with gate:
                return await client.predict(x[sl], model=model)

        answers = await asyncio.gather(*(one(sl) for sl in chunks))
    ids = [p["id"] for a in answers for p in a["predictions"]]
    probs = np.array([p["probabilities"] for a in answers for p in a["predictions"]], dtype=np.float64)
    return ids, probs, [a["version"] for a in answers]


def wait_for_version(client: MPServeClient, model: str, after: int, timeout_s: float) -> int | None:
    """The serving version once it moved past ``after`` (the worker's trigger published), or None at the deadline."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        v = client.model(model)["version"]
        if v is not None and v > after:
            return int(v)
        time.sleep(0.05)
    return None


def run_http(args: argparse.Namespace, spec: ModelSpec, base: dict[str, np.ndarray], streams: Streams,
             options: dict[str, Any], eval_every: int, drift: Drift | None = None) -> dict[str, Any]:
    if args.http == "local":
        with own_stack(spec, base, streams, options, args) as (url, store_dir):
            return drive(url, TOKEN, store_dir, spec, streams, options, eval_every, args, base, drift)
    return drive(args.http, args.admin_token, args.store_dir, spec, streams, options, eval_every, args, base, drift)


def drive(url: str, token: str | None, store_dir: Path | None, spec: ModelSpec, streams: Streams,
          options: dict[str, Any], eval_every: int, args: argparse.Namespace,
          base: dict[str, np.ndarray] | None = None, drift: Drift | None = None) -> dict[str, Any]:
    """Serve, label and reconcile `args.steps` times; a row of figures every `eval_every` steps.

    ``base``: the weights the stack started from; the client then also answers every input with them, the base
    kept frozen (its leader: what paired exploration would serve), so each row compares learning with not.
    ``drift(x, progress)``: the inputs as the world shows them at that share of the run (protocol C).
    """
    model = args.http_model
    client = MPServeClient(url, admin_token=token, timeout=600)
    store = ModelStore(store_dir) if store_dir else None
    engine = Engine(spec, 1, buckets=[1000])
    data_rng = np.random.default_rng([args.seed, 3])
    curve, evals = Curve(), eval_steps(args.steps, eval_every)
    published, refused, served_by, versions = 0, 0, set(), []
    start = time.perf_counter()
    version = int(client.model(model)["version"])

    def serve(x: np.ndarray, y: np.ndarray, is_new: np.ndarray) -> list[str]:
        ids, probs, by = asyncio.run(serve_batch(url, x, model, args.request_size, args.clients))
        served_by.update(by)
        loss = -np.log(np.maximum(probs[np.arange(len(y)), y], 1e-45))
        frozen = None if base is None else leader_logits(engine, base, x)
        curve.served(loss, probs.argmax(1) == y, is_new, None if frozen is None else frozen.argmax(1) == y,
                     None if frozen is None else cross_entropy(frozen, y))
        return ids

    def figures(step: int) -> tuple[float | None, float | None, float | None]:
        old_x = None if drift is None else drift(streams.old_test.x, step / args.steps)
        frozen = None if base is None else validation(engine, base, streams, old_x)[0]
        if store is None:
            return None, None, frozen
        loaded = load_version(store, model, version)
        return (*validation(engine, loaded.params, streams, old_x), frozen)

    bar = tqdm(range(args.steps + 1), desc=f"http {url}", disable=args.no_progress, mininterval=2.0)
    for step in bar:
        if step > 0:
            x, y, is_new = step_batch(streams, data_rng, args.old_per_step, args.new_per_step)
            if drift is not None:
                x = drift(x, step / args.steps)
            ids = serve(x, y, is_new)
            if args.label_delay_s:
                time.sleep(args.label_delay_s)  # the outcome becomes known this long after the answer
            for i in range(0, len(ids), 1000):
                results = client.label_many([(r, int(lab)) for r, lab in zip(ids[i:i + 1000], y[i:i + 1000],
                                                                              strict=True)], model=model)
                bad = [r for r in results if r["code"] >= 300]
                if bad:
                    raise RuntimeError(f"labelling failed: {bad[:3]}")
            if args.reconcile == "admin":
                try:
                    answer = client.reconcile(model)
                    version = int(answer["version"])
                    published += 1
                except MPServeError as exc:
                    if exc.status != 409:
                        raise
                    refused += "guard" in str(exc.detail)
            else:
                moved = wait_for_version(client, model, version, args.worker_timeout_s)
                if moved is None:
                    refused += 1  # the guard refused, or the worker has not reconciled in time
                else:
                    published += moved - version
                    version = moved
            versions.append(version)
        if step in evals:
            if step == 0:  # the base model's own served figures: one batch, not labelled, not learnt from
                x, y, is_new = step_batch(streams, np.random.default_rng([args.seed, 4]), args.old_per_step,
                                          args.new_per_step)
                serve(x, y, is_new)
            old_val, new_val, frozen_val = figures(step)
            point = curve.row(step, old_val, new_val, frozen_val)
            point["version"], point["refused"] = version, refused
            bar.set_postfix(version=version, old=old_val, new=new_val)
    client.close()
    return {"curve": curve.rows, "seconds": time.perf_counter() - start, "refused": refused,
            "versions": published, "final_version": version, "served_by_versions": sorted(served_by),
            "url": url if args.http != "local" else "own stack (mpserve up)", "reconcile": args.reconcile,
            "label_delay_s": args.label_delay_s, "settings": stack_settings(args, options),
            "guard": bool(options.get("guard"))}
