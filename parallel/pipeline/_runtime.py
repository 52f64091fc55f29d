"""Runs a placed program: one jitted program per task on its stage's sub-mesh, a static schedule
issued from Python (asynchronous dispatch overlaps the stages), ``jax.device_put`` between
sub-meshes, and gradient accumulation over micro-batches."""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from parallel._transfer import transfer
from parallel.pipeline._program import Program, Regions, evaluate
from parallel.pipeline._schedule import issue_order
from parallel.pipeline._stages import Placement

# Compiled task programs, shared by every pipelined step of the process: the same stage of the
# same step with the same shardings (another schedule, another ParallelStep) compiles once.
_PROGRAMS: dict[str, Any] = {}


@dataclasses.dataclass
class Task:
    """Operations run together as one jitted program on one stage.

    Attributes:
      key: ``("N", stage)``, ``("F", stage)``, ``("B", stage)`` or ``("A", level, stage)``.
      stage: the stage whose sub-mesh runs it.
      ops: op indices in program order.
      inputs: value ids read (made elsewhere).
      outputs: value ids made here and read elsewhere.
    """

    key: tuple
    stage: int
    ops: list[int]
    inputs: list[int]
    outputs: list[int]


def build_tasks(program: Program, regions: Regions, placement: Placement,
                remat: bool = False) -> dict[tuple, Task]:
    """Groups operations into tasks and finds what each one reads and hands on.

    With ``remat``, a stage's backward task recomputes the forward operations whose results it
    reads, so the forward task hands on only what the next stages and the update need.
    """
    groups: dict[tuple, list[int]] = {}
    for i, phase in enumerate(placement.phase):
        s = placement.stage[i]
        key = ("A", placement.level[i], s) if phase == "A" else (phase, s)
        groups.setdefault(key, []).append(i)
    made_in = {}
    for key, ops in groups.items():
        for i in ops:
            for v in program.ops[i].outputs:
                made_in[v] = key
    recomputed: dict[tuple, set[int]] = {}
    if remat:
        for key in [k for k in groups if k[0] == "B"]:
            forward = ("F", key[1])
            wanted = {v for i in groups[key] for v in program.ops[i].value_inputs()
                      if made_in.get(v) == forward}
            again = []
            for i in reversed(groups.get(forward, [])):
                if any(v in wanted for v in program.ops[i].outputs):
                    again.append(i)
                    wanted.update(program.ops[i].value_inputs())
            groups[key] = sorted(again) + groups[key]
            recomputed[key] = {v for i in again for v in program.ops[i].outputs}
    read_elsewhere: set[int] = {v for v in program.outputs if isinstance(v, int)}
    read_elsewhere.update(regions.crossing)
    tasks = {}
    for key, ops in groups.items():
        inputs = []
        own = {v for i in ops for v in program.ops[i].outputs}
        for i in ops:
            for v in program.ops[i].value_inputs():
                if v not in own:
                    inputs.append(v)
                    read_elsewhere.add(v)
        tasks[key] = Task(key, placement.stage[ops[0]], ops, list(dict.fromkeys(inputs)), [])
    for key, task in tasks.items():
        again = recomputed.get(key, set())
        task.outputs = [v for i in task.ops for v in program.ops[i].outputs
                        if v in read_elsewhere and v not in again]
    return tasks


def _canonical(program: Program, task: Task, in_shardings, out_shardings) -> str:
    local = {v: k for k, v in enumerate(task.inputs)}
    lines = [str([(program.avals[v].str_short(), s.spec, tuple(d.id for d in s.mesh.devices.flat))
                  for v, s in zip(task.inputs, in_shardings)])]
    for i in task.ops:
        op = program.ops[i]
        for v in op.outputs:
            local.setdefault(v, len(local))
        args = [local[a] if isinstance(a, int) else repr(a.val) for a in op.inputs]
        params = sorted((k, str(p)) for k, p in op.params.items())
        lines.append(f"{op.prim.name} {args} {[local[v] for v in op.outputs]} {params}")
    lines.append(str([(local[v], s.spec) for v, s in zip(task.outputs, out_shardings)]))
    return "\n".join(lines)


class StageRunner:
    """Executes the tasks of a placed program on the stage meshes, per a schedule.

    Args:
      program: the step flattened (traced on one micro-batch).
      regions: its regions.
      placement: where each op runs.
      meshes: one ``Mesh`` (axis ``"data"``) per stage.
      num_micro_batches: micro-batches per step.
      schedule: ``"1f1b"`` or ``"gpipe"``.
      output_stage: per flat output leaf, the stage it is returned on.
      remat: backward tasks recompute their stage's forward.
      specs: per stage, value id -> spec the stage's intra-op plan gives it (parameters).
      same_as: value id -> input value id it replaces (the new state takes the old's layout).
    """

    def __init__(self, program: Program, regions: Regions, placement: Placement,
                 meshes: list[Mesh], num_micro_batches: int, schedule: str,
                 output_stage: list[int], remat: bool = False,
                 specs: dict[int, dict[int, PartitionSpec]] | None = None,
                 same_as: dict[int, int] | None = None):
        self.program, self.regions, self.placement = program, regions, placement
        self.meshes = meshes
        self.num_micro_batches = num_micro_batches
        self.schedule = schedule
        self.output_stage = output_stage
        self.specs = specs or {}
        self.same_as = same_as or {}
        self.tasks = build_tasks(program, regions, placement, remat)
        self.order = issue_order(schedule, placement.num_stages, num_micro_batches)
        self.per_micro_batch = {v for i, p in enumerate(placement.phase) if p in "FB"
                                for v in program.ops[i].outputs}
        self.batch_inputs = [v for v in program.inputs if v in regions.batch_dim]
        self.per_micro_batch.update(self.batch_inputs)
        self.crossing = set(regions.crossing)
        self._const_cache: dict[tuple[int, int], Any] = {}
        self._jitted: dict[tuple, Any] = {}
        uses: dict[int, int] = {}
        for key, task in self.tasks.items():
            if key[0] in "FB":
                for v in task.inputs:
                    if v in self.per_micro_batch:
                        uses[v] = uses.get(v, 0) + 1
        self._uses = uses
        # XLA's CPU client runs the collectives of simulated devices on a shared thread pool:
        # many multi-device programs in flight at once can starve a rendezvous until XLA aborts
        # the process. Simulated devices share the host's cores and cannot overlap anyway, so
        # on CPUs each task finishes before the next is issued.
        self.synchronous = meshes[0].devices.flat[0].platform == "cpu"
        # Set to a list to record, per stage, the most bytes per device of per-micro-batch values
        # (activations and their gradients) alive at once during a step.
        self.peak_live_bytes: list[int] | None = None

    # ----- shardings ------------------------------------------------------------------------
    def spec(self, v: int, stage: int) -> PartitionSpec:
        """The stage's intra-op spec for parameters; per-example values split their batch
        dimension over the stage's ``data`` axis; everything else replicated."""
        v = self.same_as.get(v, v)
        planned = self.specs.get(stage, {}).get(v)
        if planned is not None:
            return planned
        dim = self.regions.batch_dim.get(v)
        size = self.meshes[stage].shape.get("data", 1)
        shape = self.program.avals[v].shape
        if dim is None or size == 1 or v in self.crossing or shape[dim] % size:
            return PartitionSpec()
        return PartitionSpec(*([None] * dim), "data")

    def sharding(self, v: int, stage: int) -> NamedSharding:
        return NamedSharding(self.meshes[stage], self.spec(v, stage))

    def jitted(self, key: tuple):
        """The jitted program of one task (built once, shared across identical tasks)."""
        if key not in self._jitted:
            task = self.tasks[key]
            ops = [self.program.ops[i] for i in task.ops]
            in_sh = [self.sharding(v, task.stage) for v in task.inputs]
            out_sh = [self.sharding(v, task.stage) for v in task.outputs]
            canon = _canonical(self.program, task, in_sh, out_sh)
            if canon not in _PROGRAMS:
                inputs, outputs = list(task.inputs), list(task.outputs)

                def run(*args, ops=ops, inputs=inputs, outputs=outputs):
                    env = dict(zip(inputs, args))
                    evaluate(ops, env)
                    return tuple(env[v] for v in outputs)

                _PROGRAMS[canon] = jax.jit(run, in_shardings=tuple(in_sh),
                                           out_shardings=tuple(out_sh))
            self._jitted[key] = _PROGRAMS[canon]
        return self._jitted[key]

    def abstract_inputs(self, key: tuple) -> list:
        task = self.tasks[key]
        return [jax.ShapeDtypeStruct(self.program.avals[v].shape, self.program.avals[v].dtype,
                                     sharding=self.sharding(v, task.stage),
                                     weak_type=getattr(self.program.avals[v], "weak_type", False))
                for v in task.inputs]

    def _record_live(self, micro) -> None:
        live = [0] * len(self.meshes)
        for table in micro:
            for copies in table.values():
                for stage, x in copies.items():
                    live[stage] += _per_device_bytes(x)
        self.peak_live_bytes = [max(a, b) for a, b in zip(self.peak_live_bytes, live)]

    # ----- one step -------------------------------------------------------------------------
    def __call__(self, flat_args: list) -> list:
        program, placement, m = self.program, self.placement, self.num_micro_batches
        step: dict[int, dict[int, Any]] = {}
        for v, arg in zip(program.inputs, flat_args):
            if v not in self.regions.batch_dim:
                step[v] = {placement.home[v]: arg}
        micro: list[dict[int, dict[int, Any]]] = [{} for _ in range(m)]
        for v, arg in zip(program.inputs, flat_args):
            if v in self.regions.batch_dim:
                for i, piece in enumerate(_split(arg, m, self.sharding(v, placement.home[v]))):
                    micro[i][v] = {placement.home[v]: piece}
        uses = [dict(self._uses) for _ in range(m)]

        def get(v: int, stage: int, i: int | None):
            table = micro[i] if i is not None and v in self.per_micro_batch else step
            if v not in table:  # a closed-over constant
                if (v, stage) not in self._const_cache:
                    self._const_cache[(v, stage)] = jax.device_put(
                        program.consts[v], self.sharding(v, stage))
                return self._const_cache[(v, stage)]
            copies = table[v]
            if stage not in copies:
                copies[stage] = transfer(next(iter(copies.values())), self.sharding(v, stage))
            return copies[stage]

        def run(key: tuple, i: int | None):
            task = self.tasks[key]
            args = [get(v, task.stage, i) for v in task.inputs]
            outs = self.jitted(key)(*args)
            if self.synchronous:
                jax.block_until_ready(outs)
            return task, outs

        for key in sorted(k for k in self.tasks if k[0] == "N"):
            task, outs = run(key, None)
            for v, x in zip(task.outputs, outs):
                step[v] = {task.stage: x}
        sums: dict[int, Any] = {}
        for kind, stage, i in self.order:
            if (kind, stage) not in self.tasks:
                continue
            task, outs = run((kind, stage), i)
            for v, x in zip(task.outputs, outs):
                if v in self.crossing:
                    sums[v] = x.astype(_acc_dtype(x.dtype)) if v not in sums else _add(sums[v], x)
                if v in self._uses or v not in self.crossing:
                    micro[i][v] = {task.stage: x}
            for v in task.inputs:
                if v in uses[i]:
                    uses[i][v] -= 1
                    if uses[i][v] == 0:
                        micro[i].pop(v, None)
            if self.peak_live_bytes is not None:
                self._record_live(micro)
        for v, total in sums.items():
            dtype = program.avals[v].dtype
            step[v] = {placement.value_stage[v]: _mean(total, m, dtype)}
        for key in sorted((k for k in self.tasks if k[0] == "A"), key=lambda k: (k[1], k[2])):
            task, outs = run(key, None)
            for v, x in zip(task.outputs, outs):
                step[v] = {task.stage: x}
        results = []
        for v, stage in zip(program.outputs, self.output_stage):
            if isinstance(v, int):
                results.append(get(v, stage, None))
            else:
                results.append(jax.device_put(jnp.asarray(v.val),
                                              NamedSharding(self.meshes[stage], PartitionSpec())))
        return results


def _per_device_bytes(x) -> int:
    shard = x.addressable_shards[0].data
    return int(shard.size * shard.dtype.itemsize)


def _acc_dtype(dtype):
    return jnp.float32 if jnp.finfo(dtype).bits < 32 else dtype


@jax.jit
def _add(total, x):
    return total + x.astype(total.dtype)


def _mean(total, m: int, dtype):
    return _scale(total, np.float32(1.0 / m), np.dtype(dtype).name)


@functools.partial(jax.jit, static_argnums=2)
def _scale(total, factor, dtype):
    return (total * factor.astype(total.dtype)).astype(dtype)


def _split(x, m: int, sharding: NamedSharding) -> list:
    """The ``m`` micro-batches of a global batch leaf (leading dimension), on ``sharding``."""
    x = x if isinstance(x, jax.Array) else jnp.asarray(x)
    if x.shape[0] % m:
        raise ValueError(f"batch leaf of shape {x.shape} does not split into {m} micro-batches")
    return list(_splitter(m, sharding)(x))


_SPLITTERS: dict = {}


def _splitter(m: int, sharding: NamedSharding):
    key = (m, sharding)
    if key not in _SPLITTERS:
        def split(x):
            b = x.shape[0] // m
            return tuple(jax.lax.slice_in_dim(x, i * b, (i + 1) * b) for i in range(m))

        _SPLITTERS[key] = jax.jit(split, out_shardings=(sharding,) * m)
    return _SPLITTERS[key]
