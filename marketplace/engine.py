"""Balanced perturbed inference: every input takes one vendor path, at the cost of plain inference.

For a version with V vendors per group the V perturbed weight sets are materialized once on the
device. A batch is padded to a bucket of B = k·V slots; slot j of every group belongs to vendor j // k,
so each group runs as one kernel over all vendors. Inputs are placed on slots by a random permutation
(on the host, free), and between groups one gather applies an independent random permutation, so the
vendor choices of different groups are independent. One TinyJit graph per bucket serves every batch
and every version (weights and permutations are graph inputs, not constants).

A lone input (a batch of one) is not padded to a bucket of V slots: it takes one random path at the cost of one
slot. Each group's vendor is a bound symbolic Variable that offsets a view of the stacked weights, so one graph
serves every path; paired, the leader and the path run as a two-slot bucket (V=2, one slot each).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from tinygrad import Device, Tensor, TinyJit, Variable, dtypes

from marketplace.deltas import vendor_signs
from marketplace.kernel_table import graph_name
from marketplace.models import ModelSpec
from marketplace.threefry import delta_keys, uniform_delta_keyed_tg

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PerturbedWeights:
    """One version's V perturbed weight sets, stacked per parameter as (V, *shape), on the device."""

    version: int
    seeds: np.ndarray  # (S, V) uint64; column 0 is the leader (seed 0)
    eps: float
    tensors: tuple[Tensor, ...]  # group order, sorted keys within a group


@dataclass(frozen=True)
class PathPlan:
    """Where each input sits in every group, and the path it takes."""

    order0: np.ndarray  # slot j of group 0 holds input order0[j] (inputs >= n are padding)
    perms: list[np.ndarray]  # group s>0: slot j takes slot perms[s-1][j] of group s-1
    order_last: np.ndarray  # slot j of the last group holds input order_last[j]
    paths: np.ndarray  # (n, S) vendor per group of each real input


def plan_paths(n: int, bucket: int, V: int, S: int, rng: np.random.Generator) -> PathPlan:
    """Balanced random paths: each vendor of each group gets exactly bucket/V slots."""
    if bucket % V or n > bucket:
        raise ValueError(f"bucket {bucket} must be a multiple of V={V} and hold n={n}")
    k = bucket // V
    slot_vendor = np.arange(bucket) // k
    paths = np.empty((bucket, S), dtype=np.int64)
    order0 = order = rng.permutation(bucket) if V > 1 else np.arange(bucket)
    paths[order, 0] = slot_vendor
    perms = []
    for s in range(1, S):
        pi = rng.permutation(bucket) if V > 1 else np.arange(bucket)
        perms.append(pi)
        order = order[pi]
        paths[order, s] = slot_vendor
    return PathPlan(order0, perms, order, paths[:n])


def default_buckets(V: int, max_batch: int) -> list[int]:
    """Powers of two times V up to max_batch (rounded up to a multiple of V)."""
    top = -(-max_batch // V) * V
    buckets, b = [], V
    while b < top:
        buckets.append(b)
        b *= 2
    return [*buckets, top]


class KernelChoice(Protocol):
    """How a graph's kernels are chosen while it compiles (`KernelTable` is one; none: tinygrad's heuristics)."""

    def compiling(self, graph: str) -> contextlib.AbstractContextManager[None]: ...


class Engine:
    """Runs a model's layer groups over V vendors; V=1 is plain (leader-only) inference."""

    def __init__(self, spec: ModelSpec, vendors: int, max_batch: int = 256, device: str | None = None,
                 buckets: list[int] | None = None, kernels: KernelChoice | None = None):
        if vendors < 1:
            raise ValueError("vendors must be >= 1")
        self.spec, self.V, self.device = spec, vendors, device or Device.DEFAULT
        self.buckets = sorted(buckets) if buckets else default_buckets(vendors, max_batch)
        if any(b % vendors for b in self.buckets):
            raise ValueError(f"every bucket must be a multiple of V={vendors}: {self.buckets}")
        self.max_batch = self.buckets[-1]
        self._group_keys = [list(spec.group_shapes(s)) for s in range(len(spec.groups))]
        self._jits: dict[tuple[int, bool], TinyJit] = {}
        self._fwd_inputs: dict[int, tuple[Tensor, Tensor, list[Tensor]]] = {}
        self._lone_jits: dict[bool, TinyJit] = {}
        self._lone_inputs: dict[bool, Tensor] = {}
        self._group_sizes = spec.group_sizes()
        self._materialize_jit: TinyJit | None = None
        self._mat_inputs: list[Tensor] | None = None
        self.kernels = kernels  # tuned kernels (marketplace.kernel_table): the graphs it covers compile under BEAM

    # ------------------------------------------------------------------------------ weights
    def materialize(self, params: dict[str, np.ndarray], seeds: np.ndarray, eps: float, version: int = 0,
                    antithetic: bool = False) -> PerturbedWeights:
        """θ ± δ(σ_v) for every vendor, generated on the device from the seeds, in buffers of this version's own.

        One TinyJit per engine serves every version: the parameters (one flat buffer per group), the seeds'
        key words, the scale and the live and sign masks are copied into its fixed input buffers, and its
        kernels write into fresh output buffers that are inputs too. A JIT reuses its own outputs on every
        replay, but batches still in flight on the previous version must keep reading that version's weights.
        """
        seeds = np.asarray(seeds, dtype=np.uint64)
        S = len(self.spec.groups)
        if seeds.shape != (S, self.V):
            raise ValueError(f"seeds must have shape {(S, self.V)}, got {seeds.shape}")
        inputs = self._materialize_inputs()
        for t, a in zip(inputs, self._materialize_data(params, seeds, eps, antithetic), strict=True):
            _copy_into(t, a)
        outs = [_device_tensor((self.V, *self.spec.group_shapes(s)[key]), dtypes.float32, self.device)
                for s, keys in enumerate(self._group_keys) for key in keys]
        if self._materialize_jit is None:
            # TinyJit runs plainly on its 1st call and captures on its 2nd (slow, ~0.1 s): both on this engine's
            # first version (start-up), so that even its first hot swap replays. Both write the same outputs.
            self._materialize_jit = TinyJit(self._perturb)
            self._materialize_jit(*inputs, *outs)
        self._materialize_jit(*inputs, *outs)
        Device[self.device].synchronize()  # materialized means done: the stall of a hot swap is paid here
        return PerturbedWeights(version, seeds, float(eps), tuple(outs))

    def leader_weights(self, params: dict[str, np.ndarray]) -> PerturbedWeights:
        """The unperturbed weights of a leader-only engine (V=1), copied into buffers of their own.

        What `materialize` gives with seed 0 and ε = 0, bit for bit (θ + 0), without its kernels: evaluation runs
        many versions once each (the guard's holdout and traffic, the head's features), and there the
        perturbation kernels cost more than the forward pass itself.
        """
        if self.V != 1:
            raise ValueError("leader_weights needs a leader-only engine (V=1)")
        tensors = []
        for s, keys in enumerate(self._group_keys):
            shapes = self.spec.group_shapes(s)
            for key in keys:
                t = _device_tensor((1, *shapes[key]), dtypes.float32, self.device)
                _copy_into(t, np.asarray(params[key], dtype=np.float32).reshape(1, *shapes[key]))
                tensors.append(t)
        return PerturbedWeights(0, leader_seeds(self.spec), 0.0, tuple(tensors))

    def _materialize_inputs(self) -> list[Tensor]:
        """The JIT's fixed inputs: key words, scale, live and sign (S, V, 1) each, then θ (1, n_s) per group."""
        if self._mat_inputs is None:
            S, V, dev = len(self.spec.groups), self.V, self.device
            self._mat_inputs = [_device_tensor((S, V, 1), dt, dev) for dt in
                                (dtypes.uint32, dtypes.uint32, dtypes.float32, dtypes.bool, dtypes.float32)]
            self._mat_inputs += [_device_tensor((1, n), dtypes.float32, dev) for n in self._group_sizes if n]
        return self._mat_inputs

    def _materialize_data(self, params: dict[str, np.ndarray], seeds: np.ndarray, eps: float,
                          antithetic: bool) -> list[np.ndarray]:
        """Host arrays for `_materialize_inputs`, in its order."""
        k0, k1, scale, live = (a[..., None] for a in delta_keys(seeds, eps))
        sign = np.broadcast_to(vendor_signs(self.V, antithetic).astype(np.float32)[None, :, None], seeds.shape + (1,))
        thetas = []
        for s, keys in enumerate(self._group_keys):
            if self._group_sizes[s]:  # reshape to its size: a wrong-sized parameter is refused, not spliced
                shapes = self.spec.group_shapes(s)
                thetas.append(np.concatenate([np.asarray(params[k], dtype=np.float32).reshape(int(np.prod(shapes[k])))
                                              for k in keys]))
        return [k0, k1, scale, live, sign, *thetas]

    def _perturb(self, k0: Tensor, k1: Tensor, scale: Tensor, live: Tensor, sign: Tensor, *rest: Tensor) -> None:
        """The JIT'd body: outs[i] = θ + sign·δ, stacked (V, *shape) per tensor in group order."""
        n_theta = sum(1 for n in self._group_sizes if n)
        thetas, outs = iter(rest[:n_theta]), iter(rest[n_theta:])
        written = []
        for s, keys in enumerate(self._group_keys):
            if not self._group_sizes[s]:
                continue
            theta = next(thetas)
            delta = uniform_delta_keyed_tg(k0[s], k1[s], scale[s], live[s], 0, self._group_sizes[s]) * sign[s]
            shapes, offset = self.spec.group_shapes(s), 0
            for key in keys:
                size = int(np.prod(shapes[key]))
                stacked = theta[:, offset:offset + size] + delta[:, offset:offset + size]
                written.append(next(outs).assign(stacked.reshape(self.V, *shapes[key])))
                offset += size
        Tensor.realize(*written)

    # ------------------------------------------------------------------------------ forward
    def graph(self, x: Tensor, perms: list[Tensor], weights: list[Tensor] | tuple[Tensor, ...],
              vendors: int | None = None) -> Tensor:
        """The forward pass as one lazy graph: x is (B, *input_shape) in group-0 slot order.

        Returns (B, num_classes) logits in last-group slot order. Differentiable, so backprop
        training runs the very same code with V=1. ``vendors=1`` with each weight's leader slice runs
        the unperturbed model (paired probes).
        """
        V, spec = vendors or self.V, self.spec
        B = x.shape[0]
        k = B // V
        h = x.reshape(V, k, *spec.input_shape) * spec.input_scale
        if spec.input_offset:
            h = h + spec.input_offset
        wi = 0
        for s, group in enumerate(spec.groups):
            if s > 0 and V > 1 and perms:  # no perms: slot j keeps vendor j in every group (a lone input)
                feat = h.shape[2:]
                h = h.reshape(B, *feat)[perms[s - 1]].reshape(V, k, *feat)
            for lname, layer in group.layers:
                names = sorted(layer.param_shapes())
                w = {}
                for pname in names:
                    w[pname] = weights[wi + self._group_keys[s].index(f"{s}.{lname}.{pname}")]
                h = layer(h, w)
            wi += len(self._group_keys[s])
        return h.reshape(B, spec.num_classes)

    def _jit_for(self, bucket: int, paired: bool = False) -> TinyJit:
        """One graph per (bucket, paired); a paired graph also runs the leader over the inputs in their own order."""
        if (bucket, paired) not in self._jits:
            n_perm = len(self.spec.groups) - 1 if self.V > 1 else 0

            def run(x: Tensor, *rest: Tensor) -> Tensor:
                return self.graph(x, list(rest[:n_perm]), rest[n_perm:]).realize()

            def run_paired(x: Tensor, x_leader: Tensor, *rest: Tensor) -> tuple[Tensor, Tensor]:
                weights = rest[n_perm:]
                probe = self.graph(x, list(rest[:n_perm]), weights)
                leader = self.graph(x_leader, [], [w[0:1] for w in weights], vendors=1)
                return probe.realize(), leader.realize()

            self._jits[(bucket, paired)] = TinyJit(run_paired if paired else run)
        return self._jits[(bucket, paired)]

    def _lone_jit(self, paired: bool) -> TinyJit:
        """The one-input graph: weights of group s are the view of vendor ``vendor_s`` (a bound Variable)."""
        if paired not in self._lone_jits:
            S = len(self.spec.groups)

            def path_weights(vendors: tuple[Variable, ...], weights: tuple[Tensor, ...]) -> list[Tensor]:
                out, wi = [], 0
                for s in range(S):
                    for _ in self._group_keys[s]:
                        w = weights[wi]
                        view = w.shrink(((vendors[s], vendors[s] + 1), *((0, d) for d in w.shape[1:])))
                        # paired: [leader; path] copied into one buffer (a kernel per tensor, cheaper than reading
                        # two views in every kernel of the graph)
                        out.append(w[0:1].cat(view).contiguous() if paired else view)
                        wi += 1
                return out

            def run(x: Tensor, *rest: Tensor) -> Tensor:
                vendors, weights = rest[:S], rest[S:]
                return self.graph(x, [], path_weights(vendors, weights), vendors=2 if paired else 1).realize()

            self._lone_jits[paired] = TinyJit(run)
        return self._lone_jits[paired]

    def _run_lone(self, weights: PerturbedWeights, x: np.ndarray, rng: np.random.Generator, paired: bool
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """One input on one random path (each group's vendor uniform), and paired, the leader beside it."""
        S = len(self.spec.groups)
        path = rng.integers(0, self.V, size=S)
        if paired not in self._lone_inputs:
            self._lone_inputs[paired] = _device_tensor((2 if paired else 1, *self.spec.input_shape), dtypes.float32,
                                                       self.device)
        xt = self._lone_inputs[paired]
        _copy_into(xt, np.concatenate([x, x]) if paired else x)
        vendors = [Variable(f"vendor{s}", 0, self.V - 1).bind(int(v)) for s, v in enumerate(path)]
        jit = self._lone_jit(paired)
        with self._compiling(jit, "lone", paired):
            out_t = jit(xt, *vendors, *weights.tensors)
        out = out_t.numpy()
        return (out[1:], path[None, :], out[:1]) if paired else (out, path[None, :], None)

    def bucket_for(self, n: int) -> int:
        for b in self.buckets:
            if b >= n:
                return b
        raise ValueError(f"batch of {n} exceeds the largest bucket {self.max_batch}")

    def forward(self, weights: PerturbedWeights, x: np.ndarray, rng: np.random.Generator
                ) -> tuple[np.ndarray, np.ndarray]:
        """Logits (n, C) float32 and paths (n, S) of a batch, each input on its own balanced path."""
        logits, paths, _ = self._run(weights, x, rng, paired=False)
        return logits, paths

    def forward_paired(self, weights: PerturbedWeights, x: np.ndarray, rng: np.random.Generator
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Paired probes: (probe logits, paths, leader logits); every input also runs through the leader.

        The answer a user gets is the leader's, so exploration is invisible to them, and the record holds the
        loss difference on the same input. Twice the FLOPs of `forward`, in the same JIT'd graph.
        """
        logits, paths, leader = self._run(weights, x, rng, paired=True)
        assert leader is not None
        return logits, paths, leader

    def _run(self, weights: PerturbedWeights, x: np.ndarray, rng: np.random.Generator, paired: bool
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        x = np.asarray(x, dtype=np.float32)
        n = x.shape[0]
        if x.shape[1:] != tuple(self.spec.input_shape):
            raise ValueError(f"inputs must have shape (n, {self.spec.input_shape}), got {x.shape}")
        if n > self.max_batch:
            parts = [self._run(weights, x[i:i + self.max_batch], rng, paired) for i in range(0, n, self.max_batch)]
            leaders = [p[2] for p in parts]
            return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                    np.concatenate(leaders) if paired else None)  # type: ignore[arg-type]
        if n == 1 and self.V > 1:
            return self._run_lone(weights, x, rng, paired)
        bucket = self.bucket_for(n)
        plan = plan_paths(n, bucket, self.V, len(self.spec.groups), rng)
        padded = np.zeros((bucket, *self.spec.input_shape), dtype=np.float32)
        padded[:n] = x
        xt, x_leader, perms = self._forward_inputs(bucket)
        _copy_into(xt, padded[plan.order0])
        for t, p in zip(perms, plan.perms if self.V > 1 else [], strict=True):
            _copy_into(t, p)
        leader = None
        jit = self._jit_for(bucket, paired)
        if paired:
            _copy_into(x_leader, padded)
            with self._compiling(jit, bucket, True):
                out_t, leader_t = jit(xt, x_leader, *perms, *weights.tensors)
            out, leader = out_t.numpy(), leader_t.numpy()[:n]
        else:
            with self._compiling(jit, bucket, False):
                out_t = jit(xt, *perms, *weights.tensors)
            out = out_t.numpy()
        logits = np.empty_like(out)
        logits[plan.order_last] = out
        return logits[:n], plan.paths, leader

    def _compiling(self, jit: TinyJit, bucket: int | str, paired: bool) -> contextlib.AbstractContextManager[None]:
        """The kernel choice's context while a graph compiles (TinyJit's first two calls: run, then capture)."""
        if self.kernels is None or jit.cnt >= 2:
            return contextlib.nullcontext()
        return self.kernels.compiling(graph_name(self.spec.architecture, self.V, bucket, paired))

    def _forward_inputs(self, bucket: int) -> tuple[Tensor, Tensor, list[Tensor]]:
        """Fixed device buffers a bucket's inputs are copied into (a memcpy: building a tensor from a host array
        each call costs tinygrad a schedule, more than the forward itself on small models). Calls are sequential
        (one engine thread), and each reads its outputs back before the next copies in."""
        if bucket not in self._fwd_inputs:
            shape = (bucket, *self.spec.input_shape)
            n_perm = len(self.spec.groups) - 1 if self.V > 1 else 0
            self._fwd_inputs[bucket] = (_device_tensor(shape, dtypes.float32, self.device),
                                        _device_tensor(shape, dtypes.float32, self.device),
                                        [_device_tensor((bucket,), dtypes.int32, self.device) for _ in range(n_perm)])
        return self._fwd_inputs[bucket]

    def warmup(self, weights: PerturbedWeights, buckets: list[int] | None = None, paired: bool = False) -> None:
        """Capture the JIT of each bucket (TinyJit records on its second call) off the request path; with the
        smallest bucket, the lone input's graph too (a batch of one runs there instead)."""
        rng = np.random.default_rng(0)
        buckets = buckets or self.buckets
        sizes = [*buckets, 1] if self.V > 1 and self.buckets[0] in buckets else buckets
        for b in sizes:
            for _ in range(3):
                self._run(weights, np.zeros((b, *self.spec.input_shape), np.float32), rng, paired)


def _device_tensor(shape: tuple[int, ...], dtype, device: str) -> Tensor:
    """A realized tensor on a buffer of its own, contents undefined until a copy or a kernel writes it."""
    t = Tensor.empty(*shape, dtype=dtype, device=device)
    t.uop.buffer.allocate()
    return t


def _copy_into(t: Tensor, a: np.ndarray) -> None:
    """Host array → an allocated device buffer, in place: a memcpy, no scheduled copy (tinygrad's own host path)."""
    buf = t.uop.buffer
    data = np.ascontiguousarray(a, dtype=_NP_DTYPES[t.dtype])
    if not data.flags.writeable:  # ctypes reads only through a writable buffer (a frozen or broadcast array)
        data = data.copy()
    if data.nbytes != buf.nbytes:
        raise ValueError(f"{data.nbytes} bytes for a buffer of {buf.nbytes}")
    buf.allocator._copyin(buf._buf, memoryview(data).cast("B"))


_NP_DTYPES = {dtypes.float32: np.float32, dtypes.uint32: np.uint32, dtypes.int32: np.int32, dtypes.bool: np.bool_}


def leader_logits(engine: Engine, params: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """Logits of the unperturbed weights (an engine with V=1), in chunks of the engine's largest bucket."""
    if engine.V != 1:
        raise ValueError("leader_logits needs a leader-only engine (V=1)")
    weights = engine.leader_weights(params)
    rng = np.random.default_rng(0)
    step = engine.max_batch
    return np.concatenate([engine.forward(weights, x[i:i + step], rng)[0] for i in range(0, len(x), step)]
                          or [np.zeros((0, engine.spec.num_classes), np.float32)])


def leader_seeds(spec: ModelSpec) -> np.ndarray:
    """Seeds of a leader-only (V=1) engine: all zero, the unperturbed model."""
    return np.zeros((len(spec.groups), 1), dtype=np.uint64)
