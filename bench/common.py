"""Shared bits of the benchmarks: a table printer, JSON output, and interleaved best-of timing."""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tinygrad import Device


def rate(fn: Callable[[], int], seconds: float) -> float:
    """Items per second of `fn` (which returns how many items it processed), run for about `seconds`."""
    start, n = time.perf_counter(), 0
    while True:
        n += fn()
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return n / elapsed


def print_table(rows: list[dict[str, Any]], columns: list[str], markdown: bool = False) -> None:
    """Rows as an aligned text table, or a Markdown one (ready to paste into the README)."""
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.0f}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    sep, edge = (" | ", "| ") if markdown else ("  ", "")
    end = " |" if markdown else ""
    print(edge + sep.join(c.rjust(w) for c, w in zip(columns, widths, strict=True)) + end)
    if markdown:
        print("|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|")
    for row in cells:
        print(edge + sep.join(v.rjust(w) for v, w in zip(row, widths, strict=True)) + end)


def save_figure(fig: Any, path: Path, dpi: int = 100) -> None:
    """Lay out a matplotlib figure, write it as a PNG (making its folder), and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def write_json(path: Path | None, payload: dict[str, Any]) -> None:
    if path:
        payload = {**payload, "device": Device.DEFAULT, "machine": platform.machine(), "time": time.time()}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2))


# ---------------------------------------------------------------------------------- a stack on loopback
class LocalStack:
    """Redis, API replicas and a worker on loopback, each a real process, started the way `mpserve up` does.

    The pieces are mpserve.stack's own (`start_redis`, `process_specs`, `spawn`, `wait_ready`, `stop`), so
    a benchmark runs exactly what a deployment runs; a benchmark only picks which processes and which
    MPSERVE_* settings. Several API replicas may share the one Redis (each on its own free port).
    """

    def __init__(self, data_dir: Path, log_level: str = "warning", admin_token: str = "bench-token",
                 default_model: str = "fashion") -> None:
        from mpserve.stack import StackSettings

        self.data_dir, self.admin_token = Path(data_dir), admin_token
        self.logs = self.data_dir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.settings = StackSettings(data_dir=self.data_dir, log_level=log_level, default_model=default_model)
        self.children: dict[str, Any] = {}  # name -> subprocess.Popen, in start order
        self.urls: dict[str, str] = {}
        self.redis_url = ""
        self._redis: Any = None

    def start_redis(self) -> str:
        from common.loading import seed_default_model
        from model_store import ModelStore
        from mpserve.stack import start_redis

        seed_default_model(ModelStore(self.data_dir / "store"), self.settings.default_model)  # once, before any API
        self._redis, self.redis_url = start_redis(self.settings, self.logs)
        return self.redis_url

    def _spec(self, kind: str, port: int) -> Any:
        from mpserve.stack import process_specs

        settings = self.settings.model_copy(update={"port": port})
        return process_specs(settings, self.redis_url, self.admin_token)[kind]

    def start_api(self, name: str, env: dict[str, str] | None = None) -> str:
        """An API replica (`mpserve serve`) with extra MPSERVE_* settings; returns its URL once started."""
        from mpserve.stack import free_port, spawn

        port = free_port()
        spec = self._spec("api", port)
        self.children[name] = spawn(name, type(spec)(spec.args, {**spec.env, **(env or {})}), self.logs)
        self.urls[name] = f"http://{self.settings.host}:{port}"
        return self.urls[name]

    def start_worker(self, env: dict[str, str] | None = None, name: str = "worker") -> None:
        from mpserve.stack import spawn

        spec = self._spec("worker", 0)
        self.children[name] = spawn(name, type(spec)(spec.args, {**spec.env, **(env or {})}), self.logs)

    def wait_ready(self, timeout_s: float = 300.0) -> None:
        from mpserve.stack import wait_ready

        for url in self.urls.values():
            wait_ready(url, self.children, timeout_s, self.logs)

    def pid(self, name: str) -> int:
        return int(self.children[name].pid) if name != "redis" else int(self._redis.pid)

    def stop(self) -> None:
        from mpserve.stack import stop

        # as `mpserve up` stops: the API replicas (no new records), then the worker, then Redis
        children = {n: p for n, p in self.children.items() if n in self.urls}
        children.update({n: p for n, p in self.children.items() if n not in self.urls})
        if self._redis is not None:
            children["redis"] = self._redis
        stop(children)
        self.children, self._redis = {}, None

    def __enter__(self) -> LocalStack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---------------------------------------------------------------------------------- /proc readings
def proc_cpu_s(pid: int, main_thread_only: bool = False) -> float:
    """CPU seconds (user + system) a process has used so far: all its threads, or only its main thread
    (for an API replica: the event loop, i.e. HTTP, JSON, validation and Redis, without the engine thread)."""
    import os

    path = f"/proc/{pid}/task/{pid}/stat" if main_thread_only else f"/proc/{pid}/stat"
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime: fields 14, 15


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (VmRSS in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise ValueError(f"no VmRSS for process {pid}")
