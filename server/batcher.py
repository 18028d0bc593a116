"""Micro-batching: concurrent /predict requests of a model share one engine batch.

A batch closes when it holds ``max_batch`` inputs or when its oldest request has waited
``max_wait_ms``, whichever comes first; while the engine runs a batch, the next one gathers, so under
load batches grow by themselves. A batch runs once on the engine thread, on the :class:`Served` it
captured (every answer names that version), its records go to Redis in one round trip, and only then
does each request get its slice: a client can label an id as soon as it has it. With learning off
nothing is recorded: a batch is answered as soon as the engine returns, without ids.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass

import numpy as np

from common.engine_thread import EngineThread
from marketplace.reconcile import cross_entropy
from redis_io.protocol import PredictionRecord
from redis_io.recordlog import AsyncRecordLog
from server.errors import ApiError, redis_op
from server.metrics import ServerMetrics
from server.runtime import ModelRuntime, Served

log = logging.getLogger(__name__)

QUEUE_BATCHES = 64  # more queued inputs than this many full batches: shed load with a 503


@dataclass(frozen=True)
class Answer:
    """One request's share of a batch."""

    version: int
    ids: list[str] | None  # None: learning is off, nothing was recorded
    logits: np.ndarray  # (n, C) float32


@dataclass
class _Item:
    x: np.ndarray  # (n, *input_shape) float32
    labels: np.ndarray | None  # (n,) int64
    future: asyncio.Future[Answer]
    arrived: float
    client: str | None = None  # the API client that asked; recorded with each of its predictions

    @property
    def n(self) -> int:
        return len(self.x)


class MicroBatcher:
    """The batching loop of one model."""

    def __init__(self, runtime: ModelRuntime, records: AsyncRecordLog, engine_thread: EngineThread,
                 metrics: ServerMetrics, max_batch: int, max_wait_ms: float, redis_timeout_s: float,
                 learning: bool = True, paired: bool = False, replay_share: float = 0.0) -> None:
        self.runtime, self.records, self.engine_thread, self.metrics = runtime, records, engine_thread, metrics
        self.learning, self.paired = learning, paired
        self.replay_share = replay_share  # inputs kept until labelled, for the worker's guard (replay stream)
        self.keep_rng = np.random.default_rng()  # which inputs are kept; used on the event loop only
        self.max_batch, self.max_wait_s, self.redis_timeout_s = max_batch, max_wait_ms / 1000.0, redis_timeout_s
        self.rng = np.random.default_rng()  # path choices; used on the engine thread only
        self._pending: deque[_Item] = deque()
        self._queued = 0
        self._arrived = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._finishing: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=f"batcher-{self.runtime.name}")

    async def stop(self) -> None:
        """Stop batching; answer what is still queued with a 503, let batches already run finish."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        while self._pending:
            item = self._pending.popleft()
            if not item.future.done():
                item.future.set_exception(ApiError(503, "the server is shutting down"))
        self._queued = 0
        await asyncio.gather(*self._finishing, return_exceptions=True)

    async def submit(self, x: np.ndarray, labels: np.ndarray | None, client: str | None = None) -> Answer:
        """Queue validated inputs (and their labels, from ``client``) and wait for their share of a batch."""
        if self.runtime.served is None:
            raise ApiError(503, f"model {self.runtime.name!r} is not loaded yet: {self.runtime.error or 'starting'}")
        if self._task is None:
            raise ApiError(503, "the server is shutting down")
        if self._queued + len(x) > QUEUE_BATCHES * self.max_batch:
            raise ApiError(503, "the server is overloaded; retry later", {"Retry-After": "1"})
        loop = asyncio.get_running_loop()
        item = _Item(x, labels, loop.create_future(), loop.time(), client)
        self._pending.append(item)
        self._queued += item.n
        self._arrived.set()
        return await item.future

    # ------------------------------------------------------------------------------ the loop
    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                self._arrived.clear()
                await self._arrived.wait()
            deadline = self._pending[0].arrived + self.max_wait_s
            while self._queued < self.max_batch and loop.time() < deadline:
                self._arrived.clear()
                try:
                    async with asyncio.timeout_at(deadline):
                        await self._arrived.wait()
                except TimeoutError:
                    break
            items = self._take()
            if items:
                await self._run(items)

    def _take(self) -> list[_Item]:
        """Up to max_batch inputs in arrival order; a request larger than that runs alone."""
        items: list[_Item] = []
        total = 0
        while self._pending:
            item = self._pending[0]
            if item.future.done():  # its client left before it ran
                self._pending.popleft()
                self._queued -= item.n
                continue
            if items and total + item.n > self.max_batch:
                break
            self._pending.popleft()
            self._queued -= item.n
            items.append(item)
            total += item.n
        return items

    async def _run(self, items: list[_Item]) -> None:
        served = self.runtime.served  # captured: this batch runs and is answered on this version
        if served is None:
            _fail(items, ApiError(503, f"model {self.runtime.name!r} is not loaded"))
            return
        shape = tuple(served.engine.spec.input_shape)
        classes = served.engine.spec.num_classes
        stale = [it for it in items if it.x.shape[1:] != shape
                 or (it.labels is not None and len(it.labels) and int(it.labels.max()) >= classes)]
        if stale:  # validated against a version of another architecture that was swapped out meanwhile
            _fail(stale, ApiError(409, f"model {self.runtime.name!r} changed to input shape {shape} and "
                                       f"{classes} classes; check GET /models and retry"))
            items = [it for it in items if not any(it is st for st in stale)]
            if not items:
                return
        x = np.concatenate([it.x for it in items]) if len(items) > 1 else items[0].x
        started = time.perf_counter()
        try:
            if self.paired:  # the user gets the leader's answer; the probe's logits go to the record
                logits, paths, leader = await self.engine_thread.run(served.engine.forward_paired, served.weights,
                                                                     x, self.rng)
            else:
                (logits, paths), leader = await self.engine_thread.run(served.engine.forward, served.weights, x,
                                                                       self.rng), None
        except asyncio.CancelledError:
            _fail(items, ApiError(503, "the server is shutting down"))
            raise
        except Exception as exc:
            log.exception("model %s: engine batch of %d inputs failed", self.runtime.name, len(x))
            _fail(items, ApiError(500, f"inference failed: {type(exc).__name__}"))
            return
        name = self.runtime.name
        self.metrics.engine_seconds.labels(name).observe(time.perf_counter() - started)
        self.metrics.batch_inputs.labels(name).observe(len(x))
        self.metrics.batch_requests.labels(name).observe(len(items))
        task = asyncio.create_task(self._finish(served, items, logits, paths, leader))
        self._finishing.add(task)
        task.add_done_callback(self._finishing.discard)

    async def _finish(self, served: Served, items: list[_Item], logits: np.ndarray, paths: np.ndarray,
                      leader: np.ndarray | None) -> None:
        """Answer every request of the batch, whatever happens: nobody awaits this task, so nothing may hang."""
        try:
            await self._write_and_answer(served, items, logits, paths, leader)
        except Exception as exc:
            log.exception("model %s: finishing a batch failed", self.runtime.name)
            _fail([it for it in items if not it.future.done()],
                  ApiError(500, f"recording failed: {type(exc).__name__}"))

    async def _write_and_answer(self, served: Served, items: list[_Item], logits: np.ndarray, paths: np.ndarray,
                                leader: np.ndarray | None) -> None:
        """Write the batch's records in one round trip, then answer each request (with the leader's logits when
        probes are paired, else with the probe's)."""
        records: list[PredictionRecord] = []
        answers: list[tuple[_Item, Answer]] = []
        offset = 0
        for item in items:
            lg, pth = logits[offset:offset + item.n], paths[offset:offset + item.n]
            lead = None if leader is None else leader[offset:offset + item.n]
            answer = lg if lead is None else lead
            offset += item.n
            if item.future.done():
                continue  # cancelled: nobody will ever see (or label) these ids
            finite = np.isfinite(lg).all(axis=1) & np.isfinite(answer).all(axis=1)
            if not finite.all():
                bad = int(np.flatnonzero(~finite)[0])
                item.future.set_exception(ApiError(422, [{
                    "loc": ["body", "inputs", bad], "type": "value_error",
                    "msg": "the model produced non-finite outputs for this input (values too large?)"}]))
                continue
            if not self.learning:
                item.future.set_result(Answer(served.version, None, answer))
                continue
            ids = [uuid.uuid4().hex for _ in range(item.n)]
            losses = cross_entropy(lg, item.labels) if item.labels is not None and lead is None else None
            keep = self.keep_rng.random(item.n) < self.replay_share
            for i in range(item.n):
                records.append(PredictionRecord(
                    ids[i], served.version, tuple(int(v) for v in pth[i]), lg[i],
                    None if item.labels is None else int(item.labels[i]),
                    None if losses is None else float(losses[i]), item.client,
                    None if lead is None else lead[i], item.x[i] if keep[i] else None))
            answers.append((item, Answer(served.version, ids, answer)))
        if not records:
            return
        try:
            async with redis_op("write prediction records", self.redis_timeout_s):
                await self.records.write_predictions(records)
        except ApiError as exc:
            _fail([it for it, _ in answers], exc)
            return
        except Exception as exc:
            log.exception("model %s: writing %d records failed", self.runtime.name, len(records))
            _fail([it for it, _ in answers], ApiError(500, f"recording the predictions failed: {type(exc).__name__}"))
            return
        self.metrics.records.labels(self.runtime.name).inc(len(records))
        labelled = sum(1 for r in records if r.label is not None)
        if labelled:
            self.metrics.labels.labels(self.runtime.name, "with_prediction").inc(labelled)
        for item, answer in answers:
            if not item.future.done():
                item.future.set_result(answer)


def _fail(items: list[_Item], exc: Exception) -> None:
    for it in items:
        if not it.future.done():
            it.future.set_exception(exc)
