"""Model store: immutable, hash-checked model versions in safetensors + JSON (docs/DESIGN.md §3). No pickle."""

from .errors import (
    ArchitectureMismatch,
    IntegrityError,
    ManifestError,
    ModelStoreError,
    SafetensorsError,
    VersionExistsError,
    VersionNotFound,
)
from .holdout import Holdout, read_holdout_file
from .manifest import make_manifest, manifest_from_json, manifest_to_json, seeds_array, validate_manifest
from .safetensors_io import encode_safetensors, load_safetensors, save_safetensors
from .store import ModelStore, validate_model_name

__all__ = [
    "ArchitectureMismatch",
    "Holdout",
    "IntegrityError",
    "ManifestError",
    "ModelStore",
    "ModelStoreError",
    "SafetensorsError",
    "VersionExistsError",
    "VersionNotFound",
    "encode_safetensors",
    "load_safetensors",
    "make_manifest",
    "manifest_from_json",
    "manifest_to_json",
    "read_holdout_file",
    "save_safetensors",
    "seeds_array",
    "validate_manifest",
    "validate_model_name",
]
