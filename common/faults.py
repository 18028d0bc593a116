"""Fault injection for crash tests (test-only; does nothing unless ``MPSERVE_FAULT`` is set).

``MPSERVE_FAULT=<point>`` ends the process at that point with ``os._exit(137)``, like a SIGKILL: no
cleanup, no lease release, no flush beyond the log line. ``MPSERVE_FAULT=<point>:pause`` stops there
instead: the process writes ``<point> <pid>`` to the file named by ``MPSERVE_FAULT_MARKER`` (if set),
then blocks (the thread that hit the point, and with it an event loop running there) until a test
sends it a real SIGKILL. Never set either in production.

Points (where the process stops):

- ``after_store_write`` (worker): the new version's files are in the store, the publish script has not run;
- ``after_publish`` (worker): the publish script ran (version set, entries acknowledged, event sent), the
  worker's buffer still holds the entries and retention has not run;
- ``fenced_ack_before_exec`` (worker): acknowledging dropped entries without a publish, the fence is
  WATCHed and checked, EXEC not sent;
- ``fenced_ack_after_exec`` (worker): that EXEC acknowledged them, the buffer still holds them;
- ``before_swap`` (API replica): a new version is loaded, materialized and warmed up, not yet swapped in.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

FAULT_ENV = "MPSERVE_FAULT"
MARKER_ENV = "MPSERVE_FAULT_MARKER"
FAULT_POINTS = ("after_store_write", "after_publish", "fenced_ack_before_exec", "fenced_ack_after_exec",
                "before_swap")


def _flush() -> None:
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stderr.flush()


def fault_point(name: str) -> None:
    """Die (or pause until killed) here if the environment asks for a fault at ``name``."""
    if name not in FAULT_POINTS:
        raise ValueError(f"unknown fault point {name!r}")
    wanted = os.environ.get(FAULT_ENV)
    if wanted == name:
        log.critical("fault injection: exiting at %s (%s=%s)", name, FAULT_ENV, wanted)
        _flush()
        os._exit(137)
    if wanted == f"{name}:pause":
        log.critical("fault injection: pausing at %s until killed (%s=%s)", name, FAULT_ENV, wanted)
        _flush()
        marker = os.environ.get(MARKER_ENV)
        if marker:
            tmp = Path(f"{marker}.tmp")
            tmp.write_text(f"{name} {os.getpid()}\n")
            tmp.replace(marker)  # the test sees the whole line or nothing
        while True:
            time.sleep(3600)
