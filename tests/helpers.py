"""Test helpers: a real redis-server process, API replica and worker processes, and polling with a deadline."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import httpx
import redis
import redis.asyncio

from common.loading import fallback_base
from model_store import ModelStore
from mpserve.stack import free_port
from redis_io.protocol import AttachResult, LabelItem, PredictionRecord, StoredPrediction
from redis_io.recordlog import AsyncRecordLog, RecordLog

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]

T = TypeVar("T")


class ModelLog(RecordLog):
    """A model's record log with both sides, for tests that play the API and the worker from one thread.

    The leader's calls are :class:`RecordLog`'s own; the replicas' (predictions, labels, rollback, retention
    figures) run :class:`AsyncRecordLog`, the very code the API runs, on an event loop and connection of
    their own per call, against the same Redis.
    """

    def __init__(self, client: redis.Redis, model: str, **kwargs: Any) -> None:
        super().__init__(client, model, **kwargs)
        self._kwargs = kwargs
        conn = client.connection_pool.connection_kwargs
        self._address = {"host": conn.get("host", "127.0.0.1"), "port": conn.get("port", 6379),
                         "db": conn.get("db", 0), "password": conn.get("password")}

    def _replica(self, method: str, *args: Any, **kwargs: Any) -> Any:
        async def call() -> Any:
            client = redis.asyncio.Redis(**self._address)
            try:
                return await getattr(AsyncRecordLog(client, self.model, **self._kwargs), method)(*args, **kwargs)
            finally:
                await client.aclose()

        return asyncio.run(call())

    def write_predictions(self, items: Sequence[PredictionRecord], now_ms: int | None = None) -> None:
        self._replica("write_predictions", items, now_ms)

    def fetch_logits(self, ids: Sequence[str]) -> dict[str, StoredPrediction | None]:
        return self._replica("fetch_logits", ids)

    def attach_labels_detailed(self, items: Sequence[LabelItem], now_ms: int | None = None,
                               client: str | None = None) -> list[AttachResult]:
        return self._replica("attach_labels_detailed", items, now_ms, client)

    def attach_labels(self, items: Sequence[LabelItem], now_ms: int | None = None) -> list[str]:
        """Statuses ok / duplicate / conflict / not_found, one per item."""
        return [r.status for r in self.attach_labels_detailed(items, now_ms)]

    def rollback(self, version: int, history_record: Mapping[str, Any] | None = None) -> None:
        self._replica("rollback", version, history_record)

    def retention_deleted_total(self) -> int:
        return self._replica("retention_deleted_total")

    def backlog(self) -> int:
        return self.stream_stats().backlog


def serving_version(client: redis.Redis, model: str, store: ModelStore) -> int:
    """The version replicas serve: ``mp:{m}:version``, or while no publish or rollback has set it, the store's
    base, which replicas and the worker both take (``fallback_base``); a replica never writes the key."""
    records = RecordLog(client, model)
    current = records.current_version()
    if current is not None:
        return current
    published = {h.get("version") for h in records.history() if h.get("type") == "publish"}
    base = fallback_base(store, model, published)
    assert base is not None, f"the store has no version of {model}"
    return base


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


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of a Prometheus text page (0 when absent)."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        sample, value = line.rsplit(" ", 1)
        got_name, _, raw_labels = sample.partition("{")
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', raw_labels))
        if got_name == name and all(found.get(k) == v for k, v in labels.items()):
            return float(value)
    return 0.0


def terminate(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM and wait; SIGKILL if it will not go."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


class RedisProcess:
    """A redis-server child process on 127.0.0.1, with its data in ``tmp_dir``."""

    def __init__(self, tmp_dir: Path, port: int, appendonly: bool, appendfsync: str,
                 extra_args: Sequence[str] = ()) -> None:
        self.tmp_dir = Path(tmp_dir)
        self.port = port
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.extra_args = list(extra_args)
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
            *self.extra_args,
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
        terminate(self.proc, timeout)
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


def numpy_mlp(spec, params, x):  # type: ignore[no-untyped-def]
    """An independent NumPy forward of the `mlp` model (float64): a twin of the engine's leader path."""
    import numpy as np

    h = x.reshape(len(x), -1).astype(np.float64) * spec.input_scale
    for s in range(len(spec.groups)):
        h = h @ params[f"{s}.fc.weight"].astype(np.float64).T + params[f"{s}.fc.bias"]
        if s < len(spec.groups) - 1:
            h = np.maximum(h, 0)
    return h


def fitted_mlp(spec, x, y, seed: int = 0):  # type: ignore[no-untyped-def]
    """A one-hidden-layer `mlp` that has learnt (x, y) in a second, without the code under test: random hidden
    features (``spec.init_params(seed)``), the head fitted by ridge regression in NumPy (~65% on Fashion-MNIST
    with 32 features and 3,000 images)."""
    import numpy as np

    assert len(spec.groups) == 2, "one hidden layer"
    params = spec.init_params(seed)
    flat = x.reshape(len(x), -1).astype(np.float64) * spec.input_scale
    h = np.maximum(flat @ params["0.fc.weight"].T.astype(np.float64) + params["0.fc.bias"], 0)
    h1 = np.hstack([h, np.ones((len(h), 1))])
    target = np.eye(spec.num_classes)[y] * 8.0 - 4.0
    w = np.linalg.solve(h1.T @ h1 + np.eye(h1.shape[1]), h1.T @ target)
    params["1.fc.weight"], params["1.fc.bias"] = w[:-1].T.astype(np.float32), w[-1].astype(np.float32)
    return params


class RedisClusterProcesses:
    """A real Redis Cluster on loopback: ``primaries`` redis-server processes in cluster mode, no replicas,
    joined by ``redis-cli --cluster create`` (slots spread evenly); ``.url`` is mpserve's cluster URL."""

    def __init__(self, tmp_dir: Path, primaries: int = 3) -> None:
        self.nodes, self.created = [], False
        for _ in range(primaries):
            port = free_port()
            node_dir = Path(tmp_dir) / f"node-{port}"
            self.nodes.append(RedisProcess(node_dir, port, False, "everysec", [
                "--cluster-enabled", "yes", "--cluster-port", str(free_port()),
                "--cluster-config-file", str(node_dir / "nodes.conf"),
                "--cluster-node-timeout", "2000"]))

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self, timeout: float = 30.0) -> RedisClusterProcesses:
        """Start the nodes and join them (the first time) or wait until they find each other again (a restart);
        on any failure every node is stopped, so no server outlives the test that started it."""
        try:
            for node in self.nodes:
                node.start()
            if not self.created:
                self._create(timeout)
            wait_until(self._settled, timeout=timeout, interval=0.1, what="the Redis Cluster settles")
        except BaseException:
            self.stop()
            raise
        self.created = True
        return self

    def _create(self, timeout: float) -> None:
        cli = shutil.which("redis-cli")
        if cli is None:
            raise RuntimeError("redis-cli not found on PATH (Debian's redis-tools, installed with redis-server)")
        out = subprocess.run([cli, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
                              "--cluster-replicas", "0", "--cluster-yes"], capture_output=True, text=True,
                             timeout=timeout)
        if out.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {out.stdout[-2000:]} {out.stderr[-2000:]}")

    def _settled(self) -> bool:
        """Every node agrees the cluster is whole and knows every other node."""
        for node in self.nodes:
            client = redis.Redis(port=node.port, host="127.0.0.1", socket_timeout=1)
            try:
                info = client.execute_command("CLUSTER", "INFO").decode()
                known = len(client.execute_command("CLUSTER", "NODES").decode().strip().splitlines())
            finally:
                client.close()
            if "cluster_state:ok" not in info or known != len(self.nodes):
                return False
        return True

    def port_of_slot(self, slot: int) -> int:
        """The port of the primary that serves ``slot``."""
        client = redis.Redis(port=self.nodes[0].port, host="127.0.0.1")
        try:
            for start, end, primary, *_ in client.execute_command("CLUSTER", "SLOTS"):
                if start <= slot <= end:
                    return int(primary[1])
        finally:
            client.close()
        raise LookupError(f"no node serves slot {slot}")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


# ------------------------------------------------------------------------------------------ feedback


def feed_labels(client: redis.Redis, model: str, n: int, version: int = 0, now_ms: int | None = None, *,
                rng, groups: int = 2, vendors: int = 4, classes: int = 10) -> list[str]:  # type: ignore[no-untyped-def]
    """Write ``n`` labelled predictions served by ``version`` on random paths; their stream entry ids, in order.

    ``rng``: the test's own seeded generator (paths, labels and losses are drawn from it). The defaults fit
    :func:`make_store`'s model (2 layer groups, 4 vendors, 10 classes).
    """
    import numpy as np

    records = [
        PredictionRecord(f"p{next(_record_ids)}", version, tuple(int(v) for v in rng.integers(0, vendors, groups)),
                         np.zeros(classes, np.float32), label=int(rng.integers(classes)),
                         loss=float(rng.exponential(1.0)))
        for _ in range(n)
    ]
    log_ = ModelLog(client, model)
    log_.write_predictions(records, now_ms)
    return [eid.decode() for eid, _ in reversed(client.xrevrange(log_.keys.feedback, count=n))]


_record_ids = itertools.count()


def pending_ids(client: redis.Redis, model: str, group: str = "reconciler") -> list[str]:
    """Entry ids delivered to the consumer group and not acknowledged (none while the group is missing)."""
    from redis_io.keys import ModelKeys

    try:
        rows = client.xpending_range(ModelKeys(model).feedback, group, "-", "+", 100_000)
    except redis.ResponseError:
        return []
    return [r["message_id"].decode() for r in rows]


# ------------------------------------------------------------------------------------------ processes


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without any MPSERVE_* variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MPSERVE_")}
    return {**env, **extra}


class ChildProcess:
    """A ``python -m <module>`` child with its output in a log file, and fault-injection helpers.

    ``fault`` is ``MPSERVE_FAULT`` (see common.faults); with a ``<point>:pause`` fault the child
    writes :attr:`marker` when it reaches the point, and :meth:`wait_paused` waits for that.
    """

    def __init__(self, module: str, args: list[str], log_path: Path, fault: str | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.module, self.args, self.log_path, self.fault = module, args, Path(log_path), fault
        self.marker = self.log_path.with_suffix(".fault")
        extra = dict(env or {})
        if fault:
            extra.update(MPSERVE_FAULT=fault, MPSERVE_FAULT_MARKER=str(self.marker))
        self.env = clean_env(**extra)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ChildProcess:
        self.marker.unlink(missing_ok=True)
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", self.module, *self.args], cwd=REPO, env=self.env,
                                         stdout=out, stderr=subprocess.STDOUT)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return "(no log)"

    def _alive(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.module} exited with {self.proc.returncode}:\n{self.log_tail()}")
        return True

    def wait_paused(self, timeout: float = 30.0) -> str:
        """Wait until the child stopped at its fault point; returns the point's name."""
        def paused() -> str | None:
            self._alive()
            if not self.marker.exists():
                return None
            point, pid = self.marker.read_text().split()
            assert int(pid) == self.pid
            return point
        try:
            return wait_until(paused, timeout=timeout, interval=0.02, what=f"{self.module} reaches {self.fault}")
        except TimeoutError as exc:
            raise RuntimeError(f"{exc}\n{self.log_tail()}") from None

    def sigkill(self) -> int:
        """A real SIGKILL (no handler, no cleanup); returns the exit status (-9)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        return self.proc.wait(timeout=10)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM and wait (SIGKILL if it will not go); the exit status, None if it never started."""
        if self.proc is None:
            return None
        terminate(self.proc, timeout)
        return self.proc.returncode


def worker_args(redis_url: str, store_root: Path, model: str, consumer: str, min_records: int = 32,
                *extra: str) -> list[str]:
    """Flags of ``python -m worker`` for tests: a short lease and poll, no timer, no idle reclaim."""
    return ["--redis-url", redis_url, "--store-dir", str(store_root), "--models", model, "--consumer", consumer,
            "--min-records", str(min_records), "--min-cohort", "8", "--poll-ms", "20", "--lease-ttl-ms", "900",
            "--claim-idle-ms", "60000", "--interval-s", "3600", *extra]


class ApiProcess(ChildProcess):
    """``python -m server`` on a free loopback port (a new one at each start): the one helper that runs an API
    replica; ``env`` is added to this environment less its MPSERVE_* variables (:func:`clean_env`)."""

    def __init__(self, args: list[str], log_path: Path, fault: str | None = None,
                 env: dict[str, str] | None = None) -> None:
        super().__init__("server", args, log_path, fault, env)
        self.base_args = list(args)
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ApiProcess:
        self.port = free_port()
        self.args = [*self.base_args, "--port", str(self.port)]
        super().start()
        return self

    def readyz(self, timeout: float = 5.0):
        """GET /readyz (None while the port does not answer yet)."""

        self._alive()
        try:
            return httpx.get(self.url + "/readyz", timeout=timeout)
        except httpx.TransportError:
            return None

    def wait_ready(self, timeout: float = 120.0) -> None:
        try:
            wait_until(lambda: (r := self.readyz()) is not None and r.status_code == 200, timeout=timeout,
                       interval=0.1, what=f"{self.url}/readyz")
        except TimeoutError as exc:
            raise RuntimeError(f"{exc}\n{self.log_tail()}") from None

    def __enter__(self) -> ApiProcess:
        """Started and ready; stopped on exit (a fixture's whole lifetime in one ``with``)."""
        try:
            self.start()
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def api_args(redis_url: str, store_root: Path, *extra: str) -> list[str]:
    """Flags of ``python -m server`` for tests: small batches (a quick warmup), fast polling, short Redis timeout."""
    return ["--redis-url", redis_url, "--store-dir", str(store_root), "--max-batch", "16", "--max-wait-ms", "5",
            "--poll-interval-s", "0.5", "--redis-timeout-s", "0.5", "--log-level", "info", *extra]
