"""tinygrad's CPU levers, each measured by `bench.inference` with the PyTorch peer beside it, in one table.

    python -m bench.kernel_levers [--batches 64,256] [--json results/kernel_levers.json]

A lever set in the environment (a renderer, threading) holds for a whole process, so each runs
`bench.inference --peer torch` in a child of its own and the table compares ratios to PyTorch measured in
the same child (absolute rates move with the machine's load; the ratio to a peer timed alongside does not).
A lever that fails (a renderer this machine cannot run) is recorded with its error.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.common import print_table, write_json

REPO = Path(__file__).resolve().parents[1]
# name -> (environment, bench.inference flags)
LEVERS: dict[str, tuple[dict[str, str], list[str]]] = {
    "heuristics (tinygrad's default)": ({}, ["--kernel-table", "off"]),
    "shipped table (BEAM=2, cached)": ({}, ["--kernel-table", "shipped"]),
    "THREADS=0 (one thread a kernel)": ({"THREADS": "0"}, ["--kernel-table", "off"]),
    "LLVM renderer (DEV=CPU:LLVM)": ({"DEV": "CPU:LLVM"}, ["--kernel-table", "off"]),
    "x86 renderer (DEV=CPU:X86)": ({"DEV": "CPU:X86"}, ["--kernel-table", "off"]),
}


def run_lever(env: dict[str, str], flags: list[str], batches: str, seconds: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "inference.json"
        proc = subprocess.run([sys.executable, "-m", "bench.inference", "--peer", "torch", "--batches", batches,
                               "--seconds", str(seconds), "--rounds", "2", *flags, "--json", str(out)],
                              env={**os.environ, "PYTHONPATH": str(REPO), **env}, cwd=REPO, capture_output=True,
                              text=True, timeout=1800)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
            return {"error": tail[:200]}
        return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--levers", default=",".join(str(i) for i in range(len(LEVERS))),
                    help="which levers, by index in the table's order")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    names = [list(LEVERS)[int(i)] for i in args.levers.split(",")]
    rows: list[dict[str, Any]] = []
    for name in names:
        env, flags = LEVERS[name]
        print(f"{name} ...", flush=True)
        got = run_lever(env, flags, args.batches, args.seconds)
        if "error" in got:
            rows.append({"lever": name, "batch": "-", "plain_per_s": "-", "perturbed_per_s": "-", "torch_per_s": "-",
                         "plain_vs_torch": "-", "perturbed_vs_plain": "-", "error": got["error"]})
            continue
        for r in got["rows"]:
            rows.append({"lever": name, "batch": r["batch"], "plain_per_s": r["plain_per_s"],
                         "perturbed_per_s": r["perturbed_per_s"], "torch_per_s": r["torch_per_s"],
                         "plain_vs_torch": r["plain_vs_torch"], "perturbed_vs_plain": r["ratio"], "error": ""})
        print_table(rows[-len(got["rows"]):], list(rows[-1]))
    print()
    print_table(rows, list(rows[0]))
    write_json(args.json, {"benchmark": "kernel_levers", "batches": args.batches, "rows": rows})


if __name__ == "__main__":
    main()
