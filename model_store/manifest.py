"""Manifest of a model version (docs/DESIGN.md §3): a plain JSON object, validated and normalized here.

A manifest is a plain dict so that fields added later (by a newer worker) survive a round trip through
an older reader: unknown keys are kept untouched. `validate_manifest` checks the known fields, turns
NumPy scalars/arrays into plain Python values, and returns a new dict; `manifest_to_json` writes strict
JSON (no NaN/Infinity, which other readers refuse), sorted keys, so the bytes are deterministic.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .errors import ManifestError

__all__ = [
    "MAX_VERSION",
    "REQUIRED_FIELDS",
    "check_version",
    "STORED_FIELDS",
    "make_manifest",
    "manifest_from_json",
    "manifest_to_json",
    "seeds_array",
    "to_jsonable",
    "validate_manifest",
    "weights_file_name",
]

#: Versions are 0 <= n < MAX_VERSION so that `{n:08d}` names sort and never grow a digit.
MAX_VERSION = 10**8
_U64 = 2**64
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_WEIGHTS_FILE_RE = re.compile(r"^[0-9]{8}\.safetensors$")

#: Fields every manifest carries (callers of `ModelStore.write_version` supply these).
REQUIRED_FIELDS: tuple[str, ...] = (
    "version",
    "parent",
    "model",
    "architecture",
    "seeds",
    "probe_scale",
    "learning_rate",
    "records",
    "cohorts",
    "outliers_dropped",
    "loss",
    "validation",
    "training",
    "created",
)
#: Fields the store adds when it writes the weights; a stored manifest has all of these too.
STORED_FIELDS: tuple[str, ...] = ("weights_sha256", "weights_file")


def weights_file_name(version: int) -> str:
    """File name of a version's weights, relative to the model's versions directory."""
    return f"{check_version(version, 'version'):08d}.safetensors"


def check_version(value: Any, field: str = "version") -> int:
    """Return `value` as an int if it is a valid version number (0 <= n < 10**8), else raise."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ManifestError(f"{field} must be an int, got {type(value).__name__}: {value!r}")
    v = int(value)
    if not 0 <= v < MAX_VERSION:
        raise ManifestError(f"{field} must be in [0, {MAX_VERSION}), got {v}")
    return v


def to_jsonable(value: Any, where: str = "manifest") -> Any:
    """Deep-convert NumPy scalars/arrays and tuples to plain JSON values; refuse anything else exotic."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        f = float(value)
        if not math.isfinite(f):
            raise ManifestError(f"{where} is {f}: JSON has no NaN/Infinity (use null for 'no value')")
        return f
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist(), where)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ManifestError(f"{where} has a non-string key {k!r}")
            out[k] = to_jsonable(v, f"{where}.{k}")
        return out
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise ManifestError(f"{where} has a value of type {type(value).__name__}, which JSON cannot hold")


def _non_negative_int(m: dict[str, Any], field: str) -> None:
    v = m[field]
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ManifestError(f"{field} must be a non-negative int, got {v!r}")


def _non_negative_float(m: dict[str, Any], field: str) -> None:
    v = m[field]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise ManifestError(f"{field} must be a finite number >= 0, got {v!r}")
    m[field] = float(v)


def _check_seeds(seeds: Any) -> None:
    if not isinstance(seeds, list) or not all(isinstance(row, list) for row in seeds):
        raise ManifestError("seeds must be a list (one per group) of lists (one per vendor) of uint64 ints")
    widths = {len(row) for row in seeds}
    if len(widths) > 1:
        raise ManifestError(f"seeds must have as many vendors in every group, got widths {sorted(widths)}")
    for s, row in enumerate(seeds):
        for v, x in enumerate(row):
            if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x < _U64:
                raise ManifestError(f"seeds[{s}][{v}] must be a uint64 int, got {x!r}")


def validate_manifest(manifest: Mapping[str, Any], *, require_weights: bool = False) -> dict[str, Any]:
    """Check the known fields and return a normalized copy (plain Python values, unknown keys kept).

    `require_weights` also demands the fields the store adds (`weights_sha256`, `weights_file`): set it
    for a manifest read back from the store, leave it off for one about to be written.
    """
    if not isinstance(manifest, Mapping):
        raise ManifestError(f"manifest must be a JSON object, got {type(manifest).__name__}")
    m: dict[str, Any] = to_jsonable(manifest)
    required = REQUIRED_FIELDS + (STORED_FIELDS if require_weights else ())
    missing = [f for f in required if f not in m]
    if missing:
        raise ManifestError(f"manifest is missing fields {missing}")

    m["version"] = check_version(m["version"], "version")
    if m["parent"] is not None:
        m["parent"] = check_version(m["parent"], "parent")
        if m["parent"] == m["version"]:
            raise ManifestError(f"version {m['version']} cannot be its own parent")
    if not isinstance(m["model"], str) or not m["model"]:
        raise ManifestError(f"model must be a non-empty string, got {m['model']!r}")

    arch = m["architecture"]
    if not isinstance(arch, dict) or not isinstance(arch.get("name"), str) or not arch["name"]:
        raise ManifestError(f'architecture must be {{"name": str, "config": object}}, got {arch!r}')
    if not isinstance(arch.get("config"), dict):
        raise ManifestError(f"architecture.config must be an object, got {arch.get('config')!r}")

    _check_seeds(m["seeds"])
    _non_negative_float(m, "probe_scale")
    _non_negative_float(m, "learning_rate")
    _non_negative_float(m, "created")
    _non_negative_int(m, "records")
    _non_negative_int(m, "outliers_dropped")
    cohorts = m["cohorts"]
    if not (
        isinstance(cohorts, list)
        or (isinstance(cohorts, int) and not isinstance(cohorts, bool) and cohorts >= 0)
    ):
        raise ManifestError(f"cohorts must be a non-negative count or a list, got {cohorts!r}")
    if not isinstance(m["loss"], dict):
        raise ManifestError(f"loss must be an object of statistics, got {m['loss']!r}")
    for field in ("validation", "training"):
        if m[field] is not None and not isinstance(m[field], dict):
            raise ManifestError(f"{field} must be an object or null, got {m[field]!r}")

    if "weights_sha256" in m:
        sha = m["weights_sha256"]
        if not (isinstance(sha, str) and _SHA256_RE.fullmatch(sha)):
            raise ManifestError(f"weights_sha256 must be 64 lowercase hex digits, got {sha!r}")
    if "weights_file" in m:
        wfile = m["weights_file"]
        if not (isinstance(wfile, str) and _WEIGHTS_FILE_RE.fullmatch(wfile)):
            raise ManifestError(f"weights_file must look like 00000000.safetensors, got {wfile!r}")
    return m


def make_manifest(
    *,
    version: int,
    parent: int | None,
    model: str,
    architecture: Mapping[str, Any],
    seeds: Sequence[Sequence[int]] | np.ndarray,
    probe_scale: float,
    learning_rate: float,
    records: int = 0,
    cohorts: int | Sequence[Any] = 0,
    outliers_dropped: int = 0,
    loss: Mapping[str, Any] | None = None,
    validation: Mapping[str, Any] | None = None,
    training: Mapping[str, Any] | None = None,
    created: float | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Build and validate a manifest; `extra` keyword fields are carried along as they are."""
    m = {
        "version": version,
        "parent": parent,
        "model": model,
        "architecture": architecture,
        "seeds": seeds,
        "probe_scale": probe_scale,
        "learning_rate": learning_rate,
        "records": records,
        "cohorts": cohorts,
        "outliers_dropped": outliers_dropped,
        "loss": {} if loss is None else loss,
        "validation": validation,
        "training": training,
        "created": time.time() if created is None else created,
        **extra,
    }
    return validate_manifest(m)


def seeds_array(manifest: Mapping[str, Any]) -> np.ndarray:
    """The vendor seeds as a uint64 array of shape (groups, vendors)."""
    seeds = manifest["seeds"]
    _check_seeds(seeds)
    if not seeds:
        return np.zeros((0, 0), dtype=np.uint64)
    return np.array(seeds, dtype=np.uint64).reshape(len(seeds), len(seeds[0]))


def manifest_to_json(manifest: Mapping[str, Any]) -> bytes:
    """Strict, deterministic JSON bytes (sorted keys, no NaN) of a validated manifest."""
    m = validate_manifest(manifest)
    try:
        text = json.dumps(m, sort_keys=True, indent=2, allow_nan=False, ensure_ascii=False)
    except ValueError as e:  # pragma: no cover - to_jsonable already refuses non-finite floats
        raise ManifestError(f"manifest cannot be encoded as strict JSON: {e}") from None
    return (text + "\n").encode("utf-8")


def _reject_constant(name: str) -> Any:
    raise ManifestError(f"manifest contains the non-JSON constant {name}")


def manifest_from_json(data: bytes | str, *, require_weights: bool = True) -> dict[str, Any]:
    """Parse and validate manifest JSON (a stored one by default, so it must name its weights' hash)."""
    try:
        m = json.loads(data, parse_constant=_reject_constant)
    except ManifestError:
        raise
    except (ValueError, RecursionError) as e:
        raise ManifestError(f"manifest is not valid JSON: {e}") from None
    return validate_manifest(m, require_weights=require_weights)
