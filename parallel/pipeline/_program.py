"""The traced step as one flat list of operations, split into the regions a pipeline runs.

Calls (``jit``, custom derivatives) are inlined so that every operation can go to a stage;
loops, branches and remat bodies stay single operations. Regions:

* ``N``: operations that do not depend on the batch (RNG splits, casts of parameters, the
  learning-rate schedule); run once per step.
* ``M``: the micro-batch region: batch-dependent operations that lead to an operation with a
  per-example input (forward, backward, the batch reductions that end in weight gradients);
  run once per micro-batch, split into stages.
* ``A``: the apply region: the remaining batch-dependent operations (optimizer update,
  gradient norm, metrics); run once per step on the micro-batch means of what ``M`` produced.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from jax.extend import core as jax_core

from parallel._errors import PlanError
from parallel.pipeline._marker import CUT_NAME, MARKER_NAME

_INLINE_CALLS = {"jit", "pjit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call"}
_BODY_PRIMS = {"scan": "a scan body", "while": "a while loop body", "cond": "a cond branch",
               "remat2": "a jax.checkpoint (remat) body", "checkpoint": "a jax.checkpoint body"}


@dataclasses.dataclass
class Op:
    """One operation of the flat program.

    Attributes:
      prim: the JAX primitive.
      params: its parameters.
      inputs: value ids, or ``jax.extend.core.Literal`` for literal operands.
      outputs: value ids of the results.
      backward: emitted by a transpose (the backward pass of ``jax.grad``).
    """

    prim: Any
    params: dict
    inputs: list
    outputs: list[int]
    backward: bool

    @property
    def is_marker(self) -> bool:
        return self.prim.name == MARKER_NAME

    def value_inputs(self) -> list[int]:
        return [v for v in self.inputs if isinstance(v, int)]


@dataclasses.dataclass
class Program:
    """A step flattened: operations over integer value ids.

    Attributes:
      ops: operations in program order.
      avals: abstract value (shape, dtype) of each value id.
      inputs: value id of each flat input leaf of the step.
      outputs: value id (or ``Literal``) of each flat output leaf.
      consts: value id -> array, for closed-over constants.
      cuts: positions of ``mark_pipeline_boundary()`` calls (no arguments): a cut at ``k`` falls
        between ``ops[k - 1]`` and ``ops[k]``.
    """

    ops: list[Op]
    avals: list[Any]
    inputs: list[int]
    outputs: list[Any]
    consts: dict[int, Any]
    cuts: list[int] = dataclasses.field(default_factory=list)

    def nbytes(self, v: int) -> int:
        aval = self.avals[v]
        try:
            itemsize = np.dtype(aval.dtype).itemsize
        except TypeError:  # PRNG keys
            itemsize = 8
        return int(np.prod(aval.shape, dtype=np.int64)) * itemsize


def _has_marker(jaxpr) -> bool:
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in (MARKER_NAME, CUT_NAME):
            return True
        for param in eqn.params.values():
            for sub in _jaxprs_of(param):
                if _has_marker(sub):
                    return True
    return False


def _jaxprs_of(param):
    if isinstance(param, jax_core.ClosedJaxpr):
        yield param.jaxpr
    elif isinstance(param, jax_core.Jaxpr):
        yield param
    elif isinstance(param, (tuple, list)):
        for p in param:
            yield from _jaxprs_of(p)


class _Flattener:
    def __init__(self):
        self.ops: list[Op] = []
        self.avals: list[Any] = []
        self.consts: dict[int, Any] = {}
        self.cuts: list[int] = []

    def new(self, aval) -> int:
        self.avals.append(aval)
        return len(self.avals) - 1

    def closed(self, closed_jaxpr, args, backward):
        consts = []
        for c in closed_jaxpr.consts:
            v = self.new(jax.core.get_aval(c))
            self.consts[v] = c
            consts.append(v)
        return self.run(closed_jaxpr.jaxpr, consts, args, backward)

    def run(self, jaxpr, consts, args, backward):
        env = dict(zip(jaxpr.constvars, consts))
        env.update(zip(jaxpr.invars, args))

        def read(atom):
            return atom if isinstance(atom, jax_core.Literal) else env[atom]

        for eqn in jaxpr.eqns:
            inputs = [read(a) for a in eqn.invars]
            is_backward = backward or "transpose" in str(eqn.source_info.name_stack)
            name = eqn.primitive.name
            if name == CUT_NAME:
                self.cuts.append(len(self.ops))
                continue
            if name in _INLINE_CALLS:
                body = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
                if isinstance(body, jax_core.ClosedJaxpr):
                    outs = self.closed(body, inputs, is_backward)
                else:
                    outs = self.run(body, [], inputs, is_backward)
            else:
                if name in _BODY_PRIMS and any(_has_marker(j) for p in eqn.params.values()
                                               for j in _jaxprs_of(p)):
                    raise PlanError(
                        f"parallel.mark_pipeline_boundary is called inside {_BODY_PRIMS[name]}; "
                        f"stages can only be cut in straight-line code: call it outside the "
                        f"{name} (e.g. between layers of an unrolled loop)")
                outs = [self.new(var.aval) for var in eqn.outvars]
                self.ops.append(Op(eqn.primitive, dict(eqn.params), inputs, outs, is_backward))
            for var, v in zip(eqn.outvars, outs):
                env[var] = v
        return [read(a) for a in jaxpr.outvars]


def flatten(closed_jaxpr) -> Program:
    """Inlines the calls of ``closed_jaxpr`` (from ``jax.make_jaxpr``) into a ``Program``."""
    builder = _Flattener()
    inputs = [builder.new(var.aval) for var in closed_jaxpr.jaxpr.invars]
    outputs = builder.closed(closed_jaxpr, inputs, False)
    return Program(builder.ops, builder.avals, inputs, outputs, builder.consts, builder.cuts)


def evaluate(ops: list[Op], env: dict[int, Any]) -> None:
    """Runs ``ops`` in order, reading and writing ``env`` (value id -> array)."""
    for op in ops:
        args = [a.val if isinstance(a, jax_core.Literal) else env[a] for a in op.inputs]
        out = op.prim.bind(*args, **op.prim.get_bind_params(op.params))
        if not op.prim.multiple_results:
            out = [out]
        env.update(zip(op.outputs, out))


@dataclasses.dataclass
class Regions:
    """The regions of a program and what the pipeline needs to know of its values.

    Attributes:
      region: per op index, ``"N"``, ``"M"`` or ``"A"``.
      batch_dim: value id -> the dimension that grows with the micro-batch (per-example values).
      batch_dependent: value ids that depend on the batch.
      crossing: values made in ``M`` and read outside it (by ``A`` or as outputs).
      combine: crossing value id -> how the runtime combines its per-micro-batch values:
        ``"mean"`` (the default for a value not named), ``"sum"``, ``"concat"`` (along its
        batch dimension; step outputs only) or ``("weighted", w)`` (sum of x*w over sum of w).
      micro_batch_index: a value id the runtime binds, in each micro-batch task, to the index of
        the micro-batch (an int32 scalar); ``None`` if the program reads none.
    """

    region: list[str]
    batch_dim: dict[int, int]
    batch_dependent: set[int]
    crossing: list[int]
    combine: dict[int, Any] = dataclasses.field(default_factory=dict)
    micro_batch_index: int | None = None


def split_regions(program: Program, doubled: Program, batch_inputs: list[int]) -> Regions:
    """Finds the ``N``/``M``/``A`` regions.

    Args:
      program: the step traced on one micro-batch.
      doubled: the same step traced on two micro-batches' worth of examples; values whose shape
        differs between the two are per-example.
      batch_inputs: value ids of the batch leaves.

    Raises:
      PlanError: the two traces differ in structure, or the step has no per-example work.
    """
    if len(program.ops) != len(doubled.ops) or any(
            a.prim is not b.prim for a, b in zip(program.ops, doubled.ops)):
        raise PlanError(
            f"the step traces to different programs for micro-batch sizes "
            f"{_batch_size(program, batch_inputs)} and {_batch_size(doubled, batch_inputs)} "
            f"({len(program.ops)} vs {len(doubled.ops)} operations); PipeshardParallel needs a "
            f"step whose operations do not depend on the batch size")
    batch_dim = {}
    for v, (a, b) in enumerate(zip(program.avals, doubled.avals)):
        sa, sb = tuple(getattr(a, "shape", ())), tuple(getattr(b, "shape", ()))
        if sa != sb:
            dims = [d for d, (x, y) in enumerate(zip(sa, sb)) if x != y]
            batch_dim[v] = dims[0] if dims else 0
    dependent = set(batch_inputs)
    for op in program.ops:
        if any(v in dependent for v in op.value_inputs()):
            dependent.update(op.outputs)
    consumers: dict[int, list[int]] = {}
    for i, op in enumerate(program.ops):
        for v in op.value_inputs():
            consumers.setdefault(v, []).append(i)
    region = ["N"] * len(program.ops)
    for i in range(len(program.ops) - 1, -1, -1):
        op = program.ops[i]
        if not any(v in dependent for v in op.value_inputs()):
            continue
        per_example = any(v in batch_dim for v in op.value_inputs())
        feeds_m = any(region[c] == "M" for v in op.outputs for c in consumers.get(v, ()))
        region[i] = "M" if per_example or feeds_m else "A"
    if "M" not in region:
        raise PlanError("the step does no per-example computation on the batch arguments "
                        "(batch_argnums); nothing to pipeline")
    produced_in_m = {v for op, r in zip(program.ops, region) if r == "M" for v in op.outputs}
    crossing = []
    for i, op in enumerate(program.ops):
        if region[i] == "M":
            continue
        crossing.extend(v for v in op.value_inputs() if v in produced_in_m)
    crossing.extend(v for v in program.outputs if isinstance(v, int) and v in produced_in_m)
    crossing = list(dict.fromkeys(crossing))
    for v in crossing:
        dtype = program.avals[v].dtype
        if not jax.numpy.issubdtype(dtype, jax.numpy.inexact):
            raise PlanError(
                f"a value of dtype {dtype} and shape {program.avals[v].shape} leaves the "
                f"per-micro-batch computation; PipeshardParallel averages such values over "
                f"micro-batches, which needs floating point: compute integer metrics as float "
                f"means inside the loss")
    return Regions(region, batch_dim, dependent, crossing)


def _batch_size(program: Program, batch_inputs: list[int]) -> Any:
    shapes = [program.avals[v].shape for v in batch_inputs if program.avals[v].shape]
    return shapes[0][0] if shapes else None
