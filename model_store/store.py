"""Immutable, hash-checked model versions on a filesystem (docs/DESIGN.md §3).

Layout: `{root}/{model}/versions/{n:08d}.safetensors` (weights) and `{n:08d}.json` (manifest). A version
exists once its manifest exists: the weights are published first, the manifest (carrying the weights'
sha256) last, each by temp file + fsync + no-replace link, so a crash at any point leaves either a
complete version or an orphan weights file that nobody lists or loads. Beside the versions, two mutable
files, each replaced atomically: `holdout.safetensors` (the guard's holdout set) and `pins.json` (versions
retention never deletes).

All filesystem access goes through the `_fs_*` helpers at the bottom of `ModelStore`, so an
fsspec/object-store backend can replace them without touching the public methods or their callers.
The store assumes one writer of versions per model at a time (the reconciler's Redis lease); readers are
unlimited. Retention and pin changes also take the model's file lock (`{root}/{model}/.lock`), so an admin
pinning a version from an API replica never races the worker deleting it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .errors import (
    ArchitectureMismatch,
    IntegrityError,
    ManifestError,
    ModelStoreError,
    VersionExistsError,
    VersionNotFound,
)
from .holdout import DEFAULT_HOLDOUT_FILE, HOLDOUT_FILE, Holdout, HoldoutKind, decode_holdout, encode_holdout
from .manifest import check_version, manifest_from_json, manifest_to_json, validate_manifest
from .safetensors_io import encode_safetensors, load_safetensors

__all__ = [
    "ArchitectureMismatch",
    "IntegrityError",
    "ModelStore",
    "ModelStoreError",
    "VersionExistsError",
    "VersionNotFound",
    "validate_model_name",
]

logger = logging.getLogger(__name__)

MODEL_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_MANIFEST_NAME_RE = re.compile(r"^([0-9]{8})\.json$")
_VERSIONS_DIR = "versions"
PINS_FILE = "pins.json"
_LOCK_FILE = ".lock"


def validate_model_name(name: str) -> str:
    """Return `name` if it is a safe model name (it becomes a directory name), else raise ValueError."""
    if not isinstance(name, str) or not MODEL_NAME_RE.fullmatch(name):
        raise ValueError(f"invalid model name {name!r}: must match {MODEL_NAME_RE.pattern}")
    return name


def _shape_str(shape: Iterable[int]) -> str:
    return "(" + ", ".join(str(int(d)) for d in shape) + ")"


class ModelStore:
    """A directory of models, each an append-only list of immutable versions."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"ModelStore({str(self.root)!r})"

    # ------------------------------------------------------------------------------------- listing

    def models(self) -> list[str]:
        """Names of the models that have at least one complete version, sorted."""
        return [
            name
            for name in sorted(self._fs_list(self.root))
            if MODEL_NAME_RE.fullmatch(name) and self.versions(name)
        ]

    def versions(self, model: str) -> list[int]:
        """Complete versions (manifest present) of `model`, ascending; [] for an unknown model."""
        names = self._fs_list(self._versions_dir(model))
        return sorted(int(m.group(1)) for n in names if (m := _MANIFEST_NAME_RE.fullmatch(n)))

    def latest(self, model: str) -> int | None:
        """Highest complete version of `model`, or None if it has none."""
        vs = self.versions(model)
        return vs[-1] if vs else None

    def has_version(self, model: str, version: int) -> bool:
        """Whether `version` of `model` is complete (its manifest exists)."""
        return self._fs_exists(self._path_for(model, version)[1])

    # ------------------------------------------------------------------------------------- reading

    def read_manifest(self, model: str, version: int) -> dict[str, Any]:
        """The validated manifest of a complete version; VersionNotFound if absent, IntegrityError if bad."""
        _, manifest_path = self._path_for(model, version)
        version = check_version(version)
        try:
            raw = self._fs_read(manifest_path)
        except FileNotFoundError:
            raise VersionNotFound(f"model {model!r} has no version {version}") from None
        try:
            manifest = manifest_from_json(raw)
        except ManifestError as e:
            raise IntegrityError(f"manifest of {model!r} version {version} is invalid: {e}") from e
        if manifest["model"] != model or manifest["version"] != version:
            raise IntegrityError(
                f"manifest at {model!r} version {version} claims model {manifest['model']!r} "
                f"version {manifest['version']}"
            )
        return manifest

    def read_version(
        self,
        model: str,
        version: int,
        expected_shapes: Mapping[str, tuple[int, ...]] | None = None,
        expected_architecture: str | None = None,
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Read (params, manifest), refusing weights whose sha256 or architecture does not match.

        The files only: ``common.loading.load_version`` makes a servable version of them.

        Nothing in the weights file is trusted before its hash matches the manifest and its safetensors
        header has been bounds-checked.
        """
        manifest = self.read_manifest(model, version)
        version = manifest["version"]
        arch = manifest["architecture"]["name"]
        if expected_architecture is not None and arch != expected_architecture:
            raise ArchitectureMismatch(
                f"{model!r} version {version} has architecture {arch!r}, expected {expected_architecture!r}"
            )

        weights_path, _ = self._path_for(model, version)
        if manifest["weights_file"] != weights_path.name:
            raise IntegrityError(
                f"manifest of {model!r} version {version} names weights {manifest['weights_file']!r}, "
                f"expected {weights_path.name!r}"
            )
        try:
            data = self._fs_read(weights_path)
        except FileNotFoundError:
            raise IntegrityError(f"weights file of {model!r} version {version} is missing") from None
        digest = hashlib.sha256(data).hexdigest()
        if digest != manifest["weights_sha256"]:
            logger.error("sha256 mismatch for %s version %d: %s != %s", model, version, digest,
                         manifest["weights_sha256"])  # fmt: skip
            raise IntegrityError(
                f"weights of {model!r} version {version} have sha256 {digest}, "
                f"manifest says {manifest['weights_sha256']} (corrupt or tampered file)"
            )
        params = load_safetensors(data)

        if expected_shapes is not None:
            self._check_shapes(model, version, params, expected_shapes)
        logger.debug("loaded %s version %d (%d tensors)", model, version, len(params))
        return params, manifest

    @staticmethod
    def _check_shapes(
        model: str, version: int, params: Mapping[str, np.ndarray], expected: Mapping[str, tuple[int, ...]]
    ) -> None:
        missing = sorted(set(expected) - set(params))
        extra = sorted(set(params) - set(expected))
        if missing or extra:
            raise ArchitectureMismatch(
                f"{model!r} version {version} does not fit the architecture: "
                f"missing tensors {missing}, unexpected tensors {extra}"
            )
        for name in sorted(expected):
            got, want = tuple(params[name].shape), tuple(int(d) for d in expected[name])
            if got != want:
                raise ArchitectureMismatch(
                    f"{model!r} version {version}: tensor {name!r} has shape {_shape_str(got)}, "
                    f"expected {_shape_str(want)}"
                )

    def lineage(self, model: str, version: int) -> list[int]:
        """[version, its parent, ..., root]; stops early at an ancestor deleted by retention.

        Raises IntegrityError on a cycle (only possible with hand-edited manifests).
        """
        manifest = self.read_manifest(model, version)
        chain: list[int] = []
        while True:
            chain.append(manifest["version"])
            parent = manifest["parent"]
            if parent is None:
                return chain
            if parent in chain:
                raise IntegrityError(f"cycle in the lineage of {model!r}: {chain + [parent]}")
            try:
                manifest = self.read_manifest(model, parent)
            except VersionNotFound:
                logger.info("lineage of %s version %d stops at deleted ancestor %d", model, version, parent)
                return chain

    # ------------------------------------------------------------------------------------- writing

    def write_version(
        self, model: str, version: int, params: Mapping[str, np.ndarray], manifest: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Publish a new immutable version and return its final manifest (with `weights_sha256`).

        `manifest` may omit `model`, `version` (taken from the arguments) and `created` (now); if given
        they must agree. The parent, if any, must be an older version. Raises VersionExistsError (a
        FileExistsError) if the version is already complete.
        """
        validate_model_name(model)
        version = check_version(version)
        weights_path, manifest_path = self._path_for(model, version)

        m = dict(manifest)
        for field, value in (("model", model), ("version", version)):
            if m.setdefault(field, value) != value:
                raise ManifestError(f"manifest {field} {m[field]!r} does not match the argument {value!r}")
        m.setdefault("created", time.time())
        parent = m.get("parent")
        if parent is not None and not (isinstance(parent, (int, np.integer)) and 0 <= parent < version):
            raise ManifestError(f"parent {parent!r} of version {version} must be an older version")

        # Encode and validate everything before touching the disk.
        data = encode_safetensors(params, {"mpserve_model": model, "mpserve_version": str(version)})
        m["weights_sha256"] = hashlib.sha256(data).hexdigest()
        m["weights_file"] = weights_path.name
        final = validate_manifest(m, require_weights=True)
        manifest_bytes = manifest_to_json(final)

        if self._fs_exists(manifest_path):
            raise VersionExistsError(f"model {model!r} version {version} exists; versions are immutable")
        versions_dir = weights_path.parent
        self._fs_makedirs(versions_dir)
        if self._fs_exists(weights_path):
            # Weights without a manifest: a writer crashed between the two publishes. Never listed or
            # loaded, so it is garbage and this writer takes the version over.
            logger.warning("removing orphan weights %s (no manifest: an earlier write crashed)", weights_path)
            self._fs_remove(weights_path)
        try:
            self._fs_publish(weights_path, data)
            self._fs_publish(manifest_path, manifest_bytes)  # last: the version exists from here on
        except FileExistsError:
            raise VersionExistsError(
                f"model {model!r} version {version} was written concurrently by another writer"
            ) from None
        self._fs_sync_dir(versions_dir)
        logger.info("wrote %s version %d (parent %s, %d bytes, sha256 %s)", model, version, final["parent"],
                    len(data), final["weights_sha256"])  # fmt: skip
        return final

    def apply_retention(
        self, model: str, keep_last: int, protect: Iterable[int] = (), pinned: Iterable[int] = ()
    ) -> list[int]:
        """Delete the versions nothing needs any more and return them, ascending.

        Kept: the `keep_last` newest; every protected version (the one serving, the versions stale cohorts
        may come from) and the parent of each (the rollback point); every lineage root (manifest parent
        None: a model as it was trained, imported or forked, e.g. the shipped base); every pinned version
        (`pinned` and the store's pins). A version whose manifest cannot be read is kept (its parent is
        unknown), and a protected one aborts retention with IntegrityError (its parent would be guessed).
        Deletion is manifest first, so a half-deleted version is never listed; it holds the model's lock,
        so a version pinned meanwhile is never deleted.
        """
        if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 0:
            raise ValueError(f"keep_last must be a non-negative int, got {keep_last!r}")
        validate_model_name(model)
        protected = {check_version(v, "protected version") for v in protect}
        keep = {check_version(v, "pinned version") for v in pinned} | protected
        if not self.versions(model):
            return []
        with self._fs_lock(model):
            existing = self.versions(model)
            keep |= set(existing[-keep_last:]) if keep_last else set()
            keep |= set(self.pins(model))
            for v in existing:
                try:
                    parent = self.read_manifest(model, v)["parent"]
                except VersionNotFound:
                    continue  # deleted meanwhile by someone else: nothing to decide
                except IntegrityError as exc:
                    if v in protected:
                        raise
                    logger.warning("retention: keeping %s version %d, its manifest is unreadable: %s", model, v, exc)
                    keep.add(v)
                    continue
                if parent is None:
                    keep.add(v)  # a lineage root
                elif v in protected:
                    keep.add(parent)
            missing = sorted(protected - set(existing))
            if missing:
                logger.warning("retention: protected versions %s of %s do not exist", missing, model)
            doomed = [v for v in existing if v not in keep]
            for v in doomed:
                weights_path, manifest_path = self._path_for(model, v)
                self._fs_remove(manifest_path)
                self._fs_remove(weights_path)
                logger.info("retention: deleted %s version %d", model, v)
            if doomed:
                self._fs_sync_dir(self._versions_dir(model))
        return doomed

    # ------------------------------------------------------------------------------------- pins

    def pins_path(self, model: str) -> Path:
        """Where the model's pinned versions are listed (a fixed name: no caller chooses a path)."""
        return self.root / validate_model_name(model) / PINS_FILE

    def pins(self, model: str) -> list[int]:
        """The model's pinned versions, ascending ([] when none); IntegrityError if the file is unreadable.

        Unreadable pins raise rather than read as none: retention must not delete what they may protect.
        """
        path = self.pins_path(model)
        try:
            raw = self._fs_read(path)
        except FileNotFoundError:
            return []
        try:
            doc = json.loads(raw)
            if not isinstance(doc, dict) or not isinstance(doc.get("pinned"), list):
                raise ValueError("expected an object with a list 'pinned'")
            return sorted({check_version(v, "pinned version") for v in doc["pinned"]})
        except ValueError as exc:
            raise IntegrityError(f"pins of {model!r} ({path}) are unreadable: {exc}") from exc

    def pin(self, model: str, version: int) -> list[int]:
        """Pin a stored version so retention keeps it whatever comes after; returns the pins (idempotent).

        VersionNotFound if the version is not stored: a pin on nothing would protect nothing.
        """
        version = check_version(version)
        if not self.has_version(model, version):
            raise VersionNotFound(f"model {model!r} has no version {version}")
        with self._fs_lock(model):  # retention holds it too: the version is either deleted before, or kept
            if not self.has_version(model, version):
                raise VersionNotFound(f"model {model!r} has no version {version}")
            pins = self.pins(model)
            if version not in pins:
                pins = self._write_pins(model, [*pins, version])
        return pins

    def unpin(self, model: str, version: int) -> list[int]:
        """Remove a pin; returns the pins. VersionNotFound if the version is neither pinned nor stored."""
        version = check_version(version)
        if not self.has_version(model, version) and version not in self.pins(model):
            raise VersionNotFound(f"model {model!r} has no version {version}")
        with self._fs_lock(model):
            pins = self.pins(model)
            if version in pins:
                pins = self._write_pins(model, [v for v in pins if v != version])
        return pins

    def _write_pins(self, model: str, pins: list[int]) -> list[int]:
        pins = sorted(set(pins))
        data = json.dumps({"model": model, "pinned": pins}, separators=(",", ":")).encode()
        self._fs_replace(self.pins_path(model), data)
        logger.info("pins of %s are now %s", model, pins)
        return pins

    # ------------------------------------------------------------------------------------- paths

    def _versions_dir(self, model: str) -> Path:
        return self.root / validate_model_name(model) / _VERSIONS_DIR

    def _path_for(self, model: str, version: int) -> tuple[Path, Path]:
        """(weights path, manifest path) of a version; validates both so no path leaves the root."""
        n = check_version(version)
        d = self._versions_dir(model)
        return d / f"{n:08d}.safetensors", d / f"{n:08d}.json"

    # ------------------------------------------------------------------------------------- holdout

    def holdout_path(self, model: str, kind: HoldoutKind = "uploaded") -> Path:
        """Where the model's holdout set of that kind lives (fixed names: no caller chooses a path).

        "uploaded": an operator's (``PUT /admin/holdout``); "default": the one the model came with (the shipped
        model's, or the one ``mpserve train`` wrote), which the guard uses when there is no other.
        """
        return self.root / validate_model_name(model) / (HOLDOUT_FILE if kind == "uploaded" else DEFAULT_HOLDOUT_FILE)

    def write_holdout(self, model: str, inputs: np.ndarray, labels: np.ndarray,
                      kind: HoldoutKind = "uploaded") -> Holdout:
        """Replace the model's holdout set of that kind; returns it as the guard will read it."""
        return self.write_holdout_bytes(model, encode_holdout(inputs, labels), kind)

    def write_holdout_bytes(self, model: str, data: bytes, kind: HoldoutKind = "uploaded") -> Holdout:
        """Replace the model's holdout set of that kind with safetensors bytes, checked first (a copy keeps its
        sha256 and dtypes)."""
        holdout = decode_holdout(data)
        path = self.holdout_path(model, kind)
        self._fs_makedirs(path.parent)
        self._fs_replace(path, data)
        return holdout

    def read_holdout_bytes(self, model: str, kind: HoldoutKind = "uploaded") -> bytes | None:
        """The stored bytes of the model's holdout set of that kind, or None."""
        try:
            return self._fs_read(self.holdout_path(model, kind))
        except FileNotFoundError:
            return None

    def read_holdout(self, model: str, kind: HoldoutKind = "uploaded") -> Holdout | None:
        """The model's holdout set of that kind, or None."""
        data = self.read_holdout_bytes(model, kind)
        return None if data is None else decode_holdout(data, str(self.holdout_path(model, kind)))

    def delete_holdout(self, model: str) -> bool:
        path = self.holdout_path(model)
        existed = path.exists()
        self._fs_remove(path)
        return existed

    # ------------------------------------------------------------------------------------- filesystem

    def _fs_read(self, path: Path) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    def _fs_exists(self, path: Path) -> bool:
        return path.exists()

    def _fs_list(self, directory: Path) -> list[str]:
        """Names in `directory`; [] if it does not exist."""
        try:
            return os.listdir(directory)
        except (FileNotFoundError, NotADirectoryError):
            return []

    def _fs_makedirs(self, directory: Path) -> None:
        if directory.is_dir():
            return
        directory.mkdir(parents=True, exist_ok=True)
        for d in (directory.parent, directory.parent.parent):  # make the new entries durable too
            self._fs_sync_dir(d)

    def _fs_remove(self, path: Path) -> None:
        path.unlink(missing_ok=True)

    def _fs_temp(self, path: Path, data: bytes) -> Path:
        """A new temp file beside `path` holding `data`, fsynced; the caller links or renames it, then unlinks it."""
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o644)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp

    def _fs_publish(self, path: Path, data: bytes) -> None:
        """Write `data` to a temp file beside `path`, fsync it, then link it to `path` (never replacing).

        Raises FileExistsError if `path` already exists.
        """
        tmp = self._fs_temp(path, data)
        try:
            try:
                os.link(tmp, path)  # atomic and fails if `path` exists, unlike rename
            except FileExistsError:
                raise
            except OSError as e:
                if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV):
                    raise
                # Filesystem without hard links: check, then rename (not race-free; one writer assumed).
                if path.exists():
                    raise FileExistsError(errno.EEXIST, "file exists", str(path)) from None
                os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def _fs_replace(self, path: Path, data: bytes) -> None:
        """Replace `path` with `data` atomically (temp file, fsync, rename): a reader sees the old or the new file.

        For the store's mutable files (holdout set, pins); versions never use it.
        """
        tmp = self._fs_temp(path, data)
        try:
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        self._fs_sync_dir(path.parent)

    @contextlib.contextmanager
    def _fs_lock(self, model: str) -> Iterator[None]:
        """Exclusive lock of one model across processes (flock), held by retention and by pin changes."""
        path = self.root / validate_model_name(model) / _LOCK_FILE
        self._fs_makedirs(path.parent)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing drops the lock

    def _fs_sync_dir(self, directory: Path) -> None:
        """fsync a directory so renames/links/unlinks in it survive a power loss (no-op where unsupported)."""
        try:
            fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)
