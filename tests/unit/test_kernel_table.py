"""Tuned kernel tables: the JSON's rules, when a table fits a process, and the round trip through tinygrad.

The round trip runs in child processes, each with a disk cache of its own (tinygrad reads CACHEDB once, at
import, and keeps compiled kernels in memory): one tunes a small graph under BEAM, another compiles with the
table; nothing may be searched there, and the kernels must be the tuned ones.
"""

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from importlib.metadata import version
from pathlib import Path

import pytest
from tinygrad import Device
from tinygrad.helpers import NUM_CPU_THREADS

from marketplace.kernel_table import SHIPPED, KernelTable, graph_name, load_table, table_for
from marketplace.kernel_tuning import serving_plans
from marketplace.models import beautiful_mnist, mlp

REPO = Path(__file__).resolve().parents[2]


def _table(**changes) -> KernelTable:
    device = Device.DEFAULT
    renderer = Device[device].renderer
    table = KernelTable(version("tinygrad"), device.split(":")[0].upper(), type(renderer).__name__,
                        str(renderer.target.arch), int(NUM_CPU_THREADS.value), 2, "test", frozenset({"g"}), ())
    return replace(table, **changes)


def _kernel(**changes) -> dict:
    return {"ast": "ab" * 32, "amt": 2, "allow_test_size": True, "device": "CPU", "suffix": "",
            "opts": [["UPCAST", 0, 4], ["UNROLL", 1, 0], ["THREAD", 0, 2]], **changes}


def test_json_round_trip_and_coverage(tmp_path):
    tc = _kernel(ast="cd" * 32, opts=[["TC", 0, [-1, 2, 1]]])  # a GPU's tensor-core choice carries a tuple
    table = KernelTable.from_json({**_table().to_json(), "kernels": [_kernel(), tc]})
    table.write(tmp_path / "t.json")
    assert load_table(tmp_path / "t.json") == table and not (tmp_path / "t.json.tmp").exists()
    assert {k.ast[:2]: k.opts for k in table.kernels} == {
        "ab": (("UPCAST", 0, 4), ("UNROLL", 1, 0), ("THREAD", 0, 2)), "cd": (("TC", 0, (-1, 2, 1)),)}
    assert table.covers("g") and not table.covers("another graph")


@pytest.mark.parametrize(("kernel", "message"), [
    (_kernel(opts=[["SPLIT", 0, 4]]), "opts\\[0\\] must be"),
    (_kernel(opts=[["UPCAST", "0", 4]]), "opts\\[0\\] must be"),
    (_kernel(opts=[["UPCAST", 0]]), "opts\\[0\\] must be"),
    (_kernel(ast="not hex"), "ast is not hex"),
    (_kernel(amt=True), "amt must be int"),
    (_kernel(opts=[["TC", 0, [-1, "2"]]]), "opts\\[0\\] must be"),
    ({k: v for k, v in _kernel().items() if k != "suffix"}, "has no 'suffix'"),
])
def test_a_malformed_kernel_is_refused_by_name(kernel, message):
    with pytest.raises(ValueError, match=message):
        KernelTable.from_json({**_table().to_json(), "kernels": [kernel]})


def test_a_table_fits_only_the_tinygrad_device_renderer_and_threads_it_was_tuned_for():
    device = Device.DEFAULT
    assert _table().unusable(device) is None
    assert "tinygrad" in _table(tinygrad="0.0.1").unusable(device)
    assert "renderer" in _table(renderer="SomeOtherRenderer").unusable(device)
    assert "device" in _table(device="CUDA").unusable(device)
    assert "target" in _table(target="sm_90").unusable(device)
    if _table().device == "CPU":
        assert "CPU threads" in _table(threads=int(NUM_CPU_THREADS.value) + 1).unusable(device)
        threaded = _table(kernels=(KernelTable.from_json({**_table().to_json(), "kernels": [_kernel()]}).kernels))
        renderer = Device[device].renderer
        old, renderer.has_threads = renderer.has_threads, False  # what THREADS=0 sets: THREAD choices fail
        try:
            assert "THREADS=0" in threaded.unusable(device) and _table().unusable(device) is None
        finally:
            renderer.has_threads = old


def test_table_for_off_unreadable_unfit_and_fit(tmp_path, caplog):
    assert table_for("off", Device.DEFAULT) is None
    fit = tmp_path / "fit.json"
    _table().write(fit)
    assert table_for(str(fit), Device.DEFAULT) == _table()
    with pytest.raises(ValueError, match="cannot read it"):
        table_for(str(tmp_path / "missing.json"), Device.DEFAULT)
    unfit = tmp_path / "unfit.json"
    _table(tinygrad="0.0.1").write(unfit)
    with caplog.at_level("INFO", logger="marketplace.kernel_table"):
        assert table_for(str(unfit), Device.DEFAULT) is None
    assert "not used" in caplog.text and "0.0.1" in caplog.text


def test_the_shipped_table_covers_the_default_serving_graphs():
    table = load_table(SHIPPED)
    spec = beautiful_mnist()
    serving = {name for plan in serving_plans(4, 256) for name in plan.graphs(spec)}
    assert table.graphs <= serving  # only graphs an API replica compiles at the defaults
    arch = spec.architecture
    for V, bucket, paired in [(1, 256, False), (1, 64, False), (1, 1, False), (4, 256, True), (4, 64, True),
                              (4, "lone", True), (4, 256, False), (4, 64, False), (4, "lone", False)]:
        assert graph_name(arch, V, bucket, paired) in table.graphs  # the benchmark's and the busiest serving ones
    assert table.beam >= 1 and len({k.ast for k in table.kernels}) == len(table.kernels)


def _child(code: str, cache: Path, *args: str) -> str:
    env = {**os.environ, "CACHEDB": str(cache), "PYTHONPATH": str(REPO), "DEV": Device.DEFAULT}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], env=env, capture_output=True,
                          text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


# compiles buckets with the table and without it; counts real BEAM searches (the search function wrapped before the
# table's swap), the table's answers and whether each is the tuned choice, and warnings (a kernel the table lacks
# or whose choices fail)
_SERVE = """
    import json, logging, sys
    import numpy as np
    from pathlib import Path
    from marketplace.engine import Engine, leader_seeds
    from marketplace.kernel_table import KernelTable, load_table, recording
    from marketplace.models import get_model
    spec, table = get_model(sys.argv[1], json.loads(sys.argv[2])), load_table(Path(sys.argv[3]))
    assert table.unusable(Engine(spec, 1, buckets=[1]).device) is None
    answered, warnings = [], []
    original = KernelTable.schedule
    def schedule(self, s):
        out = original(self, s)
        answered.append((s.ast.key.hex(), tuple((o.op.name, o.axis, o.arg) for o in out.applied_opts)))
        return out
    KernelTable.schedule = schedule
    logging.getLogger("marketplace.kernel_table").addHandler(logging.Handler())
    logging.getLogger("marketplace.kernel_table").handlers[-1].emit = warnings.append
    x = np.random.default_rng(0).uniform(0, 255, size=(3, *spec.input_shape)).astype(np.float32)
    params, out = spec.init_params(0), {}
    # as in the API: tinygrad's disk cache opened by the main thread, the graphs compiled on another (the engine's)
    from tinygrad.helpers import diskcache_get
    diskcache_get("opened_here", "by the main thread")
    def compile_all():
        for bucket in json.loads(sys.argv[4]):
            for kernels in (table, None):
                engine = Engine(spec, 1, buckets=[bucket], kernels=kernels)
                weights = engine.materialize(params, leader_seeds(spec), 0.05)
                out[f"{bucket}-{kernels is not None}"] = engine.forward(weights, x, np.random.default_rng(1))[0]
    import threading
    with recording() as searched:
        thread = threading.Thread(target=compile_all)
        thread.start()
        thread.join()
    tuned = {(k.ast, k.opts) for k in table.kernels}
    same = all(np.allclose(out[f"{b}-True"], out[f"{b}-False"], rtol=1e-4, atol=1e-5) for b in json.loads(sys.argv[4]))
    print(json.dumps({"searched": len(searched), "answered": len(answered), "warnings": len(warnings),
                      "all_tuned": all(a in tuned for a in answered), "same_logits": bool(same)}))
"""


@pytest.mark.extended  # 16 s: the tuning child; CI checks the shipped table's round trip below instead
def test_a_tuned_table_compiles_its_graphs_without_searching(tmp_path):
    """Tune one small graph in a child; in another (a fresh disk cache), that graph compiles with the table's
    choices and no search, an uncovered bucket compiles with tinygrad's heuristics (no search either), and the
    logits equal the untuned engine's. Choices that do not apply fall back to the heuristics, with a warning."""
    config = {"hidden": [16]}
    tune = """
        import json, sys
        from marketplace.kernel_tuning import GraphPlan, tune
        from marketplace.models import get_model
        table = tune(get_model("mlp", json.loads(sys.argv[1])), [GraphPlan(1, (2,), False)], beam=1, progress=False)
        open(sys.argv[2], "w").write(json.dumps(table.to_json()))
        print(len(table.kernels))
    """
    path = tmp_path / "table.json"
    assert int(_child(tune, tmp_path / "tune.db", json.dumps(config), str(path))) >= 1
    table = load_table(path)
    assert table.graphs == {graph_name(mlp(**config).architecture, 1, 2, False)} and table.beam == 1
    got = json.loads(_child(_SERVE, tmp_path / "serve.db", "mlp", json.dumps(config), str(path), "[2, 4]"))
    assert got == {"searched": 0, "answered": len(table.kernels), "warnings": 0, "all_tuned": True,
                   "same_logits": True}
    broken = tmp_path / "broken.json"  # every choice made impossible: an axis the kernels do not have
    data = json.loads(path.read_text())
    data["kernels"] = [{**k, "opts": [["UPCAST", 99, 4]]} for k in data["kernels"]]
    broken.write_text(json.dumps(data))
    got = json.loads(_child(_SERVE, tmp_path / "broken.db", "mlp", json.dumps(config), str(broken), "[2]"))
    assert got["searched"] == 0 and got["warnings"] == len(table.kernels) and got["same_logits"]


def test_the_shipped_table_is_read_not_searched_in_a_fresh_process(tmp_path):
    """The shipped table's AST keys hold in another process: beautiful_mnist's smallest covered graph compiles from
    it with nothing searched (only where the table fits this machine: same tinygrad, renderer, thread count)."""
    table = load_table(SHIPPED)
    if (why := table.unusable(Device.DEFAULT)) is not None:
        pytest.skip(f"the shipped table does not fit this machine: {why}")
    got = json.loads(_child(_SERVE, tmp_path / "serve.db", "beautiful_mnist", "{}", str(SHIPPED), "[1]"))
    assert got["searched"] == 0 and got["answered"] > 0 and got["warnings"] == 0
    assert got["all_tuned"] and got["same_logits"]


def test_graphs_to_tune_are_parsed_and_bad_ones_named():
    from marketplace.kernel_tuning import GraphPlan, parse_graphs

    assert parse_graphs("V1:256, V4p:64,V4p:8,V4:4") == [
        GraphPlan(1, (256,), False), GraphPlan(4, (64, 8), True), GraphPlan(4, (4,), False)]
    for bad in ("V4:6", "W4:8", "V4:x", "V0:8"):
        with pytest.raises(ValueError, match="V<vendors>"):
            parse_graphs(bad)
