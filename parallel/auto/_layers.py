"""The step as the pipeline runtime runs it, cut into layers, and each layer priced by the solver.

A pipeline stage is a range of layers on a sub-mesh; its cost per micro-batch is what the intra-op
solver finds for the stage's forward and backward work on that sub-mesh. Layers with the same
work (the repeated blocks of a transformer) share one solve; a range costs the sum of its layers
on one sub-mesh shape (the solver ties repeated layers to one strategy, so a range solved whole
costs the same up to its boundaries). Nothing is compiled or run: abstract shapes only.
"""
from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from parallel._errors import PlanError
from parallel._roles import trace
from parallel.auto._concurrent import in_order
from parallel.pipeline._intra import held_specs, stage_work
from parallel.pipeline._method import _mirrors
from parallel.pipeline._program import flatten
from parallel.pipeline._regions import split_regions
from parallel.pipeline._trace import Traced, batch_size, rescale, trace_step
from parallel.pipeline._stages import backward_flags, find_layers, place
from parallel.profiles import DeviceProfile


def mesh_shapes(num_devices: int, max_model: int) -> list[tuple[int, int]]:
    """``(data, model)`` shapes a stage is priced on: every factorization whose model axis stays
    inside a host (``max_model``), so activations' collectives never cross the slow link."""
    return [(num_devices // m, m) for m in range(1, num_devices + 1)
            if num_devices % m == 0 and m <= max_model]


@dataclasses.dataclass
class MeshPrice:
    """One layer's micro-batch work on one sub-mesh shape, as the solver plans it.

    Attributes:
      time_s: forward and backward of one micro-batch (compute and collectives).
      compute_s: its compute part.
      peak_bytes: the solver's peak bytes per device while it runs (parameters, gradients and
        the micro-batch's activations).
      param_bytes: parameters (per-step values read) per device.
      grad_bytes: values handed out of the micro-batch (gradients) per device: the
        accumulators' size.
      state_bytes: the stored state the layer's stage holds (its parameters and their
        optimizer state) per device, split as its parameters are.
      split_state: the solver was held to split the layer's parameters (and so its state)
        over the sub-mesh (``LayerPricer.lean``), where the fastest plan keeps them whole.
      splits_all: the plan splits every parameter the constraint applies to over all the
        sub-mesh's devices (so the fastest plan is also the lean one).
      param_specs: the plan's ``PartitionSpec`` of each per-step value the layer reads.
      residual_bytes: per device, the forward values the layer's backward reads (what a
        micro-batch in flight keeps: ``StageWork.held``), laid out as the runtime holds them
        on this plan (``held_specs``: the plan's layout for what the layer's forward makes,
        the batch split for what it receives).
      residual_inner_bytes: ``residual_bytes`` where the layer is not its stage's first: what
        it receives from earlier layers' forward is then made on the stage and laid out as
        the plan lays out the layer's input.
      residual_whole_bytes: the same values unsplit.
    """

    time_s: float
    compute_s: float
    peak_bytes: float
    param_bytes: float
    grad_bytes: float
    state_bytes: float
    split_state: bool = False
    splits_all: bool = False
    param_specs: tuple = ()
    residual_bytes: float = 0.0
    residual_inner_bytes: float = 0.0
    residual_whole_bytes: float = 0.0

    @property
    def activation_bytes(self) -> float:
        return max(self.peak_bytes - self.param_bytes - self.grad_bytes, 0.0)


@dataclasses.dataclass
class PipelineProgram:
    """The step split as the pipeline runtime splits it, and its forward layers.

    Attributes:
      program, regions, backward, layers, mirrors: as ``PipeshardParallel`` builds them.
      num_micro_batches: micro-batches the program was traced for.
      micro_batch: examples per micro-batch.
      layer_state: per layer, bytes of the stored state (parameters, optimizer state) the
        runtime keeps with it (where the state would live with one stage per layer).
      residuals: per layer, bytes of one micro-batch's forward values its backward reads
        (what a micro-batch in flight keeps).
      signatures: per layer, a digest of its work (equal digests share one solve).
      traced: the step's global and micro-batch programs (``trace_step``'s ``Traced``).
    """

    program: Any
    regions: Any
    backward: list[bool]
    layers: Any
    mirrors: dict[int, int]
    num_micro_batches: int
    micro_batch: int
    layer_state: list[float]
    residuals: list[float]
    signatures: list[str]
    traced: Any = None

    @property
    def num_layers(self) -> int:
        return self.layers.count

    def cut_bytes(self, layer: int) -> float:
        """Bytes one micro-batch hands from layer ``layer`` (and before) to the later ones."""
        return float(self.layers.cut_bytes[layer])


def pipeline_program(fn: Callable, abstract_args: Sequence[Any], batch_argnums: Sequence[int],
                     donate_argnums: Sequence[int], num_micro_batches: int,
                     num_layers: int, whole: GlobalTrace | None = None,
                     like: PipelineProgram | None = None) -> PipelineProgram:
    """Traces ``fn`` on one micro-batch and cuts its forward pass into ``num_layers`` layers
    (or the user's ``mark_pipeline_boundary`` layers), as the pipeline runtime does.

    ``whole``: the step traced on the global batch (``global_trace``), shared by the
    micro-batch counts the planner prices; default: traced here. ``like``: the program made
    for another micro-batch count; its micro-batch program rescaled to this count rather than
    the step traced again (``_micro_trace``).

    Raises:
      PlanError: the batch does not split into ``num_micro_batches``, or the step cannot be
        pipelined (the runtime's own messages).
    """
    whole = whole or global_trace(fn, abstract_args)
    traced = _micro_trace(fn, abstract_args, batch_argnums, num_micro_batches, whole, like)
    global_batch = traced.global_batch
    out_paths, _ = jax.tree_util.tree_flatten_with_path(whole.out_shape)
    names = [f"output{jax.tree_util.keystr(path)}" for path, _ in out_paths]
    program, regions = split_regions(traced, num_micro_batches, names)
    backward = backward_flags(program, regions)
    layers = find_layers(program, regions, backward, num_layers)
    mirrors = _mirrors(fn, abstract_args, donate_argnums, out=whole.out_shape)
    apart = place(program, regions, backward, layers, list(range(layers.count)), layers.count,
                  mirrors)
    state = [0.0] * layers.count
    for v in program.inputs:
        if v not in regions.batch_dim:
            state[apart.home.get(v, 0)] += program.nbytes(v)
    read_backward = {v for i, op in enumerate(program.ops) if backward[i]
                     for v in op.value_inputs()}
    residuals = [0.0] * layers.count
    for i, k in layers.of_op.items():
        residuals[k] += sum(program.nbytes(v) for v in program.ops[i].outputs
                            if v in read_backward)
    pp = PipelineProgram(program, regions, backward, layers, mirrors, num_micro_batches,
                         global_batch // num_micro_batches, state, residuals, [], traced)
    pp.signatures = [_layer_signature(pp, k) for k in range(layers.count)]
    return pp


def _micro_trace(fn, abstract_args, batch_argnums, num_micro_batches: int, whole: GlobalTrace,
                 like: PipelineProgram | None) -> Traced:
    """``trace_step``'s programs for ``num_micro_batches``; with ``like`` (made for another
    count, on micro-batches of at least 2 examples, as this one's) its micro-batch program with
    the batch-size-dependent shapes, shape parameters and literals rescaled (the runtime's own
    rescaling, ``rescale``; every shape recomputed by JAX's shape rules), which costs a
    fraction of a trace. Traced when it does not rescale."""
    batch = batch_size(abstract_args, batch_argnums, num_micro_batches)
    small = batch // num_micro_batches
    ref = None if like is None else like.traced
    if ref is not None and num_micro_batches > 1 and small >= 2 and ref.micro_batch >= 2:
        try:
            micro = rescale(ref.glob, ref.micro, batch, ref.micro_batch, small,
                            ref.batch_inputs, ref.batch_dims)
            return Traced(ref.glob, micro, ref.batch_dims, ref.batch_inputs, batch, small)
        except PlanError:
            pass
    return trace_step(fn, abstract_args, batch_argnums, num_micro_batches, glob=whole.program)


@dataclasses.dataclass(frozen=True)
class GlobalTrace:
    """The step traced once on the global batch: its program and its output shapes."""

    program: Any
    out_shape: Any


def global_trace(fn: Callable, abstract_args: Sequence[Any],
                 closed: Any = None, out_shape: Any = None) -> GlobalTrace:
    """``fn`` traced on ``abstract_args``; ``closed``, ``out_shape``: a trace made already
    (``parallel._roles.trace``'s jaxpr over the flattened arguments, as the SPMD solver's
    ``prepare`` makes it), reused rather than traced again."""
    if closed is None:
        closed, _, out_shape = trace(fn, tuple(abstract_args))
    return GlobalTrace(flatten(closed), out_shape)


def _nbytes(x) -> float:
    try:
        itemsize = np.dtype(x.dtype).itemsize
    except TypeError:
        itemsize = 8
    return float(np.prod(x.shape, dtype=np.int64)) * itemsize


def _layer_signature(pp: PipelineProgram, layer: int) -> str:
    """A digest of layer ``layer``'s forward work: operations, shapes and parameters."""
    program = pp.program
    parts = []
    for i, k in sorted(pp.layers.of_op.items()):
        if k != layer:
            continue
        op = program.ops[i]
        params = sorted((key, repr(value)) for key, value in op.params.items()
                        if not hasattr(value, "jaxpr") and key not in ("jaxpr", "name"))
        parts.append((op.prim.name, [tuple(program.avals[v].shape) for v in op.value_inputs()],
                      [tuple(program.avals[v].shape) for v in op.outputs], params))
    # The same operations cut at another point of a repeated block are the same work.
    parts = sorted(parts, key=repr) + [pp.layer_state[layer], pp.residuals[layer]]
    return hashlib.blake2b(repr(parts).encode(), digest_size=10).hexdigest()


class LayerPricer:
    """Prices layers on sub-meshes with the solver, one solve per (layer work, sub-mesh).

    Args:
      pp: the step as the pipeline runtime runs it.
      profile: the devices and hosts (``DeviceProfile.on_hosts``).
      time_limit_s: the solver's time limit per mesh shape.
    """

    def __init__(self, pp: PipelineProgram, profile: DeviceProfile, time_limit_s: float = 30.0):
        self.pp = pp
        self.profile = profile
        self.time_limit_s = time_limit_s
        self._prepared: dict[str, tuple] = {}
        self._prices: dict[tuple, dict[tuple, MeshPrice]] = {}
        self._lean: dict[tuple, MeshPrice] = {}
        self.solves = 0

    def prices(self, layer: int, num_devices: int, first_device: int = 0
               ) -> dict[tuple[int, int], MeshPrice]:
        """``{(data, model): MeshPrice}`` of layer ``layer`` on ``num_devices`` devices starting
        at ``first_device`` (mesh shapes whose collectives the solver can price)."""
        return self.prices_all([(layer, num_devices, first_device)])[0]

    def prices_all(self, wanted: Sequence[tuple[int, int, int]]
                   ) -> list[dict[tuple[int, int], MeshPrice]]:
        """``prices(*w)`` for each ``w`` of ``wanted``; the solves not made before run side by
        side (``in_order``: the same prices as one after the other)."""
        keys, jobs, layer_of = [], [], {}
        for layer, num_devices, first_device in wanted:
            sig = self.pp.signatures[layer]
            key = (sig, num_devices, self._host_pattern(num_devices, first_device))
            keys.append(key)
            if key in self._prices or key in layer_of:
                continue
            layer_of[key] = layer
            per_host = self.profile.devices_per_host or num_devices
            jobs += [(key, num_devices, first_device, shape)
                     for shape in mesh_shapes(num_devices, min(per_host, num_devices))]

        def prepared_first(jobs):
            # Each layer's work is traced in this thread just before its first solve is handed
            # out: the next layer's while the earlier ones solve.
            for job in jobs:
                self._prepare(layer_of[job[0]])
                yield job

        for (key, _, _, shape), price in zip(jobs, in_order(self._solve, prepared_first(jobs))):
            self._prices.setdefault(key, {})[shape] = price
        self.solves += len(jobs)
        return [self._prices[key] for key in keys]

    def _prepare(self, layer: int) -> None:
        """Layer ``layer``'s work and what the solver shares between its solves, once per
        signature."""
        from parallel.auto._search import prepare

        sig = self.pp.signatures[layer]
        if sig not in self._prepared:
            work, state = self._layer_work(layer)
            self._prepared[sig] = (work, state, prepare(work.fn, work.args, donate_argnums=(),
                                                        batch_argnums=(1,)))

    def _solve(self, job: tuple) -> MeshPrice:
        """The fastest plan of one layer's work on one sub-mesh shape (``prices_all``'s job),
        or with ``split`` the fastest that splits its parameters (``lean_all``'s)."""
        from parallel.auto._search import solve

        key, num_devices, first_device, shape, *split = job
        work, state, prepared = self._prepared[key[0]]
        # As the runtime plans a stage (``stage_plan`` on the mesh a layout names), with no
        # budget: the pipeline search adds the stages' memory up and checks it.
        solution = solve(work.fn, work.args, num_devices=num_devices, profile=self.profile,
                         memory_budget_bytes=float("inf"), donate_argnums=(),
                         batch_argnums=(1,), time_limit_s=self.time_limit_s,
                         prepared=prepared, first_device=first_device,
                         mesh_shape={"data": shape[0], "model": shape[1]},
                         split_leaves=range(len(work.per_step)) if split else ())
        price = self._price(work, state, solution.best, shape, prepared.closed)
        return dataclasses.replace(price, split_state=True) if split else price

    def lean(self, layer: int, num_devices: int, first_device: int,
             shape: tuple[int, int]) -> MeshPrice:
        """Layer ``layer`` on the ``(data, model)`` sub-mesh ``shape`` with its parameters (and
        so its optimizer state) split over the sub-mesh: the solver's fastest plan among those
        that split every parameter into as many pieces as it can (``solve``'s
        ``split_leaves``), as the runtime plans a stage marked ``split_state``. The fastest
        plan when it splits them over every device already."""
        return self.lean_all([(layer, num_devices, first_device, shape)])[0]

    def lean_all(self, wanted: Sequence[tuple[int, int, int, tuple[int, int]]]
                 ) -> list[MeshPrice]:
        """``lean(*w)`` for each ``w`` of ``wanted``, the solves run side by side."""
        fast = self.prices_all([w[:3] for w in wanted])
        keys, jobs = [], []
        for (layer, num_devices, first_device, shape), found in zip(wanted, fast):
            key = (self.pp.signatures[layer], num_devices,
                   self._host_pattern(num_devices, first_device), shape)
            keys.append(key)
            if key in self._lean or any(job[0] == key[:3] and job[3] == shape for job in jobs):
                continue
            if found[shape].splits_all:  # the fastest plan meets the constraint: the lean one
                self._lean[key] = found[shape]
            else:
                jobs.append((key[:3], num_devices, first_device, shape, True))
        for job, price in zip(jobs, in_order(self._solve, jobs)):
            self._lean[(*job[0], job[3])] = price
        self.solves += len(jobs)
        return [self._lean[key] for key in keys]

    def _host_pattern(self, num_devices: int, first_device: int) -> tuple:
        per_host = self.profile.devices_per_host
        if per_host is None:
            return ()
        return tuple((first_device + d) // per_host - first_device // per_host
                     for d in range(num_devices))

    def _layer_work(self, layer: int):
        """The micro-batch work of ``layer`` alone (a 3-stage split around it, stage 1)."""
        pp = self.pp
        count = pp.layers.count
        stage_of_layer = [0 if k < layer else 1 if k == layer else 2 for k in range(count)]
        placement = place(pp.program, pp.regions, pp.backward, pp.layers, stage_of_layer, 3,
                          pp.mirrors)
        return stage_work(pp.program, pp.regions, placement, 1), pp.layer_state[layer]

    def _price(self, work, state: float, result, shape, closed) -> MeshPrice:
        # Parameters below this size are not held to a split (the solver's threshold).
        from parallel.auto._search import _SHARDED_STATE_BYTES

        sizes = dict(zip(("data", "model"), shape))

        def per_device(aval, spec) -> float:
            n = 1
            for entry in spec:
                for name in (entry if isinstance(entry, tuple) else (entry,)):
                    n *= sizes.get(name, 1) if name else 1
            return _nbytes(aval) / n

        flat_in = jax.tree.leaves(work.args)[:len(work.per_step)]
        params = sum(per_device(x, s) for x, s in zip(flat_in, result.input_specs))
        whole = _whole_bytes(work)
        devices = shape[0] * shape[1]
        splits_all = all(per_device(x, s) * devices <= _nbytes(x)
                         for x, s in zip(flat_in, result.input_specs)
                         if _nbytes(x) >= _SHARDED_STATE_BYTES)
        outs = [self.pp.program.avals[v] for v in work.results]
        grads = sum(per_device(x, s) for x, s in zip(outs, result.output_specs))
        avals = self.pp.program.avals
        held, inner = (held_specs(self.pp.program, self.pp.regions, work, closed, result,
                                  shape[0], inner) for inner in (False, True))
        return MeshPrice(float(result.step_time_s), float(result.compute_s),
                         float(result.memory_bytes), float(params), float(grads),
                         state * params / whole if whole else state, splits_all=splits_all,
                         param_specs=tuple(result.input_specs[:len(flat_in)]),
                         residual_bytes=sum(per_device(avals[v], s) for v, s in held.items()),
                         residual_inner_bytes=sum(per_device(avals[v], s)
                                                  for v, s in inner.items()),
                         residual_whole_bytes=sum(_nbytes(avals[v]) for v in held))


def _whole_bytes(work) -> float:
    """Bytes of the per-step values (parameters) a layer's work reads, unsplit."""
    return sum(_nbytes(x) for x in jax.tree.leaves(work.args)[:len(work.per_step)])
