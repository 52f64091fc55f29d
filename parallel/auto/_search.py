"""ShardParallel's search: trace the step, try each mesh shape, keep the cheapest plan."""
from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from typing import Any, Callable, Sequence

import jax
import numpy as np

from parallel._errors import PlanError
from parallel._roles import OPTIMIZER, check_leaves, find_roles, trace
from parallel.auto._concurrent import in_order
from parallel.auto._cost import MeshModel
from parallel.auto._graph import build_graph
from parallel.auto._groups import Structure, warn_fallbacks
from parallel.auto._memory import Liveness
from parallel.auto._rules import FOLLOWERS
from parallel.auto._solution import MemoryBudgetError, Solution, rank, simplicity
from parallel.auto._solve import MeshProblem, MeshResult
from parallel.profiles import DeviceProfile, get_profile

log = logging.getLogger(__name__)

AXIS_NAMES = ("data", "model")
# Re-solves that add the memory constraint at a newly found peak before giving up.
_MEMORY_ROUNDS = 6
# Stored state at least this big is split in the "state sharded" candidate, smaller leaves are
# replicated (a collective on them costs more latency than it saves).
_SHARDED_STATE_BYTES = 4096


def model_limit(profile: DeviceProfile) -> int | None:
    """The largest ``model`` axis worth trying: inside one host when there are several (the
    activations' collectives of a model axis would otherwise cross the slow link at every
    layer; memory never needs it, the data axis can shard the state over every device)."""
    return profile.devices_per_host if profile.num_hosts > 1 else None


def mesh_candidates(num_devices: int) -> list[tuple[int, int]]:
    """``(data, model)`` sizes to try: the 1-D mesh, then each 2-D factorization."""
    out = [(num_devices, 1)]
    out += [(d, num_devices // d) for d in range(2, num_devices) if num_devices % d == 0]
    return out


@dataclasses.dataclass
class Prepared:
    """A step traced and analysed once, to be solved on any number of devices (the stages of a
    pipeline search solve one layer's work on several sub-meshes)."""

    args: tuple
    closed: Any
    in_tree: Any
    out_shape: Any
    graph: Any
    structure: Structure
    liveness: Liveness
    paired: dict[int, int]
    fed: set[int]
    donated: set[int]
    batch_leaves: list[int]
    update: set[int]


def prepare(fn: Callable, abstract_args: Sequence[Any], *, donate_argnums: Sequence[int] = (0,),
            batch_argnums: Sequence[int] = (1,), traced: tuple | None = None) -> Prepared:
    """Traces ``fn`` and builds what every mesh's integer program shares (see ``solve``).

    ``traced``: ``parallel._roles.trace(fn, abstract_args)`` made already (not traced again).

    Raises:
      PlanError: an argument leaf is not an array or a number.
    """
    args = tuple(abstract_args)
    check_leaves(args)
    closed, in_tree, out_shape = traced or trace(fn, args)
    graph = build_graph(closed)
    offsets = np.cumsum([0] + [len(jax.tree.leaves(a)) for a in args])
    paired = _pair_state(args, out_shape, donate_argnums, offsets)
    batch_leaves = [j for i in batch_argnums for j in range(offsets[i], offsets[i + 1])]
    structure = Structure(graph, [(graph.outputs[o], graph.inputs[i]) for o, i in paired.items()],
                          [graph.inputs[j] for j in batch_leaves])
    warn_fallbacks(structure)
    donated = {graph.inputs[j] for i in donate_argnums for j in range(offsets[i], offsets[i + 1])}
    liveness = Liveness(graph, donated, FOLLOWERS)
    state = {v for v in donated if graph.values[v].nbytes >= _SHARDED_STATE_BYTES}
    update: set[int] = set()
    if state:
        roles = find_roles(fn, args, batch_argnums=batch_argnums, donate_argnums=donate_argnums,
                           traced=(closed, in_tree, out_shape))
        update = {graph.inputs[j] for j in roles.indices(OPTIMIZER)} & state
    return Prepared(args, closed, in_tree, out_shape, graph, structure, liveness, paired,
                    set(graph.inputs) - donated, donated, batch_leaves, update)


def solve(fn: Callable, abstract_args: Sequence[Any], *, num_devices: int | None = None,
          mesh_shape: dict[str, int] | None = None, profile: str | DeviceProfile | None = None,
          memory_budget_bytes: float | None = None, donate_argnums: Sequence[int] = (0,),
          batch_argnums: Sequence[int] = (1,), time_limit_s: float = 30.0,
          prepared: Prepared | None = None, first_device: int = 0,
          max_model: int | None = None, split_leaves: Sequence[int] = ()) -> Solution:
    """Finds the sharding of ``fn(*abstract_args)`` with the lowest estimated step time.

    Args:
      fn: the step, a pure function of pytrees of arrays.
      abstract_args: its arguments; ``jax.ShapeDtypeStruct`` leaves suffice (nothing is
        allocated).
      num_devices: devices to plan for (default: ``jax.device_count()``).
      mesh_shape: ``{"data": d, "model": m}`` to plan on one mesh only; default tries each.
      profile: device profile name or object pricing compute and links (default: the running
        platform's).
      memory_budget_bytes: per-device memory limit (default: the profile's device memory).
      donate_argnums: arguments whose buffers the step may reuse; outputs with the same
        structure as one of them are updated state and keep its shardings.
      batch_argnums: arguments that carry the batch (used to name a 1-D mesh's axis).
      time_limit_s: solver time limit per mesh shape; on a time-out the best plan found is used.
      prepared: ``prepare(fn, abstract_args, ...)`` made before (nothing is traced again).
      first_device: index of the first device among the cluster's (a pipeline stage's
        sub-mesh), which decides the mesh axes that cross hosts.
      max_model: the largest ``model`` axis to try (``None``: any).
      split_leaves: flat indices of input leaves (those of at least ``_SHARDED_STATE_BYTES``)
        that must be split into as many pieces as the mesh allows (over every axis where
        their shape divides), on every mesh: a pipeline stage's parameters, so that their
        optimizer state is not kept whole on its devices (the data-parallel flavours of a
        1-D mesh are then not tried).

    Returns:
      A :class:`Solution`.

    Raises:
      MemoryBudgetError: no mesh shape has a plan within ``memory_budget_bytes``.
      PlanError: an argument leaf is not an array or a number.
    """
    start = time.perf_counter()
    n = num_devices or jax.device_count()
    if mesh_shape is not None:
        sizes = tuple(int(mesh_shape.get(a, 1)) for a in AXIS_NAMES)
        unknown = set(mesh_shape) - set(AXIS_NAMES)
        if unknown or np.prod(sizes) != n:
            raise PlanError(
                f"ShardParallel mesh {mesh_shape} must use axes {AXIS_NAMES} with sizes whose "
                f"product is the device count {n}; e.g. {{'data': {n // 2 or 1}, 'model': 2}}")
        meshes = [sizes]
    else:
        meshes = [m for m in mesh_candidates(n) if max_model is None or m[1] <= max_model]
    if not isinstance(profile, DeviceProfile):
        profile = get_profile(profile, n)
    budget = float(memory_budget_bytes if memory_budget_bytes is not None
                   else profile.memory_bytes)
    p = prepared or prepare(fn, abstract_args, donate_argnums=donate_argnums,
                            batch_argnums=batch_argnums)
    graph, structure, batch_leaves, donated = p.graph, p.structure, p.batch_leaves, p.donated

    tables: dict[tuple[int, ...], list] = {}  # a mesh's tables, shared by its flavours

    def problem(sizes, split_leading=frozenset(), split_any=frozenset(), whole=frozenset(),
                split_most=frozenset()):
        mm = _mesh_model(sizes, profile, first_device, mesh_shape is not None)
        made = MeshProblem(structure, mm, p.liveness, p.paired, p.fed,
                           split_leading, split_any, whole, tables=tables.get(sizes),
                           split_most=split_most)
        tables[sizes] = made.mesh_tables
        return made

    # A flavour whose constraints equal another's on the same mesh (no stored state to shard:
    # a pipeline stage's work) is the same integer program: solved once.
    solved: dict[tuple, MeshResult] = {}

    def solve_all(sizes_and_sets: list[tuple]) -> list[MeshResult]:
        """The plan of each ``(sizes, sets)``, the programs solved side by side (``in_order``:
        the same results, in order)."""
        keys = [(sizes, *(frozenset(x) for x in sets), *(frozenset(),) * (4 - len(sets)))
                for sizes, sets in sizes_and_sets]
        new = [key for key in dict.fromkeys(keys) if key not in solved]
        for key, result in zip(new, in_order(
                lambda key: _solve_mesh(problem(*key), budget, time_limit_s, batch_leaves), new)):
            solved[key] = result
        return [dataclasses.replace(solved[key]) for key in keys]

    split = frozenset(graph.inputs[j] for j in split_leaves
                      if graph.values[graph.inputs[j]].nbytes >= _SHARDED_STATE_BYTES)
    results = solve_all([(sizes, ((), (), (), split)) for sizes in meshes])
    if meshes[0] == (n, 1) and n > 1 and not split:
        # Data-parallel flavours of the 1-D mesh, close calls that the cost model alone may
        # misjudge: the batch split; with the optimizer state sharded (weight-update sharding,
        # ZeRO-2); with all stored state sharded (ZeRO-3).
        batch = {graph.inputs[j] for j in batch_leaves}
        state = {v for v in donated if graph.values[v].nbytes >= _SHARDED_STATE_BYTES}
        variants = [("batch split", (batch,)), ("state sharded", (batch, state, donated - state))]
        if p.update:  # weight-update sharding (ZeRO-2): parameters whole, optimizer state split
            variants.insert(1, ("update sharded", (batch, p.update, donated - p.update)))
        if results[0].mesh_shape.get("data") != 1:  # the 1-D plan splits the batch already
            results[0].variant = variants.pop(0)[0]
        # The flavours share the 1-D mesh's tables, built by its solve above.
        flavours = solve_all([(meshes[0], sets) for _, sets in variants])
        for (name, _), result in zip(variants, flavours):
            result.variant = name
            results.append(result)
    fitting = rank([r for r in results if r.status != "over_budget"],
                   lambda r: r.step_time_s, simplicity)
    if not fitting:
        smallest = min(in_order(lambda sizes: _min_memory(problem(sizes), time_limit_s),
                                meshes), key=lambda found: found[0])
        raise MemoryBudgetError(
            f"no sharding of this step on {n} devices fits memory_budget_bytes={budget:.0f}: "
            f"the smallest per-device memory reached is {smallest[0]:.0f} bytes (mesh "
            f"{smallest[1]}). Raise memory_budget_bytes to at least {smallest[0]:.0f}, use more "
            "devices, or shrink the model or batch.", smallest_bytes=smallest[0], budget=budget)
    over = [r for r in results if r.status == "over_budget"]
    return Solution(
        best=fitting[0], tried=fitting + over, memory_budget_bytes=budget,
        solve_time_s=time.perf_counter() - start, num_equations=len(graph.eqns),
        num_groups=len(structure.groups), num_classes=structure.num_classes,
        in_tree=p.in_tree, out_shape=p.out_shape)


# Mesh models by (sizes, profile, first device, data axis named): each caches the resharding
# prices it computed, which the many solves of one search (a pipeline's layers on each
# sub-mesh, each mesh's flavours) share.
_MESH_MODELS: dict[tuple, MeshModel] = {}
_MAX_MESH_MODELS = 256


def _mesh_model(sizes: tuple[int, ...], profile: DeviceProfile, first_device: int,
                data_axis_named: bool) -> MeshModel:
    key = (tuple(sizes), profile, first_device, data_axis_named)
    try:
        mm = _MESH_MODELS.get(key)
    except TypeError:  # a profile with unhashable fields: not shared
        return MeshModel(AXIS_NAMES, sizes, profile, data_axis_named=data_axis_named,
                         first_device=first_device)
    if mm is None:
        if len(_MESH_MODELS) >= _MAX_MESH_MODELS:
            _MESH_MODELS.clear()
        mm = _MESH_MODELS[key] = MeshModel(AXIS_NAMES, sizes, profile,
                                           data_axis_named=data_axis_named,
                                           first_device=first_device)
    return mm


def _pair_state(args, out_shape, donate_argnums, offsets) -> dict[int, int]:
    """Output leaf -> input leaf for outputs that are updated donated arguments."""
    parts = list(out_shape) if isinstance(out_shape, (tuple, list)) else [out_shape]
    part_offsets = np.cumsum([0] + [len(jax.tree.leaves(p)) for p in parts])
    paired: dict[int, int] = {}
    for i in donate_argnums:
        want = jax.tree.structure(args[i])
        want_leaves = [(tuple(x.shape), x.dtype) for x in jax.tree.leaves(args[i])]
        for p, part in enumerate(parts):
            leaves = [(tuple(x.shape), x.dtype) for x in jax.tree.leaves(part)]
            if jax.tree.structure(part) == want and leaves == want_leaves:
                for j in range(len(leaves)):
                    paired[int(part_offsets[p]) + j] = int(offsets[i]) + j
                break
    return paired


def _solve_mesh(problem: MeshProblem, budget: float, time_limit_s: float,
                batch_leaves: list[int]) -> MeshResult:
    start = time.perf_counter()
    mm = problem.mm
    shape = dict(zip(mm.axis_names, mm.axis_sizes))
    prog, x, _ = problem.build()
    points = problem.first_points()
    for point in points:
        problem.add_memory_row(prog, x, point, budget, None)
    choice, specs, peak, status = None, None, np.inf, "infeasible"
    for _ in range(_MEMORY_ROUNDS):
        result = prog.solve(max(time_limit_s - (time.perf_counter() - start), 1e-3),
                            relax_first=np.isinf(budget))
        log.debug("mesh %s: %d variables, %d rows, %d integer; %s in %.2f s", mm.axis_sizes,
                  *prog.size, result.status, result.seconds)
        status = result.status
        if result.x is not None:
            choice = problem.choose(result, x)
        elif status == "time_limit":
            choice = problem.cheapest_each()
        else:
            break
        specs = problem.specs(choice)
        profile = problem.memory_profile(choice, specs)
        peak = float(profile.max())
        point = int(np.argmax(profile))
        if peak <= budget * (1 + 1e-9) or point in points or result.x is None:
            break
        points.append(point)
        problem.add_memory_row(prog, x, point, budget, None)
    if choice is None or peak > budget * (1 + 1e-9):
        return MeshResult(shape, "over_budget", np.inf, np.inf, np.inf, peak,
                          time.perf_counter() - start, [], [], [], [])
    if status == "time_limit":
        warnings.warn(f"ShardParallel hit its {time_limit_s:g} s solver time limit on mesh "
                      f"{shape}; using the best plan found by then (raise time_limit_s for a "
                      "better one)", stacklevel=3)
    graph = problem.s.graph
    if mm.axis_sizes[1] == 1 and not mm.data_axis_named and not any(specs[graph.inputs[j]][:1] != ((),)
                                         for j in batch_leaves if specs[graph.inputs[j]]):
        # A 1-D mesh that does not split the batch (leading) dimension is a model axis.
        problem.mm = mm = mm.renamed(AXIS_NAMES[::-1])
        shape = {"data": 1, "model": mm.axis_sizes[0]}
    compute, comm = problem.evaluate(choice, specs)
    ins, outs = problem.io_specs(specs)
    return MeshResult(shape, status, compute + comm, compute, comm, peak,
                      time.perf_counter() - start, ins, outs, problem.constraints(specs),
                      problem.describe(choice), spec_at=problem.spec_at(specs))


def _min_memory(problem: MeshProblem, time_limit_s: float) -> tuple[float, dict[str, int]]:
    """The lowest peak per-device memory any plan reaches on the problem's mesh."""
    mm = problem.mm
    prog, x, peak_var = problem.build(minimize_memory=True)
    points = problem.first_points()
    for point in points:
        problem.add_memory_row(prog, x, point, 0.0, peak_var)
    best = np.inf
    for _ in range(_MEMORY_ROUNDS):
        result = prog.solve(time_limit_s)
        if result.x is None:
            break
        choice = problem.choose(result, x)
        profile = problem.memory_profile(choice, problem.specs(choice))
        best = min(best, float(profile.max()))
        point = int(np.argmax(profile))
        if point in points:
            break
        points.append(point)
        problem.add_memory_row(prog, x, point, 0.0, peak_var)
    return best, dict(zip(mm.axis_names, mm.axis_sizes))
