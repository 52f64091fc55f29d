"""Applies a plan's sharding constraints on intermediates by re-evaluating the traced jaxpr.

A ``Constraint`` names an equation of the top-level jaxpr of the function over its flattened
arguments and one of its outputs. The wrapped function evaluates that jaxpr equation by
equation (nested jits, scans and custom derivatives are bound as they are) and puts
``with_sharding_constraint`` on the named outputs, so JAX's partitioner honours them.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.extend import core as jex_core
from jax.sharding import Mesh, NamedSharding

from parallel._errors import PlanError
from parallel._roles import trace
from parallel.plan import Constraint


def with_constraints(fn: Callable, abstract_args: Sequence[Any],
                     constraints: Sequence[Constraint], mesh: Mesh) -> Callable:
    """``fn`` with ``constraints`` applied to its intermediates.

    Raises:
      PlanError: a constraint names an equation or output the jaxpr does not have, or a spec
        with more entries than the value has dimensions.
    """
    closed, in_tree, out_shape = trace(fn, tuple(abstract_args))
    out_tree = jax.tree.structure(out_shape)
    eqns = closed.jaxpr.eqns
    by_output = {}
    for c in constraints:
        if not 0 <= c.eqn < len(eqns) or not 0 <= c.output < len(eqns[c.eqn].outvars):
            raise PlanError(
                f"constraint on equation {c.eqn} output {c.output} does not exist: the traced "
                f"function has {len(eqns)} equations; re-plan for this function")
        ndim = len(eqns[c.eqn].outvars[c.output].aval.shape)
        if len(c.spec) > ndim:
            raise PlanError(
                f"constraint {c.spec} on equation {c.eqn} ({eqns[c.eqn].primitive}) output "
                f"{c.output} has {len(c.spec)} entries but the value has {ndim} dimensions")
        by_output[(c.eqn, c.output)] = NamedSharding(mesh, c.spec)

    def constrained(*args):
        flat, tree = jax.tree.flatten(tuple(args))
        if tree != in_tree:
            raise PlanError(f"arguments have structure {tree} but the plan was traced for "
                             f"{in_tree}; re-plan for these arguments")
        outs = _eval(closed.jaxpr, closed.consts, flat, by_output)
        return jax.tree.unflatten(out_tree, outs)

    return constrained


def _eval(jaxpr, consts, args, by_output):
    env = {}

    def read(var):
        return var.val if isinstance(var, jex_core.Literal) else env[var]

    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    for index, eqn in enumerate(jaxpr.eqns):
        params = eqn.primitive.get_bind_params(eqn.params)
        with eqn.ctx.manager:
            outs = eqn.primitive.bind(*map(read, eqn.invars), **params)
        if not eqn.primitive.multiple_results:
            outs = [outs]
        for output, (var, value) in enumerate(zip(eqn.outvars, outs)):
            sharding = by_output.get((index, output))
            if sharding is not None:
                value = jax.lax.with_sharding_constraint(value, sharding)
            if not isinstance(var, jex_core.DropVar):
                env[var] = value
    return [read(var) for var in jaxpr.outvars]
