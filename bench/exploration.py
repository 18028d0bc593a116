"""What exploration costs users: the leader's accuracy against what is served, per exploration setting.

    python -m bench.exploration --json docs/figures/exploration.json --plot docs/figures/exploration.png
    python -m bench.exploration --quick                   # 2,000 test images instead of 10,000

Every setting serves the full Fashion-MNIST test split through the engine exactly as the API does (balanced
vendor paths, V vendors of the shipped model's version 0, fresh seeds per repeat) and reports, side by side:

- leader accuracy (the unperturbed weights) and served accuracy (what users got), and their difference;
- mean KL(leader ‖ served) of the class distributions, in nats;
- served accuracy by how many groups the input's path perturbed (0 = the leader's path in every group).

Settings: paired probes (users get the leader's answer; the probe runs beside it) and single path at several
probe scales ε (users get the perturbed path's answer). The shipped default is paired.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from bench.common import print_table, save_figure, write_json
from common.loading import DEFAULT_ASSET, load_version, shipped_store
from marketplace.data import load_fashion_mnist
from marketplace.engine import Engine
from marketplace.reconcile import fresh_seeds

log = logging.getLogger("bench.exploration")

SINGLE_EPS = (0.05, 0.02, 0.01, 0.005)


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64) - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def serve(engine: Engine, params: dict[str, np.ndarray], x: np.ndarray, eps: float, paired: bool,
          seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(served logits, leader logits, paths) of ``x`` on one version with fresh seeds, batch by batch."""
    S = len(engine.spec.groups)
    weights = engine.materialize(params, fresh_seeds(S, engine.V, np.random.default_rng([seed, 1])), eps)
    rng = np.random.default_rng([seed, 2])
    served, leaders, paths = [], [], []
    for i in range(0, len(x), engine.max_batch):
        probe, path, leader = engine.forward_paired(weights, x[i:i + engine.max_batch], rng)
        served.append(leader if paired else probe)
        leaders.append(leader)
        paths.append(path)
    return np.concatenate(served), np.concatenate(leaders), np.concatenate(paths)


def measure(engine: Engine, params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, eps: float,
            paired: bool, repeats: int) -> dict[str, Any]:
    """Leader vs served figures of one setting, averaged over ``repeats`` seed sets."""
    S = len(engine.spec.groups)
    acc, lead_acc, kl, by_groups = [], [], [], {g: [] for g in range(S + 1)}
    for r in range(repeats):
        served, leader, paths = serve(engine, params, x, eps, paired, seed=r)
        ok = served.argmax(1) == y
        acc.append(ok.mean())
        lead_acc.append((leader.argmax(1) == y).mean())
        lp, lq = log_softmax(leader), log_softmax(served)
        kl.append(float((np.exp(lp) * (lp - lq)).sum(1).mean()))
        perturbed = (paths != 0).sum(1) if not paired else np.zeros(len(y), int)
        for g in range(S + 1):
            if (perturbed == g).any():
                by_groups[g].append(float(ok[perturbed == g].mean()))
    out = {"setting": "paired" if paired else "single", "probe_scale": eps, "leader_acc": float(np.mean(lead_acc)),
           "served_acc": float(np.mean(acc)), "served_acc_runs": [float(a) for a in acc],
           "kl_leader_served": float(np.mean(kl))}
    out["cost_points"] = 100 * (out["leader_acc"] - out["served_acc"])
    out["served_acc_by_perturbed_groups"] = {str(g): float(np.mean(v)) if v else None for g, v in by_groups.items()}
    return out


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    names = [f"{r['setting']}\nε={r['probe_scale']:g}" for r in results]
    axes[0].bar(names, [r["cost_points"] for r in results], color=["tab:green" if r["setting"] == "paired"
                                                                  else "tab:red" for r in results])
    axes[0].axhline(0.5, color="k", linestyle="--", linewidth=1, label="target: ≤ 0.5 points")
    axes[0].set_ylabel("leader − served accuracy (points)")
    axes[0].set_title("what exploration costs users (full test split)", fontsize=10)
    axes[0].legend()
    for r, name in zip(results, names, strict=True):
        groups = r["served_acc_by_perturbed_groups"]
        xs = [int(g) for g, v in groups.items() if v is not None]
        axes[1].plot(xs, [100 * groups[str(g)] for g in xs], marker="o", label=name.replace("\n", " "))
    axes[1].set_xlabel("groups the input's path perturbed")
    axes[1].set_ylabel("served accuracy (%)")
    axes[1].set_title("served accuracy by perturbed groups", fontsize=10)
    axes[1].legend(fontsize=8)
    save_figure(fig, path, dpi=100)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2,000 test images, one repeat")
    ap.add_argument("--repeats", type=int, default=2, help="seed sets per setting")
    ap.add_argument("--eps", type=float, nargs="*", default=list(SINGLE_EPS), help="single-path probe scales")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--plot", type=Path)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    loaded = load_version(shipped_store(), DEFAULT_ASSET, 0)
    test = load_fashion_mnist()["test"]
    n = 2000 if args.quick else len(test.y)
    repeats = 1 if args.quick else args.repeats
    x, y = test.x[:n].astype(np.float32), test.y[:n]
    engine = Engine(loaded.spec, loaded.vendors, buckets=[256])
    settings = [(loaded.eps, True)] + [(eps, False) for eps in args.eps]
    results = [measure(engine, loaded.params, x, y, eps, paired, repeats)
               for eps, paired in tqdm(settings, desc="settings")]
    rows = [{"setting": r["setting"], "ε": r["probe_scale"], "leader": f"{100 * r['leader_acc']:.2f}%",
             "served": f"{100 * r['served_acc']:.2f}%", "cost (points)": f"{r['cost_points']:.2f}",
             "KL(leader‖served)": f"{r['kl_leader_served']:.4f}",
             **{f"{g} groups": "-" if v is None else f"{100 * v:.1f}%"
                for g, v in r["served_acc_by_perturbed_groups"].items()}} for r in results]
    print_table(rows, list(rows[0]), markdown=True)
    payload = {"model": f"shipped {DEFAULT_ASSET} v0 ({loaded.spec.name})", "test_images": n, "repeats": repeats,
               "vendors": loaded.vendors, "results": results}
    write_json(args.json, payload)
    if args.plot:
        plot(results, args.plot)
    return payload


if __name__ == "__main__":
    main()
