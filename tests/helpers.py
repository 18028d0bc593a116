"""Test helpers: a real redis-server process, a real API replica process, and condition polling with a deadline."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import httpx
import redis

log = logging.getLogger(__name__)

T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[1]


def wait_until(
    predicate: Callable[[], T], timeout: float = 5.0, interval: float = 0.005, what: str = ""
) -> T:
    """Poll ``predicate`` until it returns a truthy value; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout}s: {what or predicate!r}")
        time.sleep(interval)


def free_port() -> int:
    """A loopback port that was free a moment ago (the caller retries on a lost race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisProcess:
    """A redis-server child process on 127.0.0.1, with its data in ``tmp_dir``."""

    def __init__(self, tmp_dir: Path, port: int, appendonly: bool, appendfsync: str) -> None:
        self.tmp_dir = Path(tmp_dir)
        self.port = port
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.tmp_dir / f"redis-{self.port}.log"

    def argv(self) -> list[str]:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server not found on PATH")
        return [
            exe,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", self.appendfsync,
            "--dir", str(self.tmp_dir),
            "--logfile", str(self.log_path),
        ]  # fmt: skip

    def start(self, timeout: float = 10.0) -> None:
        """Start the server and return once it answers PING (or raise with its log)."""
        if self.running:
            return
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        with open(self.tmp_dir / f"redis-{self.port}.stderr", "ab") as err:
            self.proc = subprocess.Popen(self.argv(), stdout=subprocess.DEVNULL, stderr=err)
        client = redis.Redis(port=self.port, host="127.0.0.1", socket_connect_timeout=0.2)
        try:
            deadline = time.monotonic() + timeout
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited with {self.proc.returncode}: {self._log_tail()}")
                try:
                    if client.ping():
                        return
                except redis.ConnectionError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"redis-server did not answer PING in {timeout}s: {self._log_tail()}")
                time.sleep(0.01)
        finally:
            client.close()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """Terminate (SIGTERM: AOF is flushed) and wait; kill if it will not go."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL: a crash, for durability tests (no shutdown flush)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.stop()

    def restart(self) -> None:
        """Stop and start on the same port and directory (AOF data survives when enabled)."""
        self.stop()
        self.start()

    def _log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return "(no log)"


def start_redis(
    tmp_dir: Path, port: int | None = None, appendonly: bool = False, appendfsync: str = "everysec"
) -> RedisProcess:
    """Start a real redis-server; with no port, pick a free one (retrying if it gets taken)."""
    attempts = 1 if port is not None else 5
    last: Exception | None = None
    for _ in range(attempts):
        proc = RedisProcess(tmp_dir, port or free_port(), appendonly, appendfsync)
        try:
            proc.start()
            return proc
        except RuntimeError as exc:
            log.warning("redis-server failed to start on port %d: %s", proc.port, exc)
            last = exc
    raise RuntimeError(f"could not start redis-server: {last}")


def make_store(root: Path, model: str = "fashion", hidden: tuple[int, ...] = (32,), vendors: int = 4,
               eps: float = 0.05, seed: int = 0):
    """A model store holding version 0 of a small `mlp` model: fast enough for every test that serves."""
    import numpy as np

    from marketplace.models import mlp
    from marketplace.reconcile import fresh_seeds
    from model_store import ModelStore, make_manifest

    spec = mlp(hidden=hidden)
    store = ModelStore(root)
    manifest = make_manifest(version=0, parent=None, model=model, architecture=spec.architecture,
                             seeds=fresh_seeds(len(spec.groups), vendors, np.random.default_rng(seed)),
                             probe_scale=eps, learning_rate=0.5, training={"kind": "random init (tests)"})
    store.write_version(model, 0, spec.init_params(seed), manifest)
    return store


class ServerProcess:
    """``python -m server`` on a free loopback port, its output in a log file."""

    def __init__(self, log_dir: Path, name: str, args: list[str], env: dict[str, str]) -> None:
        self.log_path = log_dir / f"server-{name}.log"
        self.args, self.env = args, env
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def launch(self) -> None:
        self.port = free_port()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "server", "--port", str(self.port), *self.args],
                                         stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=ROOT)

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
        try:
            return httpx.get(self.url + "/readyz", timeout=1.0).status_code == 200
        except httpx.TransportError:
            return False

    def wait_ready(self, timeout: float = 90.0) -> None:
        try:
            wait_until(self._ready, timeout=timeout, interval=0.1, what=f"{self.url}/readyz")
        except TimeoutError as exc:
            raise RuntimeError(f"{exc}\n{self.log_tail()}") from None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return "(no log)"


def server_env(**extra: str) -> dict[str, str]:
    """This process's environment without any MPSERVE_* variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MPSERVE_")}
    return {**env, **extra}
