"""`mpserve plot`: the dashboard's curves (loss and accuracy against version) as a PNG, for reports and CI.

The figures come from a store directory (manifests only, no Redis: no serving marker) or from a running
server's ``GET /models/{m}/versions`` (which also says which version serves and lists refused candidates).
Gathering (:func:`from_store`, :func:`from_url`, :func:`common.version_metrics.series`) is separate from
drawing (:func:`render_png`) so that what gets plotted can be checked without looking at pixels.
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Any

import httpx
from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from common.flags import build_parser
from common.logs import configure_logging
from common.names import validate_model_name
from common.version_metrics import DEFAULT_LIMIT, MAX_LIMIT, ManifestSummaryCache, series
from model_store import ModelStore
from mpserve.client import MPServeClient, MPServeError

log = logging.getLogger(__name__)


class PlotSettings(BaseSettings):
    """Where the versions come from and where the PNG goes."""

    model_config = SettingsConfigDict(env_prefix="MPSERVE_", extra="ignore", validate_default=True)

    url: str | None = Field(None, description="a running server's base URL (read GET /models/{m}/versions)")
    store_dir: Path | None = Field(None, description="a model store directory (read the manifests)")
    model: str = Field("fashion", description="the model to plot")
    out: Path = Field(Path("versions.png"), description="the PNG to write")
    limit: int = Field(DEFAULT_LIMIT, ge=1, le=MAX_LIMIT, description="newest versions to plot")
    log_level: str = Field("warning", description="logging level")

    @field_validator("model")
    @classmethod
    def _valid_model(cls, v: str) -> str:
        return validate_model_name(v)


def from_store(store_dir: Path, model: str, limit: int = DEFAULT_LIMIT) -> dict[str, Any]:
    """The versions of ``model`` in a store, shaped like the API's answer (no serving version, no refusals)."""
    store = ModelStore(store_dir)
    rows, stored = ManifestSummaryCache(store).rows(model, limit)
    if not rows:
        raise ValueError(f"store {store_dir} has no versions of model {model!r} (models there: {store.models()})")
    return {"model": model, "serving_version": None, "stored": stored,
            "versions": [{**r, "serving": False} for r in rows], "refused": []}


def from_url(url: str, model: str, limit: int = DEFAULT_LIMIT) -> dict[str, Any]:
    """A running server's answer to ``GET /models/{model}/versions?limit=``."""
    with MPServeClient(url, timeout=30) as client:
        return client.versions(model, limit)


def _nan(values: list[Any]) -> list[float]:
    return [math.nan if v is None else float(v) for v in values]


def render_png(data: dict[str, Any], out: Path) -> dict[str, list[Any]]:
    """Draw accuracy and loss against version (serving version dashed, refused candidates as crosses).

    Returns the columns it plotted (:func:`series` of the rows).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    cols = series(data["versions"])
    versions = cols["version"]
    serving = data.get("serving_version")
    refused = [c for c in data.get("refused", []) if c.get("metrics")]
    fig, (acc, loss) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    for ax, names, title in ((acc, ("online_accuracy", "validation_accuracy"), "accuracy"),
                             (loss, ("online_loss", "validation_loss"), "loss")):
        for name, color in zip(names, ("tab:blue", "tab:green") if ax is acc else ("tab:red", "tab:orange"),
                               strict=True):
            ys = _nan(cols[name])
            if any(not math.isnan(y) for y in ys):
                # markers, and lines only between consecutive versions that both have a value
                ax.plot(versions, ys, marker="o", markersize=4, color=color, label=name.replace("_", " "))
        if serving is not None:
            ax.axvline(serving, color="0.2", linestyle="--", linewidth=1, label=f"serving v{serving}")
        if ax is acc and refused:
            ax.scatter([c["version"] for c in refused], _nan([c["metrics"]["validation_accuracy"] for c in refused]),
                       marker="x", color="darkred", label="refused candidate", zorder=3)
        ax.set_title(title)
        ax.set_xlabel("version")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(f"{data['model']}: {len(versions)} versions" +
                 (f" (newest of {data['stored']})" if data.get("stored", 0) > len(versions) else ""))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return cols


def main(argv: list[str] | None = None) -> int:
    """``mpserve plot``: flags override MPSERVE_* variables; an explicit --url or --store-dir picks the source."""
    parser = build_parser(PlotSettings, "mpserve plot", "Plot loss and accuracy against version to a PNG.")
    given = vars(parser.parse_args(argv))
    try:
        settings = PlotSettings(**given)
    except ValidationError as exc:
        parser.error("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()))
    configure_logging(settings.log_level)
    source = ("url" if "url" in given else "store_dir" if "store_dir" in given
              else "url" if settings.url else "store_dir" if settings.store_dir else None)
    if source is None:
        parser.error("give --url (a running server) or --store-dir (a model store)")
    try:
        if source == "url":
            assert settings.url is not None
            data = from_url(settings.url, settings.model, settings.limit)
        else:
            assert settings.store_dir is not None
            data = from_store(settings.store_dir, settings.model, settings.limit)
    except (ValueError, OSError, MPServeError, httpx.HTTPError) as exc:  # a CLI: say what went wrong in one line
        print(f"mpserve plot: {exc}", file=sys.stderr)
        return 1
    cols = render_png(data, settings.out)
    print(f"wrote {settings.out}: {len(cols['version'])} versions of {data['model']}")
    return 0
