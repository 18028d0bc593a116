"""Model versions as the processes see them: a manifest and weights from the store, made usable.

The one place that turns a stored version into a spec, parameters, seeds and probe scale (for the
server's engine and the worker's reconciler), and a reconciled update into the next stored version.
The store itself only reads and writes files (``ModelStore.read_version``: weights and manifest);
:func:`load_version` here makes a :class:`LoadedVersion` of them. Also the shipped default model
(``common/assets/store``) and the seeding of an empty store with it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from marketplace.models import ModelSpec, spec_from_architecture
from marketplace.reconcile import VersionSeeds, fresh_seeds
from model_store import ModelStore, VersionExistsError, make_manifest, seeds_array

log = logging.getLogger(__name__)

DEFAULT_ASSET = "fashion"


@dataclass(frozen=True)
class LoadedVersion:
    """One immutable version: everything needed to serve it or to reconcile from it."""

    model: str
    version: int
    spec: ModelSpec
    params: dict[str, np.ndarray]
    seeds: np.ndarray  # (S, V) uint64
    eps: float
    manifest: dict[str, Any]

    @property
    def vendors(self) -> int:
        return int(self.seeds.shape[1])

    @property
    def antithetic(self) -> bool:
        return bool(self.manifest.get("antithetic", False))

    @property
    def sources(self) -> VersionSeeds:
        return VersionSeeds(self.seeds, self.eps, self.antithetic)


def load_version(store: ModelStore, model: str, version: int) -> LoadedVersion:
    """Read, hash-check and shape-check a version against the architecture its manifest names."""
    manifest = store.read_manifest(model, version)
    spec = spec_from_architecture(manifest["architecture"])
    params, manifest = store.read_version(model, version, expected_shapes=spec.param_shapes(),
                                          expected_architecture=spec.name)
    seeds = seeds_array(manifest)
    if seeds.shape[0] != len(spec.groups):
        raise ValueError(f"{model} v{version}: seeds for {seeds.shape[0]} groups, the model has {len(spec.groups)}")
    return LoadedVersion(model, version, spec, params, seeds, float(manifest["probe_scale"]), manifest)


def version_sources(store: ModelStore, model: str, versions: set[int] | list[int]) -> dict[int, VersionSeeds]:
    """Seeds and probe scale of older versions, from their manifests alone (weights are not needed)."""
    out = {}
    for n in versions:
        m = store.read_manifest(model, int(n))
        out[int(n)] = VersionSeeds(seeds_array(m), float(m["probe_scale"]), bool(m.get("antithetic", False)))
    return out


def write_next_version(store: ModelStore, parent: LoadedVersion, version: int, params: dict[str, np.ndarray],
                       stats: dict[str, Any], learning_rate: float, rng: np.random.Generator,
                       eps: float | None = None, vendors: int | None = None, antithetic: bool = False,
                       learned: np.ndarray | None = None, **extra: Any) -> dict[str, Any]:
    """Store a reconciled update as a new immutable version with fresh seeds (zero in the groups that do not
    learn, ``learned``); returns its manifest."""
    S = len(parent.spec.groups)
    if antithetic:
        extra["antithetic"] = True
    manifest = make_manifest(
        version=version, parent=parent.version, model=parent.model, architecture=parent.spec.architecture,
        seeds=fresh_seeds(S, vendors or parent.vendors, rng, antithetic, learned),
        probe_scale=parent.eps if eps is None else eps,
        learning_rate=learning_rate, records=int(stats.get("records", 0)), cohorts=stats.get("cohorts", []),
        outliers_dropped=int(stats.get("outliers_dropped", 0)),
        loss={"mean": stats.get("loss_mean"), "std": stats.get("loss_std")}, **extra)
    return store.write_version(parent.model, version, params, manifest)


def fallback_base(store: ModelStore, model: str, published: set[Any]) -> int | None:
    """The version to build on (and serve) while ``mp:{m}:version`` is unset.

    The newest stored version, skipping reconciler outputs (manifest with ``inputs``) that are not in
    ``published`` (the versions of the publish history): such a file is garbage left by a crash between
    the store write and the publish, and building on it (or serving it) would apply its entries twice.
    """
    versions = store.versions(model)
    for v in reversed(versions):
        if v in published or "inputs" not in store.read_manifest(model, v):
            if v != versions[-1]:
                log.warning("%s: no version is set in Redis; using %d, not the unpublished %s", model, v,
                            [x for x in versions if x > v])
            return v
    return versions[-1] if versions else None


def shipped_store() -> ModelStore:
    """The store inside this package that holds the default model (`mpserve train --export-dir` writes it)."""
    return ModelStore(Path(str(resources.files("common") / "assets" / "store")))


def seed_default_model(store: ModelStore, model: str) -> bool:
    """Copy the shipped model (and its holdout set) into an empty store as `model` version 0.

    False if the store already has versions of ``model``, or when another replica seeding the same empty
    store (two API replicas starting together on Kubernetes) wrote version 0 first: the same bytes.
    """
    if store.versions(model):
        return False
    shipped = shipped_store()
    params, manifest = shipped.read_version(DEFAULT_ASSET, 0)
    manifest = {k: v for k, v in manifest.items() if k not in ("weights_sha256", "weights_file", "model")}
    manifest["model"] = model
    holdout = shipped.read_holdout_bytes(DEFAULT_ASSET, "default")
    if holdout is not None:  # before the version: a crash in between must not leave the model unguarded
        size = len(store.write_holdout_bytes(model, holdout, "default"))
    try:
        store.write_version(model, 0, params, manifest)
    except VersionExistsError:
        log.info("model %s version 0 was seeded by another process meanwhile", model)
        return False
    log.info("seeded model %s version 0 from the shipped default%s", model,
             f" with its holdout set ({size} images)" if holdout is not None else "")
    return True
