"""Command-line flags generated from a pydantic-settings class, so a new setting is a new flag with no code.

Defaults are SUPPRESSed: a flag given overrides the environment, an omitted one leaves it alone
(pydantic-settings gives init arguments priority over environment variables).
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Sequence
from typing import Any, TypeVar

from pydantic_settings import BaseSettings

S = TypeVar("S", bound=BaseSettings)


def _strip_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _choices(annotation: Any) -> list[str] | None:
    if typing.get_origin(annotation) is typing.Literal:
        return [str(a) for a in typing.get_args(annotation)]
    return None


def build_parser(settings_cls: type[BaseSettings], prog: str, description: str) -> argparse.ArgumentParser:
    """One ``--kebab-case`` flag per field; lists take one or more values (or "a,b")."""
    parser = argparse.ArgumentParser(prog=prog, description=description, argument_default=argparse.SUPPRESS)
    prefix = settings_cls.model_config.get("env_prefix", "")
    for name, field in settings_cls.model_fields.items():
        flag = "--" + name.replace("_", "-")
        annotation = _strip_optional(field.annotation)
        default = "unset" if field.default_factory is None and field.default is None else (
            field.get_default(call_default_factory=True))
        help_text = f"{field.description or ''} (env {prefix}{name.upper()}; default: {default})"
        if annotation is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, help=help_text)
        elif typing.get_origin(annotation) is list:
            parser.add_argument(flag, dest=name, nargs="+", metavar="VALUE", help=help_text)
        else:
            parser.add_argument(flag, dest=name, choices=_choices(annotation), help=help_text)
    return parser


def settings_from_argv(settings_cls: type[S], argv: Sequence[str] | None, prog: str, description: str) -> S:
    """Settings from the environment, overridden by the flags given in ``argv``."""
    args = vars(build_parser(settings_cls, prog, description).parse_args(argv))
    return settings_cls(**args)
