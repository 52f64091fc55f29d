"""A step with no backward pass (evaluation) run on a training pipeline's stages.

The state stays where training keeps it: each leaf on its stage's devices in its stage's
layout. The step is traced on one micro-batch like a training step, and each operation runs on
the latest stage among those of its inputs (a state leaf's stage, or the stage that made a
value), so values only move forward through the stages; values read by no state leaf (the
batch, constants) go to the first stage that reads them. Micro-batches stream through the
stages forward only (``schedule="forward"``): a stage holds one micro-batch's activations at a
time, never the whole model.
"""
from __future__ import annotations

import math
from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec

from parallel._errors import PlanError
from parallel._transfer import place_outputs
from parallel.pipeline._regions import split_regions
from parallel.pipeline._runtime import StageRunner
from parallel.pipeline._stages import Placement
from parallel.pipeline._trace import trace_step
from parallel.plan import LeafPlan, Plan

INF = math.inf


def place_forward(program, regions, fixed: dict[int, int], num_stages: int) -> Placement:
    """Places every operation of a program without backward pass.

    Args:
      fixed: input value id -> stage, for the inputs that already live on a stage (state).
      num_stages: stages (virtual ones included).
    """
    ops = program.ops
    stage_of: dict[int, int] = dict(fixed)
    stage: list[float] = [INF] * len(ops)
    for i, op in enumerate(ops):
        placed = [stage_of[v] for v in op.value_inputs() if v in stage_of]
        if placed:
            stage[i] = max(placed)
            for v in op.outputs:
                stage_of[v] = int(stage[i])
    readers: dict[int, list[int]] = {}
    for i, op in enumerate(ops):
        for v in op.value_inputs():
            readers.setdefault(v, []).append(i)
    for i in range(len(ops) - 1, -1, -1):  # free operations: the first stage reading them
        if stage[i] == INF:
            later = [stage[r] for v in ops[i].outputs for r in readers.get(v, ())]
            stage[i] = min([s for s in later if s != INF], default=0)
            for v in ops[i].outputs:
                stage_of[v] = int(stage[i])
    stages = [int(s) for s in stage]
    phase, level = [""] * len(ops), [0] * len(ops)
    a_level: dict[int, int] = {}
    value_stage: dict[int, int] = {}
    for i, op in enumerate(ops):
        region = regions.region[i]
        phase[i] = "F" if region == "M" else region
        if region == "A":
            level[i] = max((a_level[v] + (value_stage[v] != stages[i])
                            for v in op.value_inputs() if v in a_level), default=0)
            for v in op.outputs:
                a_level[v] = level[i]
        for v in op.outputs:
            value_stage[v] = stages[i]
    home = {}
    for v in program.inputs:
        if v in fixed:
            home[v] = fixed[v]
        else:
            home[v] = min((stages[r] for r in readers.get(v, ())), default=0)
        value_stage[v] = home[v]
    return Placement(num_stages, stages, phase, level, home, value_stage)


class ForwardStep:
    """A step without backward pass on the stages of a ``PipelinedStep``: called like the
    function; ``plan``, ``mesh``, ``in_shardings`` and ``out_shardings`` as ``parallelize``
    needs them.

    Args:
      train: the pipelined training step whose state layout is followed.
      fn: the step, e.g. ``eval_step(state, batch) -> metrics``.
      abstract_args: its arguments (``jax.ShapeDtypeStruct`` leaves); an argument with the same
        structure and shapes as the training step's argument at the same position (the state)
        stays where training keeps it.
      batch_argnums, donate_argnums: as for ``parallelize``.
    """

    def __init__(self, train, fn, abstract_args, batch_argnums, donate_argnums):
        m = train.runner.num_micro_batches
        sizes = {leaf.shape[0] for i in batch_argnums for leaf in jax.tree.leaves(abstract_args[i])
                 if leaf.shape}
        if len(sizes) == 1 and sizes.pop() % m:
            m = 1  # a batch the training micro-batches do not divide runs whole
        traced = trace_step(fn, abstract_args, batch_argnums, m)
        out_paths, _ = jax.tree_util.tree_flatten_with_path(jax.eval_shape(fn, *abstract_args))
        names = [f"output{jax.tree_util.keystr(path)}" for path, _ in out_paths]
        program, regions = split_regions(traced, m, names)
        trained = train.flat_in_shardings
        train_args = train.abstract_args
        fixed, specs = {}, {}
        offset = 0
        for k, arg in enumerate(abstract_args):
            n = len(jax.tree.leaves(arg))
            if k not in batch_argnums and k < len(train_args) and _same(arg, train_args[k]):
                t_offset = sum(len(jax.tree.leaves(a)) for a in train_args[:k])
                for j in range(n):
                    v = program.inputs[offset + j]
                    s = train.runner.placement.home[train.runner.program.inputs[t_offset + j]]
                    fixed[v] = s
                    specs.setdefault(s, {})[v] = trained[t_offset + j].spec
            offset += n
        runner = train.runner
        placement = place_forward(program, regions, fixed, runner.placement.num_stages)
        output_stage = [placement.value_stage.get(v, 0) if isinstance(v, int) else 0
                        for v in program.outputs]
        self.runner = StageRunner(program, regions, placement, runner.meshes, m, "forward",
                                  output_stage, specs=specs,
                                  virtual_stages=runner.virtual_stages)
        self.runner.donated = set()
        flat_in = [self.runner.batch_sharding(v, placement.home[v])
                   if v in regions.batch_dim else self.runner.sharding(v, placement.home[v])
                   for v in program.inputs]
        in_treedef = jax.tree.structure(tuple(abstract_args))
        self.in_treedef, self.flat_in_shardings = in_treedef, flat_in
        self.in_shardings = tuple(jax.tree.unflatten(in_treedef, flat_in))
        out = jax.eval_shape(fn, *abstract_args)
        self.out_treedef = jax.tree.structure(out)
        self.flat_out_shardings = [
            self.runner.sharding(v, s) if isinstance(v, int)
            and not (v in regions.crossing and regions.combine.get(v) == "concat")
            else NamedSharding(runner.meshes[s], PartitionSpec())
            for v, s in zip(program.outputs, output_stage)]
        self.out_shardings = jax.tree.unflatten(self.out_treedef, self.flat_out_shardings)
        self.mesh = train.mesh
        inputs, k = [], 0
        for arg in abstract_args:
            flat, _ = jax.tree_util.tree_flatten_with_path(arg)
            inputs.append(tuple(LeafPlan(jax.tree_util.keystr(kp), tuple(leaf.shape),
                                         str(leaf.dtype), flat_in[k + j].spec)
                                for j, (kp, leaf) in enumerate(flat)))
            k += len(flat)
        out_flat, _ = jax.tree_util.tree_flatten_with_path(out)
        outputs = tuple(LeafPlan(jax.tree_util.keystr(kp), tuple(leaf.shape), str(leaf.dtype),
                                 sh.spec) for (kp, leaf), sh in zip(out_flat, self.flat_out_shardings))
        self.plan = Plan("pipeshard", dict(train.plan.mesh_shape), tuple(inputs), outputs,
                         batch_argnums=tuple(batch_argnums), donate_argnums=tuple(donate_argnums),
                         extras={"schedule": "forward", "num_micro_batches": m,
                                 "follows": "the training pipeline's stages"})

    def __call__(self, *args):
        flat, treedef = jax.tree.flatten(tuple(args))
        if treedef != self.in_treedef:
            raise PlanError(f"arguments have structure {treedef}, the plan was made for "
                            f"{self.in_treedef}")
        placed = place_outputs(self.runner(flat), self.flat_out_shardings, self.mesh)
        return jax.tree.unflatten(self.out_treedef, placed)

    def lower(self, *args):
        raise PlanError("a pipelined step is one program per stage and task, not one lowered "
                        "program")


def _same(a: Any, b: Any) -> bool:
    """Same tree structure, shapes and dtypes."""
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    return ta == tb and all(x.shape == y.shape and x.dtype == y.dtype for x, y in zip(la, lb))
