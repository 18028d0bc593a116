"""Tuned kernels shipped with the engine: tinygrad's BEAM search results as JSON, so no user pays the search.

tinygrad picks each kernel's loop transformations (upcasts, unrolls, threads) by hand-written heuristics, or,
with ``BEAM=n``, by timing candidates on the device: on this project's 2-core CPU that doubles the engine's
throughput, but the search takes minutes per graph. A `KernelTable` is such results written down as JSON, by
the kernel's AST, with the graphs they cover and the machine they were tuned for:

- `tune` (``marketplace/kernel_tuning.py``, ``mpserve tune-kernels``) runs the engine's graphs under BEAM and
  records what tinygrad chose (`recording`);
- `KernelTable.unusable` says why a table does not fit this process (another tinygrad, device kind, renderer,
  target or CPU thread count);
- `KernelTable.compiling` is what the engine enters while a graph compiles: for a graph the table covers,
  tinygrad's BEAM step takes each kernel's choices from the table instead of searching (`applying`); a kernel
  the table lacks, or whose choices do not apply, gets tinygrad's heuristics. Nothing is ever searched and
  nothing is written to tinygrad's disk cache.

The shipped table (`SHIPPED`) covers the graphs of `beautiful_mnist` it lists, on a 2-thread x86-64 CPU.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SHIPPED = Path(__file__).parent / "kernels" / "cpu.json"
OptArg = int | tuple[int, ...] | None  # an Opt's axis or arg: tensor-core opts carry a tuple


def tinygrad_version() -> str:
    try:
        return version("tinygrad")
    except PackageNotFoundError:  # a source checkout without metadata: no table can claim to match it
        return "unknown"


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
    opts: tuple[tuple[str, OptArg, OptArg], ...]


@dataclass(frozen=True)
class KernelTable:
    """BEAM results for the graphs in ``graphs``, valid for one tinygrad, device kind, renderer and thread count."""

    tinygrad: str
    device: str  # the device kind, e.g. CPU
    renderer: str  # tinygrad's renderer class, e.g. ClangRenderer
    target: str  # the renderer's target architecture, e.g. x86_64,native or sm_90
    threads: int  # tinygrad's NUM_CPU_THREADS when tuned: the THREAD choices assume it
    beam: int
    machine: str
    graphs: frozenset[str]
    kernels: tuple[TunedKernel, ...] = field(default=())

    # ---------------------------------------------------------------------------------------------- use
    def unusable(self, device: str) -> str | None:
        """Why this table does not fit a process on ``device``; None if it does."""
        from tinygrad import Device
        from tinygrad.helpers import NUM_CPU_THREADS

        renderer = Device[device].renderer
        here = {"tinygrad": tinygrad_version(), "device": device.split(":")[0].upper(),
                "renderer": type(renderer).__name__, "target": str(getattr(renderer.target, "arch", ""))}
        for name, value in here.items():
            if getattr(self, name) != value:
                return f"tuned for {name} {getattr(self, name)!r}, this process has {value!r}"
        if here["device"] == "CPU" and NUM_CPU_THREADS.value != self.threads:
            return f"tuned for {self.threads} CPU threads, tinygrad uses {NUM_CPU_THREADS.value} here"
        if not renderer.has_threads and any(op == "THREAD" for k in self.kernels for op, _, _ in k.opts):
            return "tinygrad's threads are off here (THREADS=0), and the table's kernels use them"
        return None

    def covers(self, graph: str) -> bool:
        return graph in self.graphs

    def compiling(self, graph: str) -> contextlib.AbstractContextManager[None]:
        """Entered while ``graph`` compiles: the table's kernels if it covers the graph, else tinygrad's choice."""
        if not self.covers(graph):
            return contextlib.nullcontext()
        from tinygrad.helpers import Context

        stack = contextlib.ExitStack()
        # BEAM: tinygrad asks its BEAM step, which `applying` answers. With BEAM on, tinygrad compiles in this
        # thread, not in its compile workers, and its disk cache is one sqlite connection that belongs to the thread
        # that opened it (in the API, the main thread, opening the device): CACHELEVEL=0 keeps this compile off it
        stack.enter_context(Context(BEAM=self.beam, CACHELEVEL=0))
        stack.enter_context(applying(self))
        return stack

    @cached_property
    def _by_ast(self) -> dict[str, tuple[tuple[str, OptArg, OptArg], ...]]:
        return {k.ast: k.opts for k in self.kernels}

    def schedule(self, s: Any) -> Any:
        """tinygrad's scheduler ``s`` with this table's choices for its kernel applied; tinygrad's heuristics
        (logged) if the table lacks the kernel or its choices do not apply."""
        from tinygrad.codegen.opt import KernelOptError, Opt, OptOps
        from tinygrad.codegen.opt.heuristic import hand_coded_optimizations
        from tinygrad.uop.ops import Ops

        key = s.ast.key.hex()
        opts = self._by_ast.get(key)
        if opts is not None:
            try:
                ret = s.copy()
                for op, axis, arg in opts[len(s.applied_opts):]:
                    ret.apply_opt(Opt(OptOps[op], axis, arg))
                return ret
            except KernelOptError as exc:
                log.warning("kernel table: the choices for kernel %s do not apply here (%s); tinygrad's "
                            "heuristics instead", key[:12], exc)
        else:
            log.warning("kernel table: no entry for kernel %s of a covered graph; tinygrad's heuristics instead",
                        key[:12])
        if any(u.op is Ops.STAGE for u in s.ast.backward_slice):  # as tinygrad: no heuristics for multiblock
            return s
        return hand_coded_optimizations(s.copy())

    # ---------------------------------------------------------------------------------------------- JSON
    def to_json(self) -> dict[str, Any]:
        return {"tinygrad": self.tinygrad, "device": self.device, "renderer": self.renderer, "target": self.target,
                "threads": self.threads, "beam": self.beam, "machine": self.machine, "graphs": sorted(self.graphs),
                "kernels": [{"ast": k.ast, "amt": k.amt, "allow_test_size": k.allow_test_size, "device": k.device,
                             "suffix": k.suffix, "opts": [[op, _to_json(a), _to_json(b)] for op, a, b in k.opts]}
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
                        or not all(_is_opt_arg(a) for a in o[1:])):
                    raise ValueError(f"kernel table: {where}.opts[{j}] must be [op, axis, arg] with op one of "
                                     f"{sorted(OptOps.__members__)}, axis and arg integers, lists of integers or "
                                     f"null, got {o!r}")
                opts.append((o[0], _from_json(o[1]), _from_json(o[2])))
            kernels.append(TunedKernel(ast, need(k, "amt", int, where), need(k, "allow_test_size", bool, where),
                                       need(k, "device", str, where), need(k, "suffix", str, where), tuple(opts)))
        graphs = need(data, "graphs", list, "the table")
        if not all(isinstance(g, str) for g in graphs):
            raise ValueError("kernel table: graphs must be strings")
        if need(data, "beam", int, "the table") < 1:
            raise ValueError("kernel table: beam must be at least 1")
        return cls(need(data, "tinygrad", str, "the table"), need(data, "device", str, "the table"),
                   need(data, "renderer", str, "the table"), need(data, "target", str, "the table"),
                   need(data, "threads", int, "the table"), data["beam"], need(data, "machine", str, "the table"),
                   frozenset(graphs), tuple(kernels))

    def write(self, path: Path) -> None:
        """As JSON, atomically (a checkpoint cut short never leaves a half-written table)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        os.replace(tmp, path)


def _is_opt_arg(a: Any) -> bool:
    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    return a is None or is_int(a) or (isinstance(a, list) and all(is_int(v) for v in a))


def _to_json(a: OptArg) -> Any:
    return list(a) if isinstance(a, tuple) else a


def _from_json(a: Any) -> OptArg:
    return tuple(a) if isinstance(a, list) else a


def load_table(path: Path) -> KernelTable:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"kernel table {path}: cannot read it ({exc})") from exc
    return KernelTable.from_json(data)


def table_for(setting: str, device: str) -> KernelTable | None:
    """The table a process uses from its ``kernel_table`` setting (``shipped``, ``off`` or a path an operator
    chose); None (with the reason logged) when there is none to use on ``device``."""
    if setting == "off":
        return None
    path = SHIPPED if setting == "shipped" else Path(setting)
    table = load_table(path)  # a broken table is the operator's (or the package's) error: say so at start
    if (why := table.unusable(device)) is not None:
        log.info("kernel table %s not used on %s: %s; tinygrad's heuristics pick the kernels "
                 "(`mpserve tune-kernels` tunes for this machine)", path, device, why)
        return None
    log.info("kernel table %s: %d tuned kernels for %d graphs (tuned on %s)", path, len(table.kernels),
             len(table.graphs), table.machine)
    return table


@contextmanager
def _search_replaced(make: Any) -> Iterator[None]:
    """tinygrad's BEAM step (`beam_search`) replaced by ``make(original)`` for the duration.

    tinygrad's optimizer imports its search function from its module at each call, so swapping the module attribute
    is enough. Only the engine thread (or the tuner) compiles, so no other compile sees it.
    """
    import tinygrad.codegen.opt.search as search

    original = search.beam_search
    search.beam_search = make(original)
    try:
        yield
    finally:
        search.beam_search = original


@contextmanager
def applying(table: KernelTable) -> Iterator[None]:
    """Inside it, tinygrad's BEAM step (called when BEAM >= 1) answers from ``table``: no search."""

    def from_table(s: Any, rawbufs: Any, var_vals: Any, amt: int, allow_test_size: bool = True,
                   disable_cache: Any = False) -> Any:
        return table.schedule(s)

    with _search_replaced(lambda original: from_table):
        yield


@contextmanager
def recording() -> Iterator[list[TunedKernel]]:
    """Inside it, every BEAM result tinygrad computes or reads from its cache is appended to the yielded list.

    The tuner's only window on tinygrad's choices (its disk cache holds them pickled, which this project does
    not read): tinygrad's search function is wrapped for the duration, in this process only.
    """
    found: list[TunedKernel] = []

    def wrap(original: Any) -> Any:
        def beam_search(s: Any, rawbufs: Any, var_vals: Any, amt: int, allow_test_size: bool = True,
                        disable_cache: Any = None) -> Any:
            out = (original(s, rawbufs, var_vals, amt, allow_test_size) if disable_cache is None
                   else original(s, rawbufs, var_vals, amt, allow_test_size, disable_cache))
            found.append(TunedKernel(s.ast.key.hex(), amt, bool(allow_test_size), s.ren.target.device, s.ren.suffix,
                                     tuple((o.op.name, o.axis, o.arg) for o in out.applied_opts)))
            return out

        return beam_search

    with _search_replaced(wrap):
        yield found
