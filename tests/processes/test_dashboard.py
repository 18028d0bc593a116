"""Version metrics: GET /models/{m}/versions, the /dashboard page in a real headless Chromium, `mpserve plot`.

One real redis-server, one real uvicorn replica and a store of six versions (version 0 trained offline,
with only a test accuracy; versions 1-5 with the metrics block the worker writes). The page is loaded
through a small pass-through proxy in the test that publishes a new version when the page's second poll
arrives, so "the page picks up a new version on refresh" is shown without sleeping: Chromium's virtual
time drives the page's refresh timer.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from html.parser import HTMLParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis

from common.loading import load_version, write_next_version
from common.version_metrics import METRIC_FIELDS, ManifestSummaryCache, metrics_of, refused_entries, series
from marketplace.models import mlp
from marketplace.reconcile import fresh_seeds
from model_store import ModelStore, make_manifest
from mpserve.plot import from_store, from_url, render_png
from mpserve.plot import main as plot_main
from redis_io.keys import ModelKeys
from redis_io.recordlog import RecordLog
from tests.helpers import ApiProcess, ModelLog, RedisProcess, serving_version

MODEL = "fashion"
KEYS = ModelKeys(MODEL)
SERVING = 3  # the store's newest version is 5; serving an older one shows the marker is not just "the last"
REFUSED = {"type": "refused", "version": 6, "ts_ms": 1_700_000_000_000, "reason": "validation accuracy fell",
           "metrics": {"online_loss": 0.9, "online_accuracy": 0.6, "validation_accuracy": 0.41,
                       "validation_loss": 1.7, "holdout_size": 500, "records": 64}}
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def version_metrics(v: int) -> dict[str, Any]:
    """Made-up but distinct figures per version; version 3 has no holdout (validation null)."""
    holdout = v != 3
    return {"online_loss": round(1.2 - 0.1 * v, 4), "online_accuracy": round(0.5 + 0.05 * v, 4),
            "validation_accuracy": round(0.55 + 0.04 * v, 4) if holdout else None,
            "validation_loss": round(1.1 - 0.08 * v, 4) if holdout else None,
            "holdout_size": 500 if holdout else None, "records": 32 * v,
            "leader_accuracy": round(0.6 + 0.01 * v, 4), "probe_accuracy": round(0.4 + 0.02 * v, 4) if v else None,
            "traffic_accuracy": round(0.7 + 0.01 * v, 4) if holdout else None,
            "traffic_anchor_accuracy": 0.7 if holdout else None}


def add_version(store: ModelStore, parent: int, metrics: dict[str, Any]) -> int:
    """What the worker does: store version latest+1 built on ``parent``, its metrics in the manifest."""
    base = load_version(store, MODEL, parent)
    version = (store.latest(MODEL) or 0) + 1
    params = {k: v + np.float32(0.01) for k, v in base.params.items()}
    write_next_version(store, base, version, params, {"records": metrics["records"], "loss_mean": 0.5}, 0.5,
                       np.random.default_rng(version), metrics=metrics)
    return version


def build_store(root: Path) -> ModelStore:
    spec = mlp(hidden=(16,))
    store = ModelStore(root)
    manifest = make_manifest(version=0, parent=None, model=MODEL, architecture=spec.architecture,
                             seeds=fresh_seeds(len(spec.groups), 4, np.random.default_rng(0)), probe_scale=0.05,
                             learning_rate=0.5, validation={"split": "t10k", "test_accuracy": 0.625},
                             training={"kind": "random init (tests)"})
    store.write_version(MODEL, 0, spec.init_params(0), manifest)
    for v in range(1, 6):
        assert add_version(store, v - 1, version_metrics(v)) == v
    return store


def publish(store: ModelStore, r: redis.Redis, metrics: dict[str, Any]) -> int:
    """Store a new version on top of the newest and publish it (the worker's fenced script)."""
    current = RecordLog(r, MODEL).current_version()  # unset until a publish: the worker's first one sees None
    version = add_version(store, store.latest(MODEL), metrics)
    token = int(r.get(KEYS.fence) or 0)
    RecordLog(r, MODEL).publish(token, version, {"parent": version - 1, "by": "test"}, [], expected_version=current)
    return version


# ---------------------------------------------------------------------------------- pure logic
def test_metrics_block_is_read_as_is_and_older_manifests_fall_back() -> None:
    block = version_metrics(2)
    got, source = metrics_of({"records": 64, "metrics": block, "loss": {"mean": 9.0}})
    assert source == "metrics" and got == block
    partial, _ = metrics_of({"records": 7, "metrics": {"online_loss": 0.3, "validation_accuracy": "bad"}})
    assert partial == {**dict.fromkeys(METRIC_FIELDS), "online_loss": 0.3, "records": 7}
    base, source = metrics_of({"records": 0, "loss": {}, "validation": {"test_accuracy": 0.9039}, "training": {}})
    assert source == "legacy" and base["validation_accuracy"] == 0.9039 and base["online_loss"] is None
    old, _ = metrics_of({"records": 12, "loss": {"mean": 0.42, "std": 0.1}, "validation": None, "training": None})
    assert old["online_loss"] == 0.42 and old["validation_accuracy"] is None and old["records"] == 12


def test_refused_entries_and_series() -> None:
    history = [{"type": "publish", "version": 1}, REFUSED, {"type": "refused", "version": "x"},
               {"type": "rollback", "version": 0}]
    (only,) = refused_entries(history, 10)
    assert only["version"] == 6 and only["metrics"]["validation_accuracy"] == 0.41 and only["reason"]
    assert refused_entries(history, 0) == []
    rows = [{"version": 2, "metrics": version_metrics(2)}, {"version": 1, "metrics": version_metrics(1)}]
    cols = series(rows)
    assert cols["version"] == [1, 2]
    assert cols["online_loss"] == [version_metrics(1)["online_loss"], version_metrics(2)["online_loss"]]


def test_summary_cache_reads_each_manifest_once_and_forgets_deleted_versions(tmp_path: Path) -> None:
    store = build_store(tmp_path / "store")
    cache = ManifestSummaryCache(store)
    rows, stored = cache.rows(MODEL, 4)
    assert [r["version"] for r in rows] == [2, 3, 4, 5] and stored == 6 and cache.reads == 4
    rows, _ = cache.rows(MODEL, 100)
    assert [r["version"] for r in rows] == [0, 1, 2, 3, 4, 5] and cache.reads == 6  # only 0 and 1 were new
    assert rows[0]["source"] == "legacy" and rows[0]["metrics"]["validation_accuracy"] == 0.625
    for v in range(1, 6):
        assert rows[v]["metrics"] == store.read_manifest(MODEL, v)["metrics"]
    store.apply_retention(MODEL, keep_last=2)  # keeps the root, 0, too
    rows, stored = cache.rows(MODEL, 100)
    assert [r["version"] for r in rows] == [0, 4, 5] and stored == 3 and cache.reads == 6


def test_an_unreadable_manifest_is_listed_with_its_reason_and_read_again_once_fixed(tmp_path: Path) -> None:
    store = build_store(tmp_path / "store")
    path = store.root / MODEL / "versions" / "00000002.json"
    good = path.read_bytes()
    path.write_bytes(good.replace(b'"version": 2', b'"version": 3'))
    cache = ManifestSummaryCache(store)
    rows, _ = cache.rows(MODEL, 100)
    assert [r["version"] for r in rows] == [0, 1, 2, 3, 4, 5]
    assert rows[2]["source"] == "unreadable" and "version 3" in rows[2]["error"]
    assert rows[2]["metrics"] == dict.fromkeys(METRIC_FIELDS) and rows[3]["source"] == "metrics"
    path.write_bytes(good)
    rows, _ = cache.rows(MODEL, 100)
    assert rows[2]["source"] == "metrics" and rows[2]["metrics"] == version_metrics(2) and cache.reads == 7


# ---------------------------------------------------------------------------------- a live server
@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    return build_store(tmp_path_factory.mktemp("store"))


@pytest.fixture(scope="module")
def serving_state(r: redis.Redis, store: ModelStore) -> None:
    """This module's Redis (conftest.r) serving version SERVING, with one refused candidate in the history."""
    r.flushall()
    ModelLog(r, MODEL).rollback(SERVING, {"by": "test"})
    r.rpush(KEYS.history, json.dumps(REFUSED))


@pytest.fixture(scope="module")
def server(serving_state: None, redis_proc: RedisProcess, store: ModelStore,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiProcess]:
    with ApiProcess(["--redis-url", redis_proc.url, "--store-dir", str(store.root), "--max-batch", "8",
                     "--poll-interval-s", "0.5", "--log-level", "warning"],
                    tmp_path_factory.mktemp("logs") / "server-dash.log") as proc:
        yield proc


def get_versions(server: ApiProcess, **params: Any) -> httpx.Response:
    return httpx.get(f"{server.url}/models/{MODEL}/versions", params=params, timeout=30)


def test_versions_endpoint_reports_each_stored_version(server: ApiProcess, store: ModelStore,
                                                       r: redis.Redis) -> None:
    body = get_versions(server).json()
    serving = serving_version(r, MODEL, store)
    stored = store.versions(MODEL)
    assert body["model"] == MODEL and body["serving_version"] == serving and body["stored"] == len(stored)
    assert [row["version"] for row in body["versions"]] == stored
    for row in body["versions"]:
        manifest = store.read_manifest(MODEL, row["version"])
        assert row["serving"] == (row["version"] == serving)
        assert row["parent"] == manifest["parent"] and row["records"] == manifest["records"]
        if row["version"] == 0:
            assert row["source"] == "legacy" and row["metrics"]["validation_accuracy"] == 0.625
        else:
            assert row["source"] == "metrics" and row["metrics"] == manifest["metrics"]
    assert [c["version"] for c in body["refused"]] == [REFUSED["version"]]
    assert body["refused"][0]["metrics"]["validation_accuracy"] == REFUSED["metrics"]["validation_accuracy"]

    newest = get_versions(server, limit=2).json()
    assert [row["version"] for row in newest["versions"]] == stored[-2:] and newest["stored"] == len(stored)
    # /metrics: the serving version's recent-traffic figures beside the frozen anchor's (none for a legacy v0)
    figures = store.read_manifest(MODEL, serving)["metrics"] if serving else {}
    text = httpx.get(server.url + "/metrics", timeout=30).text
    for weights, key in (("serving", "traffic_accuracy"), ("frozen", "traffic_anchor_accuracy")):
        line = f'mpserve_recent_traffic_accuracy{{model="{MODEL}",weights="{weights}"}}'
        if figures.get(key) is None:
            assert line not in text
        else:
            assert f"{line} {figures[key]}" in text


@pytest.mark.parametrize("params", [{"limit": 0}, {"limit": 100_000}, {"limit": "many"}])
def test_versions_endpoint_refuses_bad_limits(server: ApiProcess, params: dict[str, Any]) -> None:
    resp = get_versions(server, **params)
    assert resp.status_code == 422 and resp.json()["detail"][0]["loc"] == ["query", "limit"]


def test_versions_endpoint_unknown_model_and_schema(server: ApiProcess) -> None:
    resp = httpx.get(f"{server.url}/models/nosuch/versions", timeout=30)
    assert resp.status_code == 404 and "nosuch" in resp.json()["detail"]
    assert httpx.get(f"{server.url}/models/..%2Fetc/versions", timeout=30).status_code in (404, 422)
    spec = httpx.get(f"{server.url}/openapi.json", timeout=30).json()
    op = spec["paths"]["/models/{name}/versions"]["get"]
    assert op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/ModelVersions")
    assert {"ModelVersions", "VersionRow", "VersionMetrics", "RefusedCandidate"} <= set(spec["components"]["schemas"])
    assert set(spec["components"]["schemas"]["VersionMetrics"]["properties"]) == set(METRIC_FIELDS)
    page = httpx.get(f"{server.url}/dashboard", timeout=30)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "data-version" in page.text and "<script" in page.text and "http" not in page.text.replace(
        "http://www.w3.org/2000/svg", "")  # nothing fetched from elsewhere


# ---------------------------------------------------------------------------------- the page in Chromium
class DashboardDom(HTMLParser):
    """What a dumped /dashboard shows: per model, the plotted points, the table rows, the serving marks."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.refreshes = 0
        self.model: str | None = None
        self.points: dict[str, list[tuple[str, int, float, bool]]] = {}
        self.table: dict[str, list[int]] = {}
        self.serving_rows: dict[str, list[int]] = {}
        self.serving_lines: dict[str, list[int]] = {}
        self.refused: dict[str, set[int]] = {}
        self._table_kind: str | None = None
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        classes = a.get("class", "").split()
        if tag == "body":
            self.refreshes = int(a.get("data-refreshes", "0"))
        elif tag == "section" and "model" in classes:
            self.model = a["data-model"]
            for d in (self.points, self.table, self.serving_rows, self.serving_lines):
                d[self.model] = []
            self.refused[self.model] = set()
        elif self.model is None:
            return
        elif tag == "table":
            self._table_kind = a.get("class")
        elif tag == "circle" and "pt" in classes:
            self.points[self.model].append((a["data-series"], int(a["data-version"]), float(a["data-value"]),
                                            "serving" in classes))
        elif tag == "tr" and "data-version" in a and self._table_kind == "versions":
            self.table[self.model].append(int(a["data-version"]))
            if "serving" in classes:
                self.serving_rows[self.model].append(int(a["data-version"]))
        elif tag == "line" and "serving-line" in classes:
            self.serving_lines[self.model].append(int(a["data-serving-version"]))
        elif "data-refused-version" in a:
            self.refused[self.model].add(int(a["data-refused-version"]))


def dump_dom(url: str, budget_ms: int, profile: Path) -> DashboardDom:
    """Load ``url`` in headless Chromium, let ``budget_ms`` of virtual time pass, parse the resulting DOM."""
    return DashboardDom(dump_html(url, budget_ms, profile))


def dump_html(url: str, budget_ms: int, profile: Path) -> str:
    """The DOM of ``url`` as headless Chromium leaves it after ``budget_ms`` of virtual time."""
    assert CHROMIUM is not None
    argv = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-extensions", f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}",
            "--dump-dom", url]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


class HookedProxy:
    """A pass-through HTTP proxy to the server that can run a hook before forwarding the Nth ``GET /models``.

    The page starts each refresh with ``GET /models``, so a hook on the second one runs between the page's
    first and second poll: a deterministic "meanwhile, a version was published".
    """

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.hooks: dict[int, Callable[[], None]] = {}
        self.listings = 0
        self.errors: list[str] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                if self.path.split("?")[0] == "/models":
                    proxy.listings += 1
                    hook = proxy.hooks.pop(proxy.listings, None)
                    if hook is not None:
                        try:
                            hook()
                        except Exception as exc:  # noqa: BLE001 - reported by the test, not lost in a thread
                            proxy.errors.append(repr(exc))
                resp = httpx.get(proxy.upstream + self.path, timeout=30)
                self.send_response(resp.status_code)
                self.send_header("Content-Type", resp.headers.get("content-type", "application/octet-stream"))
                self.send_header("Content-Length", str(len(resp.content)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(resp.content)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> HookedProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def plotted(dom: DashboardDom, series_name: str) -> list[int]:
    return sorted(v for s, v, _, _ in dom.points[MODEL] if s == series_name)


def assert_page_matches_api(dom: DashboardDom, api: dict[str, Any]) -> None:
    rows = api["versions"]
    assert dom.table[MODEL] == sorted((r["version"] for r in rows), reverse=True)  # newest first
    for name in ("online_loss", "online_accuracy", "validation_accuracy", "validation_loss", "traffic_accuracy",
                 "traffic_anchor_accuracy"):
        assert plotted(dom, name) == [r["version"] for r in rows if r["metrics"][name] is not None], name
    values = {(s, v): x for s, v, x, _ in dom.points[MODEL]}
    for r in rows:
        for name in ("online_loss", "online_accuracy", "validation_accuracy", "traffic_accuracy",
                     "traffic_anchor_accuracy"):
            if r["metrics"][name] is not None:
                assert values[(name, r["version"])] == pytest.approx(r["metrics"][name])
    serving = api["serving_version"]
    assert dom.serving_rows[MODEL] == [serving]
    assert dom.serving_lines[MODEL] == [serving] * 4  # one per chart
    assert {v for _, v, _, is_serving in dom.points[MODEL] if is_serving} == {serving}
    assert dom.refused[MODEL] == {c["version"] for c in api["refused"]}


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (scripts/bootstrap.sh --test installs it)")
def test_dashboard_plots_the_versions_the_api_reports_and_picks_up_a_new_one(
        server: ApiProcess, store: ModelStore, r: redis.Redis, tmp_path: Path) -> None:
    before = get_versions(server).json()
    assert len(before["versions"]) >= 6 and before["serving_version"] is not None
    refresh_ms = 1000
    with HookedProxy(server.url) as proxy:
        page = f"{proxy.url}/dashboard?refresh={refresh_ms}"
        first = dump_dom(page, refresh_ms // 2, tmp_path / "profile-1")  # one poll: the page as loaded
        assert first.refreshes == 1 and proxy.listings == 1
        assert_page_matches_api(first, before)

        published: list[int] = []
        proxy.listings = 0
        proxy.hooks[2] = lambda: published.append(publish(store, r, version_metrics(7)))
        later = dump_dom(page, refresh_ms * 2 + refresh_ms // 2, tmp_path / "profile-2")  # polls at 0, 1 s, 2 s
        assert not proxy.errors, proxy.errors
    assert len(published) == 1 and later.refreshes == 3
    after = get_versions(server).json()
    (new,) = published
    assert after["serving_version"] == new and new not in {row["version"] for row in before["versions"]}
    assert_page_matches_api(later, after)
    assert new in plotted(later, "online_accuracy") and later.serving_rows[MODEL] == [new]


# ---------------------------------------------------------------------------------- mpserve plot
def test_plot_gathers_the_manifests_figures_and_writes_a_png(store: ModelStore, server: ApiProcess,
                                                             tmp_path: Path) -> None:
    data = from_store(store.root, MODEL)
    cols = render_png(data, tmp_path / "store.png")
    stored = store.versions(MODEL)
    assert cols["version"] == stored
    for i, v in enumerate(stored):
        manifest = store.read_manifest(MODEL, v)
        expected = manifest.get("metrics") or metrics_of(manifest)[0]
        assert {k: cols[k][i] for k in METRIC_FIELDS} == expected
    png = (tmp_path / "store.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000

    live = from_url(server.url, MODEL)
    assert series(live["versions"]) == cols and live["serving_version"] is not None

    out = tmp_path / "cli" / "url.png"
    assert plot_main(["--url", server.url, "--model", MODEL, "--out", str(out)]) == 0
    assert out.read_bytes().startswith(b"\x89PNG") and out.stat().st_size > 10_000
    assert plot_main(["--store-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "x.png")]) == 1
    assert not (tmp_path / "x.png").exists()


def test_plot_takes_its_source_from_the_environment_and_an_explicit_flag_wins(
        store: ModelStore, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("MPSERVE_URL", "MPSERVE_STORE_DIR", "MPSERVE_MODEL", "MPSERVE_OUT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit) as neither:
        plot_main([])
    assert neither.value.code == 2
    monkeypatch.setenv("MPSERVE_STORE_DIR", str(store.root))
    monkeypatch.setenv("MPSERVE_OUT", str(tmp_path / "env.png"))
    monkeypatch.setenv("MPSERVE_URL", "http://127.0.0.1:9")  # nothing listens: used only if chosen
    assert plot_main(["--store-dir", str(store.root)]) == 0 and (tmp_path / "env.png").stat().st_size > 0
    assert plot_main(["--url", "http://127.0.0.1:9"]) == 1
    with pytest.raises(SystemExit) as bad:
        plot_main(["--model", "Bad Name!"])
    assert bad.value.code == 2


# ---------------------------------------------------------------------------------- API docs offline
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (scripts/bootstrap.sh --test installs it)")
def test_api_docs_render_from_the_package_without_internet(server: ApiProcess, tmp_path: Path) -> None:
    """/docs (Swagger UI) and /redoc load their scripts from the API itself: this machine has no internet, so
    FastAPI's default pages (scripts from a CDN) render no operation at all here."""
    for page in ("/docs", "/redoc"):
        html = httpx.get(server.url + page, timeout=10).text
        scripts = re.findall(r'<script[^>]*src="([^"]+)"', html)
        assert scripts and all(src.startswith("/") for src in scripts), scripts  # nothing from another host
        assert all(httpx.get(server.url + src, timeout=10).status_code == 200 for src in scripts)
    spec = httpx.get(server.url + "/openapi.json", timeout=10).json()
    operations = {(m.upper(), p) for p, item in spec["paths"].items() for m in item}
    swagger = dump_html(server.url + "/docs", 5000, tmp_path / "profile-docs")
    shown = set(re.findall(r'data-path="([^"]+)"', swagger))
    assert shown == {p for _, p in operations}, shown ^ {p for _, p in operations}  # every path, no other
    assert len(re.findall(r'class="opblock opblock-', swagger)) == len(operations)
    redoc = dump_html(server.url + "/redoc", 5000, tmp_path / "profile-redoc")
    assert "/predict" in redoc and "/admin/reconcile" in redoc
