"""Schemathesis against a live server's `/openapi.json`: every operation, positive and negative data, with
and without credentials. Counts the examples, the 5xx answers and the answers that break the published
schema (undeclared status code or content type, body or headers off the response schema).

    python -m bench.fuzz [--examples 300] [--json results/fuzz.json] [--url http://127.0.0.1:8000]

Without --url it starts `mpserve up` (embedded Redis, the shipped default model) on a free port with an
admin token and one API key, so the admin and client routes are exercised both ways. The test suite
runs :func:`fuzz_api` with a few examples per operation (tests/processes/test_hardening.py).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

TOKEN = "fuzz-admin-token"
CLIENT, CLIENT_KEY = "fuzzer", "fuzz-client-key"

#: The checks this fuzzer asserts: no server error, and every answer as the schema declares it.
SCHEMA_CHECKS = ("status_code_conformance", "content_type_conformance", "response_schema_conformance",
                 "response_headers_conformance")


@dataclass
class Row:
    """One operation under one generation mode and one set of credentials."""

    operation: str
    mode: str
    auth: str
    examples: int = 0
    server_errors: int = 0
    schema_violations: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)  # the first few, with a curl command to reproduce

    def note(self, text: str, keep: int = 5) -> None:
        if len(self.failures) < keep:
            self.failures.append(text)


def _checks() -> tuple[Any, list[Any]]:
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi import checks

    return not_a_server_error, [getattr(checks, name) for name in SCHEMA_CHECKS]


def fuzz_api(base_url: str, examples: int, credentials: Mapping[str, Mapping[str, str]],
             modes: tuple[str, ...] = ("positive", "negative", "shaped"), derandomize: bool = False,
             timeout_s: float = 60.0) -> list[Row]:
    """Fuzz every operation of the live schema at ``base_url``; one row per (operation, mode, credentials).

    ``positive``/``negative``: schemathesis' data from the schema. ``shaped``: /predict bodies of the
    default model's exact input shape (random values up to the float32 range, labels in and out of
    range), then /label on the ids they returned, so the success paths are fuzzed too (the schema says
    only "nested arrays of numbers": random data almost never has the model's shape).
    ``credentials`` names header sets, e.g. ``{"none": {}, "token": {"Authorization": "Bearer ..."}}``.
    Failures are counted, not raised, so one run reports every operation.
    """
    import schemathesis
    from schemathesis import GenerationMode

    server_error, schema_checks = _checks()
    checks = [server_error, *schema_checks]
    schema = schemathesis.openapi.from_url(base_url.rstrip("/") + "/openapi.json", timeout=timeout_s)
    operations = [r.ok() for r in schema.get_all_operations()]
    rows: list[Row] = []
    for op in operations:
        for mode in modes:
            if mode == "shaped":
                continue
            strategy = op.as_strategy(generation_mode=GenerationMode(mode))
            for auth, headers in credentials.items():
                row = Row(op.label, mode, auth)
                rows.append(row)
                _run_cases(strategy, row, base_url, dict(headers), examples, derandomize, timeout_s, checks)
    if "shaped" in modes:
        by_label = {op.label: op for op in operations}
        rows += _shaped(by_label["POST /predict"], by_label["POST /label"], base_url, examples, credentials,
                        derandomize, timeout_s, checks)
    return rows


def _shaped(predict: Any, label: Any, base_url: str, examples: int, credentials: Mapping[str, Mapping[str, str]],
            derandomize: bool, timeout_s: float, checks: list[Any]) -> list[Row]:
    """Well-shaped /predict bodies for the default model, then labels for the ids they got."""
    import numpy as np
    import requests
    from hypothesis import strategies as st
    from hypothesis.extra.numpy import arrays

    info = requests.get(base_url.rstrip("/") + "/models", timeout=timeout_s).json()["models"][0]
    shape, classes = tuple(info["input_shape"]), int(info["num_classes"])
    f32 = float(np.finfo(np.float32).max)
    values = st.one_of(st.integers(0, 255).map(float), st.floats(-f32, f32, width=32),
                       st.floats(-1e3, 1e3, width=32))
    wanted = st.integers(0, classes - 1) | st.sampled_from([-1, classes])  # out of range: a 422
    rows: list[Row] = []
    for auth, headers in credentials.items():
        ids: list[str] = []

        def keep_ids(response: Any, ids: list[str] = ids) -> None:
            if response.status_code == 200:
                ids.extend(p["id"] for p in response.json()["predictions"])

        @st.composite
        def predict_body(draw: Any) -> dict[str, Any]:
            n = draw(st.integers(1, 3))
            x = draw(arrays(np.float32, (n, *shape), elements=values))
            body: dict[str, Any] = {"inputs": x.tolist()}
            if draw(st.booleans()):
                body["labels"] = draw(st.lists(wanted, min_size=n, max_size=n))
            return body

        row = Row(predict.label, "shaped", auth)
        rows.append(row)
        _run_cases(predict_body().map(lambda b: predict.Case(body=b, media_type="application/json")), row,
                   base_url, dict(headers), examples, derandomize, timeout_s, checks, keep_ids)
        known = st.sampled_from(ids) if ids else st.just("0" * 32)
        item = st.fixed_dictionaries({"id": st.one_of(known, st.just("f" * 32)), "label": wanted})
        body = st.one_of(item, st.fixed_dictionaries({"labels": st.lists(item, min_size=1, max_size=4)}))
        row = Row(label.label, "shaped", auth)
        rows.append(row)
        _run_cases(body.map(lambda b: label.Case(body=b, media_type="application/json")), row, base_url,
                   dict(headers), examples, derandomize, timeout_s, checks)
    return rows


def _run_cases(strategy: Any, row: Row, base_url: str, headers: dict[str, str], examples: int, derandomize: bool,
               timeout_s: float, checks: list[Any], on_response: Callable[[Any], None] | None = None) -> None:
    """Send ``examples`` cases drawn from ``strategy``; count statuses, 5xx and schema violations into ``row``."""
    from hypothesis import HealthCheck, Phase, Verbosity, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.core.failures import FailureGroup

    @settings(max_examples=examples, deadline=None, database=None, derandomize=derandomize,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck),
              verbosity=Verbosity.quiet)
    @given(case=strategy)
    def run(case: Any) -> None:
        response = case.call(base_url=base_url, headers=headers, timeout=timeout_s)
        row.examples += 1
        status = str(response.status_code)
        row.statuses[status] = row.statuses.get(status, 0) + 1
        if response.status_code >= 500:
            row.server_errors += 1
        if on_response is not None:
            on_response(response)
        try:
            case.validate_response(response, checks=checks, headers=headers)
        except FailureGroup as group:
            row.schema_violations += any(type(f).__name__ != "ServerError" for f in group.exceptions)
            row.note(f"{status}: " + "; ".join(f"{type(f).__name__}: {f.title}" for f in group.exceptions)
                     + f"\n  {case.as_curl_command(headers=headers)}\n  answer: {response.content[:300]!r}")

    try:
        run()
    except Unsatisfiable:  # nothing to negate (an operation without parameters or body): no example exists
        pass


def summary(rows: list[Row]) -> list[dict[str, Any]]:
    """The printed table: one line per operation, all modes and credentials added up."""
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        s = out.setdefault(r.operation, {"operation": r.operation, "examples": 0, "5xx": 0, "schema_violations": 0})
        s["examples"] += r.examples
        s["5xx"] += r.server_errors
        s["schema_violations"] += r.schema_violations
    return list(out.values())


@contextmanager
def stack(data_dir: Path) -> Iterator[str]:
    """`mpserve up` with an admin token and one API key, on a free port; yields its URL."""
    from mpserve.stack import free_port

    port = free_port()
    env = {**os.environ, "MPSERVE_ADMIN_TOKEN": TOKEN, "MPSERVE_API_KEYS": f"{CLIENT}:{CLIENT_KEY}",
           "MPSERVE_LOG_LEVEL": "warning", "MPSERVE_INTERVAL_S": "1000000"}
    log_path = data_dir / "up.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "mpserve.cli", "up", "--port", str(port), "--data-dir",
                                 str(data_dir)], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while b"mpserve is up" not in log_path.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(log_path.read_text()[-3000:])
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)


def main() -> None:
    from bench.common import print_table, write_json

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--examples", type=int, default=300, help="examples per operation, mode and credentials")
    ap.add_argument("--url", default=None, help="fuzz this server (default: start `mpserve up` here)")
    ap.add_argument("--token", default=TOKEN, help="admin token of --url")
    ap.add_argument("--api-key", default=CLIENT_KEY, help="client API key of --url")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    credentials = {"none": {}, "keys": {"Authorization": f"Bearer {args.token}", "X-API-Key": args.api_key}}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if args.url:
            rows = fuzz_api(args.url, args.examples, credentials)
        else:
            with stack(Path(tmp)) as url:
                rows = fuzz_api(url, args.examples, credentials)
    elapsed = time.perf_counter() - started
    table = summary(rows)
    print_table(table, ["operation", "examples", "5xx", "schema_violations"])
    print(f"\n{sum(r.examples for r in rows)} requests in {elapsed:.0f} s")
    for r in rows:
        for f in r.failures:
            print(f"\n{r.operation} [{r.mode}, {r.auth}] {f}")
    write_json(args.json, {"benchmark": "fuzz", "examples_per_case": args.examples, "seconds": elapsed,
                           "table": table, "rows": [asdict(r) for r in rows]})
    if any(r.server_errors or r.schema_violations for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
