"""`mpserve up` and docker-compose.yml: the same stack, started for real here and held to the same spec."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from common.loading import load_version, seed_default_model, shipped_store
from marketplace.data import load_fashion_mnist
from model_store import ModelStore
from mpserve.cli import app
from mpserve.client import MPServeClient
from mpserve.stack import StackSettings, process_specs
from tests.helpers import free_port, wait_until
from worker.guard import ValidationGuard
from worker.settings import WorkerSettings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_services_run_what_mpserve_up_runs(compose):
    specs = process_specs(StackSettings(_env_file=None), "redis://redis:6379/0", "token")
    services = {name: svc for name, svc in compose["services"].items() if not svc.get("profiles")}
    assert set(services) == {"redis", "api", "worker"}  # what `docker compose up` starts
    for name, spec in specs.items():
        svc = services[name]
        assert svc["command"] == ["mpserve", *spec.args]
        env = svc["environment"]
        assert set(env) == set(spec.env), f"{name}: compose and mpserve up set different variables"
        for key in ("MPSERVE_MODELS", "MPSERVE_LOG_LEVEL", "MPSERVE_DEFAULT_MODEL", "MPSERVE_SEED_DEFAULT"):
            if key in spec.env:
                assert str(env[key]).lower() == spec.env[key].lower(), key
        assert env["MPSERVE_REDIS_URL"].startswith("redis://redis:")
        # both share one model store volume, mounted where MPSERVE_STORE_DIR points
        mounts = dict(v.split(":")[::-1] for v in svc["volumes"])
        assert mounts[env["MPSERVE_STORE_DIR"]] == "model-store"
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["api"]["image"] == services["worker"]["image"]


def test_compose_redis_is_durable_and_checked(compose):
    redis_svc = compose["services"]["redis"]
    cmd = redis_svc["command"]
    assert cmd[cmd.index("--appendonly") + 1] == "yes"
    assert cmd[cmd.index("--appendfsync") + 1] in ("everysec", "always")
    assert any(v.endswith(":/data") and not v.startswith("/") for v in redis_svc["volumes"])  # a named volume
    assert "redis-cli" in redis_svc["healthcheck"]["test"]
    assert set(compose["volumes"]) >= {"redis-data", "model-store"}


def dockerfile_stages() -> dict[str, list[str]]:
    """Each stage's lines by its name (``FROM image AS name``), in order; the last is what ``docker build`` makes."""
    stages: dict[str, list[str]] = {}
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("FROM "):
            stages[line.split()[-1]] = []
        elif stages:
            stages[list(stages)[-1]].append(line)
    return stages


def test_dockerfile_is_multi_stage_and_non_root():
    text = (ROOT / "Dockerfile").read_text()
    assert text.count("FROM ") >= 2 and "COPY --from=build" in text
    stages = dockerfile_stages()
    assert list(stages)[-1] == "cpu"  # the default target: the CPU image compose's api and worker build
    for target in ("cpu", "gpu"):  # each image ends as the non-root user
        user = [line.split()[1] for line in stages[target] if line.startswith("USER ")]
        assert user and user[-1] not in ("root", "0"), target


def test_the_gpu_image_and_compose_profile_run_the_same_processes_on_cuda(compose):
    """Profile gpu: api-gpu and worker-gpu are api and worker (same commands, variables, volumes) built from the
    Dockerfile's gpu target, which brings NVRTC from NVIDIA's wheel and selects CUDA; one GPU reserved each."""
    gpu = "\n".join(dockerfile_stages()["gpu"])
    assert "nvidia-cuda-nvrtc" in gpu and "NVRTC_PATH=" in gpu and "MPSERVE_DEVICE=CUDA" in gpu
    services = compose["services"]
    for name in ("api", "worker"):
        svc, cpu = services[f"{name}-gpu"], services[name]
        assert svc["profiles"] == ["gpu"] and svc["build"] == {"context": ".", "target": "gpu"}
        assert svc["image"] == "mpserve:gpu" != cpu["image"]
        for key in ("command", "environment", "volumes"):
            assert svc[key] == cpu[key], (name, key)
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert services["worker-gpu"]["depends_on"]["api-gpu"] == {"condition": "service_started"}
    assert "api" not in services["worker-gpu"]["depends_on"]  # a GPU stack does not start the CPU API


def test_the_shipped_default_model_loads_and_says_how_it_was_trained():
    store = shipped_store()
    params, manifest = store.read_version("fashion", 0)
    assert manifest["architecture"]["name"] == "beautiful_mnist"
    assert manifest["validation"]["test_accuracy"] >= 0.90
    assert "backprop" in manifest["training"]["method"] or "marketplace" in manifest["training"]["method"]
    assert sum(p.size for p in params.values()) < 200_000


def test_the_shipped_model_comes_with_a_holdout_so_the_guard_is_on_by_default(tmp_path):
    """Seeding a store copies the shipped holdout (100 test images per class, byte for byte) as the model's
    default set, and a worker with default settings judges candidates on it: learning on the shipped model is
    guarded without any flag. An operator's file, or an upload, takes precedence over it."""
    shipped = shipped_store().read_holdout("fashion", "default")
    assert shipped is not None and np.bincount(shipped.labels).tolist() == [100] * 10
    test_images = {img.tobytes() for img in load_fashion_mnist()["test"].x}
    assert all(img.astype(np.uint8).tobytes() in test_images for img in shipped.inputs)  # never trained on
    store = ModelStore(tmp_path / "store")
    assert seed_default_model(store, "mine")
    assert store.read_holdout("mine") is None  # nothing uploaded: the default slot holds it
    guard = ValidationGuard(WorkerSettings(_env_file=None), store, "mine")
    held = guard.holdout()
    assert held is not None and held.sha256 == shipped.sha256
    parent = load_version(store, "mine", 0)
    verdict = guard.judge(parent, parent.params)
    assert verdict is not None and verdict.accepted
    assert verdict.validation["accuracy"] >= 0.88 and min(verdict.validation["class_accuracy"]) >= 0.6

    own = tmp_path / "own.npz"  # an operator's file wins over the default, an upload over both
    np.savez(own, inputs=shipped.inputs[:50], labels=shipped.labels[:50])
    configured = ValidationGuard(WorkerSettings(_env_file=None, holdout_path=own), store, "mine")
    assert len(configured.holdout()) == 50
    uploaded = store.write_holdout("mine", shipped.inputs[:30], shipped.labels[:30])
    assert configured.holdout().sha256 == uploaded.sha256 and len(guard.holdout()) == 30
    assert not seed_default_model(store, "mine")  # seeds only once
    # two replicas starting together on an empty store: the one that finds version 0 written meanwhile steps back
    # (simulated: the listing it checked first still showed no version)
    racing = ModelStore(tmp_path / "store")
    racing.versions = lambda model: []  # type: ignore[method-assign]
    assert not seed_default_model(racing, "mine") and store.versions("mine") == [0]


@pytest.mark.slow
def test_mpserve_up_serves_learns_and_stops_cleanly(tmp_path):
    """The README's first command, for real: embedded Redis with AOF, API, worker; Ctrl-C stops all three."""
    port, token = free_port(), "up-test-token"
    env = {**os.environ, "MPSERVE_ADMIN_TOKEN": token, "MPSERVE_MIN_RECORDS": "100000", "MPSERVE_MIN_COHORT": "8",
           "MPSERVE_MAX_BATCH": "16", "MPSERVE_INTERVAL_S": "3600"}  # only the admin call reconciles
    # (batches of 16 at most: three buckets of the shipped conv net to warm up, not five; requests here are <= 16)
    log = (tmp_path / "up.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "mpserve.cli", "up", "--port", str(port), "--data-dir",
                             str(tmp_path / "data")], env=env, stdout=log, stderr=subprocess.STDOUT)
    client = MPServeClient(f"http://127.0.0.1:{port}", admin_token=token, timeout=30)
    try:
        wait_until(lambda: b"mpserve is up" in (tmp_path / "up.log").read_bytes() or proc.poll() is not None,
                   timeout=240, what="mpserve up to print its URLs")
        assert proc.poll() is None, (tmp_path / "up.log").read_text()[-3000:]
        assert token in (tmp_path / "up.log").read_text()
        # the seeded default model serves, and learns from labels through the worker
        rng = np.random.default_rng(0)
        x = rng.integers(0, 256, size=(16, 1, 28, 28)).astype(float)
        first = client.predict(x.tolist(), labels=[int(i % 10) for i in range(16)])
        assert first["version"] == 0 and len(first["predictions"]) == 16
        outcome = client.reconcile()
        assert outcome["version"] == 1 and outcome["parent"] == 0
        wait_until(lambda: client.predict(x[:1].tolist())["version"] == 1, timeout=60, what="swap to v1")
        stored = ModelStore(tmp_path / "data" / "store").read_manifest("fashion", 1)
        assert stored["records"] == 16
        assert (tmp_path / "data" / "redis" / "appendonlydir").is_dir()  # AOF is on
        # the admin commands of the CLI talk to the same stack
        url = f"http://127.0.0.1:{port}"
        listed = CliRunner().invoke(app, ["models", "--url", url, "--name", "fashion"])
        assert listed.exit_code == 0 and json.loads(listed.output)["version"] == 1
        denied = CliRunner().invoke(app, ["rollback", "0", "--url", url, "--token", "wrong"])
        assert denied.exit_code == 1 and "401" in denied.output
        rolled = CliRunner().invoke(app, ["rollback", "0", "--url", url, "--token", token])
        assert rolled.exit_code == 0, rolled.output
        wait_until(lambda: client.predict(x[:1].tolist())["version"] == 0, timeout=60, what="rollback to v0")
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=60)
        log.close()
    assert code == 0, (tmp_path / "up.log").read_text()[-3000:]
    # all three went down with it: the API port is closed, Redis logged its clean exit
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
    assert "ready to exit" in (tmp_path / "data" / "logs" / "redis.log").read_text()
