"""Every kernel of serving and of the worker's learning path compiles for CUDA, on this machine without a GPU.

`python -m bench.compile_check` runs in a child process per renderer (tinygrad's NULL device with the CUDA
renderer, compiled by NVRTC, and with the PTX renderer, assembled by nvJitLink, both for sm_90), so this
process stays on the CPU. It materializes a version and runs the JIT'd forward and paired forward of each
bucket of every registered model, plus a leader-only engine, and reports the kernels of each stage.

The expected kernels are derived from the model spec: materialize writes one kernel per parameter tensor
after two per layer group (its counters and its deltas); a forward launches the kernels of each layer as
tinygrad 0.14 fuses them (`LAYER_KERNELS`), plus one gather between groups when V > 1; a paired forward adds
the leader's pass over the same bucket. Each is counted by kind (E: elementwise, r: reduction, the first
letter of tinygrad's kernel name) and by the number of elements it writes, and each must come back as a
cubin from the renderer's compiler. `make test` compiles each engine's largest bucket (256, the one with the
most aggressive kernel optimizations; ~20 s of CPU per renderer, the two side by side, which is the budget
of the suite); `pytest -m extended tests/processes/test_cuda_compile.py` compiles every bucket (~75 s of CPU each).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from math import prod
from pathlib import Path

import pytest

from bench.compile_check import pick_buckets
from marketplace.engine import default_buckets
from marketplace.layers import Conv2d, Flatten, InstanceNorm, Linear, MaxPool2d, ReLU
from marketplace.models import REGISTRY, ModelSpec, get_model
from tests.helpers import REPO, clean_env

RENDERERS = {"CUDA": "NVRTCCompiler", "PTX": "NVPTXCompiler"}
VENDORS, MAX_BATCH = 4, 256  # the shipped model's V, the replicas' default max_batch
Kernels = Counter[tuple[str, int]]  # (kind, elements written) -> how many such kernels

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="NVIDIA's compiler wheels are for Linux")


# ------------------------------------------------------------------------------------ expectations
def _conv(layer: Conv2d, shape: tuple[int, ...]) -> tuple[tuple[int, ...], list[tuple[str, int]]]:
    _, h, w = shape
    out = (layer.cout, h + 2 * layer.padding - layer.kernel + 1, w + 2 * layer.padding - layer.kernel + 1)
    return out, [("r", prod(out))]  # bias, the ReLU after it and the input's scale fuse into the reduction


def _norm(layer: InstanceNorm, shape: tuple[int, ...]) -> tuple[tuple[int, ...], list[tuple[str, int]]]:
    return shape, [("r", shape[0]), ("r", shape[0]), ("E", prod(shape))]  # mean, variance, the scaled output


def _pool(layer: MaxPool2d, shape: tuple[int, ...]) -> tuple[tuple[int, ...], list[tuple[str, int]]]:
    out = (shape[0], shape[1] // layer.kernel, shape[2] // layer.kernel)
    return out, [("r", prod(out))]


#: Per layer type: (output shape per input, kernels as (kind, elements written per input)).
LAYER_KERNELS = {
    Conv2d: _conv,
    InstanceNorm: _norm,
    MaxPool2d: _pool,
    Linear: lambda layer, shape: ((layer.fout,), [("r", layer.fout)]),
    ReLU: lambda layer, shape: (shape, []),  # fused into the kernel that produced its input
    Flatten: lambda layer, shape: ((prod(shape),), []),
}


def forward_kernels(spec: ModelSpec, V: int, bucket: int) -> Kernels:
    """One pass of `Engine.graph` over a bucket: each layer's kernels, and a gather between groups when V > 1."""
    out: Kernels = Counter()
    shape = tuple(spec.input_shape)
    for s, group in enumerate(spec.groups):
        if s > 0 and V > 1:
            out["E", bucket * prod(shape)] += 1  # the permutation that deals inputs to this group's vendors
        for _, layer in group.layers:
            shape, kernels = LAYER_KERNELS[type(layer)](layer, shape)
            out.update((kind, bucket * n) for kind, n in kernels)
    return out


def stage_kernels(spec: ModelSpec, V: int, stage: str, bucket: int | None) -> Kernels:
    if stage == "materialize":  # per group: its counters and its V deltas; per tensor: θ + δ for each vendor
        out: Kernels = Counter()
        for s, n in enumerate(spec.group_sizes()):
            if n:
                out.update([("E", n), ("E", V * n)])
                out.update(("E", V * prod(shape)) for shape in spec.group_shapes(s).values())
        return out
    assert bucket is not None
    if stage == "forward":
        return forward_kernels(spec, V, bucket)
    assert stage == "paired"
    return forward_kernels(spec, V, bucket) + forward_kernels(spec, 1, bucket)  # the probes, then the leader


def expected_stages(buckets: str) -> list[tuple[str, int, str, int | None]]:
    """(model, V, stage, bucket) of every stage bench.compile_check runs, in its order."""
    stages: list[tuple[str, int, str, int | None]] = []
    for name in sorted(REGISTRY):
        for V in (VENDORS, 1):
            stages.append((name, V, "materialize", None))
            for b in pick_buckets(default_buckets(V, MAX_BATCH), buckets):
                stages += [(name, V, "forward", b)] + ([(name, V, "paired", b)] if V > 1 else [])
    return stages


# ------------------------------------------------------------------------------------ the runs
def compile_all(tmp: Path, buckets: str) -> dict[str, dict | str]:
    """Both renderers at once, a child each (two cores): each one's report, or its output if it failed."""
    procs = {}
    for renderer in RENDERERS:
        argv = [sys.executable, "-m", "bench.compile_check", "--renderer", renderer, "--buckets", buckets,
                "--vendors", str(VENDORS), "--max-batch", str(MAX_BATCH), "--json", str(tmp / f"{renderer}.json")]
        procs[renderer] = subprocess.Popen(argv, cwd=REPO, env=clean_env(NO_COLOR="1"), stdout=subprocess.PIPE,
                                           stderr=subprocess.STDOUT)
    results: dict[str, dict | str] = {}
    for renderer, proc in procs.items():
        out, _ = proc.communicate(timeout=900)
        text = out.decode(errors="replace")
        where = "".join(line + "\n" for line in text.splitlines() if line.startswith("compile_check:"))
        results[renderer] = (json.loads((tmp / f"{renderer}.json").read_text()) if proc.returncode == 0 else
                             f"exit {proc.returncode}:\n{where}...\n{text[-4000:]}")
    return results


@pytest.fixture(scope="module")
def largest(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict | str]:
    return compile_all(tmp_path_factory.mktemp("compile"), "largest")


def check(report: dict | str, renderer: str, buckets: str) -> None:
    if isinstance(report, str):
        pytest.fail(f"compiling for {renderer} failed, {report}", pytrace=False)
    assert report["dev"] == f"NULL:{renderer}:sm_90"
    assert report["compiler"] == RENDERERS[renderer], report["compiler"]
    seen = [(s["model"], s["V"], s["stage"], s["bucket"]) for s in report["stages"]]
    assert seen == expected_stages(buckets)
    for s in report["stages"]:
        where = f"{renderer} {s['model']} V={s['V']} {s['stage']} bucket={s['bucket']}"
        got = Counter((k["kind"], k["out_elems"]) for k in s["kernels"])
        want = stage_kernels(get_model(s["model"]), s["V"], s["stage"], s["bucket"])
        assert got == want, (f"{where}: kernels {[k['name'] for k in s['kernels']]}; missing {want - got}, "
                             f"unexpected {got - want} (a new layer or another tinygrad fuses differently: "
                             "update LAYER_KERNELS)")
        not_compiled = [k["name"] for k in s["kernels"] if k["format"] != "cubin" or k["bytes"] < 100]
        assert not not_compiled, f"{where}: no cubin for {not_compiled}"
    names = {k["name"] for s in report["stages"] for k in s["kernels"]}
    launched = sum(len(s["kernels"]) for s in report["stages"])
    assert len(names) <= report["compiles"] <= launched  # each distinct kernel compiled once, none skipped


@pytest.mark.slow  # ~20 s of CPU per renderer: in make test, not in the fast subset
@pytest.mark.parametrize("renderer", RENDERERS)
def test_every_kernel_compiles_for_cuda(largest: dict[str, dict | str], renderer: str) -> None:
    """Materialize, and forward and paired forward at the largest bucket, of a serving and a leader-only engine."""
    check(largest[renderer], renderer, "largest")


@pytest.mark.slow
@pytest.mark.extended
def test_every_bucket_compiles_for_cuda(tmp_path: Path) -> None:
    """The same for every bucket of every engine (what a replica warms up), both renderers."""
    for renderer, report in compile_all(tmp_path, "all").items():
        check(report, renderer, "all")


def test_expectations_follow_the_spec() -> None:
    """The derivation itself, on beautiful_mnist: 3 groups of 6, 6 and 2 tensors; 7 + 7 + 1 forward kernels."""
    spec = get_model("beautiful_mnist")
    assert sum(stage_kernels(spec, 4, "materialize", None).values()) == 2 * 3 + 14
    fwd = forward_kernels(spec, 4, 8)
    assert sum(fwd.values()) == 15 and fwd["E", 8 * 32 * 10 * 10] == 1 and fwd["r", 8 * 10] == 1
    assert sum(stage_kernels(spec, 4, "paired", 8).values()) == 15 + 13
