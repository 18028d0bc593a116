"""The leader lease of one model as one worker holds it: take, renew on time, notice its loss.

The lease (``SET NX PX`` on ``mp:{m}:lock``) says who should work; the fencing token taken with it says
whose publish counts. A worker that lost the lease without noticing (a pause, a partition) cannot do
harm: the publish script refuses its older token. Renewing every third of the TTL leaves two thirds
of it as slack for a slow loop iteration.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from redis_io.recordlog import RecordLog

log = logging.getLogger(__name__)


class Lease:
    """``owner``'s view of the lease: the fencing token while it believes it holds the lease, else None."""

    def __init__(self, records: RecordLog, owner: str, ttl_ms: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.records = records
        self.owner = owner
        self.ttl_ms = ttl_ms
        self.token: int | None = None
        self._clock = clock
        self._renewed_at = 0.0

    @property
    def held(self) -> bool:
        return self.token is not None

    def acquire(self) -> bool:
        """Take the lease if it is free; a success gives a new, larger fencing token."""
        token = self.records.acquire_lease(self.owner, self.ttl_ms)
        if token is None:
            return False
        self.token, self._renewed_at = token, self._clock()
        log.info("%s: %s took the leader lease (fencing token %d)", self.records.model, self.owner, token)
        return True

    def keep(self) -> bool:
        """Renew when a third of the TTL has passed; False when the lease is gone (stop leading)."""
        if self.token is None:
            return False
        now = self._clock()
        if (now - self._renewed_at) * 1000 < self.ttl_ms / 3:
            return True
        if self.records.renew_lease(self.owner, self.ttl_ms):
            self._renewed_at = now
            return True
        log.warning("%s: %s lost the leader lease (token %d)", self.records.model, self.owner, self.token)
        self.token = None
        return False

    @contextmanager
    def renewing(self) -> Iterator[None]:
        """Renew from a helper thread while the caller runs one long step (a reconciliation, a validation).

        A step longer than the TTL (the validation guard compiling its engine, a large holdout) would
        otherwise let the lease expire under a healthy leader and hand the model to another worker mid-way.
        The caller must not use the lease inside the block; afterwards ``held`` says whether it survived.
        """
        if self.token is None:
            yield
            return
        stop, lost = threading.Event(), threading.Event()

        def renew() -> None:
            while not stop.wait(self.ttl_ms / 3000):
                if not self.records.renew_lease(self.owner, self.ttl_ms):
                    lost.set()
                    return
                self._renewed_at = self._clock()

        thread = threading.Thread(target=renew, name=f"lease-{self.records.model}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            if lost.is_set() and self.token is not None:
                log.warning("%s: %s lost the leader lease during a long step (token %d)", self.records.model,
                            self.owner, self.token)
                self.token = None

    def drop(self) -> None:
        """Forget the lease locally (after a refused publish): the next ``acquire`` decides anew."""
        self.token = None

    def release(self) -> None:
        """Give the lease back so another worker takes over at once instead of after the TTL."""
        if self.token is None:
            return
        self.token = None
        if self.records.release_lease(self.owner):
            log.info("%s: %s released the leader lease", self.records.model, self.owner)

    def holder(self) -> str | None:
        """Who holds the lease now, as Redis says (None: nobody)."""
        return self.records.lease_holder()
