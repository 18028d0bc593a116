"""Field types shared by the processes' settings classes, so env variables and flags parse alike."""

from __future__ import annotations

import json
from typing import Annotated

from pydantic import AfterValidator, BeforeValidator, SecretStr
from pydantic_settings import NoDecode

from common.names import validate_client_name, validate_model_name
from model_store.manifest import check_version


def _split(v: object) -> object:
    """Accept "a,b", a JSON list, or a list whose items may themselves be "a,b" (flags, env variables)."""
    if isinstance(v, str):
        if v.strip().startswith("["):
            return json.loads(v)
        return [m.strip() for m in v.split(",") if m.strip()]
    if isinstance(v, list):
        return [m.strip() if isinstance(m, str) else m
                for item in v for m in (item.split(",") if isinstance(item, str) else [item])
                if not isinstance(m, str) or m.strip()]
    return v


def _validated(v: list[str]) -> list[str]:
    for m in v:
        validate_model_name(m)
    return list(dict.fromkeys(v))


#: A list of model names: NoDecode so that MPSERVE_MODELS=a,b is split here rather than parsed as JSON.
ModelNames = Annotated[list[str], NoDecode, BeforeValidator(_split), AfterValidator(_validated)]


def _versions(v: list[int]) -> list[int]:
    return sorted({check_version(n, "pinned version") for n in v})


#: A list of version numbers ("3,7" or a JSON list), each 0 <= n < 10**8, sorted without repeats.
VersionNumbers = Annotated[list[int], NoDecode, BeforeValidator(_split), AfterValidator(_versions)]


# ------------------------------------------------------------------------------------- API clients
MIN_SECRET_LEN = 8


def _client_names(v: list[str]) -> list[str]:
    return list(dict.fromkeys(validate_client_name(c) for c in v))


def _parse_keys(v: object) -> object:
    """Accept "a:secret1,b:secret2" or a JSON object {"a": "secret1"} (flags, env variables)."""
    if isinstance(v, str):
        text = v.strip()
        if text.startswith("{"):
            return json.loads(text)
        out: dict[str, str] = {}
        for item in filter(None, (s.strip() for s in text.split(","))):
            name, sep, secret = item.partition(":")
            if not sep:
                raise ValueError(f"api key entry {name.strip()!r} has no ':': write client:secret")
            out[name.strip()] = secret.strip()
        return out
    return v


def _checked_keys(v: dict[str, SecretStr]) -> dict[str, SecretStr]:
    """Valid names, secrets long enough, and no secret shared by two clients (a key names one client)."""
    seen: dict[str, str] = {}
    for name, secret in v.items():
        validate_client_name(name)
        value = secret.get_secret_value()
        if len(value) < MIN_SECRET_LEN or any(c.isspace() or c == "," for c in value):
            raise ValueError(f"the secret of client {name!r} must be at least {MIN_SECRET_LEN} characters, "
                             "without spaces or commas")
        if value in seen:
            raise ValueError(f"clients {seen[value]!r} and {name!r} have the same secret")
        seen[value] = name
    return v


#: A list of client names ("a,b" or a JSON list), each a plain token.
ClientNames = Annotated[list[str], NoDecode, BeforeValidator(_split), AfterValidator(_client_names)]

#: Client name -> secret, from "a:secret1,b:secret2" or a JSON object; secrets stay SecretStr (never logged).
ApiKeys = Annotated[dict[str, SecretStr], NoDecode, BeforeValidator(_parse_keys), AfterValidator(_checked_keys)]
