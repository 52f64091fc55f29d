"""Tasks of a placed program: the operations one jitted program runs on one stage, what it reads
and hands on, and how the values leaving the micro-batch region accumulate inside it."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from parallel._errors import PlanError
from parallel.pipeline._program import Program, Regions
from parallel.pipeline._stages import Placement

# How a value leaving the micro-batch region (``Regions.crossing``) combines over micro-batches
# (``Regions.combine``; a value not named there is a mean).
COMBINES = ("mean", "sum", "concat", "weighted")


@dataclasses.dataclass
class Task:
    """Operations run together as one jitted program on one stage.

    Attributes:
      key: ``("N", stage)`` (per-step work before the micro-batches), ``("F", stage)``,
        ``("B", stage)``, ``("L", stage)`` (per-step work only the update reads, after the
        micro-batches) or ``("A", level, stage)`` (the update).
      stage: the stage whose sub-mesh runs it.
      ops: op indices in program order.
      inputs: value ids read (made elsewhere).
      outputs: value ids made here and read elsewhere (by another task, or the step's output).
      accumulates: accumulators this task adds its micro-batch's contribution to (F and B).
    """

    key: tuple
    stage: int
    ops: list[int]
    inputs: list[int]
    outputs: list[int]
    accumulates: list["Accumulator"] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class Accumulator:
    """A running total over micro-batches, an input and a donated output of the task adding to it.

    Attributes:
      value: the crossing value id added each micro-batch.
      kind: ``"sum"`` (of the value), ``"wsum"`` (of the value times ``weight``), ``"weight"``
        (the sum of a weight, beside a ``"wsum"``) or ``"concat"`` (the value written at its
        micro-batch's rows of a global-batch buffer).
      weight: for ``"wsum"``, the value id of the weight.
      axis: for ``"concat"``, the batch dimension.
      shape, dtype: the accumulator's.
    """

    value: int
    kind: str
    weight: int | None
    axis: int | None
    shape: tuple
    dtype: np.dtype


def combine_of(regions: Regions, v: int):
    """``"mean"``, ``"sum"``, ``"concat"`` or ``("weighted", w)`` for crossing value ``v``."""
    return regions.combine.get(v, "mean")


def primary_kind(how) -> str:
    """The accumulator kind a combine finishes from."""
    if isinstance(how, tuple):
        return "wsum"
    return "concat" if how == "concat" else "sum"


def accumulator_dtype(dtype) -> np.dtype:
    """Floats narrower than 32 bits add up in float32; booleans as int32; the rest as they are."""
    dtype = np.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating):
        return np.dtype(np.float32) if jnp.finfo(dtype).bits < 32 else dtype
    if dtype == np.bool_:
        return np.dtype(np.int32)
    return dtype


def accumulators(program: Program, regions: Regions, num_micro_batches: int,
                 made_by: dict[int, tuple]) -> dict[tuple, list[Accumulator]]:
    """Per F/B task key, the accumulators it adds to, from each crossing value's combine.

    A weighted mean's task also sums the weights (``"weight"``); a weight made by another task
    is handed to it each micro-batch (``weights_read``).

    Raises:
      PlanError: an unknown combine, or a non-float value averaged.
    """
    out: dict[tuple, list[Accumulator]] = {}
    have: set[tuple] = set()

    def add(key, acc):
        if (key, acc.value, acc.kind) not in have:
            have.add((key, acc.value, acc.kind))
            out.setdefault(key, []).append(acc)

    for v in regions.crossing:
        key = made_by[v]
        aval = program.avals[v]
        how = combine_of(regions, v)
        mode = how[0] if isinstance(how, tuple) else how
        if mode not in COMBINES:
            raise PlanError(f"combine {how!r} for a value of shape {aval.shape}: use one of "
                            f"{', '.join(COMBINES)}")
        inexact = jnp.issubdtype(aval.dtype, jnp.inexact)
        if mode in ("mean", "weighted") and not inexact:
            raise PlanError(f"a value of dtype {aval.dtype} and shape {aval.shape} leaves the "
                            f"per-micro-batch computation as a {mode}, which needs floating "
                            f"point: compute it as a float, or combine it as a sum")
        if mode == "concat":
            axis = regions.batch_dim.get(v, 0)
            shape = list(aval.shape)
            shape[axis] *= num_micro_batches
            add(key, Accumulator(v, "concat", None, axis, tuple(shape), np.dtype(aval.dtype)))
            continue
        dtype = accumulator_dtype(aval.dtype)
        if mode == "weighted":
            w = how[1]
            if program.avals[w].shape != ():
                raise PlanError(f"a value of shape {aval.shape} is a mean weighted by a value of "
                                f"shape {program.avals[w].shape}; the weight must be a scalar "
                                f"per micro-batch")
            add(key, Accumulator(v, "wsum", w, None, tuple(aval.shape), dtype))
            add(key, Accumulator(w, "weight", None, None, (),
                                 accumulator_dtype(program.avals[w].dtype)))
        else:
            add(key, Accumulator(v, "sum", None, None, tuple(aval.shape), dtype))
    return out


def weights_read(tasks: dict[tuple, "Task"], made_by: dict[int, tuple]) -> list[tuple]:
    """``(task key, weight id)`` for weights a task sums but does not make."""
    return [(key, a.value) for key, task in tasks.items() for a in task.accumulates
            if a.kind == "weight" and made_by.get(a.value) != key]


def finalize(regions: Regions, v: int, raw: dict[tuple, jax.Array], num_micro_batches: int,
             dtype) -> jax.Array:
    """The step's value of crossing value ``v`` from the raw accumulators (traced)."""
    how = combine_of(regions, v)
    if how == "concat":
        return raw[(v, "concat")]
    if isinstance(how, tuple):
        total = raw[(v, "wsum")] / raw[(how[1], "weight")].astype(raw[(v, "wsum")].dtype)
    elif how == "sum":
        total = raw[(v, "sum")]
    else:
        total = raw[(v, "sum")] * np.asarray(1.0 / num_micro_batches, raw[(v, "sum")].dtype)
    return total.astype(dtype)


def add_to(acc: Accumulator, total, env: dict, index):
    """``total`` plus this micro-batch's contribution (traced inside the task's program)."""
    x = env[acc.value]
    if acc.kind == "concat":
        size = x.shape[acc.axis]
        return jax.lax.dynamic_update_slice_in_dim(total, x.astype(total.dtype), index * size,
                                                   acc.axis)
    if acc.kind == "wsum":
        x = x * env[acc.weight]
    return total + x.astype(total.dtype)


def build_tasks(program: Program, regions: Regions, placement: Placement,
                remat: bool = False) -> dict[tuple, Task]:
    """Groups operations into tasks and finds what each one reads and hands on.

    With ``remat``, a stage's backward task recomputes the forward operations whose results it
    reads, so the forward task hands on only what the next stages and the update need. A
    crossing value is handed on only if another micro-batch task reads it; the rest of its
    uses read its accumulator.
    """
    early = _needed_by_micro_batches(program, placement)
    groups: dict[tuple, list[int]] = {}
    for i, phase in enumerate(placement.phase):
        s = placement.stage[i]
        if phase == "A":
            key = ("A", placement.level[i], s)
        elif phase == "N" and i not in early:
            key = ("L", s)  # per-step work only the update reads: run after the micro-batches
        else:
            key = (phase, s)
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
    _copy_layout_ops(program, placement, groups, made_in, recomputed)
    _local_constants(program, placement, groups, recomputed)
    crossing = set(regions.crossing)
    read_by: dict[int, set[tuple]] = {}
    tasks = {}
    for key, ops in groups.items():
        inputs = []
        own = {v for i in ops for v in program.ops[i].outputs}
        for i in ops:
            for v in program.ops[i].value_inputs():
                if v not in own:
                    inputs.append(v)
                    read_by.setdefault(v, set()).add(key)
        tasks[key] = Task(key, key[-1], ops, list(dict.fromkeys(inputs)), [])
    outputs = {v for v in program.outputs if isinstance(v, int)}
    for key, task in tasks.items():
        again = recomputed.get(key, set())
        handed = []
        for i in task.ops:
            for v in program.ops[i].outputs:
                if v in again or v not in read_by and v not in outputs:
                    continue
                if v in crossing and not any(k[0] in "FB" for k in read_by.get(v, ())):
                    continue  # only its accumulator leaves the task
                handed.append(v)
        task.outputs = handed
    return tasks


# Operations that only lay out or convert what they read: a per-step task that reads their
# result computes it again itself rather than receiving a (possibly large) array.
_LAYOUT_OPS = {"transpose", "reshape", "broadcast_in_dim", "convert_element_type", "squeeze",
               "expand_dims", "iota", "copy", "copy_p"}


def _copy_layout_ops(program: Program, placement: Placement, groups: dict[tuple, list[int]],
                     made_in: dict[int, tuple], recomputed: dict[tuple, set[int]]) -> None:
    """Adds to each per-step task (``N``, ``L``, ``A``) the layout operations, and those
    computing from literals alone, of its stage's other per-step tasks whose results it reads
    (and theirs, recursively): the update then transposes a gradient itself, or makes its own
    zeros, instead of receiving a (possibly large) array made for it."""
    producer = {v: i for i, op in enumerate(program.ops) for v in op.outputs}
    constant = set()  # per-step ops computing from literals alone (instantiated zeros, ...)
    for i, op in enumerate(program.ops):
        if placement.phase[i] in ("N", "L") and all(producer.get(v) in constant
                                                    for v in op.value_inputs()):
            constant.add(i)
    for key in [k for k in groups if k[0] in "NLA"]:
        ops = set(groups[key])
        own = {v for i in ops for v in program.ops[i].outputs}
        pending = [v for i in ops for v in program.ops[i].value_inputs() if v not in own]
        pulled = set()
        while pending:
            v = pending.pop()
            i = producer.get(v)
            cheap = program.ops[i].prim.name in _LAYOUT_OPS if i is not None else False
            if (i is None or i in ops or i in pulled or not (cheap or i in constant)
                    or made_in.get(v, ("",))[0] not in ("N", "L", "A")
                    or placement.stage[i] != key[-1]):
                continue
            pulled.add(i)
            pending.extend(program.ops[i].value_inputs())
        if pulled:
            groups[key] = sorted(ops | pulled)
            recomputed.setdefault(key, set()).update(
                v for i in pulled for v in program.ops[i].outputs)


def _local_constants(program: Program, placement: Placement, groups: dict[tuple, list[int]],
                     recomputed: dict[tuple, set[int]]) -> None:
    """Adds to each micro-batch task (``F``, ``B``) the operations computing from literals
    alone (the zeros a ReLU's backward selects, an iota) that another stage's task makes and it
    reads: it makes them itself instead of receiving a copy every micro-batch."""
    producer = {v: i for i, op in enumerate(program.ops) for v in op.outputs}
    constant = set()
    for i, op in enumerate(program.ops):
        if placement.phase[i] in "FB" and all(producer.get(v) in constant
                                              for v in op.value_inputs()):
            constant.add(i)
    for key in [k for k in groups if k[0] in "FB"]:
        ops = set(groups[key])
        pending = [v for i in ops for v in program.ops[i].value_inputs()]
        pulled = set()
        while pending:
            i = producer.get(pending.pop())
            if i is None or i not in constant or i in ops or i in pulled:
                continue
            pulled.add(i)
            pending.extend(program.ops[i].value_inputs())
        if pulled:
            groups[key] = sorted(ops | pulled)
            recomputed.setdefault(key, set()).update(
                v for i in pulled for v in program.ops[i].outputs)


def _needed_by_micro_batches(program: Program, placement: Placement) -> set[int]:
    """Per-step (``N``) ops whose results the micro-batch tasks read, directly or through
    other such ops. The others (e.g. an optimizer's decay of its moments, which needs no
    batch) run after the micro-batches, so their results do not sit in memory meanwhile."""
    wanted = {v for i, p in enumerate(placement.phase) if p in "FB"
              for v in program.ops[i].value_inputs()}
    early = set()
    for i in range(len(program.ops) - 1, -1, -1):
        if placement.phase[i] == "N" and any(v in wanted for v in program.ops[i].outputs):
            early.add(i)
            wanted.update(program.ops[i].value_inputs())
    return early


def made_by(program: Program, tasks: dict[tuple, Task]) -> dict[int, tuple]:
    """Value id -> key of the F or B task making it."""
    return {v: key for key, task in tasks.items() if key[0] in "FB"
            for i in task.ops for v in program.ops[i].outputs}
