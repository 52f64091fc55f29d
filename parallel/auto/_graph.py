"""Flattens a traced step into one graph of array values and the equations between them.

Calls (``jit``, custom derivatives, remat) are inlined; loop and branch bodies are inlined once,
with their equations weighted by how often they run, so the solver sees a single program.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
from jax.extend import core as jax_core

# Calls whose body runs exactly once in place of the call.
_INLINE_CALLS = {"jit", "pjit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call"}
# Calls inlined for the analysis only: a sharding constraint cannot be inserted inside them.
_OPAQUE_CALLS = {"remat2", "checkpoint"}


@dataclasses.dataclass
class Value:
    """One array of the program.

    Attributes:
      shape: the array's shape.
      itemsize: bytes per element.
      producer: index of the equation that computes it; -1 for inputs and constants.
    """

    shape: tuple[int, ...]
    itemsize: int
    producer: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.itemsize

    @property
    def ndim(self) -> int:
        return len(self.shape)


@dataclasses.dataclass
class Eqn:
    """One equation of the flattened program.

    Attributes:
      prim: primitive name; names starting with ``_`` are the graph's own links
        (``_slice_leading``: one iteration's slice of a scanned input, ``_stack_leading``: a scan's
        stacked output, ``_identity``: a loop carry's first value, ``_merge``: a branch output).
      params: the primitive's parameters.
      inputs: value ids of the operands; ``None`` marks a literal scalar.
      outputs: value ids of the results.
      weight: how many times the equation runs per call (products of scan lengths).
      site: address of the equation for a sharding constraint (indices through inlined calls);
        ``None`` when it sits inside a loop, branch or remat body.
    """

    prim: str
    params: dict[str, Any]
    inputs: tuple[int | None, ...]
    outputs: tuple[int, ...]
    weight: float
    site: tuple[int, ...] | None


@dataclasses.dataclass
class Graph:
    """A flattened program.

    Attributes:
      values: every array, indexed by value id.
      eqns: equations in program order.
      inputs: value id of each flat input leaf.
      outputs: value id of each flat output leaf (``None`` for a literal output).
      constants: value ids of closed-over arrays (their placement is not the plan's choice).
      loops: ``(carry_out, carry_in, weight)``: a loop carry whose next value must take the spec
        of the current one, ``weight`` times per call.
    """

    values: list[Value]
    eqns: list[Eqn]
    inputs: list[int]
    outputs: list[int | None]
    constants: list[int]
    loops: list[tuple[int, int, float]]


def _itemsize(aval) -> int:
    try:
        return np.dtype(aval.dtype).itemsize
    except TypeError:  # extended dtypes such as PRNG keys
        return 8


class _Builder:
    def __init__(self):
        self.values: list[Value] = []
        self.eqns: list[Eqn] = []
        self.constants: list[int] = []
        self.loops: list[tuple[int, int, float]] = []

    def new_value(self, aval, producer: int) -> int:
        shape = tuple(int(d) for d in getattr(aval, "shape", ()))
        self.values.append(Value(shape, _itemsize(aval), producer))
        return len(self.values) - 1

    def add_eqn(self, prim, params, inputs, out_avals, weight, site) -> list[int]:
        index = len(self.eqns)
        outputs = [self.new_value(aval, index) for aval in out_avals]
        self.eqns.append(Eqn(prim, params, tuple(inputs), tuple(outputs), weight, site))
        return outputs

    def link(self, prim, source: int | None, aval, weight, params=None) -> int:
        return self.add_eqn(prim, params or {}, [source], [aval], weight, None)[0]

    def run(self, jaxpr, consts: list[int | None], args: list[int | None], weight: float,
            site: tuple[int, ...] | None) -> list[int | None]:
        """Inlines ``jaxpr`` with its constvars and invars bound to value ids; returns its outputs."""
        env: dict[Any, int | None] = {}
        for var, v in zip(jaxpr.constvars, consts):
            env[var] = v
        for var, v in zip(jaxpr.invars, args):
            env[var] = v

        def read(atom):
            return None if isinstance(atom, jax_core.Literal) else env[atom]

        for i, eqn in enumerate(jaxpr.eqns):
            inputs = [read(a) for a in eqn.invars]
            here = None if site is None else site + (i,)
            outputs = self.eqn(eqn, inputs, weight, here)
            for var, v in zip(eqn.outvars, outputs):
                env[var] = v
        return [read(a) for a in jaxpr.outvars]

    def closed(self, closed_jaxpr, args, weight, site):
        consts = [self.constant(c) for c in closed_jaxpr.consts]
        return self.run(closed_jaxpr.jaxpr, consts, args, weight, site)

    def constant(self, array) -> int:
        v = self.new_value(array, -1)
        self.constants.append(v)
        return v

    def eqn(self, eqn, inputs, weight, site) -> list[int | None]:
        name = eqn.primitive.name
        params = eqn.params
        out_avals = [var.aval for var in eqn.outvars]
        if name in _INLINE_CALLS:
            body = params.get("jaxpr", params.get("call_jaxpr"))
            if isinstance(body, jax_core.ClosedJaxpr):
                return self.closed(body, inputs, weight, site)
            return self.run(body, [], inputs, weight, site)
        if name in _OPAQUE_CALLS:
            return self.run(params["jaxpr"], [], inputs, weight, None)
        if name == "scan":
            return self.scan(params, inputs, out_avals, weight)
        if name == "while":
            return self.while_loop(params, inputs, weight)
        if name == "cond":
            return self.cond(params, inputs, out_avals, weight)
        if name == "pipeline_cut":  # mark_pipeline_boundary(): a position, no values
            return []
        # An optimization barrier only orders the schedule, a stage marker only names a cut:
        # each result is its input.
        if name in ("optimization_barrier", "pipeline_boundary"):
            return [self.link("_identity", v, aval, weight) for v, aval in zip(inputs, out_avals)]
        return self.add_eqn(name, dict(params), inputs, out_avals, weight, site)

    def scan(self, params, inputs, out_avals, weight) -> list[int | None]:
        body = params["jaxpr"]
        n_consts, n_carry, length = params["num_consts"], params["num_carry"], params["length"]
        consts, init, xs = inputs[:n_consts], inputs[n_consts:n_consts + n_carry], inputs[n_consts + n_carry:]
        in_avals = body.in_avals
        carry_in = [
            self.link("_identity", v, aval, weight) for v, aval in zip(init, in_avals[n_consts:])
        ]
        x_slices = [
            self.link("_slice_leading", v, aval, weight * length)
            for v, aval in zip(xs, in_avals[n_consts + n_carry:])
        ]
        outs = self.closed(body, consts + carry_in + x_slices, weight * length, None)
        carry_out, y_slices = outs[:n_carry], outs[n_carry:]
        for out, into in zip(carry_out, carry_in):
            if out is not None:
                self.loops.append((out, into, weight * length))
        ys = [
            self.link("_stack_leading", v, aval, weight)
            for v, aval in zip(y_slices, out_avals[n_carry:])
        ]
        return list(carry_out) + ys

    def while_loop(self, params, inputs, weight) -> list[int | None]:
        # The trip count is unknown when tracing: the body is weighted as running once.
        n_cond, n_body = params["cond_nconsts"], params["body_nconsts"]
        cond_consts, body_consts = inputs[:n_cond], inputs[n_cond:n_cond + n_body]
        init = inputs[n_cond + n_body:]
        body = params["body_jaxpr"]
        carry_in = [
            self.link("_identity", v, aval, weight)
            for v, aval in zip(init, body.in_avals[n_body:])
        ]
        self.closed(params["cond_jaxpr"], cond_consts + carry_in, weight, None)
        carry_out = self.closed(body, body_consts + carry_in, weight, None)
        for out, into in zip(carry_out, carry_in):
            if out is not None:
                self.loops.append((out, into, weight))
        return carry_out

    def cond(self, params, inputs, out_avals, weight) -> list[int | None]:
        operands = inputs[1:]
        branch_outs = [self.closed(b, operands, weight, None) for b in params["branches"]]
        return [
            self.add_eqn("_merge", {}, list(outs), [aval], weight, None)[0]
            for outs, aval in zip(zip(*branch_outs), out_avals)
        ]


def build_graph(closed_jaxpr) -> Graph:
    """Flattens ``closed_jaxpr`` (from ``jax.make_jaxpr``) into a :class:`Graph`."""
    builder = _Builder()
    args = [builder.new_value(var.aval, -1) for var in closed_jaxpr.jaxpr.invars]
    outputs = builder.closed(closed_jaxpr, args, 1.0, ())
    return Graph(builder.values, builder.eqns, args, outputs, builder.constants, builder.loops)
