"""BEAM-tune an engine's graphs on this machine and write the `KernelTable` the engine then ships or loads.

    mpserve tune-kernels --model beautiful_mnist --out marketplace/kernels/cpu.json

Each graph (V, bucket, paired) is compiled under tinygrad's ``BEAM`` with its compile workers off
(``PARALLEL=0``): the candidates are then timed on a quiet machine rather than beside compile processes,
which on two cores made BEAM reject every multi-threaded kernel. Run it with nothing else on the CPU.
"""

from __future__ import annotations

import contextlib
import platform
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from marketplace.engine import Engine, default_buckets, leader_seeds
from marketplace.kernel_table import KernelTable, TunedKernel, graph_name, recording, tinygrad_version
from marketplace.models import ModelSpec
from marketplace.reconcile import fresh_seeds


@dataclass(frozen=True)
class GraphPlan:
    """One engine configuration to tune: V, its buckets, and paired (the leader beside the probes) or not.
    With V > 1 the lone-input graph is tuned too (a batch of one runs there)."""

    vendors: int
    buckets: tuple[int, ...]
    paired: bool

    def graphs(self, spec: ModelSpec) -> list[str]:
        names = [graph_name(spec.architecture, self.vendors, b, self.paired) for b in self.buckets]
        lone = [graph_name(spec.architecture, self.vendors, "lone", self.paired)] if self.vendors > 1 else []
        return names + lone


def serving_plans(vendors: int = 4, max_batch: int = 256) -> list[GraphPlan]:
    """What an API replica compiles at these settings: every bucket of its leader-only engine (learning off; the
    worker loads no table) and of its learning engine, single and paired (the default exploration); largest first,
    the buckets that carry the most inputs."""
    learning = tuple(reversed(default_buckets(vendors, max_batch)))
    return [GraphPlan(1, tuple(reversed(default_buckets(1, max_batch))), False),
            GraphPlan(vendors, learning, False), GraphPlan(vendors, learning, True)]


def parse_graphs(text: str) -> list[GraphPlan]:
    """Plans from ``V1:256,V4:64,V4p:256``: V, ``p`` for paired, and a bucket per entry (in the order given)."""
    plans: dict[tuple[int, bool], list[int]] = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        head, _, bucket = item.partition(":")
        paired = head.endswith("p")
        try:
            vendors, size = int(head[1:-1] if paired else head[1:]), int(bucket)
        except ValueError:
            raise ValueError(f"graph {item!r}: write V<vendors>[p]:<bucket>, e.g. V4p:256") from None
        if not head.startswith("V") or vendors < 1 or size < 1 or size % vendors:
            raise ValueError(f"graph {item!r}: V<vendors>[p]:<bucket> with the bucket a multiple of V")
        plans.setdefault((vendors, paired), []).append(size)
    return [GraphPlan(v, tuple(b), paired) for (v, paired), b in plans.items()]


class _Beam:
    """Every graph compiled under tinygrad's BEAM search: the engine's `KernelChoice` while tuning."""

    def __init__(self, beam: int) -> None:
        self.beam = beam

    def compiling(self, graph: str) -> contextlib.AbstractContextManager[None]:
        from tinygrad.helpers import Context

        return Context(BEAM=self.beam)


def tune(spec: ModelSpec, plans: list[GraphPlan], beam: int = 2, progress: bool = True,
         on_graph: Callable[[KernelTable], None] | None = None) -> KernelTable:
    """Compile every graph of ``plans`` under BEAM=``beam`` on tinygrad's default device; the table of its choices.

    Minutes per large graph on a CPU (the search times every candidate kernel). ``on_graph`` gets the table so
    far after each graph (a checkpoint); a kernel already in tinygrad's disk cache is read from there, so a run
    cut short resumes where it stopped.
    """
    from tinygrad.helpers import Context

    params = spec.init_params(0)
    graphs: list[str] = []
    with Context(PARALLEL=0), recording() as found:
        steps = [(plan, b) for plan in plans for b in plan.buckets]
        for plan, bucket in tqdm(steps, desc="tuning graphs", disable=not progress):
            engine = Engine(spec, plan.vendors, buckets=[bucket], kernels=_Beam(beam))
            seeds = (fresh_seeds(len(spec.groups), plan.vendors, np.random.default_rng(0)) if plan.vendors > 1
                     else leader_seeds(spec))
            weights = engine.materialize(params, seeds, 0.05)
            engine.warmup(weights, [bucket], plan.paired)  # with V > 1, the lone graph too
            names = [graph_name(spec.architecture, plan.vendors, bucket, plan.paired)]
            if plan.vendors > 1:
                names.append(graph_name(spec.architecture, plan.vendors, "lone", plan.paired))
            graphs += [n for n in names if n not in graphs]
            if on_graph is not None:
                on_graph(_table(beam, graphs, found))
    return _table(beam, graphs, found)


def _table(beam: int, graphs: list[str], found: list[TunedKernel]) -> KernelTable:
    from tinygrad import Device
    from tinygrad.helpers import NUM_CPU_THREADS

    device = Device.DEFAULT
    renderer = Device[device].renderer
    kernels = {k.ast: k for k in found}  # the last choice wins
    return KernelTable(tinygrad_version(), device.split(":")[0].upper(), type(renderer).__name__,
                       str(getattr(renderer.target, "arch", "")), int(NUM_CPU_THREADS.value), beam, _machine(),
                       frozenset(graphs), tuple(kernels.values()))


def _machine() -> str:
    """What the table was tuned on, for the reader: the processor's model name and tinygrad's thread count."""
    from tinygrad.helpers import NUM_CPU_THREADS

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{platform.machine()} {model}, {NUM_CPU_THREADS.value} threads"
