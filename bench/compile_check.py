"""Compile every kernel of serving and of the worker's learning path for CUDA, on a machine without a GPU.

    python -m bench.compile_check [--renderer CUDA|PTX] [--arch sm_90] [--buckets ends|all] [--json PATH]

tinygrad's NULL device renders each kernel with the renderer named in ``DEV=NULL:<renderer>:<arch>`` and
compiles it with that renderer's compiler, then "runs" it as a no-op: CUDA (C++ source) is compiled by
NVRTC to a cubin, PTX (tinygrad's own PTX) is assembled and linked by nvJitLink to a cubin. Both libraries
come from NVIDIA's PyPI wheels (``nvidia-cuda-nvrtc``, ``nvidia-nvjitlink``, in the test extra); nothing else
of CUDA is needed. tinygrad's compile cache is off, so every kernel really goes through the compiler.

Stages, for every registered model: ``Engine.materialize`` and the JIT'd ``forward`` and ``forward_paired``
of every bucket of a serving engine (V vendors, max_batch 256), and ``materialize`` and ``forward`` of a
leader-only engine (V=1: a replica with learning off, and the worker's validation guard, whose one bucket,
256, is among them). ``--buckets ends`` keeps each engine's smallest and largest bucket, ``largest`` the largest.

Prints a table and, with ``--json``, writes per stage the kernels one run of it launches (name, kind E/r,
output elements, binary format and size), the number of compiler invocations, and the compiler's class.
The environment is set here, before tinygrad is imported: run it as its own process
(tests/processes/test_cuda_compile.py).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import glob
import importlib.util
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# libraries the renderers' compilers load, found in the `nvidia` namespace package of the wheels
LIBS = {"CUDA": [("NVRTC_PATH", "libnvrtc.so.*"), (None, "libnvrtc-builtins.so.*")],
        "PTX": [("NVJITLINK_PATH", "libnvJitLink.so.*")]}


def find_nvidia_lib(pattern: str) -> str:
    """A shared library of NVIDIA's wheels (nvidia/<cuXX>/lib/), or a clear error naming the package."""
    spec = importlib.util.find_spec("nvidia")
    roots = list(spec.submodule_search_locations or []) if spec else []
    hits = sorted(p for root in roots for p in glob.glob(os.path.join(root, "*", "lib", pattern))
                  if not p.endswith(".alt.so") and ".alt." not in os.path.basename(p))
    if not hits:
        raise SystemExit(f"no {pattern} in the nvidia packages ({roots or 'not installed'}): "
                         "pip install -e '.[test]' (nvidia-cuda-nvrtc, nvidia-nvjitlink)")
    return hits[-1]


def configure(renderer: str, arch: str) -> dict[str, str]:
    """The variables of a NULL-device compile for `renderer`, set in this process before tinygrad starts."""
    if "tinygrad" in sys.modules:
        raise RuntimeError("configure() must run before tinygrad is imported")
    env = {"DEV": f"NULL:{renderer}:{arch}", "NULL_ALLOW_COPYOUT": "1", "CCACHE": "0", "PARALLEL": "0"}
    for var, pattern in LIBS[renderer]:
        path = find_nvidia_lib(pattern)
        if var:
            env[var] = path
        else:  # NVRTC dlopens its builtins by soname: load them first, so no LD_LIBRARY_PATH is needed
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    os.environ.update(env)
    return env


class KernelLog:
    """Records the kernels of each compiled schedule (tinygrad's `lower_and_compile`) and each compiler call."""

    def __init__(self) -> None:
        self.calls: list[list[dict[str, Any]]] = []
        self.compiles = 0

    def install(self) -> None:
        from tinygrad import Device
        from tinygrad.engine import realize
        from tinygrad.uop.ops import Ops

        original = realize.lower_and_compile

        def lower_and_compile(linear):  # type: ignore[no-untyped-def]
            out = original(linear)
            kernels = []
            for call in out.src if out.op is Ops.LINEAR else ():
                if call.op is Ops.CALL and call.src[0].op is Ops.PROGRAM:
                    prg, bufs = call.src[0], call.src[1:]
                    binary = next((s.arg for s in prg.src if s.op is Ops.BINARY), b"")
                    info = prg.arg
                    outs = [bufs[i] for i in info.outs if i < len(bufs)]
                    kernels.append({"name": info.function_name, "kind": info.function_name.split("_")[0],
                                    "out_elems": math.prod(outs[0].max_shape) if outs else None,
                                    "format": _format(binary), "bytes": len(binary)})
            self.calls.append(kernels)
            return out

        realize.lower_and_compile = lower_and_compile
        compiler = Device[Device.DEFAULT].compiler
        compile_fn = compiler.compile

        def counted(src: str) -> bytes:
            self.compiles += 1
            return compile_fn(src)

        compiler.compile = counted  # type: ignore[method-assign]

    def take(self) -> list[dict[str, Any]]:
        """The kernels one run of the stage launches: its last compiled schedule (a JIT's capture), then clear."""
        with_kernels = [c for c in self.calls if c]
        self.calls = []
        return with_kernels[-1] if with_kernels else []


def _format(binary: bytes) -> str:
    if binary.startswith(b"\x7fELF"):
        return "cubin"
    if b".target" in binary[:200]:
        return "ptx"
    return "other" if binary else "none"


@contextlib.contextmanager
def stage(stages: list[dict[str, Any]], log: KernelLog, model: str, V: int, name: str, bucket: int | None
          ) -> Iterator[None]:
    """One stage: its kernels and CPU time appended to `stages`; which stage it was, if it fails."""
    t = time.process_time()
    try:
        yield
    except Exception:
        print(f"compile_check: {os.environ.get('DEV')} failed in {model} V={V} {name} bucket={bucket}",
              file=sys.stderr, flush=True)
        raise
    stages.append({"model": model, "V": V, "stage": name, "bucket": bucket, "cpu_s": time.process_time() - t,
                   "kernels": log.take()})


def pick_buckets(buckets: list[int], mode: str) -> list[int]:
    """all of them, the smallest and the largest (ends), or the largest alone."""
    return {"all": buckets, "ends": sorted({buckets[0], buckets[-1]}), "largest": buckets[-1:]}[mode]


def run(models: list[str], vendors: int, max_batch: int, bucket_mode: str) -> dict[str, Any]:
    """Every stage of every model on the configured NULL device; the kernels of each."""
    import numpy as np
    from tinygrad import Device

    from marketplace.engine import Engine, leader_seeds
    from marketplace.models import get_model
    from marketplace.reconcile import fresh_seeds

    log = KernelLog()
    log.install()
    stages: list[dict[str, Any]] = []
    t0, c0 = time.perf_counter(), time.process_time()
    for name in models:
        spec = get_model(name)
        params = spec.init_params(0)
        for V in (vendors, 1):
            engine = Engine(spec, V, max_batch=max_batch)
            buckets = pick_buckets(engine.buckets, bucket_mode)
            seeds = fresh_seeds(len(spec.groups), V, np.random.default_rng(0)) if V > 1 else leader_seeds(spec)
            with stage(stages, log, name, V, "materialize", None):
                weights = engine.materialize(params, seeds, 0.05)
            for b in buckets:
                for paired in ((False, True) if V > 1 else (False,)):
                    with stage(stages, log, name, V, "paired" if paired else "forward", b):
                        engine.warmup(weights, [b], paired)  # the JIT's run, capture and replay, as a replica does
    dev = Device[Device.DEFAULT]
    return {"dev": os.environ["DEV"], "device": Device.DEFAULT, "renderer": type(dev.renderer).__name__,
            "compiler": type(dev.compiler).__name__, "compiles": log.compiles,
            "seconds": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
            "vendors": vendors, "max_batch": max_batch, "buckets": bucket_mode, "stages": stages}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--renderer", choices=sorted(LIBS), default="CUDA")
    ap.add_argument("--arch", default="sm_90", help="GPU architecture (sm_90: H100/H200)")
    ap.add_argument("--models", default=None, help="comma-separated (default: every registered model)")
    ap.add_argument("--vendors", type=int, default=4, help="V of the serving engine (the shipped model's)")
    ap.add_argument("--max-batch", type=int, default=256)
    ap.add_argument("--buckets", choices=["all", "ends", "largest"], default="all")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    configure(args.renderer, args.arch)

    from bench.common import print_table
    from marketplace.models import REGISTRY

    models = args.models.split(",") if args.models else sorted(REGISTRY)
    report = run(models, args.vendors, args.max_batch, args.buckets)
    rows = [{"model": s["model"], "V": s["V"], "stage": s["stage"], "bucket": s["bucket"] or "",
             "kernels": len(s["kernels"]), "formats": ",".join(sorted({k["format"] for k in s["kernels"]})),
             "cpu_s": round(s["cpu_s"], 2)} for s in report["stages"]]
    print_table(rows, ["model", "V", "stage", "bucket", "kernels", "formats", "cpu_s"])
    print(f"{report['dev']}: {report['compiles']} kernels compiled by {report['compiler']} "
          f"in {report['seconds']:.1f} s ({report['cpu_s']:.1f} s of CPU)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
