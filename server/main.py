"""Command line of an API replica: ``python -m server`` (mounted as ``mpserve serve``).

The flags are generated from :class:`ServerSettings` fields, so a new setting is a new flag with no
code here; a flag given overrides the environment, an omitted one leaves it alone.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from common.device import DeviceError, use_device
from common.flags import build_parser as _build_parser
from common.flags import settings_from_argv
from common.logs import configure_logging
from server.settings import ServerSettings

PROG, DESCRIPTION = "python -m server", "mpserve API replica (FastAPI on uvicorn)"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """One flag per settings field; defaults are SUPPRESSed so only given flags override."""
    return _build_parser(ServerSettings, prog, DESCRIPTION)


def settings_from_args(argv: Sequence[str] | None = None) -> ServerSettings:
    """Settings from the environment, overridden by the flags in ``argv``."""
    return settings_from_argv(ServerSettings, argv, PROG, DESCRIPTION)


def run(settings: ServerSettings) -> None:
    """Serve until interrupted: one uvicorn worker (one engine thread per process; scale by replicas)."""
    import uvicorn

    from server.app import create_app

    configure_logging(settings.log_level)
    try:
        device = use_device(settings.device)
    except DeviceError as exc:
        raise SystemExit(f"mpserve serve: {exc}") from None
    logging.getLogger(__name__).info("tinygrad device %s", device)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level,
                workers=1, lifespan="on", timeout_graceful_shutdown=30)


def main(argv: Sequence[str] | None = None) -> None:
    run(settings_from_args(argv))


if __name__ == "__main__":
    main()
