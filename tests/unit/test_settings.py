"""Each process reads MPSERVE_MODELS the same way: "a,b" or a JSON list, validated names."""

import pytest
from pydantic import ValidationError

from mpserve.stack import StackSettings
from server.settings import ServerSettings
from worker.settings import WorkerSettings


@pytest.mark.parametrize("cls", [ServerSettings, WorkerSettings])
@pytest.mark.parametrize("value", ["fashion,other", '["fashion", "other"]', " fashion , other,"])
def test_models_from_the_environment(monkeypatch, cls, value):
    monkeypatch.setenv("MPSERVE_MODELS", value)
    monkeypatch.setenv("MPSERVE_DEFAULT_MODEL", "fashion")
    assert cls().models == ["fashion", "other"]


@pytest.mark.parametrize("cls", [ServerSettings, WorkerSettings])
def test_bad_model_names_are_refused(monkeypatch, cls):
    monkeypatch.setenv("MPSERVE_MODELS", "fashion,../etc")
    with pytest.raises(ValidationError):
        cls()


def test_stack_settings_read_flags_and_env(monkeypatch):
    monkeypatch.setenv("MPSERVE_PORT", "9001")
    assert StackSettings().port == 9001 and StackSettings().redis_url is None


def test_the_readme_names_every_setting() -> None:
    """Each process's settings table in the README is printed by scripts/settings_tables.py: none is missing."""
    from pathlib import Path

    from mpserve.stack import StackSettings
    from server.settings import ServerSettings
    from worker.settings import WorkerSettings

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    missing = [f"MPSERVE_{name.upper()}" for cls in (StackSettings, ServerSettings, WorkerSettings)
               for name in cls.model_fields if f"`MPSERVE_{name.upper()}`" not in readme]
    assert not missing, f"README lacks {missing}: run python scripts/settings_tables.py"


def test_a_kernel_table_named_by_path_is_read_at_start(monkeypatch, tmp_path):
    """shipped and off need no file; a path must hold a readable table, or the replica stops with the reason."""
    monkeypatch.delenv("MPSERVE_KERNEL_TABLE", raising=False)  # the suite sets off for the servers it starts
    assert ServerSettings().kernel_table == "shipped"
    monkeypatch.setenv("MPSERVE_KERNEL_TABLE", "off")
    assert ServerSettings().kernel_table == "off"
    bad = tmp_path / "table.json"
    bad.write_text('{"tinygrad": "0.14.0"}')
    monkeypatch.setenv("MPSERVE_KERNEL_TABLE", str(bad))
    with pytest.raises(ValidationError, match="has no 'kernels'"):
        ServerSettings()
    monkeypatch.setenv("MPSERVE_KERNEL_TABLE", str(tmp_path / "missing.json"))
    with pytest.raises(ValidationError, match="cannot read it"):
        ServerSettings()
