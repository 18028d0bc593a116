"""`mpserve up`: the whole stack on this machine — Redis, the API and the reconciler — in one command.

Redis is the one given by MPSERVE_REDIS_URL, or else a real `redis-server` started here with AOF on,
its data in the data directory. The API and the worker run as child processes with the same
commands and environment as the docker-compose services (`process_specs` is the one source for both,
and a test holds docker-compose.yml to it). The shipped default model is seeded into the store on
first start. Ctrl-C stops the API, then the worker, then Redis.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from common.loading import seed_default_model
from common.logs import configure_logging
from model_store import ModelStore
from redis_io.connect import RedisUrl, blocking_client, wait_until_up
from redis_io.recordlog import RecordLog

log = logging.getLogger("mpserve.up")


class StackSettings(BaseSettings):
    """Settings of `mpserve up` (env MPSERVE_*, or flags)."""

    model_config = SettingsConfigDict(env_prefix="MPSERVE_", extra="ignore")

    host: str = Field("127.0.0.1", description="address the API listens on")
    port: int = Field(8000, ge=1, le=65535, description="port the API listens on")
    data_dir: Path = Field(Path("./data"), description="model store, Redis data and logs")
    redis_url: RedisUrl | None = Field(
        None, description="an existing Redis, or a Redis Cluster as redis+cluster://host:port,host:port "
                          "(unset: start an embedded redis-server)")
    redis_port: int = Field(0, ge=0, le=65535, description="port of the embedded Redis (0: any free port)")
    appendfsync: str = Field("everysec", pattern="^(always|everysec|no)$",
                             description="AOF fsync policy of the embedded Redis (always: no acknowledged label lost)")
    admin_token: SecretStr | None = Field(None, description="admin bearer token (unset: one is generated)")
    default_model: str = Field("fashion", description="the model name; the shipped model is seeded under it")
    ready_timeout_s: float = Field(180.0, gt=0, description="how long to wait for /readyz")
    log_level: str = Field("info", description="logging level of the three processes")


@dataclass(frozen=True)
class ProcessSpec:
    """A child process of the stack: its `mpserve` arguments and environment."""

    args: list[str]
    env: dict[str, str]


def process_specs(settings: StackSettings, redis_url: str, admin_token: str) -> dict[str, ProcessSpec]:
    """The API and the worker, exactly as docker-compose.yml runs them (`mpserve serve` / `mpserve worker`)."""
    common = {
        "MPSERVE_REDIS_URL": redis_url,
        "MPSERVE_STORE_DIR": str(settings.data_dir / "store"),
        "MPSERVE_MODELS": settings.default_model,
        "MPSERVE_LOG_LEVEL": settings.log_level,
    }
    api = {**common, "MPSERVE_HOST": settings.host, "MPSERVE_PORT": str(settings.port),
           "MPSERVE_DEFAULT_MODEL": settings.default_model, "MPSERVE_ADMIN_TOKEN": admin_token,
           "MPSERVE_SEED_DEFAULT": "true"}
    return {"api": ProcessSpec(["serve"], api), "worker": ProcessSpec(["worker"], common)}


def free_port() -> int:
    """A loopback port that was free a moment ago (the caller retries on a lost race)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(settings: StackSettings, logs: Path) -> tuple[subprocess.Popen, str]:
    """A real redis-server with AOF on, data under the data directory, listening on loopback only."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server not found: install Debian's redis-server (scripts/bootstrap.sh does) "
                         "or set MPSERVE_REDIS_URL")
    port = settings.redis_port or free_port()
    data = (settings.data_dir / "redis").resolve()
    data.mkdir(parents=True, exist_ok=True)
    cmd = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data), "--appendonly", "yes",
           "--appendfsync", settings.appendfsync, "--save", "", "--protected-mode", "yes"]
    proc = subprocess.Popen(cmd, stdout=(logs / "redis.log").open("ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"redis://127.0.0.1:{port}/0"
    if not wait_until_up(url, 20, alive=lambda: proc.poll() is None):
        raise SystemExit(f"redis-server did not start (see {logs / 'redis.log'})")
    return proc, url


def spawn(name: str, spec: ProcessSpec, logs: Path) -> subprocess.Popen:
    env = {**os.environ, **spec.env, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "mpserve.cli", *spec.args], env=env,
                            stdout=(logs / f"{name}.log").open("ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def wait_ready(url: str, children: dict[str, subprocess.Popen], timeout_s: float, logs: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for name, proc in children.items():
            if proc.poll() is not None:
                raise SystemExit(f"{name} exited with {proc.returncode}; see {logs / (name + '.log')}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"the API was not ready within {timeout_s:.0f} s; see {logs / 'api.log'}")


def wait_leading(redis_url: str, model: str, children: dict[str, subprocess.Popen], timeout_s: float,
                 logs: Path) -> None:
    """Wait until a worker holds the model's lease: POST /admin/reconcile asks that worker (503 while none leads)."""
    client = blocking_client(redis_url, 5.0, 5.0)
    try:
        records, deadline = RecordLog(client, model), time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for name, proc in children.items():
                if proc.poll() is not None:
                    raise SystemExit(f"{name} exited with {proc.returncode}; see {logs / (name + '.log')}")
            if records.lease_holder() is not None:
                return
            time.sleep(0.2)
    finally:
        client.close()
    raise SystemExit(f"no worker took the lease of {model!r} within {timeout_s:.0f} s; see {logs / 'worker.log'}")


def stop(children: dict[str, subprocess.Popen], timeout_s: float = 15.0) -> None:
    """SIGTERM each child in order (API, worker, Redis) and wait; SIGKILL what does not stop."""
    for name, proc in children.items():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0f s: killing it", name, timeout_s)
                proc.kill()
                proc.wait()


def run(settings: StackSettings) -> int:
    configure_logging(settings.log_level)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    logs = settings.data_dir / "logs"
    logs.mkdir(exist_ok=True)
    if seed_default_model(ModelStore(settings.data_dir / "store"), settings.default_model):
        log.info("seeded the shipped default model as %r", settings.default_model)
    token = settings.admin_token.get_secret_value() if settings.admin_token else secrets.token_urlsafe(24)
    children: dict[str, subprocess.Popen] = {}
    stopping, failed = False, False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    redis_proc = None
    try:
        redis_url = settings.redis_url
        if redis_url is None:
            redis_proc, redis_url = start_redis(settings, logs)
            log.info("embedded redis-server at %s (AOF appendfsync %s)", redis_url, settings.appendfsync)
        for name, spec in process_specs(settings, redis_url, token).items():
            children[name] = spawn(name, spec, logs)
        url = f"http://{settings.host}:{settings.port}"
        wait_ready(url, children, settings.ready_timeout_s, logs)
        wait_leading(redis_url, settings.default_model, children, settings.ready_timeout_s, logs)
        print(f"\nmpserve is up: {url}\n  docs:        {url}/docs\n  admin token: {token}\n"
              f"  logs:        {logs}/\nCtrl-C stops it.\n", flush=True)
        while not stopping:
            for name, proc in children.items():
                if proc.poll() is not None:
                    log.error("%s exited with %s; stopping the stack (see %s)", name, proc.returncode,
                              logs / f"{name}.log")
                    stopping = failed = True
            time.sleep(0.2)
        return 1 if failed else 0
    finally:
        if redis_proc is not None:
            children["redis"] = redis_proc
        stop(children)
        log.info("stopped")


def main(argv: list[str] | None = None) -> int:
    from common.flags import settings_from_argv

    return run(settings_from_argv(StackSettings, argv, "mpserve up", "Run Redis, the API and the worker here."))
