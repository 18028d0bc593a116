"""scripts/gpu_check.sh, the one-call GPU check: every command it would run on a lent GPU is checked here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.gpu_check import plan, read_output, summarize
from tests.helpers import REPO, clean_env


def test_every_command_of_the_gpu_check_parses() -> None:
    """--dry-run: each step's arguments go through its module's own parser (pytest's collection for the tests),
    and scripts/gpu_learning.sh runs with a PYTHON that checks instead of running; a typo fails here, not there."""
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run"], cwd=REPO, env=clean_env(), text=True,
                          capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    checked = [line.split(":")[0] for line in proc.stdout.splitlines() if line.startswith(("ok", "FAIL"))]
    assert checked == [f"ok   {s.name}" for s in plan(Path("w"), False, 1000)]


def test_every_part_of_gpu_learning_parses() -> None:
    env = clean_env(PYTHON=f"{sys.executable} -m bench.gpu_check --validate-argv", PYTHONPATH=str(REPO))
    proc = subprocess.run(["bash", "scripts/gpu_learning.sh", "/tmp/unused", "exploration", "A", "C"], cwd=REPO,
                          env=env, text=True, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("arguments ok") == 3
    bad = subprocess.run(["bash", "scripts/gpu_learning.sh", "/tmp/unused", "D"], cwd=REPO, env=env, text=True,
                         capture_output=True, timeout=300)
    assert bad.returncode == 2 and "unknown part 'D'" in bad.stderr


def test_the_summary_reads_each_steps_output(tmp_path: Path) -> None:
    xml = tmp_path / "t.xml"
    xml.write_text('<testsuites><testsuite tests="6" failures="1" errors="0" skipped="0" time="1.5">'
                   '<testcase classname="tests.test_threefry" name="test_a"><failure/></testcase>'
                   '<testcase classname="tests.test_threefry" name="test_b"/></testsuite></testsuites>')
    assert summarize("threefry", read_output(xml)) == "5/6 passed; failed: tests.test_threefry.test_a"
    assert summarize("inference", {"rows": [{"batch": 64, "plain_per_s": 1000.0, "perturbed_per_s": 900.0,
                                             "ratio": 0.9}]}) == "batch 64: plain 1,000/s, perturbed 900/s (0.90x)"
    curve = [{"step": s, "old_val_acc": 0.9, "new_val_acc": a, "new_loss": 3.0 - a} for s, a in ((0, 0.0), (500, 0.5))]
    assert "on the new class 0.0% -> 50.0%" in summarize("protocol_A", {"curve": curve, "steps": 1000})
    assert summarize("materialize", {"rows": [{}]}).startswith("(unreadable: KeyError")  # never raises
    assert summarize("engine", None) == "no output"


@pytest.mark.slow
@pytest.mark.extended
def test_the_gpu_check_runs_end_to_end_on_the_cpu(tmp_path: Path) -> None:
    """Every step for real at toy sizes on this CPU (about a minute): the files that would come back from $OUT."""
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--tiny", "--out", str(tmp_path)], cwd=REPO,
                          env=clean_env(DEV="CPU"), text=True, capture_output=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert {k: v["status"] for k, v in report["steps"].items()} == dict.fromkeys(
        ["device", "threefry", "engine", "materialize", "inference", "protocol_A"], "ok")
    assert report["steps"]["device"]["outputs"]["device.json"]["device"] == "CPU"
    assert sorted(os.listdir(tmp_path)) == ["continual_A_mlp.png", "gpu_check.json", "gpu_check.log", "work"]
