"""Tests of the model store: the safetensors codec (the reference library in a strict shell), manifests, the store."""

from __future__ import annotations

import hashlib
import io
import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from model_store import (
    ArchitectureMismatch,
    IntegrityError,
    ManifestError,
    ModelStore,
    ModelStoreError,
    SafetensorsError,
    VersionExistsError,
    VersionNotFound,
    encode_safetensors,
    load_safetensors,
    make_manifest,
    manifest_from_json,
    manifest_to_json,
    save_safetensors,
    seeds_array,
    validate_manifest,
    validate_model_name,
)

# ----------------------------------------------------------------------------------------- helpers


def craft(
    header: Any, buffer: bytes = b"", *, raw_header: bytes | None = None, length: int | None = None
) -> bytes:
    """Hand-build a safetensors file, possibly a malformed one."""
    raw = raw_header if raw_header is not None else json.dumps(header).encode()
    n = len(raw) if length is None else length
    return struct.pack("<Q", n) + raw + buffer


def sample_params(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "l1.weight": rng.standard_normal((8, 4)).astype(np.float32),
        "l1.bias": rng.standard_normal(8).astype(np.float32),
        "l2.weight": rng.standard_normal((3, 8)).astype(np.float32),
        "l2.bias": np.zeros(3, dtype=np.float32),
    }


SHAPES = {"l1.weight": (8, 4), "l1.bias": (8,), "l2.weight": (3, 8), "l2.bias": (3,)}
SEEDS = [[0, 2**64 - 1, 12345], [0, 7, 2**63]]


def manifest_for(version: int, parent: int | None, **extra: Any) -> dict[str, Any]:
    return make_manifest(
        version=version,
        parent=parent,
        model="fashion",
        architecture={"name": "mlp", "config": {"hidden": 8}},
        seeds=SEEDS,
        probe_scale=0.01,
        learning_rate=0.05,
        records=100 * version,
        cohorts=[parent] if parent is not None else [],
        outliers_dropped=2,
        loss={"mean": 0.5, "std": 0.1, "n": 100},
        validation={"accuracy": 0.8} if version % 2 == 0 else None,
        training={"epochs": 3} if parent is None else None,
        created=1_700_000_000.0 + version,
        **extra,
    )


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "store")


def write(store: ModelStore, version: int, parent: int | None, seed: int | None = None) -> dict[str, Any]:
    return store.write_version(
        "fashion", version, sample_params(version if seed is None else seed), manifest_for(version, parent)
    )


# ----------------------------------------------------------------------------------------- safetensors


def test_round_trip_dtypes_and_shapes_bit_exact() -> None:
    rng = np.random.default_rng(1)
    f32 = rng.standard_normal((3, 5)).astype(np.float32)
    f32[0, 0] = np.float32(np.nan)
    f32[0, 1] = -0.0
    f32.view(np.uint32)[0, 2] = 0x7FC0_1234  # a NaN with a payload: must survive bit for bit
    tensors = {
        "f32": f32,
        "f16": rng.standard_normal((2, 2, 2)).astype(np.float16),
        "f64": rng.standard_normal(4),
        "i32": np.arange(-6, 6, dtype=np.int32).reshape(3, 4),
        "i64": np.array([-(2**63), 2**63 - 1, 0], dtype=np.int64),
        "u8": np.arange(256, dtype=np.uint8),
        "u64": np.array([2**64 - 1, 1], dtype=np.uint64),
        "bool": np.array([True, False, True]),
        "scalar": np.array(3.5, dtype=np.float32),
        "empty": np.zeros((0, 7), dtype=np.float32),
        "big_endian": np.arange(5, dtype=">i4"),
        "strided": np.arange(12, dtype=np.float32).reshape(3, 4).T,
    }
    out = load_safetensors(encode_safetensors(tensors))
    assert sorted(out) == sorted(tensors)
    for name, arr in tensors.items():
        got = out[name]
        assert got.shape == arr.shape, name
        assert got.dtype == arr.dtype.newbyteorder("="), name
        assert got.tobytes() == np.asarray(arr, dtype=got.dtype).tobytes(), name  # bit-exact
        assert got.flags.writeable and got.flags.owndata and got.flags.c_contiguous, name
    assert out["f32"].view(np.uint32)[0, 2] == 0x7FC0_1234
    assert out["scalar"].shape == () and out["scalar"] == np.float32(3.5)


def test_files_are_standard_safetensors_with_metadata(tmp_path: Path) -> None:
    """Another tool (the reference reader, memory-mapped) sees the same tensors and the metadata."""
    from safetensors import safe_open

    tensors = {"b": np.arange(3, dtype=np.float32), "a": np.arange(2, dtype=np.int64).reshape(1, 2)}
    path = tmp_path / "x.safetensors"
    save_safetensors(path, tensors, {"note": "hi"})
    with safe_open(path, framework="np") as f:
        assert f.metadata() == {"note": "hi"}
        assert sorted(f.keys()) == ["a", "b"]
        for name, arr in tensors.items():
            np.testing.assert_array_equal(f.get_tensor(name), arr)
    (n,) = struct.unpack_from("<Q", path.read_bytes())
    assert (8 + n) % 8 == 0  # the buffer starts 8-byte aligned


def test_save_to_path_fileobj_and_bytes(tmp_path: Path) -> None:
    t = {"x": np.arange(4, dtype=np.int32)}
    raw = save_safetensors(None, t)
    assert isinstance(raw, bytes)
    path = tmp_path / "x.safetensors"
    assert save_safetensors(path, t) is None
    assert path.read_bytes() == raw
    buf = io.BytesIO()
    assert save_safetensors(buf, t) is None
    assert buf.getvalue() == raw
    np.testing.assert_array_equal(load_safetensors(raw)["x"], t["x"])


def test_encoder_refuses_unsupported_input() -> None:
    with pytest.raises(SafetensorsError, match="no safetensors equivalent"):
        encode_safetensors({"c": np.zeros(2, np.complex64)})
    with pytest.raises(SafetensorsError, match="no safetensors equivalent"):
        encode_safetensors({"o": np.array([object()], dtype=object)})
    with pytest.raises(SafetensorsError, match="reserved"):
        encode_safetensors({"__metadata__": np.zeros(1, np.float32)})
    with pytest.raises(SafetensorsError, match="str to str"):
        encode_safetensors({"x": np.zeros(1, np.float32)}, {"k": 1})  # type: ignore[dict-item]


def _valid() -> bytes:
    return encode_safetensors({"a": np.arange(4, dtype=np.float32), "b": np.arange(2, dtype=np.int64)})


F32 = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}

#: Hostile or broken files, each refused with SafetensorsError before any tensor is returned.
HOSTILE: dict[str, bytes] = {
    "buffer one byte short": _valid()[:-1],
    "cut inside the header": _valid()[:20],
    "shorter than the length field": _valid()[:5],
    "trailing byte": _valid() + b"\0",
    "offsets past the buffer": craft({"a": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, b"\0" * 16),
    "negative offset": craft({"a": {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]}}, b"\0" * 4),
    "overlapping tensors": craft({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                  "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12),
    "gap between tensors": craft({"a": F32, "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}},
                                 b"\0" * 12),
    "span does not fit the shape": craft({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8),
    "shape overflows": craft({"a": {"dtype": "F32", "shape": [2**62, 2**62], "data_offsets": [0, 4]}}, b"\0" * 4),
    "header length 2**63": struct.pack("<Q", 2**63) + b"{}",
    "header length over 100 MB": struct.pack("<Q", 100_000_001) + b"{}",
    "header length past the file": craft({}, length=1000),
    "BF16 (no NumPy type)": craft({"a": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4),
    "F8 (no NumPy type)": craft({"a": {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [0, 4]}}, b"\0" * 4),
    "unknown dtype": craft({"a": {"dtype": "complex", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4),
    "dtype not a string": craft({"a": {"dtype": 7, "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4),
    "negative dimension": craft({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}),
    "bool dimension": craft({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, b"\0" * 4),
    "float dimension": craft({"a": {"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}}, b"\0" * 4),
    "shape not a list": craft({"a": {"dtype": "F32", "shape": "1", "data_offsets": [0, 4]}}, b"\0" * 4),
    "one offset": craft({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}, b"\0" * 4),
    "float offsets": craft({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0.0, 4.0]}}, b"\0" * 4),
    "no offsets": craft({"a": {"dtype": "F32", "shape": [1]}}, b"\0" * 4),
    "entry not an object": craft({"a": [1, 2, 3]}, b"\0" * 4),
    "metadata not str to str": craft({"__metadata__": {"k": 1}, "a": F32}, b"\0" * 4),
    "BOOL byte 2": craft({"a": {"dtype": "BOOL", "shape": [2], "data_offsets": [0, 2]}}, b"\x01\x02"),
    "not JSON": craft(None, raw_header=b"not json at all"),
    "JSON cut short": craft(None, raw_header=b'{"a": '),
    "not UTF-8": craft(None, raw_header=b"\xff\xfe{}"),
    "a JSON list": craft(None, raw_header=b"[1, 2]"),
    "two JSON objects": craft(None, raw_header=b"{} {}"),
    "NaN literal": craft(None, raw_header=b'{"a": NaN}'),
    "nesting 100,000 deep": craft(None, raw_header=b"[" * 100_000 + b"]" * 100_000),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_or_broken_files_are_refused(name: str) -> None:
    with pytest.raises(SafetensorsError):
        load_safetensors(HOSTILE[name])


def test_valid_edge_cases_load() -> None:
    header = {"a": {"dtype": "BOOL", "shape": [2], "data_offsets": [0, 2]}}
    assert load_safetensors(craft(header, b"\x01\x00"))["a"].tolist() == [True, False]
    assert load_safetensors(craft({})) == {}
    empty = {"a": {"dtype": "F32", "shape": [0, 3], "data_offsets": [0, 0]}}
    assert load_safetensors(craft(empty))["a"].shape == (0, 3)


def test_safetensors_error_is_a_value_error() -> None:
    assert issubclass(SafetensorsError, ValueError)
    assert issubclass(SafetensorsError, ModelStoreError)


# ----------------------------------------------------------------------------------------- manifest


def test_manifest_normalizes_numpy_and_keeps_unknown_keys() -> None:
    m = make_manifest(
        version=np.int64(3),
        parent=2,
        model="fashion",
        architecture={"name": "mlp", "config": {"sizes": (784, 10)}, "extra": "kept"},
        seeds=np.array(SEEDS, dtype=np.uint64),
        probe_scale=np.float32(0.5),
        learning_rate=0.1,
        loss={"mean": np.float64(1.25)},
        future_field={"anything": [1, 2]},
    )
    assert type(m["version"]) is int and m["version"] == 3
    assert m["seeds"] == SEEDS and all(type(x) is int for row in m["seeds"] for x in row)
    assert m["architecture"] == {"name": "mlp", "config": {"sizes": [784, 10]}, "extra": "kept"}
    assert m["future_field"] == {"anything": [1, 2]}
    assert isinstance(m["created"], float) and m["created"] > 1.6e9
    back = manifest_from_json(manifest_to_json(m), require_weights=False)
    assert back == m
    np.testing.assert_array_equal(seeds_array(back), np.array(SEEDS, dtype=np.uint64))
    assert seeds_array(back).dtype == np.uint64


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"seeds": [[0, 2**64]]}, "uint64"),
        ({"seeds": [[0, -1]]}, "uint64"),
        ({"seeds": [[0, 1], [0]]}, "vendors"),
        ({"seeds": [[0, True]]}, "uint64"),
        ({"loss": {"mean": float("nan")}}, "NaN"),
        ({"probe_scale": float("inf")}, "NaN|finite"),
        ({"architecture": {"name": "", "config": {}}}, "architecture"),
        ({"architecture": {"name": "mlp"}}, "config"),
        ({"version": 10**8}, "version"),
        ({"parent": 5}, "own parent"),
        ({"validation": [1]}, "validation"),
        ({"records": -1}, "records"),
    ],
)
def test_manifest_validation_refuses_bad_fields(change: dict[str, Any], match: str) -> None:
    m = {**manifest_for(5, 4), **change}
    with pytest.raises(ManifestError, match=match):
        validate_manifest(m)


def test_manifest_missing_field_is_named() -> None:
    m = manifest_for(1, 0)
    del m["probe_scale"]
    with pytest.raises(ManifestError, match="probe_scale"):
        validate_manifest(m)
    with pytest.raises(ManifestError, match="weights_sha256"):
        validate_manifest(manifest_for(1, 0), require_weights=True)


# ----------------------------------------------------------------------------------------- store


def test_write_and_load_round_trip(store: ModelStore) -> None:
    params = sample_params(0)
    final = store.write_version("fashion", 0, params, manifest_for(0, None, note="kept"))
    weights = store.root / "fashion" / "versions" / "00000000.safetensors"
    assert weights.is_file() and (weights.parent / "00000000.json").is_file()
    assert final["weights_file"] == "00000000.safetensors"
    assert final["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert final["note"] == "kept"

    loaded, manifest = store.read_version("fashion", 0, expected_shapes=SHAPES, expected_architecture="mlp")
    assert manifest == final == store.read_manifest("fashion", 0)
    assert sorted(loaded) == sorted(params)
    for name, arr in params.items():
        assert loaded[name].dtype == arr.dtype
        assert loaded[name].tobytes() == arr.tobytes()  # bit-exact
    assert manifest["seeds"] == SEEDS and manifest["training"] == {"epochs": 3}
    assert not [p for p in weights.parent.iterdir() if p.name.startswith(".")]  # no temp files left


def test_write_fills_model_version_created(store: ModelStore) -> None:
    m = manifest_for(0, None)
    for key in ("model", "version", "created"):
        del m[key]
    final = store.write_version("fashion", 0, sample_params(), m)
    assert final["model"] == "fashion" and final["version"] == 0 and final["created"] > 1.6e9
    with pytest.raises(ManifestError, match="does not match"):
        store.write_version("fashion", 1, sample_params(), manifest_for(2, None))
    with pytest.raises(ManifestError, match="older version"):
        store.write_version("fashion", 1, sample_params(), manifest_for(1, 3))
    assert store.versions("fashion") == [0]


def test_refuses_to_overwrite(store: ModelStore) -> None:
    write(store, 0, None)
    weights = store.root / "fashion" / "versions" / "00000000.safetensors"
    before = weights.read_bytes()
    with pytest.raises(FileExistsError):
        write(store, 0, None, seed=99)
    with pytest.raises(VersionExistsError, match="immutable"):
        write(store, 0, None, seed=99)
    assert weights.read_bytes() == before
    store.read_version("fashion", 0)  # still intact


def test_flipped_byte_fails_the_hash(store: ModelStore) -> None:
    write(store, 0, None)
    weights = store.root / "fashion" / "versions" / "00000000.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01  # one bit of one weight
    weights.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="sha256"):
        store.read_version("fashion", 0)


def test_truncated_weights_fail_the_hash(store: ModelStore) -> None:
    write(store, 0, None)
    weights = store.root / "fashion" / "versions" / "00000000.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(IntegrityError, match="sha256"):
        store.read_version("fashion", 0)
    weights.unlink()
    with pytest.raises(IntegrityError, match="missing"):
        store.read_version("fashion", 0)


def test_tampered_manifest_is_refused(store: ModelStore) -> None:
    write(store, 0, None)
    path = store.root / "fashion" / "versions" / "00000000.json"
    m = json.loads(path.read_text())
    path.write_text(json.dumps({**m, "version": 1}))
    with pytest.raises(IntegrityError, match="claims"):
        store.read_manifest("fashion", 0)
    path.write_text("{not json")
    with pytest.raises(IntegrityError, match="invalid"):
        store.read_version("fashion", 0)


def test_shape_mismatch_names_the_tensor(store: ModelStore) -> None:
    write(store, 0, None)
    wrong = {**SHAPES, "l2.weight": (8, 3)}
    with pytest.raises(ArchitectureMismatch, match=r"'l2\.weight'.*\(3, 8\).*\(8, 3\)"):
        store.read_version("fashion", 0, expected_shapes=wrong)
    missing = {**SHAPES, "l3.weight": (2, 2)}
    with pytest.raises(ArchitectureMismatch, match=r"missing tensors \['l3\.weight'\]"):
        store.read_version("fashion", 0, expected_shapes=missing)
    extra = {k: v for k, v in SHAPES.items() if k != "l1.bias"}
    with pytest.raises(ArchitectureMismatch, match=r"unexpected tensors \['l1\.bias'\]"):
        store.read_version("fashion", 0, expected_shapes=extra)


def test_architecture_mismatch_names_both(store: ModelStore) -> None:
    write(store, 0, None)
    with pytest.raises(ArchitectureMismatch, match=r"'mlp'.*expected 'resnet'"):
        store.read_version("fashion", 0, expected_architecture="resnet")


def test_lineage_across_four_versions(store: ModelStore) -> None:
    write(store, 0, None)
    write(store, 1, 0)
    write(store, 2, 1)
    write(store, 3, 1)  # a rollback to 1, then a new step from it
    assert store.lineage("fashion", 3) == [3, 1, 0]
    assert store.lineage("fashion", 2) == [2, 1, 0]
    assert store.lineage("fashion", 0) == [0]
    assert store.versions("fashion") == [0, 1, 2, 3]
    assert store.latest("fashion") == 3
    with pytest.raises(VersionNotFound):
        store.lineage("fashion", 4)


def test_lineage_detects_cycles(store: ModelStore) -> None:
    write(store, 0, None)
    write(store, 1, 0)
    path = store.root / "fashion" / "versions" / "00000000.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "parent": 1}))  # hand-edited
    with pytest.raises(IntegrityError, match="cycle"):
        store.lineage("fashion", 1)


def test_retention_keeps_current_parent_newest_and_the_root(store: ModelStore) -> None:
    write(store, 0, None)
    for v in range(1, 8):
        write(store, v, v - 1)
    write(store, 8, 2)  # serving was rolled back to 2; 8 was trained from it
    deleted = store.apply_retention("fashion", keep_last=2, protect=[4])
    # kept: the root 0, newest two (7, 8), protected 4 and its parent 3. Not the parent (2) of unprotected 8.
    assert deleted == [1, 2, 5, 6]
    assert store.versions("fashion") == [0, 3, 4, 7, 8]
    files = sorted(p.name for p in (store.root / "fashion" / "versions").iterdir())
    assert files == [f"{v:08d}.{ext}" for v in (0, 3, 4, 7, 8) for ext in ("json", "safetensors")]
    assert store.lineage("fashion", 4) == [4, 3]  # stops at the deleted ancestor
    assert store.apply_retention("fashion", keep_last=2, protect=[4]) == []
    assert store.apply_retention("fashion", keep_last=0, protect=[8]) == [3, 4, 7]
    assert store.versions("fashion") == [0, 8]


def test_retention_with_fewer_versions_than_keep_last_deletes_nothing(store: ModelStore) -> None:
    """Issue #9: 26 versions under keep_last 50 lost versions 0 and 1 (a negative slice start)."""
    write(store, 0, None)
    for v in range(1, 26):
        write(store, v, v - 1)
    assert store.apply_retention("fashion", keep_last=50, protect=[25, 24]) == []
    assert store.versions("fashion") == list(range(26))


def test_pins_survive_retention_and_bad_pins_are_refused(store: ModelStore) -> None:
    write(store, 0, None)
    for v in range(1, 6):
        write(store, v, v - 1)
    assert store.pin("fashion", 2) == [2] and store.pin("fashion", 2) == [2]  # idempotent
    with pytest.raises(VersionNotFound):
        store.pin("fashion", 9)
    assert store.apply_retention("fashion", keep_last=1, pinned=[3]) == [1, 4]
    assert store.versions("fashion") == [0, 2, 3, 5]
    assert store.unpin("fashion", 2) == [] and store.unpin("fashion", 2) == []
    with pytest.raises(VersionNotFound):
        store.unpin("fashion", 4)  # deleted and not pinned
    assert store.pins_path("fashion") == store.root / "fashion" / "pins.json"
    assert [p.name for p in store.pins_path("fashion").parent.iterdir() if p.name.endswith(".tmp")] == []
    store.pins_path("fashion").write_text('{"pinned": [3, -1]}')  # hand-edited: retention must not guess
    with pytest.raises(IntegrityError, match="pins"):
        store.apply_retention("fashion", keep_last=1)
    assert store.versions("fashion") == [0, 2, 3, 5]
    with pytest.raises(ValueError):
        store.apply_retention("fashion", keep_last=-1, protect=[])


def test_invalid_model_names_rejected(store: ModelStore) -> None:
    for bad in ("../x", "A", "", "a/b", ".hidden", "a" * 65, "a\n", "x\\y", None):
        with pytest.raises(ValueError):
            validate_model_name(bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            store.write_version(bad, 0, sample_params(), manifest_for(0, None))  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            store.versions(bad)  # type: ignore[arg-type]
    assert validate_model_name("fashion-mnist_2") == "fashion-mnist_2"
    assert not (store.root.parent / "x").exists()
    assert store.models() == []


@pytest.mark.parametrize("bad", [-1, 10**8, 1.0, True, "1"])
def test_invalid_versions_rejected(store: ModelStore, bad: Any) -> None:
    with pytest.raises(ValueError):
        store.write_version("fashion", bad, sample_params(), manifest_for(0, None))
    with pytest.raises(ValueError):
        store.has_version("fashion", bad)


def test_version_without_manifest_is_not_listed(store: ModelStore) -> None:
    write(store, 0, None)
    # A crash between the two publishes: the weights of version 1 exist, its manifest does not.
    orphan = store.root / "fashion" / "versions" / "00000001.safetensors"
    orphan.write_bytes(encode_safetensors(sample_params(1)))
    (orphan.parent / ".00000002.json.123.abc.tmp").write_text("{}")  # a crashed temp file
    assert store.versions("fashion") == [0]
    assert store.latest("fashion") == 0
    assert not store.has_version("fashion", 1)
    with pytest.raises(VersionNotFound):
        store.read_version("fashion", 1)
    # The version can still be written properly; the orphan is replaced.
    final = write(store, 1, 0, seed=42)
    assert store.versions("fashion") == [0, 1]
    assert final["weights_sha256"] == hashlib.sha256(orphan.read_bytes()).hexdigest()
    loaded, _ = store.read_version("fashion", 1)
    assert loaded["l1.weight"].tobytes() == sample_params(42)["l1.weight"].tobytes()


def test_models_and_empty_store(store: ModelStore) -> None:
    assert store.models() == [] and store.versions("fashion") == [] and store.latest("fashion") is None
    write(store, 0, None)
    m = manifest_for(0, None)
    m["model"] = "digits"
    store.write_version("digits", 0, sample_params(), m)
    (store.root / "empty").mkdir()  # a directory without versions is not a model
    (store.root / "Not_A_Model").mkdir()
    assert store.models() == ["digits", "fashion"]
    assert store.has_version("digits", 0) and not store.has_version("digits", 1)
    with pytest.raises(VersionNotFound, match="no version 5"):
        store.read_manifest("fashion", 5)
