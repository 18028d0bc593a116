"""Tuned kernel tables: the JSON's rules, when a table fits a process, and the round trip through tinygrad.

The round trip runs in child processes, each with a disk cache of its own (tinygrad reads CACHEDB once, at
import): one tunes a small graph under BEAM, another installs the table and compiles; nothing may be searched
there, and the kernels must be the tuned ones.
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
from tinygrad.helpers import NUM_CPU_THREADS, Context

from marketplace.kernel_table import KernelTable, graph_name, load_table, table_for
from marketplace.models import mlp

REPO = Path(__file__).resolve().parents[2]


def _table(**changes) -> KernelTable:
    device = Device.DEFAULT
    table = KernelTable(version("tinygrad"), device.split(":")[0].upper(), type(Device[device].renderer).__name__,
                        int(NUM_CPU_THREADS.value), 2, "test", frozenset({"g"}), ())
    return replace(table, **changes)


def _kernel(**changes) -> dict:
    return {"ast": "ab" * 32, "amt": 2, "allow_test_size": True, "device": "CPU", "suffix": "",
            "opts": [["UPCAST", 0, 4], ["UNROLL", 1, 0], ["THREAD", 0, 2]], **changes}


def test_json_round_trip_and_coverage():
    table = KernelTable.from_json({**_table().to_json(), "kernels": [_kernel()]})
    assert KernelTable.from_json(json.loads(json.dumps(table.to_json()))) == table
    assert table.kernels[0].opts == (("UPCAST", 0, 4), ("UNROLL", 1, 0), ("THREAD", 0, 2))
    assert table.beam_for("g") == 2 and table.beam_for("another graph") == 0


@pytest.mark.parametrize(("kernel", "message"), [
    (_kernel(opts=[["SPLIT", 0, 4]]), "opts\\[0\\] must be"),
    (_kernel(opts=[["UPCAST", "0", 4]]), "opts\\[0\\] must be"),
    (_kernel(opts=[["UPCAST", 0]]), "opts\\[0\\] must be"),
    (_kernel(ast="not hex"), "ast is not hex"),
    (_kernel(amt=True), "amt must be int"),
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
    if _table().device == "CPU":
        assert "CPU threads" in _table(threads=int(NUM_CPU_THREADS.value) + 1).unusable(device)
    with Context(CACHELEVEL=0):  # BEAM would search instead of reading the table
        assert "CACHELEVEL=0" in _table().unusable(device)


def test_table_for_off_unreadable_and_unfit(tmp_path, caplog):
    assert table_for("off", Device.DEFAULT) is None
    with pytest.raises(ValueError, match="cannot read it"):
        table_for(str(tmp_path / "missing.json"), Device.DEFAULT)
    unfit = tmp_path / "unfit.json"
    unfit.write_text(json.dumps(_table(tinygrad="0.0.1").to_json()))
    with caplog.at_level("INFO", logger="marketplace.kernel_table"):
        assert table_for(str(unfit), Device.DEFAULT) is None
    assert "not used" in caplog.text and "0.0.1" in caplog.text


def _child(code: str, cache: Path, *args: str) -> str:
    env = {**os.environ, "CACHEDB": str(cache), "PYTHONPATH": str(REPO), "DEV": Device.DEFAULT}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], env=env, capture_output=True,
                          text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


# compiles under a table (installed into this child's own cache), counting searches: the cache's keys before and
# after, and the choices tinygrad read, which must be the table's
_SERVE = """
    import json, sqlite3, sys
    import numpy as np
    from pathlib import Path
    from tinygrad.helpers import CACHEDB
    from marketplace.engine import Engine, leader_seeds
    from marketplace.kernel_table import load_table, recording
    from marketplace.models import get_model
    spec, table = get_model(sys.argv[1], json.loads(sys.argv[2])), load_table(Path(sys.argv[3]))
    assert table.unusable(Engine(spec, 1, buckets=[1]).device) is None
    table.install()
    def keys():
        return {r[0] for r in sqlite3.connect(CACHEDB).execute("SELECT ast FROM beam_search_22")}
    before = keys()
    x = np.random.default_rng(0).uniform(0, 255, size=(3, *spec.input_shape)).astype(np.float32)
    params = spec.init_params(0)
    out = {}
    with recording() as seen:
        for bucket in json.loads(sys.argv[4]):
            for kernels in (table, None):
                engine = Engine(spec, 1, buckets=[bucket], kernels=kernels)
                weights = engine.materialize(params, leader_seeds(spec), 0.05)
                out[f"{bucket}-{kernels is not None}"] = engine.forward(weights, x, np.random.default_rng(1))[0]
    tuned = {(k.ast, k.opts) for k in table.kernels}
    ok = all(np.allclose(out[f"{b}-True"], out[f"{b}-False"], rtol=1e-4, atol=1e-5) for b in json.loads(sys.argv[4]))
    print(json.dumps({"searched": len(keys() - before), "read": len(seen),
                      "all_tuned": all((k.ast, k.opts) in tuned for k in seen), "same_logits": ok}))
"""


def test_a_tuned_table_compiles_its_graphs_without_searching(tmp_path):
    """Tune one small graph in a child; in another (a fresh disk cache), that graph compiles with the table's
    choices and no search, an uncovered bucket compiles with tinygrad's heuristics (no search either), and the
    logits equal the untuned engine's."""
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
    assert got == {"searched": 0, "read": len(table.kernels), "all_tuned": True, "same_logits": True}
