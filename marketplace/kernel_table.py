"""Tuned kernels shipped with the engine: tinygrad's BEAM search results as JSON, so no user pays the search.

tinygrad picks each kernel's loop transformations (upcasts, unrolls, threads) by hand-written heuristics, or,
with ``BEAM=n``, by timing candidates on the device: on this project's 2-core CPU that doubles the engine's
throughput, but the search takes minutes per graph. tinygrad keeps each search's result in its disk cache,
keyed by the kernel's AST, and looks there before searching. A `KernelTable` is such results written down as
JSON (never tinygrad's pickled cache), with the graphs they cover and the machine they were tuned for:

- `tune` runs the engine's graphs under BEAM and records what tinygrad chose (``mpserve tune-kernels``);
- `KernelTable.unusable` says why a table does not fit this process (another tinygrad, device, renderer or
  thread count, or tinygrad's disk cache off: then BEAM would search), and `install` writes its results into
  tinygrad's disk cache, so compiling a covered graph under BEAM finds every kernel there and searches nothing;
- `KernelTable.beam_for` is what the engine asks before compiling a graph: the BEAM width if the table
  covers it, else 0 (tinygrad's heuristics, never a search on the request path).

The shipped table (`SHIPPED`) covers `beautiful_mnist`'s serving and benchmark graphs on a 2-thread x86-64 CPU.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SHIPPED = Path(__file__).parent / "kernels" / "cpu.json"
_BEAM_TABLE = "beam_search"  # tinygrad's disk-cache table of BEAM results


def graph_name(architecture: dict[str, Any], vendors: int, bucket: int | str, paired: bool) -> str:
    """One engine graph: the model's architecture (weights play no part in a kernel), V, the bucket (``lone`` for
    a single input on V > 1) and whether the leader runs beside the probes."""
    arch = json.dumps(architecture, sort_keys=True, separators=(",", ":"))
    return f"{arch}|V={vendors}|{bucket}|{'paired' if paired else 'plain'}"


@dataclass(frozen=True)
class TunedKernel:
    """One BEAM result: tinygrad's cache key fields and the loop transformations it chose, as (op, axis, arg)."""

    ast: str  # hex of tinygrad's AST key
    amt: int
    allow_test_size: bool
    device: str
    suffix: str
    opts: tuple[tuple[str, int | None, int | None], ...]

    def cache_key(self) -> dict[str, Any]:
        return {"ast": bytes.fromhex(self.ast), "amt": self.amt, "allow_test_size": self.allow_test_size,
                "device": self.device, "suffix": self.suffix}


@dataclass(frozen=True)
class KernelTable:
    """BEAM results for the graphs in ``graphs``, valid for one tinygrad, device kind, renderer and thread count."""

    tinygrad: str
    device: str  # the device kind, e.g. CPU
    renderer: str  # tinygrad's renderer class, e.g. ClangRenderer
    threads: int  # tinygrad's NUM_CPU_THREADS when tuned: the THREAD choices assume it
    beam: int
    machine: str
    graphs: frozenset[str]
    kernels: tuple[TunedKernel, ...] = field(default=())

    # ---------------------------------------------------------------------------------------------- use
    def unusable(self, device: str) -> str | None:
        """Why this table does not fit a process on ``device``; None if it does."""
        from tinygrad import Device
        from tinygrad.helpers import CACHELEVEL, NUM_CPU_THREADS

        here = {"tinygrad": version("tinygrad"), "device": device.split(":")[0].upper(),
                "renderer": type(Device[device].renderer).__name__}
        for name, value in here.items():
            if getattr(self, name) != value:
                return f"tuned for {name} {getattr(self, name)!r}, this process has {value!r}"
        if here["device"] == "CPU" and NUM_CPU_THREADS.value != self.threads:
            return f"tuned for {self.threads} CPU threads, tinygrad uses {NUM_CPU_THREADS.value} here"
        if CACHELEVEL.value < 1:
            return "tinygrad's disk cache is off (CACHELEVEL=0), so BEAM would search instead of reading the table"
        return None

    def install(self) -> None:
        """Write every result into tinygrad's disk cache (its CACHEDB), where BEAM looks before searching."""
        from tinygrad.codegen.opt import Opt, OptOps
        from tinygrad.helpers import diskcache_put

        for k in self.kernels:
            diskcache_put(_BEAM_TABLE, k.cache_key(), [Opt(OptOps[op], axis, arg) for op, axis, arg in k.opts])

    def beam_for(self, graph: str) -> int:
        """BEAM width to compile ``graph`` with: the table's if it covers the graph, else 0 (heuristics)."""
        return self.beam if graph in self.graphs else 0

    # ---------------------------------------------------------------------------------------------- JSON
    def to_json(self) -> dict[str, Any]:
        return {"tinygrad": self.tinygrad, "device": self.device, "renderer": self.renderer, "threads": self.threads,
                "beam": self.beam, "machine": self.machine, "graphs": sorted(self.graphs),
                "kernels": [{"ast": k.ast, "amt": k.amt, "allow_test_size": k.allow_test_size, "device": k.device,
                             "suffix": k.suffix, "opts": [list(o) for o in k.opts]}
                            for k in sorted(self.kernels, key=lambda k: (k.ast, k.amt))]}

    @classmethod
    def from_json(cls, data: Any) -> KernelTable:
        """A table from its JSON; a ValueError naming the first field that is wrong."""
        from tinygrad.codegen.opt import OptOps

        def need(obj: Any, name: str, kind: type | tuple[type, ...], where: str) -> Any:
            if not isinstance(obj, dict) or name not in obj:
                raise ValueError(f"kernel table: {where} has no {name!r}")
            value = obj[name]
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise ValueError(f"kernel table: {where}.{name} must be {getattr(kind, '__name__', kind)}, "
                                 f"got {value!r}")
            return value

        kernels = []
        for i, k in enumerate(need(data, "kernels", list, "the table")):
            where = f"kernels[{i}]"
            ast = need(k, "ast", str, where)
            try:
                bytes.fromhex(ast)
            except ValueError as exc:
                raise ValueError(f"kernel table: {where}.ast is not hex") from exc
            opts = []
            for j, o in enumerate(need(k, "opts", list, where)):
                if (not isinstance(o, list) or len(o) != 3 or o[0] not in OptOps.__members__
                        or not all(a is None or (isinstance(a, int) and not isinstance(a, bool)) for a in o[1:])):
                    raise ValueError(f"kernel table: {where}.opts[{j}] must be [op, axis, arg] with op one of "
                                     f"{sorted(OptOps.__members__)} and integer (or null) axis and arg, got {o!r}")
                opts.append((o[0], o[1], o[2]))
            kernels.append(TunedKernel(ast, need(k, "amt", int, where), need(k, "allow_test_size", bool, where),
                                       need(k, "device", str, where), need(k, "suffix", str, where), tuple(opts)))
        graphs = need(data, "graphs", list, "the table")
        if not all(isinstance(g, str) for g in graphs):
            raise ValueError("kernel table: graphs must be strings")
        return cls(need(data, "tinygrad", str, "the table"), need(data, "device", str, "the table"),
                   need(data, "renderer", str, "the table"), need(data, "threads", int, "the table"),
                   need(data, "beam", int, "the table"), need(data, "machine", str, "the table"),
                   frozenset(graphs), tuple(kernels))


def load_table(path: Path) -> KernelTable:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"kernel table {path}: cannot read it ({exc})") from exc
    return KernelTable.from_json(data)


def table_for(setting: str, device: str) -> KernelTable | None:
    """The table a process uses from its ``kernel_table`` setting (``shipped``, ``off`` or a path an operator
    chose), installed into tinygrad's disk cache; None (with the reason logged) when there is none to use."""
    if setting == "off":
        return None
    path = SHIPPED if setting == "shipped" else Path(setting)
    table = load_table(path)  # a broken table is the operator's (or the package's) error: say so at start
    if (why := table.unusable(device)) is not None:
        log.info("kernel table %s not used on %s: %s; tinygrad's heuristics pick the kernels "
                 "(`mpserve tune-kernels` tunes for this machine)", path, device, why)
        return None
    try:
        table.install()
    except Exception as exc:  # e.g. a read-only cache folder: serve untuned rather than not at all
        log.warning("kernel table %s not used: writing it into tinygrad's disk cache failed (%s: %s)", path,
                    type(exc).__name__, exc)
        return None
    log.info("kernel table %s: %d tuned kernels for %d graphs (BEAM=%d, tuned on %s)", path, len(table.kernels),
             len(table.graphs), table.beam, table.machine)
    return table


@contextmanager
def recording() -> Iterator[list[TunedKernel]]:
    """Inside it, every BEAM result tinygrad computes or reads from its cache is appended to the yielded list.

    The tuner's only window on tinygrad's choices (its disk cache holds them pickled, which this project does
    not read): tinygrad's search function is wrapped for the duration, in this process only.
    """
    import tinygrad.codegen.opt.search as search

    found: list[TunedKernel] = []
    original = search.beam_search

    def beam_search(s: Any, rawbufs: Any, var_vals: Any, amt: int, allow_test_size: bool = True,
                    disable_cache: Any = search.IGNORE_BEAM_CACHE.value) -> Any:
        out = original(s, rawbufs, var_vals, amt, allow_test_size, disable_cache)
        found.append(TunedKernel(s.ast.key.hex(), amt, bool(allow_test_size), s.ren.target.device, s.ren.suffix,
                                 tuple((o.op.name, o.axis, o.arg) for o in out.applied_opts)))
        return out

    search.beam_search = beam_search
    try:
        yield found
    finally:
        search.beam_search = original
