"""Each stage's intra-op plan: the ``ShardParallel`` solver on the stage's own work.

A stage's forward and backward for one micro-batch form a function of the values it reads
(parameters and other per-step values, per-example activations); the solver picks the
stage's ``("data", "model")`` sub-mesh shape and a ``PartitionSpec`` per parameter, exactly as
it does for a whole step. Per-example values stay split over ``"data"`` between tasks.
"""
from __future__ import annotations

import jax
from jax.sharding import PartitionSpec

from parallel.pipeline._program import Program, Regions, evaluate
from parallel.pipeline._stages import Placement


def stage_plan(program: Program, regions: Regions, placement: Placement, stage: int,
               num_devices: int, profile) -> tuple[dict[str, int], dict[int, PartitionSpec]]:
    """The solver's sub-mesh shape for ``stage``, the specs of the per-step values it reads and
    of the values it hands out of the micro-batch region.

    Returns:
      ``(mesh_shape, {value id: spec})``.
    """
    from parallel.auto import solve  # the solver is heavy to import; only pipelines need it here

    ops = [i for i, (s, p) in enumerate(zip(placement.stage, placement.phase))
           if s == stage and p in ("F", "B")]
    made = {v for i in ops for v in program.ops[i].outputs}
    reads = list(dict.fromkeys(v for i in ops for v in program.ops[i].value_inputs()
                               if v not in made))
    per_step = [v for v in reads if v not in regions.batch_dim]
    per_example = [v for v in reads if v in regions.batch_dim]
    results = [v for v in dict.fromkeys(v for i in ops for v in program.ops[i].outputs)
               if v in regions.crossing]
    stage_ops = [program.ops[i] for i in ops]

    def micro_batch_work(state, batch):
        env = dict(zip(per_step, state))
        env.update(zip(per_example, batch))
        for op in stage_ops:  # markers are identities; the solver need not know them
            if op.is_marker:
                env.update(zip(op.outputs, (env[v] for v in op.inputs)))
            else:
                evaluate([op], env)
        return tuple(env[v] for v in results)

    def abstract(vs):
        return tuple(jax.ShapeDtypeStruct(program.avals[v].shape, program.avals[v].dtype)
                     for v in vs)

    solution = solve(micro_batch_work, (abstract(per_step), abstract(per_example)),
                     num_devices=num_devices, profile=profile, donate_argnums=(),
                     batch_argnums=(1,))
    specs = dict(zip(per_step, solution.best.input_specs[:len(per_step)]))
    # The values the stage hands out of the micro-batch region (gradients): their accumulators
    # take the layout the solver gives them, not a replicated one.
    specs.update(zip(results, solution.best.output_specs))
    return solution.mesh_shape, specs
