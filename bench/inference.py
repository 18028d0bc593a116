"""Inputs/s of plain vs balanced perturbed inference (and a naive per-input loop), side by side.

    python bench/inference.py [--quick] [--peer torch] [--json results/inference.json]

plain: the leader only (V=1), the same engine code; perturbed: V vendors per group, every input on its
own balanced path, one kernel per layer over all vendors; naive: each input run alone through the
weights of its own path, as the upstream continual-learning code does. Measurements are interleaved
and each figure is the best of several rounds, so background load hits all three alike.
``--peer torch``: the same model and weights in PyTorch (`bench/torch_peer.py`, its logits checked against the
engine's), timed in the same rounds under ``torch.inference_mode()`` with ``--torch-threads`` threads on
``--torch-device``; the table gains the engine's ratios to it. PyTorch is the benchmark's optional extra
(`pip install .[peer]`).
``--kernel-table`` (default: the shipped table, where it fits this machine): the engine's tuned kernels
(`marketplace/kernel_table.py`); when a table is used, the same engines with tinygrad's heuristic kernels are
timed in the same rounds (``untuned_*`` columns, and ``tuned_speedup`` = plain / untuned plain).
"""

from __future__ import annotations

import argparse
import itertools
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from tinygrad import Device

from bench.common import print_table, rate, write_json
from marketplace.deltas import path_params
from marketplace.engine import Engine, leader_logits, leader_seeds
from marketplace.kernel_table import table_for
from marketplace.models import get_model
from marketplace.reconcile import fresh_seeds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="beautiful_mnist")
    ap.add_argument("--vendors", type=int, default=4)
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="short measurements (under 60 s)")
    ap.add_argument("--peer", choices=["none", "torch"], default="none", help="time the same model in PyTorch too")
    ap.add_argument("--torch-threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--torch-device", default="cpu", help="where the peer runs: cpu, or cuda beside DEV=CUDA")
    ap.add_argument("--kernel-table", default="shipped", help="tuned kernels (marketplace/kernel_table.py): "
                    "shipped, off, or a path; where one is used, the untuned engine is timed beside it")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.rounds = 1.0, 2

    spec = get_model(args.model)
    params = spec.init_params(0)
    S, V = len(spec.groups), args.vendors
    seeds = fresh_seeds(S, V, np.random.default_rng(0))
    rng = np.random.default_rng(1)
    batches = [int(b) for b in args.batches.split(",")]
    data = rng.uniform(0, 255, size=(max(batches), *spec.input_shape)).astype(np.float32)

    table = table_for(args.kernel_table, Device.DEFAULT)
    variants = {"": table, **({"untuned_": None} if table is not None else {})}  # column prefix -> kernels

    # naive: one leader engine at batch 1, with the weights of every path materialized up front
    naive_engine = Engine(spec, 1, buckets=[1], kernels=table)
    path_weights = {p: naive_engine.materialize(path_params(spec, params, seeds, np.array(p), 0.05),
                                                leader_seeds(spec), 0.05)
                    for p in itertools.product(range(V), repeat=S)}
    for w in list(path_weights.values())[:1]:
        naive_engine.warmup(w)

    peer = None
    if args.peer == "torch":
        import torch

        from bench.torch_peer import check_peer, torch_logits, torch_model

        torch.set_num_threads(args.torch_threads)
        peer = torch_model(spec, params, args.torch_device)
        probe = Engine(spec, 1, buckets=[16])
        check_peer(peer, spec, leader_logits(probe, params, data[:16]), data[:16])

    rows = []
    for batch in batches:
        x = data[:batch]
        runs: dict[str, Callable[[], int]] = {}
        for prefix, kernels in variants.items():
            plain = Engine(spec, 1, buckets=[batch], kernels=kernels)
            plain_w = plain.materialize(params, leader_seeds(spec), 0.05)
            pert = Engine(spec, V, max_batch=max(batch, V), kernels=kernels)
            pert_w = pert.materialize(params, seeds, 0.05)
            plain.warmup(plain_w)
            pert.warmup(pert_w, [pert.bucket_for(batch)])
            runs[f"{prefix}plain"] = lambda x=x, e=plain, w=plain_w: len(e.forward(w, x, rng)[0])
            runs[f"{prefix}perturbed"] = lambda x=x, e=pert, w=pert_w: len(e.forward(w, x, rng)[0])

        def run_naive(x=x) -> int:
            for i in range(len(x)):
                p = tuple(int(v) for v in rng.integers(0, V, size=S))
                naive_engine.forward(path_weights[p], x[i:i + 1], rng)
            return len(x)

        runs["naive"] = run_naive
        if peer is not None:
            runs["torch"] = lambda x=x: len(torch_logits(peer, spec, x))
        best = dict.fromkeys(runs, 0.0)
        for _ in range(args.rounds):
            for name, fn in runs.items():
                best[name] = max(best[name], rate(fn, args.seconds))
        row = {"batch": batch, "plain_per_s": best["plain"], "perturbed_per_s": best["perturbed"],
               "ratio": best["perturbed"] / best["plain"], "naive_per_s": best["naive"],
               "vs_naive": best["perturbed"] / best["naive"]}
        if table is not None:
            row.update(untuned_plain_per_s=best["untuned_plain"], untuned_perturbed_per_s=best["untuned_perturbed"],
                       tuned_speedup=best["plain"] / best["untuned_plain"])
        if peer is not None:
            row.update(torch_per_s=best["torch"], plain_vs_torch=best["plain"] / best["torch"],
                       perturbed_vs_torch=best["perturbed"] / best["torch"])
        rows.append(row)
        print_table(rows[-1:], list(rows[-1]))
    print()
    print_table(rows, list(rows[0]))
    write_json(args.json, {"benchmark": "inference", "model": args.model, "vendors": V, "peer": args.peer,
                           "torch_threads": args.torch_threads if peer is not None else None,
                           "torch_device": args.torch_device if peer is not None else None,
                           "kernel_table": args.kernel_table if table is not None else "off", "rows": rows})


if __name__ == "__main__":
    main()
