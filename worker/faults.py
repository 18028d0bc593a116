"""Fault injection for crash tests (test-only; does nothing unless ``MPSERVE_FAULT`` is set).

``MPSERVE_FAULT=after_store_write`` kills the process right after a new version is written to the store
and before it is published; ``MPSERVE_FAULT=after_publish`` right after the publish script ran. The
process ends with ``os._exit(137)``, like a SIGKILL: no cleanup, no lease release, no flush beyond the
log line below. Never set it in production.
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)

FAULT_ENV = "MPSERVE_FAULT"
FAULT_POINTS = ("after_store_write", "after_publish")


def fault_point(name: str) -> None:
    """Die here if the environment asks for a crash at ``name``."""
    if name not in FAULT_POINTS:
        raise ValueError(f"unknown fault point {name!r}")
    if os.environ.get(FAULT_ENV) == name:
        log.critical("fault injection: exiting at %s (%s=%s)", name, FAULT_ENV, name)
        for handler in logging.getLogger().handlers:
            handler.flush()
        sys.stderr.flush()
        os._exit(137)
