"""``parallelize``: plan, compile and run a pure step function on a device mesh."""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from parallel._constraints import with_constraints
from parallel._errors import PlanError
from parallel._transfer import transfer
from parallel._methods import DataParallel, Method, plan_outputs
from parallel._roles import check_leaves
from parallel.plan import Plan, shardings_from_specs

log = logging.getLogger(__name__)


def abstractify(tree: Any) -> Any:
    """Replaces every leaf by a ``jax.ShapeDtypeStruct`` of its shape and dtype (no sharding).

    Raises:
      PlanError: a leaf is not an array or a number (its path is named).
    """

    def one(leaf):
        if isinstance(leaf, (jax.ShapeDtypeStruct, jax.Array)):
            return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype)
        array = np.asarray(leaf)
        if array.dtype.kind not in "biufc":  # a string or object: raise naming its path
            check_leaves(tree)
        return jax.ShapeDtypeStruct(array.shape, jax.dtypes.canonicalize_dtype(array.dtype))

    return jax.tree.map(one, tree)


def program_fingerprint(fn: Callable, abstract_args: Sequence[Any]) -> str:
    """A short hash of ``fn``'s jaxpr over ``abstract_args``: equal programs, equal hashes.

    A saved plan is reused only for the program it was made for: its constraints name
    equations of this jaxpr, and a solver's choice depends on every equation.
    """
    text = str(jax.make_jaxpr(fn)(*abstract_args))
    text = re.sub(r" at 0x[0-9a-f]+", "", text)  # function reprs in custom-derivative params
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def device_summary(devices: Sequence[jax.Device]) -> dict:
    """What a plan depends on about the devices: their count, platform and kind."""
    return {"count": len(devices), "platform": devices[0].platform,
            "kind": devices[0].device_kind}


def _signature(abstract_args: Sequence[Any]) -> tuple:
    leaves, treedef = jax.tree.flatten(tuple(abstract_args))
    return treedef, tuple((tuple(x.shape), str(x.dtype)) for x in leaves)


@dataclasses.dataclass
class _Entry:
    """Everything cached for one abstract signature."""

    plan: Plan
    mesh: Mesh
    in_shardings: tuple
    out_shardings: Any
    jitted: Any
    abstract_args: tuple
    solve_time_s: float
    compiled: Any = None
    compile_time_s: float = 0.0


class ParallelStep:
    """A step function planned and compiled for a mesh; call it like the function.

    Made by ``parallelize``. Plans and executables are cached per abstract signature (tree
    structure, shapes, dtypes); arguments with a new signature are planned afresh.
    """

    def __init__(self, fn: Callable, method: Method, batch_argnums: Sequence[int],
                 donate_argnums: Sequence[int], logical_axes: Sequence[Any] | None,
                 devices: Sequence[jax.Device] | None):
        if not isinstance(method, Method):
            raise TypeError(f"method must be a parallel.Method such as parallel.DataParallel(); "
                            f"got {method!r}. Use parallel.make_method(name) to build one by name")
        self.fn = fn
        self.method = method
        self.batch_argnums = tuple(batch_argnums)
        self.donate_argnums = tuple(donate_argnums)
        self.logical_axes = None if logical_axes is None else tuple(logical_axes)
        self.devices = list(jax.devices() if devices is None else devices)
        self._entries: dict[tuple, _Entry] = {}
        functools.update_wrapper(self, fn)

    def __repr__(self) -> str:
        return f"ParallelStep({getattr(self.fn, '__name__', self.fn)!r}, method={self.method!r})"

    def _entry(self, args: Sequence[Any]) -> _Entry:
        abstract_args = tuple(abstractify(tuple(args)))
        key = _signature(abstract_args)
        entry = self._entries.get(key)
        if entry is None:
            if self._entries:
                log.info("%s: arguments with a new structure or shapes; planning again", self)
            entry = self._build(abstract_args)
            self._entries[key] = entry
        return entry

    def set_plan(self, plan: Plan, *args) -> None:
        """Runs these arguments with ``plan`` (e.g. one saved with a checkpoint): no solve.

        Args:
          plan: a plan this step made before, possibly in another process (``Plan.from_json``).
          *args: arrays or ``jax.ShapeDtypeStruct`` leaves with the signature to use it for.

        Raises:
          PlanError: the plan was made for another method, other devices, other argument
            leaves or another program; the message says which (plan afresh then).
        """
        abstract_args = tuple(abstractify(tuple(args)))
        self._check_arguments(abstract_args)
        problem = self._reuse_problem(plan, abstract_args)
        if problem is not None:
            raise PlanError(f"the saved plan does not apply: {problem}")
        self._entries[_signature(abstract_args)] = self._build(abstract_args, plan, 0.0)

    def _reuse_problem(self, plan: Plan, abstract_args: tuple) -> str | None:
        if hasattr(self.method, "build_executable") and "stages" in plan.extras:
            return f"method {self.method.name!r} builds its pipelined programs anew"
        if plan.method != self.method.name:
            return f"it was made by method {plan.method!r}, this step uses {self.method.name!r}"
        saved, now = plan.extras.get("devices"), device_summary(self.devices)
        if saved != now:
            return f"it was made for devices {saved}, these are {now}"
        if (tuple(plan.batch_argnums), tuple(plan.donate_argnums)) != (
                self.batch_argnums, self.donate_argnums):
            return "its batch or donated arguments differ"
        if not plan.matches(abstract_args) or any(
                leaf.dtype != str(x.dtype)
                for arg, planned in zip(abstract_args, plan.inputs)
                for leaf, x in zip(planned, jax.tree.leaves(arg))):
            return "the arguments' leaves, shapes or dtypes differ"
        if plan.extras.get("program") != program_fingerprint(self.fn, abstract_args):
            return "the step's program differs"
        return None

    def _check_arguments(self, abstract_args: tuple) -> None:
        n = len(abstract_args)
        for name, nums in (("batch_argnums", self.batch_argnums),
                           ("donate_argnums", self.donate_argnums)):
            if any(not 0 <= i < n for i in nums):
                raise PlanError(f"{name}={nums} but the function was called with {n} "
                                 f"positional arguments")

    def _make_plan(self, abstract_args: tuple) -> tuple[Plan, float]:
        """The method's plan, stamped with what reusing it requires (devices, program)."""
        start = time.perf_counter()
        plan = _made_by_process_0(lambda: self.method.make_plan(
            self.fn, abstract_args, batch_argnums=self.batch_argnums,
            donate_argnums=self.donate_argnums, devices=self.devices,
            logical_axes=self.logical_axes))
        solve_time = time.perf_counter() - start
        extras = {**plan.extras, "devices": device_summary(self.devices),
                  "program": program_fingerprint(self.fn, abstract_args)}
        return dataclasses.replace(plan, extras=extras), solve_time

    def _build(self, abstract_args: tuple, plan: Plan | None = None,
               solve_time: float = 0.0) -> _Entry:
        if plan is None:
            self._check_arguments(abstract_args)
            self.method.hosts(self.devices)  # a topology that does not match the devices
            build = getattr(self.method, "build_executable", None)
            start = time.perf_counter()
            if build is not None:  # methods running several programs (pipelines) build their own
                step = build(self.fn, abstract_args, batch_argnums=self.batch_argnums,
                             donate_argnums=self.donate_argnums, devices=self.devices)
                if step is not None:  # None: the method's plan is one SPMD program after all
                    return _Entry(step.plan, step.mesh, step.in_shardings, step.out_shardings,
                                  step, abstract_args, time.perf_counter() - start, compiled=step)
            searched = time.perf_counter() - start  # (a search that chose an SPMD plan)
            plan, solve_time = self._make_plan(abstract_args)
            solve_time += searched
        if plan.num_devices != len(self.devices):
            raise PlanError(f"plan mesh {plan.mesh_shape} covers {plan.num_devices} devices but "
                             f"{len(self.devices)} are in use")
        mesh = plan.make_mesh(self.devices)
        in_shardings = tuple(shardings_from_specs(mesh, s) for s in plan.input_specs(abstract_args))
        abstract_out = jax.eval_shape(self.fn, *abstract_args)
        out_shardings = shardings_from_specs(mesh, plan.output_specs(abstract_out))
        fn = self.fn
        if plan.constraints:
            fn = with_constraints(self.fn, abstract_args, plan.constraints, mesh)
        jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings,
                         donate_argnums=self.donate_argnums)
        return _Entry(plan, mesh, in_shardings, out_shardings, jitted, abstract_args, solve_time)

    def _compiled(self, entry: _Entry):
        if entry.compiled is None:
            start = time.perf_counter()
            entry.compiled = entry.jitted.lower(*entry.abstract_args).compile()
            entry.compile_time_s = time.perf_counter() - start
        return entry.compiled

    def __call__(self, *args):
        """Runs the step; inputs not already placed per the plan are moved there first."""
        entry = self._entry(args)
        placed = tuple(place(arg, sharding) for arg, sharding in zip(args, entry.in_shardings))
        return self._compiled(entry)(*placed)

    def plan(self, *args) -> Plan:
        """The plan for these arguments (arrays or ``jax.ShapeDtypeStruct`` leaves)."""
        return self._entry(args).plan

    def mesh(self, *args) -> Mesh:
        """The mesh the plan for these arguments runs on."""
        return self._entry(args).mesh

    def input_shardings(self, *args) -> tuple:
        """One pytree of ``NamedSharding`` per argument, as the plan places them."""
        return self._entry(args).in_shardings

    def abstract_inputs(self, *args) -> tuple:
        """The arguments as ``jax.ShapeDtypeStruct`` leaves carrying the plan's shardings.

        This is the ``target`` a checkpoint restore takes to place arrays per the plan.
        """
        entry = self._entry(args)
        return tuple(
            jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), arg, sh)
            for arg, sh in zip(entry.abstract_args, entry.in_shardings))

    def lower(self, *args):
        """The ``jax.stages.Lowered`` step for these arguments."""
        entry = self._entry(args)
        return entry.jitted.lower(*entry.abstract_args)

    def compile(self, *args):
        """The compiled executable for these arguments (compiled once, then cached)."""
        return self._compiled(self._entry(args))

    def init_state(self, init_fn: Callable, rng_key: jax.Array, *other_args):
        """Creates the state (argument 0) directly with the plan's shardings.

        Args:
          init_fn: ``init_fn(rng_key) -> state``, pure.
          rng_key: the key passed to ``init_fn``.
          *other_args: the step's remaining positional arguments (e.g. the batch); arrays or
            ``jax.ShapeDtypeStruct``, used only for their shapes.

        Returns:
          The state, each leaf created on the devices and in the layout the plan chose; no
          leaf is ever materialized whole on one device unless the plan replicates it.
        """
        abstract_state = jax.eval_shape(init_fn, rng_key)
        entry = self._entry((abstract_state, *other_args))
        if hasattr(entry.compiled, "init_state"):  # a pipeline: leaves on several sub-meshes
            return entry.compiled.init_state(init_fn, rng_key)
        return jax.jit(init_fn, out_shardings=entry.in_shardings[0])(rng_key)

    def analyze(self, *args, profile: str | None = None):
        """Compiles the step for these arguments and reports what it costs.

        Args:
          *args: arrays or ``jax.ShapeDtypeStruct`` leaves (nothing is allocated).
          profile: device profile for ``estimated_step_time_s`` (``"cpu"``, ``"h100"``, ...);
            ``None`` picks the running platform.

        Returns:
          A ``parallel.Report``.
        """
        from parallel.report import build_report

        entry = self._entry(args)
        if hasattr(entry.compiled, "report"):  # a pipeline reports its stages
            return entry.compiled.report(profile=profile, solve_time_s=entry.solve_time_s)
        compiled = self._compiled(entry)
        specs = entry.plan.input_specs(entry.abstract_args)
        return build_report(compiled, entry.plan, specs, solve_time_s=entry.solve_time_s,
                            compile_time_s=entry.compile_time_s, profile=profile,
                            num_hosts=self.method.hosts(self.devices))


class FollowPlan(Method):
    """Lays out another step's arguments as that step's plan does: nothing is solved.

    For a companion of a train step taking the same arguments, such as an eval step
    ``(state, batch) -> metrics``: the state stays where training keeps it and only the batch
    is placed. Outputs mirroring an argument take its specs; others are replicated. A
    pipelined step's companion runs on the pipeline's stages (forward only, micro-batch by
    micro-batch; ``PipelinedStep.follow``).

    Args:
      step: the ``ParallelStep`` whose plan (for the same abstract arguments) is followed.
    """

    name = "follow"

    def __init__(self, step: "ParallelStep"):
        super().__init__(None)
        self.step = step

    def __repr__(self) -> str:
        return f"FollowPlan({self.step!r})"

    def build_executable(self, fn, abstract_args, *, batch_argnums, donate_argnums, devices):
        """A followed pipeline runs ``fn`` on its stages (``None``: follow the plan as data)."""
        del devices
        followed = self.step._entry(abstract_args).compiled
        if not hasattr(followed, "follow"):
            return None
        return followed.follow(fn, abstract_args, batch_argnums=batch_argnums,
                               donate_argnums=donate_argnums)

    def make_plan(self, fn, abstract_args, *, batch_argnums, donate_argnums, devices,
                  logical_axes) -> Plan:
        source = self.step.plan(*abstract_args)
        if "stages" in source.extras:  # a pipeline whose step build_executable did not
            return DataParallel().make_plan(  # follow: data parallel (else: on its stages)
                fn, abstract_args, batch_argnums=batch_argnums, donate_argnums=donate_argnums,
                devices=devices, logical_axes=logical_axes)
        del logical_axes
        if source.num_devices != len(devices):
            raise PlanError(f"FollowPlan: the followed plan covers {source.num_devices} devices, "
                            f"this step runs on {len(devices)}")
        outputs = plan_outputs(fn, abstract_args, source.inputs, donate_argnums)
        return Plan(source.method, dict(source.mesh_shape), source.inputs, outputs,
                    batch_argnums=tuple(batch_argnums), donate_argnums=tuple(donate_argnums),
                    extras={"follows": repr(self.step)})


def _made_by_process_0(make_plan: Callable[[], Plan]) -> Plan:
    """``make_plan()`` run by process 0 alone and handed to every process.

    With several processes (a cluster) every one must run the same program; a solver's
    time limit could make their plans differ, so one plans and the others follow.
    """
    if jax.process_count() == 1:
        return make_plan()
    from jax.experimental import multihost_utils

    text = make_plan().to_json().encode() if jax.process_index() == 0 else b""
    size = int(multihost_utils.broadcast_one_to_all(np.int64(len(text))))
    buffer = np.zeros(size, np.uint8)
    buffer[:len(text)] = np.frombuffer(text, np.uint8)
    return Plan.from_json(bytes(np.asarray(multihost_utils.broadcast_one_to_all(buffer))).decode())


def place(tree: Any, shardings: Any) -> Any:
    """Moves the leaves of ``tree`` that are not laid out as ``shardings`` says."""

    def one(leaf, sharding: NamedSharding):
        if isinstance(leaf, jax.Array) and (
                leaf.sharding == sharding or leaf.sharding.is_equivalent_to(sharding, leaf.ndim)):
            return leaf
        if not isinstance(leaf, jax.Array):
            leaf = jnp.asarray(leaf)
        return transfer(leaf, sharding)

    return jax.tree.map(one, tree, shardings)


def parallelize(fn: Callable | None = None, *, method: Method | None = None,
                batch_argnums: Sequence[int] = (1,), donate_argnums: Sequence[int] = (0,),
                logical_axes: Sequence[Any] | None = None,
                devices: Sequence[jax.Device] | None = None):
    """Runs a pure function over pytrees of arrays on a device mesh, as ``method`` plans.

    Usable as ``parallelize(fn, method=...)``, ``@parallelize`` or ``@parallelize(method=...)``.

    Args:
      fn: e.g. ``train_step(state, batch) -> (new_state, metrics)``.
      method: a ``parallel.Method``; ``None`` means ``DataParallel()``.
      batch_argnums: arguments whose leaves' leading dimension is the global batch.
      donate_argnums: arguments whose buffers the outputs may reuse (the state).
      logical_axes: optional, one entry per positional argument: a pytree matching (or a
        prefix of) it whose leaves are tuples of logical axis names, one per dimension.
      devices: devices to run on; ``None`` means ``jax.devices()``.

    Returns:
      A ``ParallelStep`` (or a decorator making one when ``fn`` is ``None``).
    """
    if fn is None:
        return functools.partial(parallelize, method=method, batch_argnums=batch_argnums,
                                 donate_argnums=donate_argnums, logical_axes=logical_axes,
                                 devices=devices)
    return ParallelStep(fn, DataParallel() if method is None else method, batch_argnums,
                        donate_argnums, logical_axes, devices)
