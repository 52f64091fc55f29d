"""The step traced twice: on the global batch, and as the program one micro-batch runs.

The global trace is the step as written (``x.shape[0]`` is the global batch): the per-step and
update regions run it. The micro-batch program has the same operations with micro-batch shapes:
the step traced on one micro-batch when that gives the same operations, else (a micro-batch of one
example, where JAX elides broadcasts and reductions over dimensions of size 1) the global trace
with every batch-size-dependent shape parameter rescaled, checked by JAX's shape rules.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from jax.extend import core as jax_core

from parallel._errors import PlanError
from parallel.pipeline._program import Op, Program, flatten


@dataclasses.dataclass
class Traced:
    """The two programs of a step (same operations, same value ids).

    Attributes:
      glob: traced on the global batch.
      micro: the program of one micro-batch (avals, shape parameters and literals for it).
      batch_dims: value id -> dimensions whose size grows with the batch.
      batch_inputs: value ids of the batch leaves.
      global_batch: examples per step.
      micro_batch: examples per micro-batch.
    """

    glob: Program
    micro: Program
    batch_dims: dict[int, tuple[int, ...]]
    batch_inputs: list[int]
    global_batch: int
    micro_batch: int


def batch_size(abstract_args, batch_argnums, num_micro_batches: int) -> int:
    """The global batch size, checked: one leading size over every batch leaf, divisible."""
    sizes = set()
    for i in batch_argnums:
        for leaf in jax.tree.leaves(abstract_args[i]):
            if not leaf.shape:
                raise PlanError(f"batch argument {i} has a scalar leaf; every batch leaf needs a "
                                f"leading batch dimension to split into micro-batches")
            sizes.add(leaf.shape[0])
    if len(sizes) != 1:
        raise PlanError(f"batch leaves have different leading dimensions {sorted(sizes)}; they "
                        f"must share the global batch size")
    batch = sizes.pop()
    if batch % num_micro_batches:
        raise PlanError(f"global batch size {batch} is not divisible by num_micro_batches="
                        f"{num_micro_batches}; use a batch size that is a multiple of "
                        f"{num_micro_batches}")
    return batch


def _at(abstract_args, batch_argnums, size: int) -> tuple:
    return tuple(
        jax.tree.map(lambda x: jax.ShapeDtypeStruct((size, *x.shape[1:]), x.dtype), arg)
        if i in batch_argnums else arg for i, arg in enumerate(abstract_args))


def _trace(fn, abstract_args, batch_argnums, size: int) -> Program:
    return flatten(jax.make_jaxpr(fn)(*_at(abstract_args, batch_argnums, size)))


def same_structure(a: Program, b: Program) -> bool:
    return (len(a.ops) == len(b.ops) and len(a.avals) == len(b.avals)
            and sorted(a.consts) == sorted(b.consts) and a.cuts == b.cuts
            and all(x.prim is y.prim and x.outputs == y.outputs
                    and [i if isinstance(i, int) else None for i in x.inputs]
                    == [i if isinstance(i, int) else None for i in y.inputs]
                    for x, y in zip(a.ops, b.ops)))


def _shape(aval) -> tuple:
    return tuple(getattr(aval, "shape", ()))


def _batch_dims(small: Program, big: Program) -> dict[int, tuple[int, ...]]:
    dims = {}
    for v, (a, b) in enumerate(zip(small.avals, big.avals)):
        sa, sb = _shape(a), _shape(b)
        if sa != sb:
            dims[v] = tuple(d for d, (x, y) in enumerate(zip(sa, sb)) if x != y) or (0,)
    return dims


def trace_step(fn, abstract_args, batch_argnums, num_micro_batches: int,
               glob: Program | None = None) -> Traced:
    """Traces ``fn`` on the global batch and builds the program of one micro-batch.

    ``glob``: the step already traced on the global batch (``flatten`` of its jaxpr), reused
    rather than traced again (the planner prices several micro-batch counts of one step).

    Raises:
      PlanError: the batch does not split; the step's operations depend on the batch size; an
        operation's parameters do not rescale to the micro-batch.
    """
    m = num_micro_batches
    batch = batch_size(abstract_args, batch_argnums, m)
    micro_size = batch // m
    if glob is None:
        glob = _trace(fn, abstract_args, batch_argnums, batch)
    inputs = _batch_input_ids(abstract_args, batch_argnums, glob.inputs)
    micro = glob if m == 1 else _trace(fn, abstract_args, batch_argnums, micro_size)
    if m > 1 and same_structure(micro, glob):
        dims = _batch_dims(micro, glob)
    else:
        other_size = 2 * micro_size if 2 * micro_size != batch else 3 * micro_size
        other = _trace(fn, abstract_args, batch_argnums, other_size)
        if not same_structure(other, glob):
            raise PlanError(
                f"the step traces to different programs for batch sizes {batch} and "
                f"{other_size} ({len(glob.ops)} vs {len(other.ops)} operations); "
                f"PipeshardParallel needs a step whose operations do not depend on the batch "
                f"size")
        dims = _batch_dims(other, glob)
        if m > 1:
            micro = rescale(glob, other, batch, other_size, micro_size, inputs, dims)
    return Traced(glob, micro, dims, inputs, batch, micro_size)


def _batch_input_ids(abstract_args, batch_argnums, input_ids) -> list[int]:
    ids, k = [], 0
    for i, arg in enumerate(abstract_args):
        n = len(jax.tree.leaves(arg))
        if i in batch_argnums:
            ids.extend(input_ids[k:k + n])
        k += n
    return ids


class _Unscalable(Exception):
    pass


def _scale_int(g: int, r: int, big: int, other: int, small: int) -> int:
    num = (g - r) * (small - big)
    if num % (big - other):
        raise _Unscalable
    value = g + num // (big - other)
    if value < 0:
        raise _Unscalable
    return value


def _scale_param(g: Any, r: Any, big: int, other: int, small: int) -> Any:
    if isinstance(g, (bool, np.bool_)) or g is r:
        return g
    if isinstance(g, (int, np.integer)) and isinstance(r, (int, np.integer)):
        return g if g == r else _scale_int(int(g), int(r), big, other, small)
    if isinstance(g, (tuple, list)) and type(g) is type(r) and len(g) == len(r):
        items = [_scale_param(x, y, big, other, small) for x, y in zip(g, r)]
        return type(g)(*items) if hasattr(g, "_fields") else type(g)(items)
    try:
        if g == r:
            return g
    except Exception:  # arrays, jaxprs: compared by their text
        pass
    if str(g) == str(r):
        return g
    raise _Unscalable


def scale_literal(g: float, r: float, big: int, other: int, small: int) -> float:
    """A batch-size-dependent constant at the micro-batch size: proportional to the batch
    (``b * T``, a mean's count), inversely proportional (``1 / b``), or affine."""
    if r and np.isclose(g / r, big / other):
        return g * small / big
    if r and np.isclose(g / r, other / big):
        return g * big / small
    return g + (g - r) * (small - big) / (big - other)


def rescale(glob: Program, other: Program, big: int, other_size: int, small: int,
            batch_inputs: list[int], dims) -> Program:
    """The global program with shapes, shape parameters and literals for ``small`` examples.

    Every batch-size-dependent integer is taken as affine in the batch size, fitted on two
    traces of the same operations; literals as ``scale_literal``; every aval recomputed by JAX's
    shape rules (``abstract_avals``).

    Args:
      glob: the step traced on ``big`` examples.
      other: the same operations traced on ``other_size`` examples (``same_structure``).
      big, other_size, small: examples per batch of ``glob``, ``other``, the result.
      batch_inputs: value ids of the batch leaves.
      dims: value id -> dimensions whose size grows with the batch (``Traced.batch_dims``).

    Raises:
      PlanError: an operation's parameters do not rescale (named), or the rescaled program
        does not trace.
    """
    ops = []
    for op, ref in zip(glob.ops, other.ops):
        try:
            params = {k: _scale_param(v, ref.params[k], big, other_size, small)
                      for k, v in op.params.items()}
        except _Unscalable:
            raise PlanError(
                f"micro-batches of {small} example(s): the step's operation {op.prim.name} "
                f"(output shape {_shape(glob.avals[op.outputs[0]]) if op.outputs else ()}) has "
                f"parameters that do not rescale with the batch size; use micro-batches of at "
                f"least {2 if small == 1 else small + 1} examples") from None
        inputs = []
        for a, b in zip(op.inputs, ref.inputs):
            if isinstance(a, jax_core.Literal) and not np.array_equal(a.val, b.val):
                value = scale_literal(float(a.val), float(b.val), big, other_size, small)
                a = jax_core.Literal(np.asarray(value, np.asarray(a.val).dtype), a.aval)
            inputs.append(a)
        ops.append(Op(op.prim, params, inputs, list(op.outputs), op.backward))
    input_avals = {}
    for v in glob.inputs:
        aval = glob.avals[v]
        input_avals[v] = (jax.ShapeDtypeStruct((small, *aval.shape[1:]), aval.dtype)
                          if v in batch_inputs else aval)
    const_avals = {}
    for v, c in glob.consts.items():
        shape = list(np.shape(c))
        for d in dims.get(v, ()):
            shape[d] = _scale_int(shape[d], _shape(other.avals[v])[d], big, other_size, small)
        const_avals[v] = jax.ShapeDtypeStruct(tuple(shape), np.asarray(c).dtype)
    avals = abstract_avals(ops, glob, input_avals, const_avals)
    return Program(ops, avals, list(glob.inputs), list(glob.outputs), dict(glob.consts),
                   list(glob.cuts))


def abstract_avals(ops: list[Op], program: Program, input_avals: dict, const_avals: dict):
    """The aval of every value when ``ops`` run on inputs and constants of these avals.

    Raises:
      PlanError: an operation rejects its operands' shapes (named).
    """
    from parallel.pipeline._program import evaluate

    avals = list(program.avals)
    order = list(input_avals) + list(const_avals)
    current = {}

    def run(*args):
        env = dict(zip(order, args))
        for op in ops:
            current["op"] = op
            evaluate([op], env)
        for v, x in env.items():
            avals[v] = jax.typeof(x)
        return []

    try:
        jax.make_jaxpr(run)(*[input_avals[v] for v in input_avals],
                            *[const_avals[v] for v in const_avals])
    except (TypeError, ValueError) as e:
        op = current.get("op")
        raise PlanError(f"the micro-batch program does not trace: operation "
                        f"{op.prim.name if op else '?'} fails with "
                        f"{str(e).strip().splitlines()[0]}; use larger micro-batches") from None
    return avals
