"""A/B of the learning options on one continual-learning protocol: same base model, same traffic, same seeds.

    python -m bench.continual_ablation --protocol A --steps 1200 --checkpoints 300,600,1200 --jobs 2 \\
        --json docs/figures/continual_ablation.json --md docs/figures/continual_ablation.md

Every variant runs `bench.continual.run_engine` (the one code path of the experiments) with the plain
algorithm's settings plus one option; `--best` adds a combination, `--grid-eps` / `--grid-lr` tune the probe
scale ε and the step size η separately (one varied, the other at its plain value). The table gives, at fixed
step counts, the new data's validation accuracy and the known data's, with its drop from the base model.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import write_json
from bench.continual import PROTOCOLS, Protocol, make_streams, run_engine, train_base
from marketplace.data import load_fashion_mnist
from marketplace.models import get_model

log = logging.getLogger("bench.continual_ablation")

#: the plain algorithm, spelled out so that a change of the worker's defaults does not change what "plain" means
PLAIN: dict[str, Any] = {"learning_rate": 0.5, "probe_scale": 0.05, "attribution": "zscore", "normalize": "model",
                         "class_weights": False, "baseline": "none", "outlier": "none", "antithetic": False,
                         "momentum": 0.0, "lr_schedule": "constant"}
OPTIONS: dict[str, dict[str, Any]] = {
    "plain": {},
    "antithetic pairs": {"antithetic": True},
    "rank shaping": {"attribution": "rank"},
    "momentum 0.5": {"momentum": 0.5},
    "loss-gap LR schedule": {"lr_schedule": "loss_gap"},
    "class weights": {"class_weights": True},
    "class-mean baseline": {"baseline": "class"},
    "validation guard": {"guard": True},
}


def variants(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    plain = {**PLAIN, "learning_rate": args.learning_rate, "probe_scale": args.probe_scale}
    out = {name: {**plain, **opt} for name, opt in OPTIONS.items()
           if not args.only or name in args.only.split(",")}
    for eps in args.grid_eps:
        out[f"ε={eps:g} (η={plain['learning_rate']:g})"] = {**plain, "probe_scale": eps}
    for lr in args.grid_lr:
        out[f"η={lr:g} (ε={plain['probe_scale']:g})"] = {**plain, "learning_rate": lr}
    if args.best:
        out["best combination"] = {**plain, **json.loads(args.best)}
    for combo in args.combo:
        name, _, spec = combo.partition("={")  # a name may hold "=" itself (ε=0.1)
        spec = "{" + spec
        out[name] = {**plain, **json.loads(spec)}
    return out


def _one(job: tuple[str, dict[str, Any], str, dict[str, np.ndarray], str, int, int, int]) -> dict[str, Any]:
    """One variant in its own process (tinygrad state is per process)."""
    name, options, protocol_name, base, model, hidden, steps, every = job
    protocol = PROTOCOLS[protocol_name]
    streams = make_streams(protocol, load_fashion_mnist(), 2000, 0)
    spec = get_model(model, {"hidden": [hidden]} if model == "mlp" else None)
    out = run_engine(spec, base, streams, options, steps, every, progress=False, desc=name)
    return {"option": name, "options": options, **out}


def summarize(results: list[dict[str, Any]], checkpoints: list[int]) -> list[dict[str, Any]]:
    """Per option and checkpoint: new and known validation accuracy, and the known accuracy's drop from step 0."""
    rows = []
    for r in results:
        by_step = {p["step"]: p for p in r["curve"]}
        base_old = by_step[0]["old_val_acc"]
        at = {}
        for c in checkpoints:
            p = by_step.get(c)
            if p is not None:
                at[str(c)] = {"new_val_acc": p["new_val_acc"], "old_val_acc": p["old_val_acc"],
                              "new_loss": p["new_loss"], "old_loss": p["old_loss"],
                              "old_drop_points": 100 * (base_old - p["old_val_acc"]), "refused": p.get("refused", 0)}
        rows.append({"option": r["option"], "options": r["options"], "base_old_val_acc": base_old, "at": at,
                     "seconds": r["seconds"], "refused": r["refused"]})
    return rows


def markdown(rows: list[dict[str, Any]], checkpoints: list[int], title: str) -> str:
    head = ["option"] + [f"step {c}: new / known (change), new loss" for c in checkpoints] + ["refused", "seconds"]
    rule = "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", rule]
    for r in rows:
        cells = [r["option"]]
        for c in checkpoints:
            a = r["at"].get(str(c))
            if a is None:
                cells.append("-")
                continue
            new, old, change = 100 * a["new_val_acc"], 100 * a["old_val_acc"], -a["old_drop_points"]
            cells.append(f"{new:.1f}% / {old:.1f}% ({change:+.1f}), {a['new_loss']:.2f}")
        cells += [str(r["refused"]), f"{r['seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--protocol", choices=sorted(PROTOCOLS), default="A")
    ap.add_argument("--model", default="mlp")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--base-steps", type=int, default=300, help="backprop steps of the shared base model")
    ap.add_argument("--base-npz", type=Path, default=None, help="cache of the base model's weights (.npz)")
    ap.add_argument("--steps", type=int, default=1200)
    ap.add_argument("--checkpoints", default=None, help="comma-separated step counts for the table")
    ap.add_argument("--learning-rate", type=float, default=PLAIN["learning_rate"])
    ap.add_argument("--probe-scale", type=float, default=PLAIN["probe_scale"])
    ap.add_argument("--only", default=None, help="comma-separated option names (default: all)")
    ap.add_argument("--grid-eps", type=lambda s: [float(v) for v in s.split(",")], default=[])
    ap.add_argument("--grid-lr", type=lambda s: [float(v) for v in s.split(",")], default=[])
    ap.add_argument("--best", default=None, help="JSON of the combination to add, e.g. '{\"baseline\": \"class\"}'")
    ap.add_argument("--combo", action="append", default=[], metavar="NAME=JSON",
                    help="a named combination of options (repeatable), e.g. 'mine={\"momentum\": 0.5}'")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--md", type=Path, default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    checkpoints = [int(c) for c in args.checkpoints.split(",")] if args.checkpoints else \
        [args.steps // 4, args.steps // 2, args.steps]
    every = int(np.gcd.reduce(checkpoints))
    protocol: Protocol = PROTOCOLS[args.protocol]
    spec = get_model(args.model, {"hidden": [args.hidden]} if args.model == "mlp" else None)
    if args.base_npz and args.base_npz.exists():
        base = dict(np.load(args.base_npz))
    else:
        streams = make_streams(protocol, load_fashion_mnist(), 2000, 0)
        base = train_base(spec, streams, protocol, args.base_steps, 0)
        if args.base_npz:
            np.savez(args.base_npz, **base)
    jobs = [(name, opt, protocol.name, base, args.model, args.hidden, args.steps, every)
            for name, opt in variants(args).items()]
    start = time.perf_counter()
    if args.jobs > 1:
        with mp.get_context("spawn").Pool(args.jobs) as pool:
            results = []
            for r in pool.imap(_one, jobs):
                log.info("%s done in %.0f s", r["option"], r["seconds"])
                results.append(r)
    else:
        results = [_one(j) for j in jobs]
    rows = summarize(results, checkpoints)
    title = (f"Protocol {protocol.name}, {spec.name}, {args.steps} steps of 240 known + 16 new, V=4; "
             f"plain: η={args.learning_rate:g}, ε={args.probe_scale:g}")
    md = markdown(rows, checkpoints, title)
    print(md)
    payload = {"protocol": protocol.name, "model": spec.name, "steps": args.steps, "checkpoints": checkpoints,
               "base_steps": args.base_steps, "rows": rows, "seconds": time.perf_counter() - start,
               "curves": {r["option"]: r["curve"] for r in results}}
    write_json(args.json, payload)
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(md)
    return payload


if __name__ == "__main__":
    main()
