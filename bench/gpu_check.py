"""The GPU checks in one call, for a machine lent with an NVIDIA GPU (run by scripts/gpu_check.sh).

    scripts/gpu_check.sh --prepare      # here, no GPU needed: the wheels and Fashion-MNIST to carry, into .gpu/
    scripts/gpu_check.sh                # there: on DEV (default CUDA), figures into $OUT (else results/gpu_check)
    scripts/gpu_check.sh --dry-run      # anywhere: every step's command checked (arguments parsed), none run
    DEV=CPU scripts/gpu_check.sh --tiny # here: every step for real at toy sizes (~1 min), to try the script

Steps, in order, each a child process with a time limit inside ``--budget-s`` (a step that fails or runs out
of time is recorded and the next one runs; if the device itself is unusable the rest are skipped):

  device       common.device opens DEV and runs a kernel; tinygrad's renderer and compiler; nvidia-smi
  threefry     tests/unit/test_threefry.py on DEV: known answers, the NumPy and tinygrad delta twins bit for bit
  engine       tests/unit/test_engine.py on DEV: each input gets its own path's logits; materialize equals the
               NumPy twin bit for bit in every version
  materialize  bench.materialize: ms per version of the V=4 perturbed weights (mlp, beautiful_mnist)
  inference    bench.inference: inputs/s of plain (V=1) and perturbed (V=4) inference per batch size, and the
               same model in PyTorch beside it where PyTorch is installed (on CUDA when DEV is)
  protocol_A   scripts/gpu_learning.sh's protocol A on beautiful_mnist, --a-steps steps (the rows so far are
               kept if the budget runs out)

Writes gpu_check.json (each step's status, time and figures: the benchmarks' own JSON inlined), gpu_check.log
(every step's output) and the protocol A plot into the output folder, and prints a short table last.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Step:
    name: str
    argv: list[str]
    timeout_s: float
    outputs: list[Path] = field(default_factory=list)  # JSON / JUnit files the step writes, read by `summarize`
    env: dict[str, str] = field(default_factory=dict)


def plan(work: Path, tiny: bool, a_steps: int) -> list[Step]:
    """The steps; ``tiny``: toy sizes (mlp, a few steps), to try the whole script on a CPU in about a minute."""
    py = sys.executable
    pytest = [py, "-m", "pytest", "-q", "--noconftest", "-p", "no:cacheprovider"]
    mat = ["--models", "mlp", "--versions", "1", "--skip", "1"] if tiny else []
    inf = (["--model", "mlp", "--batches", "4", "--seconds", "0.01", "--rounds", "1"] if tiny else
           ["--model", "beautiful_mnist", "--batches", "1,16,64,256,1024", "--seconds", "1", "--rounds", "3"])
    if not tiny and importlib.util.find_spec("torch") is not None:  # the GPU image holds PyTorch: the same table
        cuda = os.environ.get("DEV", "").split(":")[0].upper() == "CUDA"
        inf += ["--peer", "torch", "--torch-device", "cuda" if cuda else "cpu"]
    learn = ({"MODEL": "mlp", "BASE_STEPS": "2", "A_STEPS": "2", "A_EVAL_EVERY": "1"} if tiny else
             {"MODEL": "beautiful_mnist", "BASE_STEPS": "1000", "A_STEPS": str(a_steps),
              "A_EVAL_EVERY": str(max(1, a_steps // 8))})
    model = learn["MODEL"]
    return [
        Step("device", [py, "-m", "bench.gpu_check", "--device-info", str(work / "device.json")], 90,
             [work / "device.json"]),
        Step("threefry", [*pytest, "tests/unit/test_threefry.py", f"--junitxml={work / 'threefry.xml'}",
                          *(["-k", "known_answers"] if tiny else [])], 90, [work / "threefry.xml"]),
        Step("engine", [*pytest, "tests/unit/test_engine.py", f"--junitxml={work / 'engine.xml'}",
                        *(["-k", "leader_engine_matches"] if tiny else [])], 120, [work / "engine.xml"]),
        Step("materialize", [py, "-m", "bench.materialize", *mat, "--json", str(work / "materialize.json")], 60,
             [work / "materialize.json"]),
        Step("inference", [py, "-m", "bench.inference", *inf, "--json", str(work / "inference.json")], 180,
             [work / "inference.json"]),
        Step("protocol_A", ["bash", "scripts/gpu_learning.sh", str(work / "learning"), "A"], 1e9,  # what is left
             [work / "learning" / f"continual_A_{model}.json"], env=learn),
    ]


# ------------------------------------------------------------------------------------------ running
def find_libcuda() -> str | None:
    """The driver's libcuda: tinygrad looks only in LD_LIBRARY_PATH and the usual lib folders, not ld.so's cache."""
    try:
        cache = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        cache = ""
    found = [line.split("=>")[-1].strip() for line in cache.splitlines() if re.match(r"\s*libcuda\.so[.\d]*\s", line)]
    for folder in ("/usr/local/nvidia/lib64", "/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/local/cuda/compat"):
        found += sorted(glob.glob(f"{folder}/libcuda.so*"))
    return next((p for p in found if os.path.isfile(p)), None)


def child_env(step: Step) -> dict[str, str]:
    """This environment, the repository importable, and where tinygrad's CUDA finds libcuda and NVRTC."""
    env = {**os.environ, **step.env, "PYTHONUNBUFFERED": "1", "PYTHON": sys.executable}  # scripts' python: this one
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    cuda = env.get("DEV", "").split(":")[0].upper() == "CUDA"
    if cuda and "CUDA_PATH" not in env and (libcuda := find_libcuda()):
        env["CUDA_PATH"] = libcuda  # tinygrad's variable for libcuda's file
    if cuda and "NVRTC_PATH" not in env:
        from bench.compile_check import find_nvidia_lib  # the wheel tinygrad's compile test also uses

        with contextlib.suppress(SystemExit):  # no wheel: tinygrad searches the system's CUDA itself
            lib = find_nvidia_lib("libnvrtc.so.*")
            env["NVRTC_PATH"] = lib
            env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(Path(lib).parent), env.get("LD_LIBRARY_PATH"))
                                                     if p)
    return env


def run_step(step: Step, log: Any, deadline: float) -> dict[str, Any]:
    """Run one step with its output in `log`; its status (ok, failed, timeout) and time."""
    timeout = max(1.0, min(step.timeout_s, deadline - time.monotonic()))
    print(f"\n=== {step.name} (at most {timeout:.0f} s): {' '.join(step.argv)}", file=log, flush=True)
    t = time.monotonic()
    proc = subprocess.Popen(step.argv, cwd=REPO, env=child_env(step), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # its own process group: a timeout ends its children too
    try:
        rc = proc.wait(timeout=timeout)
        status = "ok" if rc == 0 else "failed"
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        rc, status = None, "timeout"
    return {"status": status, "rc": rc, "seconds": round(time.monotonic() - t, 1), "command": step.argv}


# ------------------------------------------------------------------------------------------ reading
def read_output(path: Path) -> Any:
    """A step's JSON as written, or a JUnit file's counts and failures; None if it wrote none."""
    if not path.exists():
        return None
    if path.suffix == ".xml":
        root = ET.parse(path).getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        assert suite is not None
        failed = [f"{case.get('classname')}.{case.get('name')}" for case in suite.iter("testcase")
                  if case.find("failure") is not None or case.find("error") is not None]
        return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")} | {
            "time_s": float(suite.get("time", 0)), "failed": failed}
    return json.loads(path.read_text())


def summarize(name: str, data: Any) -> str:
    """One line of the table for a step's output (never raises: a surprise in the data is reported instead)."""
    try:
        if data is None:
            return "no output"
        if name == "device":
            return f"{data['device']} ({data['renderer']}, {data['compiler']}); {data.get('gpu') or 'no nvidia-smi'}"
        if name in ("threefry", "engine"):
            passed = data["tests"] - data["failures"] - data["errors"] - data["skipped"]
            failed = f"; failed: {', '.join(data['failed'])}" if data["failed"] else ""
            return f"{passed}/{data['tests']} passed{failed}"
        if name == "materialize":
            return "; ".join(f"{r['model']} V={r['V']}: {r['new_ms']:.2f} ms/version (first {r['new_first_s']:.2f} s)"
                             for r in data["rows"])
        if name == "inference":
            return "; ".join(f"batch {r['batch']}: plain {r['plain_per_s']:,.0f}/s, perturbed "
                             f"{r['perturbed_per_s']:,.0f}/s ({r['ratio']:.2f}x)"
                             + (f", PyTorch {r['torch_per_s']:,.0f}/s" if "torch_per_s" in r else "")
                             for r in data["rows"])
        if name == "protocol_A":
            curve = data["curve"]
            first, last = curve[0], curve[-1]
            return (f"step {last['step']} of {data['steps']}: leader on known classes {first['old_val_acc']:.1%} -> "
                    f"{last['old_val_acc']:.1%}, on the new class {first['new_val_acc']:.1%} -> "
                    f"{last['new_val_acc']:.1%}; served loss on it {first['new_loss']:.2f} -> {last['new_loss']:.2f}")
        return json.dumps(data)[:200]
    except Exception as exc:  # the raw data is in gpu_check.json regardless
        return f"(unreadable: {type(exc).__name__}: {exc})"


# ------------------------------------------------------------------------------------------ checking
class _Parsed(Exception):
    pass


def validate_argv(argv: list[str]) -> None:
    """What a step would run, checked without running it: ``-m module args`` parses its arguments (argparse, or
    pytest's collection), ``-c code`` compiles. Used as PYTHON by --dry-run, so scripts' commands are checked."""
    if argv[:1] == ["-c"]:
        compile(argv[1], "<-c>", "exec")
        return
    if argv[:1] != ["-m"] or len(argv) < 2:
        raise SystemExit(f"validate: expected -m MODULE or -c CODE, got {argv[:2]}")
    module, args = argv[1], argv[2:]
    if module == "pytest":
        import pytest

        rc = pytest.main([*[a for a in args if not a.startswith("--junitxml")], "--collect-only"])
        if rc != 0:
            raise SystemExit(f"validate: pytest {args} collects nothing (exit {rc})")
        return
    import importlib

    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):  # type: ignore[no-untyped-def]
        original(self, args, namespace)
        raise _Parsed

    sys.argv = [module, *args]
    argparse.ArgumentParser.parse_args = parse_then_stop  # type: ignore[method-assign]
    try:
        importlib.import_module(module).main()
    except _Parsed:
        print(f"validate: {module} {' '.join(args)}: arguments ok")
        return
    finally:
        argparse.ArgumentParser.parse_args = original  # type: ignore[method-assign]
    raise SystemExit(f"validate: {module} did not parse its arguments")


def dry_run(steps: list[Step]) -> int:
    """Each step's command checked, none run: python steps here, scripts in a child whose PYTHON is the checker."""
    bad = 0
    for step in steps:
        if step.argv[0] == "bash":
            env = {**child_env(step), "PYTHON": f"{sys.executable} -m bench.gpu_check --validate-argv"}
            proc = subprocess.run(step.argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
            ok, why = proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        else:
            try:
                validate_argv(step.argv[1:])
                ok, why = True, ""
            except (SystemExit, Exception) as exc:
                ok, why = False, f"{type(exc).__name__}: {exc}"
        bad += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {step.name}: {' '.join(step.argv)}" + ("" if ok else f"\n{why}"), flush=True)
    return 1 if bad else 0


def device_info(path: Path) -> None:
    """The `device` step: DEV opened and checked with a kernel (common.device), and what tinygrad uses there."""
    from common.device import use_device

    device = use_device(os.environ.get("DEV") or None)
    import tinygrad
    from tinygrad import Device

    dev = Device[device]
    gpu = None
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=60)
        gpu = out.stdout.strip() or out.stderr.strip()
    info = {"device": device, "dev": os.environ.get("DEV"), "renderer": type(dev.renderer).__name__,
            "compiler": type(dev.compiler).__name__, "tinygrad": getattr(tinygrad, "__version__", None),
            "python": sys.version.split()[0], "gpu": gpu, "nvrtc": os.environ.get("NVRTC_PATH"),
            "libcuda": os.environ.get("CUDA_PATH")}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info, indent=1))
    print(json.dumps(info))


# ------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--validate-argv"]:
        validate_argv(argv[1:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or REPO / "results" / "gpu_check"))
    ap.add_argument("--work", type=Path, default=None, help="where steps write (default: OUT/../gpu_check_work "
                                                             "when OUT is $OUT, else OUT/work)")
    ap.add_argument("--budget-s", type=float, default=360, help="all steps together, seconds (a lease has 15 "
                                                                "minutes, a machine's start included)")
    ap.add_argument("--a-steps", type=int, default=1000, help="protocol A steps (gpu_learning.sh's full run: 25000)")
    ap.add_argument("--tiny", action="store_true", help="toy sizes: try the script on a CPU (DEV=CPU)")
    ap.add_argument("--dry-run", action="store_true", help="check every command, run none")
    ap.add_argument("--device-info", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.device_info:
        device_info(args.device_info)
        return 0
    # $OUT comes back at most two folders deep and eight files: the steps' files go elsewhere, three come back
    work = args.work or (Path("/tmp/gpu_check_work") if os.environ.get("OUT") else args.out / "work")
    steps = plan(work, args.tiny, args.a_steps)
    if args.dry_run:
        return dry_run(steps)

    args.out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"dev": os.environ.get("DEV"), "budget_s": args.budget_s, "tiny": args.tiny,
                              "started": time.time(), "steps": {}}
    deadline = time.monotonic() + args.budget_s
    rows = []
    with open(args.out / "gpu_check.log", "w") as log:
        for step in steps:
            if report["steps"].get("device", {}).get("status", "ok") != "ok":
                result: dict[str, Any] = {"status": "skipped (device unusable)"}
            elif time.monotonic() >= deadline:
                result = {"status": "skipped (budget spent)"}
            else:
                print(f"gpu_check: {step.name} ...", flush=True)
                result = run_step(step, log, deadline)
            outputs = {p.name: read_output(p) for p in step.outputs if p.exists()}
            result["outputs"] = outputs
            report["steps"][step.name] = result
            summary = summarize(step.name, next(iter(outputs.values()), None))
            rows.append({"step": step.name, "status": result["status"], "s": result.get("seconds", ""),
                         "result": summary})
            (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1))  # kept even if cut short
    for png in (work / "learning").glob("continual_A_*.png"):
        shutil.copy(png, args.out / png.name)

    print(f"\ngpu_check on DEV={report['dev']}: {args.out / 'gpu_check.json'}, {args.out / 'gpu_check.log'}")
    for r in rows:
        print(f"{r['step']:<12} {r['status']:<8} {r['s']:>6}  {r['result']}")
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
