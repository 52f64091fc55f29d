"""The traced step as one flat list of operations, split into the regions a pipeline runs.

Calls (``jit``, custom derivatives) are inlined so that every operation can go to a stage;
loops, branches and remat bodies stay single operations. Regions:

* ``N``: operations that do not depend on the batch (RNG splits, casts of parameters, the
  learning-rate schedule); run once per step.
* ``M``: the micro-batch region: batch-dependent operations that lead to an operation with a
  per-example input (forward, backward, the batch reductions that end in weight gradients);
  run once per micro-batch, split into stages.
* ``A``: the apply region: the remaining batch-dependent operations (optimizer update,
  gradient norm, metrics); run once per step on what ``M`` produced, combined over the
  micro-batches (``parallel.pipeline._regions`` decides how, and what is exact).
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
        """The value ids it reads (not literals); kept until ``inputs`` is replaced (the
        planner's passes ask millions of times; none changes ``inputs`` in place)."""
        cached = self.__dict__.get("_value_inputs")
        if cached is None or cached[0] is not self.inputs:
            cached = self._value_inputs = (self.inputs,
                                           [v for v in self.inputs if isinstance(v, int)])
        return cached[1]


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
            v = self.new(jax.typeof(c))
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


def substitute(op: Op, mapping: dict[int, int]) -> Op:
    """``op`` reading ``mapping[v]`` for each value ``v`` it reads that ``mapping`` names."""
    if not any(isinstance(a, int) and a in mapping for a in op.inputs):
        return op
    return dataclasses.replace(op, inputs=[mapping.get(a, a) if isinstance(a, int) else a
                                           for a in op.inputs])


def emit(fn, inputs: list[int], avals: list, consts: dict[int, Any]) -> tuple[list[Op], list]:
    """The operations of ``fn`` traced on the values ``inputs``, with fresh value ids.

    ``avals`` and ``consts`` are the program's (extended in place with the new values).
    """
    builder = _Flattener()
    builder.avals, builder.consts = avals, consts
    closed = jax.make_jaxpr(fn)(*[jax.ShapeDtypeStruct(avals[v].shape, avals[v].dtype)
                                  for v in inputs])
    outputs = builder.closed(closed, list(inputs), False)
    return builder.ops, outputs


@dataclasses.dataclass
class Regions:
    """The regions of a program and what the pipeline needs to know of its values.

    The per-step (``N``) and apply (``A``) regions run operations traced on the global batch,
    the micro-batch region (``M``) operations traced on one micro-batch.

    Attributes:
      region: per op index, ``"N"``, ``"M"`` or ``"A"``.
      batch_dim: value id -> the dimension that grows with the batch (per-example values).
      batch_dependent: value ids that depend on the batch.
      crossing: values made in ``M`` and read outside it (by ``A`` or as outputs).
      combine: crossing value id -> how its per-micro-batch values make the step's value:
        ``"sum"``, ``"mean"``, ``"concat"`` (along ``batch_dim``) or ``("weighted", w)``.
      micro_batch_index: value id of the micro-batch's index (an int32 scalar the runtime binds
        in every micro-batch task), or ``None`` when nothing reads it.
      global_avals: value id -> its aval over the global batch, for values whose
        ``program.avals`` entry is a micro-batch's (batch inputs read by ``N``, concatenated
        crossing values read by ``A``).
      notes: what is computed per micro-batch rather than over the global batch (batch
        statistics, ratios), one line each, for the plan's report.
    """

    region: list[str]
    batch_dim: dict[int, int]
    batch_dependent: set[int]
    crossing: list[int]
    combine: dict[int, Any] = dataclasses.field(default_factory=dict)
    micro_batch_index: int | None = None
    global_avals: dict[int, Any] = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)
