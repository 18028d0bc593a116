"""The name rules of the project: what a model, an API client and a prediction id may be called.

Each name ends up somewhere a free-form string must not: a model name is a directory of the store (the
store owns that rule, ``model_store.store``, and it is re-exported here), a client name goes into Redis
records and logs, a prediction id into a Redis key.
"""

from __future__ import annotations

import re

# the model store makes directories of model names, so it owns their rule
from model_store.store import MODEL_NAME_RE, validate_model_name

__all__ = ["CLIENT_NAME_RE", "MODEL_NAME_RE", "RECORD_ID_RE", "validate_client_name", "validate_model_name",
           "validate_record_id"]

RECORD_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
CLIENT_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def validate_client_name(name: str) -> str:
    """An API client's name goes into Redis records and logs: a short plain token, never free text."""
    if not isinstance(name, str) or not CLIENT_NAME_RE.fullmatch(name):
        raise ValueError(f"invalid client name {name!r}: must match {CLIENT_NAME_RE.pattern}")
    return name


def validate_record_id(record_id: str) -> str:
    """Return ``record_id`` if it is a valid prediction id, else raise ValueError."""
    if not isinstance(record_id, str) or not RECORD_ID_RE.fullmatch(record_id):
        raise ValueError(f"invalid record id {record_id!r}: must match {RECORD_ID_RE.pattern}")
    return record_id
