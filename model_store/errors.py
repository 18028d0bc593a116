"""Exceptions of the model store; callers can catch `ModelStoreError` for all of them."""

from __future__ import annotations


class ModelStoreError(Exception):
    """Base class of every error the model store raises on purpose."""


class SafetensorsError(ModelStoreError, ValueError):
    """A safetensors buffer is malformed (or a tensor cannot be encoded); nothing in it is trusted."""


class ManifestError(ModelStoreError, ValueError):
    """A manifest is missing a field, has a field of the wrong type, or cannot be encoded as strict JSON."""


class IntegrityError(ModelStoreError):
    """Stored bytes do not match what the manifest promises (hash, version, model): never serve them."""


class ArchitectureMismatch(ModelStoreError):
    """Stored weights do not fit the architecture the caller is about to load them into."""


class VersionNotFound(ModelStoreError, LookupError):
    """The version has no complete manifest in the store."""


class VersionExistsError(ModelStoreError, FileExistsError):
    """Versions are immutable: a version that exists is never written again."""
