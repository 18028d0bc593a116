"""Command line of an API replica: ``python -m server`` (mounted as ``mpserve serve``).

The flags are generated from :class:`ServerSettings` fields, so a new setting is a new flag with no
code here; a flag given overrides the environment, an omitted one leaves it alone.
"""

from __future__ import annotations

import argparse
import logging
import types
import typing
from collections.abc import Sequence
from typing import Any

from pydantic import SecretStr

from server.settings import ServerSettings


def _is_list(annotation: Any) -> bool:
    return typing.get_origin(annotation) is list


def _is_bool(annotation: Any) -> bool:
    return annotation is bool


def _choices(annotation: Any) -> list[str] | None:
    if typing.get_origin(annotation) is typing.Literal:
        return [str(a) for a in typing.get_args(annotation)]
    return None


def _strip_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def build_parser(prog: str = "python -m server") -> argparse.ArgumentParser:
    """One flag per settings field; defaults are SUPPRESSed so only given flags override."""
    parser = argparse.ArgumentParser(prog=prog, description="mpserve API replica (FastAPI on uvicorn)",
                                     argument_default=argparse.SUPPRESS)
    for name, field in ServerSettings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        annotation = _strip_optional(field.annotation)
        default = field.get_default(call_default_factory=True)
        shown = "unset" if default is None or annotation is SecretStr else default
        help_text = f"{field.description or ''} (env MPSERVE_{name.upper()}; default: {shown})"
        if _is_bool(annotation):
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, help=help_text)
        elif _is_list(annotation):
            parser.add_argument(flag, dest=name, nargs="+", metavar="VALUE", help=help_text)
        else:
            parser.add_argument(flag, dest=name, choices=_choices(annotation), metavar=None, help=help_text)
    return parser


def settings_from_args(argv: Sequence[str] | None = None) -> ServerSettings:
    """Settings from the environment, overridden by the flags in ``argv``."""
    args = vars(build_parser().parse_args(argv))
    return ServerSettings(**args)


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def run(settings: ServerSettings) -> None:
    """Serve until interrupted: one uvicorn worker (one engine thread per process; scale by replicas)."""
    import uvicorn

    from server.app import create_app

    configure_logging(settings.log_level)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level,
                workers=1, lifespan="on", timeout_graceful_shutdown=30)


def main(argv: Sequence[str] | None = None) -> None:
    run(settings_from_args(argv))


if __name__ == "__main__":
    main()
