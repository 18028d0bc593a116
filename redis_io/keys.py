"""Redis key names of one model (docs/DESIGN.md §2).

Every key of a model carries the hash tag ``{m}`` so that all of them live in one Redis Cluster
slot and a Lua script may touch any of them.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.names import validate_model_name, validate_record_id


@dataclass(frozen=True, slots=True)
class ModelKeys:
    """Key names for ``model``; the only place that spells them."""

    model: str

    def __post_init__(self) -> None:
        validate_model_name(self.model)

    @property
    def prefix(self) -> str:
        return f"mp:{{{self.model}}}"

    def pred(self, record_id: str) -> str:
        """Hash of one served prediction: version, path, logits, created, label."""
        return f"{self.prefix}:pred:{validate_record_id(record_id)}"

    @property
    def feedback(self) -> str:
        """Stream of labelled examples, read by the ``reconciler`` consumer group."""
        return f"{self.prefix}:feedback"

    def kept_input(self, record_id: str) -> str:
        """String: the input of a prediction the API kept for the replay (float32 bytes), until it is labelled
        or ``replay_window_s`` passes; then the label script moves it to :attr:`replay`."""
        return f"{self.prefix}:x:{validate_record_id(record_id)}"

    @property
    def replay(self) -> str:
        """Stream of recent labelled inputs (``x`` float32 bytes, ``label``, ``id``), capped by the API's
        ``replay_size``; the worker's guard judges candidates on them."""
        return f"{self.prefix}:replay"

    @property
    def version(self) -> str:
        """String: the version serving must use."""
        return f"{self.prefix}:version"

    @property
    def events(self) -> str:
        """Pub/sub channel: one JSON message per publish or rollback."""
        return f"{self.prefix}:events"

    @property
    def lock(self) -> str:
        """String: the reconciler's leader lease (value = owner)."""
        return f"{self.prefix}:lock"

    @property
    def fence(self) -> str:
        """String counter: fencing token, INCR'd on every lease taken."""
        return f"{self.prefix}:fence"

    @property
    def history(self) -> str:
        """List of JSON records, one per publish or rollback, oldest first."""
        return f"{self.prefix}:history"

    @property
    def retention(self) -> str:
        """Hash of what retention deleted: ``deleted_total`` (HINCRBY), ``last_deleted`` (JSON list), ``last_ts_ms``."""
        return f"{self.prefix}:retention"

    @property
    def requests(self) -> str:
        """List of JSON reconcile requests (``POST /admin/reconcile``) for the worker holding the lease."""
        return f"{self.prefix}:requests"

    def reply(self, request_id: str) -> str:
        """List holding the worker's JSON answer to one reconcile request (short TTL; BLPOP'd)."""
        return f"{self.prefix}:reply:{validate_record_id(request_id)}"
