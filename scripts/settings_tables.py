"""Print the README's settings tables (flag, env, default, what) from the pydantic-settings classes.

Run `python scripts/settings_tables.py` after adding a setting and paste the tables into README.md;
`tests/unit/test_settings.py` checks that the README names every setting's environment variable.
"""

from __future__ import annotations

from pydantic_settings import BaseSettings

from mpserve.stack import StackSettings
from server.settings import ServerSettings
from worker.settings import WorkerSettings

CLASSES: dict[str, type[BaseSettings]] = {"mpserve up": StackSettings, "mpserve serve (API replica)": ServerSettings,
                                          "mpserve worker (reconciler)": WorkerSettings}


def default_text(cls: type[BaseSettings], name: str) -> str:
    field = cls.model_fields[name]
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
        if not isinstance(value, (list, dict)):
            return "computed"  # e.g. hostname-pid
        return ",".join(map(str, value)) if isinstance(value, list) else (str(value) if value else "none")
    return "unset" if field.default is None else str(field.default)


def table(cls: type[BaseSettings]) -> str:
    prefix = cls.model_config.get("env_prefix", "")
    rows = ["| flag | env | default | what |", "|---|---|---|---|"]
    for name, field in cls.model_fields.items():
        what = (field.description or "").replace("|", "\\|")
        flag, env = f"--{name.replace('_', '-')}", f"{prefix}{name.upper()}"
        rows.append(f"| `{flag}` | `{env}` | `{default_text(cls, name)}` | {what} |")
    return "\n".join(rows)


def main() -> None:
    for title, cls in CLASSES.items():
        print(f"**`{title.split(' (')[0]}`**{(' (' + title.split(' (')[1]) if ' (' in title else ''}\n")
        print(table(cls), end="\n\n")


if __name__ == "__main__":
    main()
