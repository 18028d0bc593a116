"""Field types shared by the processes' settings classes, so env variables and flags parse alike."""

from __future__ import annotations

import json
from typing import Annotated

from pydantic import AfterValidator, BeforeValidator
from pydantic_settings import NoDecode

from mpserve.keys import validate_model_name


def _split(v: object) -> object:
    """Accept "a,b", a JSON list, or a list whose items may themselves be "a,b" (flags, env variables)."""
    if isinstance(v, str):
        if v.strip().startswith("["):
            return json.loads(v)
        return [m.strip() for m in v.split(",") if m.strip()]
    if isinstance(v, list):
        return [m.strip() for item in v for m in (item.split(",") if isinstance(item, str) else [item])
                if not isinstance(m, str) or m.strip()]
    return v


def _validated(v: list[str]) -> list[str]:
    for m in v:
        validate_model_name(m)
    return list(dict.fromkeys(v))


#: A list of model names: NoDecode so that MPSERVE_MODELS=a,b is split here rather than parsed as JSON.
ModelNames = Annotated[list[str], NoDecode, BeforeValidator(_split), AfterValidator(_validated)]
