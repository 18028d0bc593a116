"""Engine.materialize per version: the old lazy graph vs the TinyJit path, side by side in one run.

    python -m bench.materialize [--quick] [--json docs/figures/materialize.json]

old: what materialize did before the JIT (a fresh lazy tinygrad graph per version: Threefry-2x32-20 from
`uniform_delta_tg`, then θ + δ per tensor, scheduled and realized), kept here only for the comparison; new:
`Engine.materialize` (one TinyJit per engine, fixed input buffers, fresh output buffers per version).
Every version has new seeds, parameters and eps; the first `--skip` versions of each (the compile, and the
JIT's capture) are left out. Old and new alternate version by version, so background load hits both
alike; the figures are the median and the best ms per version. The two paths are checked bit for bit.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
from tinygrad import Device, Tensor

from bench.common import print_table, write_json
from marketplace.deltas import vendor_signs
from marketplace.engine import Engine, PerturbedWeights
from marketplace.models import get_model
from marketplace.reconcile import fresh_seeds
from marketplace.threefry import uniform_delta_tg


def materialize_old(engine: Engine, params: dict[str, np.ndarray], seeds: np.ndarray, eps: float,
                    antithetic: bool = False) -> PerturbedWeights:
    """Engine.materialize as it was before the JIT: one lazy graph per version, scheduled every call."""
    seeds = np.asarray(seeds, dtype=np.uint64)
    tensors: list[Tensor] = []
    for s in range(len(engine.spec.groups)):
        shapes = engine.spec.group_shapes(s)
        total = sum(int(np.prod(v)) for v in shapes.values())
        delta = uniform_delta_tg(seeds[s], 0, total, eps, device=engine.device)
        if antithetic:
            delta = delta * Tensor(vendor_signs(engine.V, True).astype(np.float32)[:, None], device=engine.device)
        offset = 0
        for key, shape in shapes.items():
            size = int(np.prod(shape))
            theta = Tensor(np.ascontiguousarray(params[key], dtype=np.float32).reshape(1, size), device=engine.device)
            tensors.append((theta + delta[:, offset:offset + size]).reshape(engine.V, *shape).contiguous())
            offset += size
    Tensor.realize(*tensors)
    Device[engine.device].synchronize()
    return PerturbedWeights(0, seeds, float(eps), tuple(tensors))


def measure(model: str, vendors: int, versions: int, skip: int) -> dict[str, object]:
    spec = get_model(model)
    engine = Engine(spec, vendors, max_batch=vendors)
    rng = np.random.default_rng(0)
    times: dict[str, list[float]] = {"old": [], "new": []}
    first: dict[str, float] = {}
    for v in range(versions + skip):
        params = spec.init_params(v)
        seeds = fresh_seeds(len(spec.groups), vendors, rng)
        eps = float(rng.uniform(0.01, 0.1))
        out = {}
        for name, fn in (("old", lambda: materialize_old(engine, params, seeds, eps)),  # noqa: B023
                         ("new", lambda: engine.materialize(params, seeds, eps, v))):  # noqa: B023
            t = time.perf_counter()
            out[name] = fn()
            dt = time.perf_counter() - t
            if v == 0:
                first[name] = dt
            if v >= skip:
                times[name].append(dt)
        for a, b in zip(out["old"].tensors, out["new"].tensors, strict=True):
            if not np.array_equal(a.numpy().view(np.uint32), b.numpy().view(np.uint32)):
                raise AssertionError(f"{model}: old and new materialize differ in version {v}")
    old, new = statistics.median(times["old"]), statistics.median(times["new"])
    return {"model": model, "V": vendors, "versions": versions,
            "old_first_s": first["old"], "new_first_s": first["new"], "old_ms": old * 1e3, "new_ms": new * 1e3,
            "old_best_ms": min(times["old"]) * 1e3, "new_best_ms": min(times["new"]) * 1e3, "old/new": old / new}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mlp,beautiful_mnist")
    ap.add_argument("--vendors", type=int, default=4)
    ap.add_argument("--versions", type=int, default=20, help="timed versions per model")
    ap.add_argument("--skip", type=int, default=3, help="untimed first versions (compile, JIT capture)")
    ap.add_argument("--quick", action="store_true", help="5 timed versions")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    versions = 5 if args.quick else args.versions
    rows = [measure(m, args.vendors, versions, args.skip) for m in args.models.split(",")]
    print_table(rows, ["model", "V", "versions", "old_first_s", "new_first_s", "old_ms", "new_ms", "old_best_ms",
                       "new_best_ms", "old/new"])
    write_json(args.json, {"benchmark": "materialize", "rows": rows})


if __name__ == "__main__":
    main()
