"""How close each forward-only estimate of the head's gradient comes to the true gradient, side by side.

    python -m bench.head_gradient --json docs/figures/head_gradient.json --plot docs/figures/head_gradient.png

On one protocol-A batch after another (240 known images + 16 of the new class, the mlp base of bench.continual),
every estimator sees the same probes (V vendors of the head, vendor 0 the leader, ε = 0.05) and the same records:

- spsa: the loss difference of each record times its vendor's delta, 3/(ε²·n)·Σ d_i·δ_i (what every other group
  gets, marketplace.reconcile);
- logits: the head's gradient from the logits its probes moved (marketplace.head.head_gradient, the default);

and the table gives the mean cosine of each to the exact gradient of the batch's mean loss over the head.
The mlp's features are computed here in NumPy (ReLU(W₀x + b₀)) only to build the records and the exact
gradient; the estimators see what a record holds: path, loss, logits.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from bench.common import save_figure, write_json
from bench.continual import PROTOCOLS, make_streams, step_batch, train_base
from marketplace.data import load_fashion_mnist
from marketplace.deltas import group_delta
from marketplace.head import head_gradient, linear_head, softmax
from marketplace.models import mlp
from marketplace.reconcile import VersionSeeds, cross_entropy, fresh_seeds

log = logging.getLogger("bench.head_gradient")


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def one_batch(params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, V: int, eps: float,
              rng: np.random.Generator) -> dict[str, float]:
    """Cosines of both estimates to the exact gradient, on one batch under fresh seeds."""
    spec = mlp()
    w_key, b_key = linear_head(spec)  # type: ignore[misc]
    h = np.maximum(x.reshape(len(x), -1) * spec.input_scale @ params["0.fc.weight"].T + params["0.fc.bias"], 0)
    h = h.astype(np.float64)
    seeds = fresh_seeds(2, V, rng, learned=np.array([False, True]))
    vendor = rng.integers(0, V, len(y))
    leader = h @ params[w_key].T.astype(np.float64) + params[b_key]
    probe = leader.copy()
    flat_delta = np.zeros((V, 10 + 10 * h.shape[1]))  # sorted keys: bias, then weight
    for v in range(1, V):
        d = group_delta(spec, 1, int(seeds[1, v]), eps)
        rows = vendor == v
        probe[rows] += h[rows] @ d[w_key].T.astype(np.float64) + d[b_key]
        flat_delta[v] = np.concatenate([d[b_key].ravel(), d[w_key].ravel()])
    G = softmax(leader)
    G[np.arange(len(y)), y] -= 1.0
    exact = np.concatenate([G.mean(0), (G.T @ h / len(y)).ravel()])
    diff = cross_entropy(probe, y) - cross_entropy(leader, y)
    spsa = 3.0 / (eps * eps * len(y)) * (diff @ flat_delta[vendor])
    path = np.stack([np.zeros_like(vendor), vendor], axis=1)  # group 0 runs unperturbed (seed 0), as by default
    est, _ = head_gradient(spec, probe, leader, y, np.zeros(len(y), np.int64), path,  # type: ignore[misc]
                           {0: VersionSeeds(seeds, eps)}, np.ones(len(y), bool))
    return {"spsa": cosine(spsa, exact), "logits": cosine(est, exact)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vendors", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--batches", type=int, default=20, help="batches per setting")
    ap.add_argument("--probe-scale", type=float, default=0.05)
    ap.add_argument("--base-npz", type=Path, default=None, help="the protocol-A mlp base (bench.continual's cache)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    protocol = PROTOCOLS["A"]
    streams = make_streams(protocol, load_fashion_mnist(), 1000, args.seed)
    if args.base_npz and args.base_npz.exists():
        with np.load(args.base_npz, allow_pickle=False) as z:
            params = {k: z[k] for k in z.files}
    else:
        params = train_base(mlp(), streams, protocol, 300, args.seed)
    rng = np.random.default_rng(args.seed)
    rows = []
    for V in tqdm(args.vendors, desc="vendors"):
        cos = [one_batch(params, *step_batch(streams, rng, 240, 16)[:2], V, args.probe_scale, rng)
               for _ in range(args.batches)]
        rows.append({"vendors": V, **{k: float(np.mean([c[k] for c in cos])) for k in ("spsa", "logits")}})
    print(f"{'V':>4} {'spsa':>8} {'logits':>8} {'ratio':>7}")
    for r in rows:
        print(f"{r['vendors']:>4} {r['spsa']:>8.3f} {r['logits']:>8.3f} {r['logits'] / r['spsa']:>6.1f}×")
    payload = {"rows": rows, "batches": args.batches, "probe_scale": args.probe_scale, "seed": args.seed,
               "base": str(args.base_npz) if args.base_npz else "backprop 300 steps"}
    if args.json:
        write_json(args.json, payload)
    if args.plot:
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.5))
        for key in ("spsa", "logits"):
            ax.plot([r["vendors"] for r in rows], [r[key] for r in rows], marker="o", label=key)
        ax.set(xlabel="vendors of the head (V)", ylabel="cosine to the exact gradient", xscale="log", ylim=(0, 1),
               title="head gradient, a batch of 256 (mlp, A)")
        ax.set_xticks([r["vendors"] for r in rows], [str(r["vendors"]) for r in rows])
        ax.minorticks_off()
        ax.legend()
        save_figure(fig, args.plot)
    return payload


if __name__ == "__main__":
    main()
