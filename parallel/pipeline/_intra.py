"""Each stage's intra-op plan: the ``ShardParallel`` solver on the stage's own work.

A stage's forward and backward for one micro-batch form a function of the values it reads
(parameters and other per-step values, per-example activations); the solver picks the
stage's ``("data", "model")`` sub-mesh shape and a ``PartitionSpec`` per parameter, exactly as
it does for a whole step. Per-example values stay split over ``"data"`` between tasks.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
from jax.sharding import PartitionSpec

from parallel.pipeline._layouts import example_spec
from parallel.pipeline._program import Program, Regions, evaluate
from parallel.pipeline._stages import Placement


@dataclasses.dataclass
class StageWork:
    """One micro-batch's forward and backward on one stage, as a function the solver plans.

    Attributes:
      fn: ``fn(per_step_values, per_example_values) -> values handed out of the stage``: first
        ``results``, then what other stages read (activations, cotangents).
      args: its abstract arguments.
      per_step: value ids of the per-step values it reads (parameters...), in ``args[0]``.
      results: value ids of the values leaving the micro-batch region (gradients).
      per_example: value ids of the per-example values it reads (made elsewhere), in
        ``args[1]``.
      held: value ids of the forward values its backward reads (a micro-batch in flight keeps
        them from its forward to its backward): made by its forward, or received.
      planned: those of ``held`` its forward makes and no other stage reads; they keep the
        layout the stage's plan gives them (``held_specs``), the others the batch split.
      ops: its operations, in order.
    """

    fn: Any
    args: tuple
    per_step: list[int]
    results: list[int]
    per_example: list[int] = dataclasses.field(default_factory=list)
    held: list[int] = dataclasses.field(default_factory=list)
    planned: list[int] = dataclasses.field(default_factory=list)
    ops: list = dataclasses.field(default_factory=list)


def stage_work(program: Program, regions: Regions, placement: Placement, stage: int) -> StageWork:
    """The micro-batch work of ``stage`` under ``placement``."""
    ops = [i for i, (s, p) in enumerate(zip(placement.stage, placement.phase))
           if s == stage and p in ("F", "B")]
    made = {v for i in ops for v in program.ops[i].outputs}
    reads = list(dict.fromkeys(v for i in ops for v in program.ops[i].value_inputs()
                               if v not in made))
    per_step = [v for v in reads if v not in regions.batch_dim]
    per_example = [v for v in reads if v in regions.batch_dim]
    results = [v for v in dict.fromkeys(v for i in ops for v in program.ops[i].outputs)
               if v in regions.crossing]
    # What the stage hands to the other stages (activations on, cotangents back) is written
    # out too: the solver prices making it and lays it out.
    mine = set(ops)
    read_elsewhere = {v for i, op in enumerate(program.ops) if i not in mine
                      for v in op.value_inputs()}
    handed = [v for v in dict.fromkeys(v for i in ops for v in program.ops[i].outputs)
              if v in read_elsewhere and v not in regions.crossing]
    stage_ops = [program.ops[i] for i in ops]
    forward = {i: program.ops[i] for i, p in enumerate(placement.phase) if p == "F"}
    made_forward = {v for op in forward.values() for v in op.outputs}
    mine_forward = {v for i in ops if i in forward for v in program.ops[i].outputs}
    inputs = set(program.inputs)
    per_step_set = set(per_step)
    held = [v for v in dict.fromkeys(v for i in ops if placement.phase[i] == "B"
                                     for v in program.ops[i].value_inputs())
            if v not in regions.crossing and (v in made_forward or v in inputs)
            and v not in per_step_set]
    planned = [v for v in held if v in mine_forward and v not in read_elsewhere]

    def micro_batch_work(state, batch):
        env = dict(zip(per_step, state))
        env.update(zip(per_example, batch))
        for k, op in enumerate(stage_ops):  # markers are identities; the solver need not know them
            if op.is_marker:
                env.update(zip(op.outputs, (env[v] for v in op.inputs)))
            else:
                with jax.named_scope(_scope(k)):  # names the equation for ``held_specs``
                    evaluate([op], env)
        return tuple(env[v] for v in results + handed)

    def abstract(vs):
        return tuple(jax.ShapeDtypeStruct(program.avals[v].shape, program.avals[v].dtype)
                     for v in vs)

    return StageWork(micro_batch_work, (abstract(per_step), abstract(per_example)), per_step,
                     results, per_example, held, planned, stage_ops)


def held_specs(program: Program, regions: Regions, work: StageWork, closed, result,
               data: int, inner: bool = False) -> dict[int, PartitionSpec]:
    """The layout of each value ``work.held`` on the stage: the plan's (``result``, a
    ``MeshResult`` of ``work.fn`` traced as ``closed``) for ``work.planned``, else (and where
    the plan names none) the batch split over the ``data`` axis of size ``data``.

    ``inner``: the work is a part of a larger stage's (a layer after its first): what it
    receives from the stage's forward, not from the step's batch, takes the plan's layout of
    the work's input too (the stage's plan lays it out where it is made).

    The traced function binds each operation of ``work.ops`` but its markers under a name scope
    of the operation's position (``_scope``): an equation of ``closed`` is the operation its
    scope names (checked by result shapes); an operation without one keeps the batch split."""
    by_scope = {}
    for k, eqn in enumerate(closed.jaxpr.eqns):
        names = [scope.name for scope in eqn.source_info.name_stack.stack]
        if names and names[-1].startswith(_SCOPE):
            by_scope[names[-1]] = k
    site = {}
    for i, op in enumerate(work.ops):
        if op.is_marker:
            site.update((out, site.get(v)) for out, v in zip(op.outputs, op.inputs))
        elif _scope(i) in by_scope and [
                tuple(x.aval.shape) for x in closed.jaxpr.eqns[by_scope[_scope(i)]].outvars] == [
                tuple(program.avals[v].shape) for v in op.outputs]:
            site.update((v, ((by_scope[_scope(i)],), j)) for j, v in enumerate(op.outputs))
    planned = set(work.planned)
    received = dict(zip(work.per_example, result.input_specs[len(work.per_step):]))
    inputs = set(program.inputs)
    out = {}
    for v in work.held:
        spec = result.spec_at(*site[v]) if v in planned and site.get(v) else None
        if inner and v in received and v not in inputs:
            spec = received[v]
        out[v] = spec if spec is not None else example_spec(
            program.avals[v].shape, regions.batch_dim.get(v), data)
    return out


_SCOPE = "shardax_op"


def _scope(position: int) -> str:
    return f"{_SCOPE}{position}"


def stage_plan(program: Program, regions: Regions, placement: Placement, stage: int,
               num_devices: int, profile, mesh_shape: dict[str, int] | None = None,
               first_device: int = 0, max_model: int | None = None,
               split_state: bool = False) -> tuple[dict[str, int], dict[int, PartitionSpec]]:
    """The solver's sub-mesh shape for ``stage``, the specs of the per-step values it reads and
    of the values it hands out of the micro-batch region.

    Args:
      mesh_shape: plan on this sub-mesh shape only (the one a search priced); ``None``: the
        solver tries each.
      first_device: the stage's first device among the cluster's (which axes cross hosts).
      max_model: the largest ``model`` axis to try.
      split_state: the stage's parameters (so their optimizer state) are held split over the
        sub-mesh, as the search priced the stage when the fastest plan did not fit
        (``parallel.auto.LayerPricer.lean``).

    Returns:
      ``(mesh_shape, {value id: spec})``.
    """
    # heavy to import; only pipelines need it here
    from parallel.auto._search import prepare, solve

    work = stage_work(program, regions, placement, stage)
    # On a mesh a search chose, the stage is planned as it was priced: without a budget (the
    # search checked the stage's memory with its micro-batches in flight), its parameters
    # split if the search held them so.
    prepared = prepare(work.fn, work.args, donate_argnums=(), batch_argnums=(1,))
    solution = solve(work.fn, work.args, num_devices=num_devices, profile=profile,
                     prepared=prepared,
                     donate_argnums=(), batch_argnums=(1,), mesh_shape=mesh_shape,
                     first_device=first_device, max_model=max_model,
                     memory_budget_bytes=float("inf") if mesh_shape is not None else None,
                     split_leaves=range(len(work.per_step)) if split_state else ())
    specs = dict(zip(work.per_step, solution.best.input_specs[:len(work.per_step)]))
    # The values the stage hands out of the micro-batch region (gradients): their accumulators
    # take the layout the solver gives them, not a replicated one.
    specs.update(zip(work.results, solution.best.output_specs))
    # What its forward keeps for its backward stays as the plan lays it out (as priced:
    # ``parallel.auto.LayerPricer``), not gathered whole between the two programs.
    held = held_specs(program, regions, work, prepared.closed, solution.best,
                      solution.mesh_shape.get("data", 1))
    specs.update((v, held[v]) for v in work.planned)
    _follow_specs(program, placement, stage, specs)
    return solution.mesh_shape, specs


def _follow_specs(program: Program, placement: Placement, stage: int,
                  specs: dict[int, PartitionSpec]) -> None:
    """Gives the stage's state the layout of what it becomes or is made from, in place.

    The solver plans what the micro-batch work reads (a parameter's compute-dtype copy) and
    hands out (its gradient). The state behind them is laid out alike: a float32 parameter as
    its cast, an optimizer moment as the gradient it accumulates, along the element-wise
    operations of the stage's per-step and update work, so no state leaf is replicated over the
    stage's devices when its parameter is split.
    """
    ops = [program.ops[i] for i, (s, p) in enumerate(zip(placement.stage, placement.phase))
           if s == stage and p in ("N", "A")]
    links = []
    for op in ops:
        if op.prim.name not in _ELEMENTWISE:
            continue
        shape = tuple(program.avals[op.outputs[0]].shape)
        same = [v for v in op.value_inputs() + op.outputs
                if tuple(program.avals[v].shape) == shape]
        links.append(same)
    changed = True
    while changed:
        changed = False
        for same in links:
            spec = next((specs[v] for v in same if v in specs), None)
            if spec is None:
                continue
            for v in same:
                if v not in specs:
                    specs[v] = spec
                    changed = True


# Operations whose operands and result of one shape share one layout.
_ELEMENTWISE = frozenset(
    "add add_any sub mul div neg max min sqrt rsqrt pow integer_pow exp log abs sign select_n "
    "convert_element_type copy square".split())
