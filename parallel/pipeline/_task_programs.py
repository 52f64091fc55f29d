"""The jitted programs of a ``StageRunner``: per task (and per stage, the batch split and the
accumulators' creation and finish), their abstract arguments with shardings, donation, body and a
content key under which identical programs compile once per process. Mixed into
``StageRunner``, which sets the attributes these read."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from parallel.pipeline._layouts import StageLayouts, global_shape
from parallel.pipeline._program import evaluate
from parallel.pipeline._tasks import add_to, combine_of, finalize

# Compiled task programs, shared by every pipelined step of the process: the same stage of the
# same step with the same shardings (another schedule, another ParallelStep) compiles once.
_PROGRAMS: dict[str, Any] = {}


class TaskPrograms(StageLayouts):
    """Builds and caches the programs a ``StageRunner`` issues; see it for the fields."""

    # ----- programs -------------------------------------------------------------------------
    def _signature(self, key: tuple) -> tuple[list, list, list[int]]:
        """Abstract arguments (with shardings), output shardings and donated positions."""
        if key[0] == "split":
            stage = key[1]
            args = [jax.ShapeDtypeStruct(global_shape(self._aval(v), self.num_micro_batches),
                                         self.program.avals[v].dtype,
                                         sharding=self.batch_sharding(v, stage))
                    for v in self._splits[stage]]
            outs = [self.sharding(v, stage) for v in self._splits[stage]] * self.num_micro_batches
            return args, outs, []
        if key[0] in ("zeros", "finish"):
            stage, accs = key[1], self._accs[key[1]]
            acc_args = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=self._acc_sharding(a, stage))
                        for a in accs]
            if key[0] == "zeros":
                return [], [a.sharding for a in acc_args], []
            outs = [self._finished_sharding(v, stage) for v in self._finished[stage]]
            return acc_args, outs, _aliasable(acc_args, [
                (self._finished_shape(v), self.program.avals[v].dtype, s)
                for v, s in zip(self._finished[stage], outs)])
        task = self.tasks[key]
        per_step = key[0] in "NLA"
        args = [jax.ShapeDtypeStruct(a.shape, a.dtype, weak_type=a.weak_type,
                                     sharding=self.input_sharding(v, task.stage, per_step))
                for v, a in ((v, self._aval(v, per_step)) for v in task.inputs)]
        outs = [self.sharding(v, task.stage) for v in task.outputs]
        donate: list[int] = []
        if task.accumulates:
            first = len(args)
            args += [jax.ShapeDtypeStruct(a.shape, a.dtype,
                                          sharding=self._acc_sharding(a, task.stage))
                     for a in task.accumulates]
            outs += [a.sharding for a in args[first:]]
            donate = list(range(first, len(args)))
            if any(a.kind == "concat" for a in task.accumulates):
                args.append(jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(
                    self.meshes[task.stage], PartitionSpec())))
        elif key[0] in "NLA":
            dead = [k for k, v in enumerate(task.inputs) if self._dies_in(v, key)]
            candidates = [args[k] for k in dead]
            alias = _aliasable(candidates, [(self.program.avals[v].shape,
                                             self.program.avals[v].dtype, s)
                                            for v, s in zip(task.outputs, outs)])
            donate = [dead[k] for k in alias]
        return args, outs, donate

    def _dies_in(self, v: int, key: tuple) -> bool:
        """Whether per-step task ``key`` is the last reader of ``v``, on ``v``'s own stage, and
        ``v`` may be overwritten (a donated argument or a value made during the step)."""
        if v in self._output_ids or v in self.per_micro_batch:
            return False
        if v in self.program.inputs and v not in self.donated:
            return False
        if v not in self.program.inputs and v not in self.placement.value_stage:
            return False  # a constant
        readers = [k for k, t in self.tasks.items() if v in t.inputs]
        rank = {k: rank_of(k) for k in readers}
        last = max(readers, key=rank.get)
        return (last == key and sum(rank[k] == rank[key] for k in readers) == 1
                and self.tasks[key].stage == self.placement.value_stage.get(v))

    def jitted(self, key: tuple):
        """The jitted program of a task (or of a split, zeros or finish step), built once and
        shared across identical ones."""
        if key in self._jitted:
            return self._jitted[key]
        args, outs, donate = self._signature(key)
        canon = self._canonical(key, args, outs, donate)
        if canon not in _PROGRAMS:
            _PROGRAMS[canon] = jax.jit(self._body(key), in_shardings=tuple(a.sharding for a in args),
                                       out_shardings=tuple(outs), donate_argnums=tuple(donate))
        self._jitted[key] = _PROGRAMS[canon]
        return self._jitted[key]

    def _body(self, key: tuple):
        m, regions = self.num_micro_batches, self.regions
        if key[0] == "split":
            def split(*leaves):
                pieces = [jnp.split(x, m) for x in leaves]
                return tuple(p[i] for i in range(m) for p in pieces)
            return split
        if key[0] in ("zeros", "finish"):
            accs, finished = self._accs[key[1]], self._finished[key[1]]
            if key[0] == "zeros":
                return lambda: tuple(jnp.zeros(a.shape, a.dtype) for a in accs)

            def finish(*totals):
                raw = {(a.value, a.kind): t for a, t in zip(accs, totals)}
                return tuple(finalize(regions, v, raw, m, self.program.avals[v].dtype)
                             for v in finished)
            return finish
        task = self.tasks[key]
        ops = [self.program.ops[i] for i in task.ops]
        inputs, outputs, accs = list(task.inputs), list(task.outputs), list(task.accumulates)
        per_step = key[0] in "NLA"
        moved = {k: self.sharding(v, task.stage) for k, v in enumerate(inputs)
                 if self.input_sharding(v, task.stage, per_step) != self.sharding(v, task.stage)}

        def run(*args):
            env = {v: jax.lax.with_sharding_constraint(x, moved[k]) if k in moved else x
                   for k, (v, x) in enumerate(zip(inputs, args))}
            evaluate(ops, env)
            totals = args[len(inputs):len(inputs) + len(accs)]
            index = args[-1] if len(args) > len(inputs) + len(accs) else None
            return tuple(env[v] for v in outputs) + tuple(
                add_to(a, t, env, index) for a, t in zip(accs, totals))
        return run

    def _canonical(self, key: tuple, args, outs, donate) -> str:
        head = [key[0] if key[0] in ("split", "zeros", "finish") else "task",
                [(a.shape, str(a.dtype), a.sharding.spec, _devices(a.sharding)) for a in args],
                [(s.spec, _devices(s)) for s in outs], donate]
        if key[0] == "split":
            return str(head + [self.num_micro_batches])
        if key[0] == "zeros":  # the shapes are in no argument: name them
            return str(head + [[(a.shape, str(a.dtype)) for a in self._accs[key[1]]]])
        if key[0] == "finish":
            return str(head + [[(a.kind, a.value, a.weight) for a in self._accs[key[1]]],
                               [(v, combine_of(self.regions, v)) for v in self._finished[key[1]]],
                               self.num_micro_batches, id(self.program)])
        task = self.tasks[key]
        local = {v: k for k, v in enumerate(task.inputs)}
        lines = [str(head)]
        for i in task.ops:
            op = self.program.ops[i]
            for v in op.outputs:
                local.setdefault(v, len(local))
            operands = [local[a] if isinstance(a, int) else repr(a.val) for a in op.inputs]
            params = sorted((k, str(p)) for k, p in op.params.items())
            lines.append(f"{op.prim.name} {operands} {[local[v] for v in op.outputs]} {params}")
        lines.append(str([local[v] for v in task.outputs]))
        lines.append(str([(local[a.value], a.kind, local.get(a.weight), a.axis)
                          for a in task.accumulates]))
        return "\n".join(lines)

    def abstract_inputs(self, key: tuple) -> list:
        """The abstract arguments of a task's program, with their shardings."""
        return self._signature(key)[0]


def rank_of(key: tuple) -> tuple:
    """Execution order of tasks: per-step work, every micro-batch task, the per-step work only
    the update reads, then the update level by level."""
    if key[0] == "N":
        return (0, key[1], 0)
    if key[0] == "L":
        return (2, -1, key[1])
    if key[0] == "A":
        return (2, key[1], key[2])
    return (1, 0, 0)


def _aliasable(args: list, outputs: list[tuple]) -> list[int]:
    """Positions in ``args`` whose buffer an output of the same shape, dtype and sharding can
    take (each output at most once)."""
    free = list(outputs)
    chosen = []
    for k, a in enumerate(args):
        for j, (shape, dtype, sharding) in enumerate(free):
            if tuple(a.shape) == tuple(shape) and a.dtype == dtype and a.sharding == sharding:
                chosen.append(k)
                del free[j]
                break
    return chosen


def _devices(sharding) -> tuple:
    """Where a sharding's spec applies: the mesh's axes, their sizes and its devices (the same
    spec on the same devices is another layout on a mesh of another shape)."""
    mesh = sharding.mesh
    return tuple(mesh.shape.items()), tuple(d.id for d in mesh.devices.flat)
