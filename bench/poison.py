"""Poisoned feedback: do the outlier filter and the validation guard keep the model when labels lie?

    python -m bench.poison --quick                                  # 150 steps, 6 runs, 2 processes: < 3 min
    python -m bench.poison --steps 2000 --jobs 2 --json docs/figures/poison.json --md docs/figures/poison.md \\
        --plot docs/figures/poison.png

Setting: an mlp base trained by backprop on every class of Fashion-MNIST (`bench.continual.train_base`); the
traffic is the train split (less a held-out slice, the guard's holdout), 256 labelled inputs per step, V=4, one
reconciliation per step, by `bench.continual.run_engine`: the worker's own configs and guard (`judge_candidate`).
Conditions, on the same base, traffic and seeds (only the labels the clients send differ):

- clean: every label true;
- random: a share (20%) of each step's labels replaced by a uniformly drawn wrong label;
- adversarial: one client owns a share (1/8) of the traffic and labels every input of one class (0) as another
  fixed class (6), the same wrong label every time; its other inputs it labels truly.

Defenses: none, the outlier filter (per cohort, on loss), the validation guard (anchor reference, re-seeding after
a refusal), both. Reported: accuracy of the leader (unperturbed) weights on the test split, all classes and the
attacked class, at checkpoints, with the difference from the clean run with the same defense and from the clean
undefended run; how many candidates the guard refused.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import save_figure, write_json

log = logging.getLogger("bench.poison")

NUM_CLASSES = 10


# ------------------------------------------------------------------------------------------------ label corruption
def random_wrong_labels(y: np.ndarray, rate: float, num_classes: int, rng: np.random.Generator) -> np.ndarray:
    """A copy of ``y`` with round(rate·n) labels, at random positions, replaced by a uniformly drawn *wrong* label."""
    if not 0 <= rate <= 1 or num_classes < 2:
        raise ValueError("rate must lie in [0, 1] and there must be at least two classes")
    out = np.array(y, dtype=np.int64, copy=True)
    idx = rng.choice(len(out), int(round(rate * len(out))), replace=False)
    out[idx] = (out[idx] + rng.integers(1, num_classes, len(idx))) % num_classes  # never the true label
    return out


def targeted_labels(y: np.ndarray, share: float, source: int, target: int, rng: np.random.Generator) -> np.ndarray:
    """A copy of ``y`` where one client, owning round(share·n) random positions, labels class ``source`` ``target``."""
    if not 0 <= share <= 1 or source == target:
        raise ValueError("share must lie in [0, 1] and the target must differ from the source")
    out = np.array(y, dtype=np.int64, copy=True)
    mine = np.zeros(len(out), bool)
    mine[rng.choice(len(out), int(round(share * len(out))), replace=False)] = True
    out[mine & (out == source)] = target
    return out


@dataclass(frozen=True)
class Condition:
    """How the clients label: name, and the relabelling (None: truly)."""

    name: str
    kind: str  # clean | random | targeted
    rate: float = 0.0  # random: share of labels replaced; targeted: the client's share of traffic
    source: int = 0
    target: int = 6

    def relabel(self):  # noqa: ANN201 - a callable for run_engine, or None
        if self.kind == "clean":
            return None
        if self.kind == "random":
            return partial(_random, rate=self.rate)
        return partial(_targeted, share=self.rate, source=self.source, target=self.target)


def _random(y: np.ndarray, rng: np.random.Generator, rate: float) -> np.ndarray:
    return random_wrong_labels(y, rate, NUM_CLASSES, rng)


def _targeted(y: np.ndarray, rng: np.random.Generator, share: float, source: int, target: int) -> np.ndarray:
    return targeted_labels(y, share, source, target, rng)


def conditions(args: argparse.Namespace) -> list[Condition]:
    out = [Condition("clean", "clean"),
           Condition(f"random {100 * args.noise:g}%", "random", args.noise),
           Condition(f"adversarial 1/{round(1 / args.adv_share)}: {args.source}→{args.target}", "targeted",
                     args.adv_share, args.source, args.target)]
    if args.adv_all:  # the stronger form: every input of the class, whoever sends it
        out.append(Condition(f"adversarial all: {args.source}→{args.target}", "targeted", 1.0, args.source,
                             args.target))
    return out


def defenses(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    filt = {"outlier": args.outlier, "outlier_z": args.outlier_z, "outlier_quantile": args.outlier_quantile}
    guard = {"guard": True, "guard_tolerance": args.guard_tolerance, "guard_reference": "anchor",
             "reseed_on_refusal": True}
    what = f"z={args.outlier_z:g}" if args.outlier == "zscore" else f"q={args.outlier_quantile:g}"
    return {"none": {}, f"filter ({args.outlier} {what})": filt, f"guard (ε={args.guard_tolerance:g})": guard,
            "filter + guard": {**filt, **guard}}


# ------------------------------------------------------------------------------------------------ runs
def poison_protocol():  # noqa: ANN201
    """Every class known; the "new" test set of bench.continual becomes the attacked class's test images."""
    from bench.continual import Protocol

    return Protocol("poison", new_class=0, exclude_class=None, rotate=False)


def class_accuracy(run: Any, test: Any) -> dict[str, Any]:
    """Leader accuracy on the test split per class (for the attacked class and the one it is pushed to)."""
    from marketplace.engine import leader_logits

    pred = leader_logits(run.eval_engine, run.params, test.x.astype(np.float32)).argmax(1)
    return {"class_acc": [float(np.mean(pred[test.y == c] == c)) for c in range(NUM_CLASSES)]}


def _one(job: tuple[Condition, str, dict[str, Any], dict[str, np.ndarray], int, int, int, int]) -> dict[str, Any]:
    """One condition x defense in its own process (tinygrad state is per process)."""
    from bench.continual import make_streams, run_engine
    from marketplace.data import load_fashion_mnist
    from marketplace.models import get_model

    cond, defense, options, base, hidden, steps, every, holdout_size = job
    protocol = poison_protocol()
    data = load_fashion_mnist()
    streams = make_streams(protocol, data, holdout_size, 0)
    spec = get_model("mlp", {"hidden": [hidden]})
    out = run_engine(spec, base, streams, {**options}, steps, every, old_n=256, new_n=0, progress=False,
                     desc=f"{cond.name} / {defense}", relabel=cond.relabel(),
                     extra_eval=partial(class_accuracy, test=data["test"]))
    return {"condition": cond.name, "defense": defense, "options": options, **out}


def filter_trial(spec: Any, base: dict[str, np.ndarray], conds: list[Condition], holdout_size: int,
                 batches: int = 8) -> list[dict[str, Any]]:
    """Which outlier filter to use: the share of poisoned and of true records each drops, on the base model's
    served losses (the filter sees a cohort's losses, before any baseline), over a few steps of traffic."""
    from bench.continual import EngineRun, make_streams, step_batch, worker_settings
    from marketplace.data import load_fashion_mnist
    from marketplace.reconcile import ReconcileConfig, cross_entropy, keep_mask

    streams = make_streams(poison_protocol(), load_fashion_mnist(), holdout_size, 0)
    run = EngineRun(spec, base, worker_settings({}), False, streams.holdout)
    filters = {"zscore z=3": ReconcileConfig(outlier="zscore", outlier_z=3.0),
               "zscore z=2": ReconcileConfig(outlier="zscore", outlier_z=2.0),
               "zscore z=1.5": ReconcileConfig(outlier="zscore", outlier_z=1.5),
               "quantile q=0.02": ReconcileConfig(outlier="quantile", outlier_quantile=0.02),
               "quantile q=0.1": ReconcileConfig(outlier="quantile", outlier_quantile=0.1)}
    data_rng, path_rng, label_rng = (np.random.default_rng([0, k]) for k in (3, 2, 6))
    counts = {(c.name, f): np.zeros(4) for c in conds if c.kind != "clean" for f in filters}
    for _ in range(batches):
        x, y, _ = step_batch(streams, data_rng, 256, 0)
        weights = run.engine.materialize(run.params, run.seeds, run.eps, 0)
        logits, _ = run.engine.forward(weights, x, path_rng)
        for c in conds:
            if c.kind == "clean":
                continue
            sent = c.relabel()(y, label_rng)
            bad, loss = sent != y, cross_entropy(logits, sent)
            for f, config in filters.items():
                drop = ~keep_mask(loss, config)
                counts[(c.name, f)] += [(drop & bad).sum(), bad.sum(), (drop & ~bad).sum(), (~bad).sum()]
    return [{"condition": c, "filter": f, "poisoned_dropped": n[0] / max(n[1], 1), "true_dropped": n[2] / n[3]}
            for (c, f), n in counts.items()]


def summarize(results: list[dict[str, Any]], checkpoints: list[int], source: int, target: int
              ) -> list[dict[str, Any]]:
    """Per run and checkpoint: test accuracy (all, attacked class, target class), differences from the clean runs."""
    by = {(r["condition"], r["defense"]): {p["step"]: p for p in r["curve"]} for r in results}
    clean_name = results[0]["condition"]  # conditions run in order, clean first
    none_name = results[0]["defense"]
    rows = []
    for r in results:
        at = {}
        for c in checkpoints:
            p = by[(r["condition"], r["defense"])].get(c)
            same = by.get((clean_name, r["defense"]), {}).get(c)
            plain = by.get((clean_name, none_name), {}).get(c)
            if p is None:
                continue
            at[str(c)] = {
                "acc": p["old_val_acc"], "attacked_acc": p["class_acc"][source], "target_acc": p["class_acc"][target],
                "vs_clean_same_defense": None if same is None else 100 * (p["old_val_acc"] - same["old_val_acc"]),
                "attacked_vs_clean_same_defense": None if same is None else
                100 * (p["class_acc"][source] - same["class_acc"][source]),
                "vs_clean_undefended": None if plain is None else 100 * (p["old_val_acc"] - plain["old_val_acc"]),
                "attacked_vs_clean_undefended": None if plain is None else
                100 * (p["class_acc"][source] - plain["class_acc"][source]),
                "refused": p.get("refused", 0)}
        rows.append({"condition": r["condition"], "defense": r["defense"], "at": at, "refused": r["refused"],
                     "seconds": r["seconds"], "base_acc": by[(r["condition"], r["defense"])][0]["old_val_acc"]})
    return rows


def markdown(rows: list[dict[str, Any]], checkpoints: list[int], title: str, source: int) -> str:
    head = ["condition", "defense"] + [f"step {c}: all (Δ clean same def., Δ clean undef.) / class {source} (Δ, Δ)"
                                       for c in checkpoints] + ["refused", "seconds"]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(head)
                                                                                                     - 2)) + "|"]

    def d(v: float | None) -> str:
        return "-" if v is None else f"{v:+.1f}"

    for r in rows:
        cells = [r["condition"], r["defense"]]
        for c in checkpoints:
            a = r["at"].get(str(c))
            cells.append("-" if a is None else
                         f"{100 * a['acc']:.1f}% ({d(a['vs_clean_same_defense'])}, {d(a['vs_clean_undefended'])}) / "
                         f"{100 * a['attacked_acc']:.1f}% ({d(a['attacked_vs_clean_same_defense'])}, "
                         f"{d(a['attacked_vs_clean_undefended'])})")
        cells += [str(r["refused"]), f"{r['seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict[str, Any]], source: int, title: str, path: Path) -> None:
    """Test accuracy vs step, one column per condition: all classes (top), the attacked class (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conds = list(dict.fromkeys(r["condition"] for r in results))
    defs = list(dict.fromkeys(r["defense"] for r in results))
    colors = dict(zip(defs, ("tab:gray", "tab:blue", "tab:orange", "tab:green", "tab:red"), strict=False))
    fig, axes = plt.subplots(2, len(conds), figsize=(4.6 * len(conds), 7.5), squeeze=False, sharex=True)
    for j, cond in enumerate(conds):
        for r in (r for r in results if r["condition"] == cond):
            steps = [p["step"] for p in r["curve"]]
            axes[0, j].plot(steps, [100 * p["old_val_acc"] for p in r["curve"]], color=colors[r["defense"]],
                            label=r["defense"])
            axes[1, j].plot(steps, [100 * p["class_acc"][source] for p in r["curve"]], color=colors[r["defense"]],
                            label=r["defense"])
        axes[0, j].set_title(cond, fontsize=10)
        axes[1, j].set_xlabel("step (256 labelled inputs each)")
        for i in range(2):
            axes[i, j].grid(alpha=0.3)
    axes[0, 0].set_ylabel("test accuracy, all classes (%)")
    axes[1, 0].set_ylabel(f"test accuracy, class {source} (%)")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(title)
    save_figure(fig, path, dpi=90)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--checkpoints", default=None, help="comma-separated step counts for the table")
    ap.add_argument("--hidden", type=int, default=128, help="mlp hidden width")
    ap.add_argument("--base-steps", type=int, default=400, help="backprop steps of the shared base model")
    ap.add_argument("--base-npz", type=Path, default=None, help="cache of the base model's weights (.npz)")
    ap.add_argument("--holdout-size", type=int, default=2000, help="the guard's holdout (a slice of the train split)")
    ap.add_argument("--noise", type=float, default=0.2, help="random condition: share of labels replaced")
    ap.add_argument("--adv-share", type=float, default=1 / 8, help="adversarial client's share of the traffic")
    ap.add_argument("--adv-all", action="store_true", help="also: every input of the class relabelled")
    ap.add_argument("--source", type=int, default=0, help="the attacked class")
    ap.add_argument("--target", type=int, default=6, help="the label the adversary gives it")
    ap.add_argument("--outlier", choices=["zscore", "quantile"], default="zscore")
    ap.add_argument("--outlier-z", type=float, default=2.0)
    ap.add_argument("--outlier-quantile", type=float, default=0.02)
    ap.add_argument("--guard-tolerance", type=float, default=0.005)
    ap.add_argument("--learning-rate", type=float, default=0.5)
    ap.add_argument("--probe-scale", type=float, default=0.05)
    ap.add_argument("--only-conditions", default=None, help="comma-separated prefixes of condition names")
    ap.add_argument("--only-defenses", default=None, help="comma-separated prefixes of defense names")
    ap.add_argument("--filter-trial", action="store_true",
                    help="only print which records each candidate outlier filter drops, on the base model")
    ap.add_argument("--jobs", type=int, default=1, help="variants in parallel processes")
    ap.add_argument("--quick", action="store_true",
                    help="150 steps, base of 300 backprop steps, defenses none and filter + guard, 2 processes")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--md", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.quick:  # a step costs ~0.25 s (~0.5 s with the guard) on one core
        args.steps, args.base_steps, args.jobs = min(args.steps, 150), 300, max(args.jobs, 2)
        args.only_defenses = args.only_defenses or "none,filter +"
        args.checkpoints = args.checkpoints if args.checkpoints and max(map(int, args.checkpoints.split(","))) \
            <= args.steps else "50,100,150"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    checkpoints = [int(c) for c in args.checkpoints.split(",")] if args.checkpoints else \
        [args.steps // 4, args.steps // 2, args.steps]
    points = 10 if args.quick else 20  # the table's steps, and a divisor of them that gives this many plot points
    every = int(np.gcd.reduce(checkpoints))
    every = max((d for d in range(1, every + 1) if every % d == 0 and args.steps // d >= points), default=every)

    from bench.continual import make_streams, train_base
    from marketplace.data import load_fashion_mnist
    from marketplace.models import get_model

    spec = get_model("mlp", {"hidden": [args.hidden]})
    if args.base_npz and args.base_npz.exists():
        with np.load(args.base_npz, allow_pickle=False) as z:
            base = {k: z[k] for k in z.files}
    else:
        streams = make_streams(poison_protocol(), load_fashion_mnist(), args.holdout_size, 0)
        t0 = time.perf_counter()
        base = train_base(spec, streams, poison_protocol(), args.base_steps, 0)
        log.info("base model: %d backprop steps in %.1f s", args.base_steps, time.perf_counter() - t0)
        if args.base_npz:
            np.savez(args.base_npz, **base)
    plain = {"learning_rate": args.learning_rate, "probe_scale": args.probe_scale}
    if args.filter_trial:
        trial = filter_trial(spec, base, conditions(args), args.holdout_size)
        print("| condition | filter | poisoned records dropped | true records dropped |\n|---|---|---:|---:|")
        for t in trial:
            print(f"| {t['condition']} | {t['filter']} | {100 * t['poisoned_dropped']:.0f}% | "
                  f"{100 * t['true_dropped']:.1f}% |")
        return {"filter_trial": trial}
    conds = [c for c in conditions(args) if not args.only_conditions
             or any(c.name.startswith(p) for p in args.only_conditions.split(","))]
    defs = {n: o for n, o in defenses(args).items() if not args.only_defenses
            or any(n.startswith(p) for p in args.only_defenses.split(","))}
    jobs = [(c, name, {**plain, **opt}, base, args.hidden, args.steps, every, args.holdout_size)
            for c in conds for name, opt in defs.items()]
    start = time.perf_counter()
    results: list[dict[str, Any]] = []

    def output(final: bool) -> dict[str, Any]:  # after every run, so a stopped benchmark leaves what it measured
        rows = summarize(results, checkpoints, args.source, args.target)
        title = (f"Poisoned feedback, mlp ({args.base_steps} backprop steps, all classes), {args.steps} steps of 256 "
                 f"labelled train inputs, V=4, η={args.learning_rate:g}, ε={args.probe_scale:g}; test accuracy of "
                 f"the leader weights" + ("" if final else f" (partial: {len(results)} of {len(jobs)} runs)"))
        md = markdown(rows, checkpoints, title, args.source)
        payload = {"model": spec.name, "steps": args.steps, "checkpoints": checkpoints,
                   "base_steps": args.base_steps, "holdout_size": args.holdout_size, "source": args.source,
                   "target": args.target, "conditions": [c.__dict__ for c in conds], "defenses": defs, "rows": rows,
                   "seconds": time.perf_counter() - start, "partial": not final,
                   # the worker settings every run starts from; each defense's own options are under "defenses"
                   "base_settings": {**results[0]["settings"], "outlier": "none", "guard": False} if results else {},
                   "curves": {f"{r['condition']} / {r['defense']}": r["curve"] for r in results}}
        if args.json:
            write_json(args.json, payload)
        if args.md:
            args.md.parent.mkdir(parents=True, exist_ok=True)
            args.md.write_text(md)
        if args.plot:
            plot(results, args.source, f"Poisoned feedback, {args.steps} steps (mlp, V=4)", args.plot)
        if final:
            print(md)
        return payload

    def done(r: dict[str, Any]) -> None:
        log.info("%s / %s done in %.0f s", r["condition"], r["defense"], r["seconds"])
        results.append(r)
        if len(results) < len(jobs):
            output(False)

    if args.jobs > 1:
        with mp.get_context("spawn").Pool(args.jobs) as pool:
            for r in pool.imap(_one, jobs):
                done(r)
    else:
        for j in jobs:
            done(_one(j))
    return output(True)


if __name__ == "__main__":
    main()
