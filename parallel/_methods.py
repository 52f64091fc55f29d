"""Methods: objects that turn a traced step into a ``Plan``.

``Method.make_plan`` is the one entry point ``parallelize`` calls. The manual methods here
choose a ``PartitionSpec`` per input leaf from the leaf's role, found from types and from the
traced step, never from key names (``parallel._roles``):

* batch leaves are split on their leading (batch) dimension,
* ZeRO-2 splits optimizer state, ZeRO-3 every stored-state leaf (a leaf of a donated
  argument: parameters, optimizer state, and the rest) that is large enough,
* everything else (and everything under ``DataParallel``) is replicated.

Outputs that mirror an input argument (the new state mirrors the state) take that argument's
specs, so step N+1 needs no data movement; other outputs (metrics) are replicated.
"""
from __future__ import annotations

import difflib
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import PartitionSpec

from parallel import mesh as mesh_lib
from parallel._errors import PlanError
from parallel._roles import OPTIMIZER, PARAMETER, STATE, Roles, find_roles
from parallel.plan import LeafPlan, Plan, make_leaf_plans

_warned: set[str] = set()


def warn_once(message: str) -> None:
    """Emits ``message`` as a ``UserWarning`` the first time it is seen in this process."""
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


def largest_divisible_dim(shape: Sequence[int], ways: int) -> int | None:
    """The index of the largest dimension divisible by ``ways`` (first on ties), or ``None``."""
    best = None
    for dim, size in enumerate(shape):
        if size % ways == 0 and size >= ways and (best is None or size > shape[best]):
            best = dim
    return best


class Method:
    """Base class: decides a ``Plan`` for a function and its abstract arguments.

    Subclasses implement ``make_plan`` (the automatic solvers) or, for methods that only
    place inputs, ``leaf_spec`` and ``default_mesh``.

    Args:
      mesh: axis name -> size (``-1`` fills the rest), or ``None`` for the method's default.
    """

    name = "method"
    batch_axis = mesh_lib.DATA_AXIS
    # The cluster the plan is for: hosts and devices per host (``None``: as JAX sees them, one
    # host per process). ``make_method`` sets them from the config's ``cluster`` section.
    num_hosts: int | None = None
    devices_per_host: int | None = None
    # Per-device bytes the plan's arguments may take (``parallel.memory_budget_bytes``);
    # ``None``: no limit. Fixed layouts are checked in ``make_plan``.
    memory_budget_bytes: float | None = None

    def __init__(self, mesh: Mapping[str, int] | None = None):
        self.mesh = dict(mesh) if mesh is not None else None

    def hosts(self, devices: Sequence[jax.Device]) -> int:
        """How many hosts ``devices`` are spread over (``parallel.mesh.count_hosts``).

        Raises:
          PlanError: the topology the method was given does not match the devices.
        """
        return mesh_lib.count_hosts(devices, self.num_hosts, self.devices_per_host)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mesh={self.mesh})"

    def default_mesh(self, num_devices: int) -> dict[str, int]:
        """The mesh shape used when the user gives none."""
        return {mesh_lib.DATA_AXIS: num_devices}

    def known_axes(self) -> tuple[str, ...]:
        """Mesh axes this method places something on (others would idle and are refused)."""
        return (mesh_lib.DATA_AXIS,)

    def resolve_mesh_shape(self, num_devices: int) -> dict[str, int]:
        """The concrete mesh shape for ``num_devices`` devices, checked against ``known_axes``."""
        shape = mesh_lib.resolve_mesh_shape(
            self.mesh if self.mesh is not None else self.default_mesh(num_devices), num_devices)
        mesh_lib.check_axes_known(shape, self.known_axes(), type(self).__name__)
        return shape

    def make_plan(
        self,
        fn: Callable,
        abstract_args: Sequence[Any],
        *,
        batch_argnums: Sequence[int],
        donate_argnums: Sequence[int],
        devices: Sequence[jax.Device],
        logical_axes: Sequence[Any] | None,
    ) -> Plan:
        """Plans ``fn`` over ``abstract_args`` (pytrees of ``jax.ShapeDtypeStruct``).

        Args:
          fn: the function being parallelized.
          abstract_args: its positional arguments, abstract.
          batch_argnums: arguments whose leading dimension is the global batch.
          donate_argnums: arguments donated to the step.
          devices: the devices the mesh covers.
          logical_axes: ``None`` or one pytree (prefix) of logical axis names per argument.

        Returns:
          The plan.
        """
        mesh_shape = self.resolve_mesh_shape(len(devices))
        roles = find_roles(fn, abstract_args, batch_argnums=batch_argnums,
                           donate_argnums=donate_argnums)
        context = self.prepare(abstract_args, mesh_shape, logical_axes, roles)
        inputs = []
        for i, arg in enumerate(abstract_args):
            arg_roles = iter(roles.by_arg[i])

            def spec_fn(path, key_path, leaf, i=i, arg_roles=arg_roles):
                role = next(arg_roles)
                if i in batch_argnums:
                    return self.batch_spec(path, leaf, mesh_shape, i, key_path, context)
                return self.leaf_spec(role, path, key_path, leaf, mesh_shape, i, context)

            inputs.append(make_leaf_plans(arg, spec_fn))
        outputs = plan_outputs(fn, abstract_args, inputs, donate_argnums)
        plan = Plan(self.name, mesh_shape, tuple(inputs), outputs,
                    batch_argnums=tuple(batch_argnums), donate_argnums=tuple(donate_argnums))
        self.check_budget(plan)
        return plan

    def check_budget(self, plan: Plan) -> None:
        """Refuses a plan whose arguments alone (state and batch, laid out as it says) take
        more bytes per device than ``memory_budget_bytes``.

        Raises:
          PlanError: naming the bytes, the budget and the methods that split the state.
        """
        if self.memory_budget_bytes is None:
            return
        needed = sum(leaf.bytes_per_device(plan.mesh_shape) for arg in plan.inputs for leaf in arg)
        if needed > self.memory_budget_bytes:
            raise PlanError(
                f"method {self.name!r} needs {needed:,} bytes per device for the step's "
                f"arguments alone (state and batch as it lays them out), over "
                f"parallel.memory_budget_bytes={int(self.memory_budget_bytes):,}; use a method "
                f"that splits the state (zero3, shard, pipeshard) or a larger budget")

    def prepare(self, abstract_args: Sequence[Any], mesh_shape: dict[str, int],
                logical_axes: Sequence[Any] | None, roles: Roles) -> Any:
        """Per-plan precomputation handed to ``leaf_spec`` and ``batch_spec`` (none here)."""
        del abstract_args, mesh_shape, roles
        if logical_axes is not None and any(entry is not None for entry in logical_axes):
            warn_once(f"{type(self).__name__} ignores logical_axes; use ManualParallel(rules) "
                      f"to place parameters by their logical axis names")
        return None

    def leaf_spec(self, role: str, path: str, key_path: tuple, leaf: Any,
                  mesh_shape: dict[str, int], argnum: int, context: Any) -> PartitionSpec:
        """The spec of a non-batch leaf of role ``role`` (``parallel._roles``); replicated
        unless a subclass says otherwise."""
        del role, path, key_path, leaf, mesh_shape, argnum, context
        return PartitionSpec()

    def batch_spec(self, path: str, leaf: Any, mesh_shape: dict[str, int], argnum: int,
                   key_path: tuple, context: Any) -> PartitionSpec:
        """Splits the leading dimension of a batch leaf over the data axis."""
        del key_path, context
        return batch_leaf_spec(path, leaf, mesh_shape, argnum, self.batch_axis)


def batch_leaf_spec(path: str, leaf: Any, mesh_shape: Mapping[str, int], argnum: int,
                    batch_axis: str = mesh_lib.DATA_AXIS) -> PartitionSpec:
    """``P(batch_axis)`` for a batch leaf, ``P()`` for scalars or a mesh without the axis.

    Raises:
      PlanError: the leading dimension does not divide by the batch axis size.
    """
    ways = mesh_shape.get(batch_axis, 1)
    shape = np.shape(leaf)
    if ways == 1 or not shape:
        return PartitionSpec()
    if shape[0] % ways:
        raise PlanError(
            f"global batch size {shape[0]} (argument {argnum}, leaf {path or '<root>'}, shape "
            f"{tuple(shape)}) is not divisible by the data-parallel size {ways} of mesh "
            f"{dict(mesh_shape)}; use a batch size that is a multiple of {ways} or change the "
            f"mesh's {batch_axis!r} axis"
        )
    return PartitionSpec(batch_axis)


def plan_outputs(fn: Callable, abstract_args: Sequence[Any],
                 inputs: Sequence[tuple[LeafPlan, ...]],
                 donate_argnums: Sequence[int]) -> tuple[LeafPlan, ...]:
    """Output placements: an output entry that mirrors an argument takes its specs.

    The output (or, for a tuple/list output, each of its entries) is compared with the
    arguments, donated ones first; an entry with the same structure and leaf shapes as an
    argument reuses that argument's specs. Every other output leaf is replicated.
    """
    out = jax.eval_shape(fn, *abstract_args)
    order = list(donate_argnums) + [i for i in range(len(abstract_args)) if i not in donate_argnums]
    signatures = {i: _signature(abstract_args[i]) for i in order}

    def specs_for(entry):
        sig = _signature(entry)
        for i in order:
            if signatures[i] == sig:
                return [leaf.spec for leaf in inputs[i]]
        return [PartitionSpec()] * len(jax.tree.leaves(entry))

    if isinstance(out, (tuple, list)):
        specs = [spec for entry in out for spec in specs_for(entry)]
    else:
        specs = specs_for(out)
    flat = iter(specs)
    return make_leaf_plans(out, lambda path, key_path, leaf: next(flat))


def _signature(tree: Any) -> tuple:
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple(tuple(np.shape(x)) for x in leaves)


class DataParallel(Method):
    """Parameters and optimizer state replicated, the batch split over ``"data"`` (like pmap).

    Args:
      mesh: default ``{"data": num_devices}``.
    """

    name = "data"


class Zero2Parallel(Method):
    """ZeRO stage 2: optimizer state (and so the update) sharded over ``"data"``.

    Parameters stay replicated; each optimizer-state leaf (found by its optax type or by
    mirroring a parameter, whatever the state's keys; see ``parallel._roles``) is split along
    its largest dimension that divides by the data size. Leaves with fewer than
    ``min_shard_elements`` elements or no such dimension stay replicated.

    Args:
      mesh: default ``{"data": num_devices}``.
      min_shard_elements: smaller leaves are replicated (a collective on them costs more
        latency than the memory saved).
    """

    name = "zero2"
    sharded_roles = (OPTIMIZER,)
    nothing_to_shard = (
        "found no optimizer state in the donated arguments (no optax state, no leaf mirroring "
        "a parameter that the step updates as p + u), so it replicates everything like "
        "DataParallel; donate the state (donate_argnums) or use Zero3Parallel, which shards "
        "every donated leaf")

    def __init__(self, mesh: Mapping[str, int] | None = None, min_shard_elements: int = 1024):
        super().__init__(mesh)
        self.min_shard_elements = min_shard_elements

    def prepare(self, abstract_args, mesh_shape, logical_axes, roles):
        if not any(role in self.sharded_roles for role in roles.flat()):
            warn_once(f"{type(self).__name__} {self.nothing_to_shard}")
        return super().prepare(abstract_args, mesh_shape, logical_axes, roles)

    def leaf_spec(self, role, path, key_path, leaf, mesh_shape, argnum, context):
        del path, key_path, argnum, context
        ways = mesh_shape.get(mesh_lib.DATA_AXIS, 1)
        shape = np.shape(leaf)
        if role not in self.sharded_roles or ways == 1 or math.prod(shape) < self.min_shard_elements:
            return PartitionSpec()
        dim = largest_divisible_dim(shape, ways)
        if dim is None:
            return PartitionSpec()
        return PartitionSpec(*([None] * dim), mesh_lib.DATA_AXIS)


class Zero3Parallel(Zero2Parallel):
    """ZeRO stage 3 (FSDP): every stored-state leaf sharded over ``"data"``, gathered where used.

    Every leaf of a donated argument (parameters, optimizer state, and anything else the step
    stores, whatever it is called) that is large enough is split as in ZeRO-2.
    """

    name = "zero3"
    sharded_roles = (PARAMETER, OPTIMIZER, STATE)
    nothing_to_shard = ("shards the stored state, the donated arguments, but none is donated; "
                        "pass donate_argnums (e.g. (0,) for the state)")


_REGISTRY: dict[str, Callable[..., Method]] = {}


def register_method(name: str, factory: Callable[..., Method]) -> None:
    """Makes ``make_method(name, ...)`` call ``factory(mesh=, rules=, memory_budget_bytes=,
    num_micro_batches=)``, plus ``profile=`` when the config names a device profile."""
    _REGISTRY[name] = factory


def make_method(
    name: str,
    mesh: Mapping[str, int] | None = None,
    rules: Mapping[str, Any] | None = None,
    memory_budget_bytes: int | None = None,
    num_micro_batches: int = 1,
    profile: str | None = None,
    stages: int | str | None = None,
    schedule: str | None = None,
    remat: bool = False,
    virtual_stages: int = 1,
    num_hosts: int | None = None,
    devices_per_host: int | None = None,
) -> Method:
    """Builds a method from the config's ``parallel:`` section.

    Args:
      name: ``"data"``, ``"zero2"``, ``"zero3"``, ``"manual"``, or a registered method such as
        ``"shard"``/``"auto"``.
      mesh: axis name -> size (``-1`` fills the rest); ``None`` lets the method choose.
      rules: logical axis name -> mesh axis (``manual`` only).
      memory_budget_bytes: per-device memory limit (solver methods only).
      num_micro_batches: micro-batches per step (pipeline methods only).
      profile: the device profile plans are priced for (``"h100"``...; solver methods only);
        ``None``: the running device. Passed to the factory only when set.
      stages, schedule, remat: pipeline options (``"auto"`` or a number of stages, ``"1f1b"``
        or ``"gpipe"``, recompute forwards in the backward); pipeline methods only, passed
        only when set.
      virtual_stages: model chunks per stage (interleaved 1F1B; pipeline methods only).
      num_hosts, devices_per_host: the cluster's topology (``cluster.num_hosts``...); ``None``:
        one host per process, as JAX sees the devices.

    Raises:
      PlanError: unknown name, or an option the method does not take.
    """
    if name not in _REGISTRY:
        hint = difflib.get_close_matches(str(name), list(_REGISTRY), n=1)
        did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise PlanError(f"unknown parallel method {name!r}{did_you_mean}; available: "
                         f"{', '.join(sorted(_REGISTRY))}")
    extra = {} if profile is None else {"profile": profile}
    pipeline = {k: v for k, v in (("stages", stages), ("schedule", schedule), ("remat", remat))
                if v not in (None, False)}
    if virtual_stages != 1:
        pipeline["virtual_stages"] = virtual_stages
    if pipeline and not getattr(_REGISTRY[name], "pipeline", False):
        given = ", ".join(f"parallel.{k}={v}" for k, v in pipeline.items())
        raise PlanError(f"{given} only apply to pipeline methods ('pipeshard'); method {name!r} "
                        f"does not pipeline. Drop them or use method 'pipeshard'")
    extra.update(pipeline)
    method = _REGISTRY[name](mesh=mesh, rules=rules, memory_budget_bytes=memory_budget_bytes,
                             num_micro_batches=num_micro_batches, **extra)
    method.num_hosts, method.devices_per_host = num_hosts, devices_per_host
    return method


def _placement_factory(cls: type[Method], name: str) -> Callable[..., Method]:
    def factory(mesh=None, rules=None, memory_budget_bytes=None, num_micro_batches=1,
                profile=None):
        del profile  # a fixed layout does not depend on the device
        if rules:
            raise PlanError(f"parallel.rules={dict(rules)} only applies to method 'manual'; "
                             f"method {name!r} ignores rules. Set parallel.method=manual or drop "
                             f"the rules")
        if num_micro_batches != 1:
            raise PlanError(f"parallel.num_micro_batches={num_micro_batches} applies to "
                             f"pipeline methods; method {name!r} runs the whole batch at once. "
                             f"Use train.grad_accum_steps for accumulation, or set it to 1")
        method = cls(mesh=mesh)
        method.memory_budget_bytes = memory_budget_bytes  # checked against the fixed layout
        return method

    return factory


register_method("data", _placement_factory(DataParallel, "data"))
register_method("zero2", _placement_factory(Zero2Parallel, "zero2"))
register_method("zero3", _placement_factory(Zero3Parallel, "zero3"))
