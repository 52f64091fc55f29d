"""Roles: which argument leaves are parameters, optimizer state, other stored state or batch.

Design
------
``parallel`` works on any step ``fn(*args)`` over pytrees: a dict with any keys, a tuple
``(weights, optimizer_state)``, a flax ``TrainState``, an ``nnx.Optimizer``'s state. It never
looks at key names. A leaf's role comes from its argument, its type, and the traced step:

* ``BATCH``: a leaf of a ``batch_argnums`` argument.
* Stored state is every leaf of a ``donate_argnums`` argument (the step returns it updated).
  Each stored leaf is one of:

  - ``PARAMETER``: a floating-point leaf whose returned value is ``old + update`` (or
    ``old - update``) and whose old value is also read for something else (the forward pass).
    This is what ``optax.apply_updates``, ``TrainState.apply_gradients``,
    ``nnx.Optimizer.update`` and a hand-written ``p - lr * g`` compute. It is found by
    following each leaf through the jaxpr of the step (through ``jit``, custom-derivative and
    remat calls, dtype casts and copies) to the output that returns it. Optimizer moments
    (``b * m + (1 - b) * g``), accumulators that are only added to (Adagrad's), integer
    counters, RNG keys and running statistics are not of that form.
  - ``OPTIMIZER``: optimizer state, found either way:

    * by type: a leaf inside an optax state object, i.e. any pytree node whose type is
      defined in an ``optax`` module (``ScaleByAdamState``, ``EmptyState``,
      ``InjectHyperparamsState``...), wherever it sits (under any dict key, in a tuple, as a
      ``TrainState`` field);
    * by mirroring: a leaf that is not a parameter, has a parameter's shape, and whose key
      path ends with that parameter's path below the prefix most parameters share
      (``[1]['opt'][0]['mu']['dense']['kernel']`` mirrors ``[0]['dense']['kernel']``). This is
      how every optax moment is laid out, and all that is left of it once ``nnx.split`` or
      ``nnx.to_pure_dict`` has turned optax's NamedTuples into dicts.
    A leaf inside an optax state is ``OPTIMIZER`` whatever its update looks like.
  - ``STATE``: every other stored leaf (step counter, RNG key, batch-norm statistics).
* ``OTHER``: leaves of the remaining arguments.

How the methods use the roles: ``Zero2Parallel`` and ShardParallel's "update sharded" flavour
split the ``OPTIMIZER`` leaves; ``Zero3Parallel`` and the "state sharded" flavour split every
stored leaf that is large enough, whatever its role; ``ManualParallel`` gives a leaf without
logical names the spec of the named leaf it mirrors (``mirrors``).

Leaves must be arrays (or Python/NumPy numbers, which JAX takes as scalars): ``check_leaves``
names the path of anything else.
"""
from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.extend import core as jax_core

from parallel._errors import PlanError

BATCH = "batch"
PARAMETER = "parameter"
OPTIMIZER = "optimizer"
STATE = "state"
OTHER = "other"

# Primitives whose result is their operand, up to dtype or placement.
_SAME_VALUE = {"convert_element_type", "copy", "copy_p", "reduce_precision",
               "sharding_constraint", "device_put"}
# Calls whose body runs once in place of the call, operands bound to the body's inputs.
_CALLS = {"jit", "pjit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
          "remat2", "checkpoint"}


def key_name(key: Any) -> Any:
    """The plain name of one key-path entry: a dict key, sequence index or attribute name."""
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return getattr(key, attr)
    return str(key)


def plain_path(key_path: Sequence[Any]) -> tuple:
    """A key path as a tuple of plain names (``(0, 'mu', 'dense', 'kernel')``)."""
    return tuple(key_name(k) for k in key_path)


def check_leaves(tree: Any, what: str = "args") -> None:
    """Raises ``PlanError`` naming the first leaf that is not an array or a number.

    Args:
      tree: a pytree of arguments.
      what: how to name ``tree`` in the message (its leaves are ``what[0]['step']``...).

    Raises:
      PlanError: a leaf is a string, an object, or an array of a non-numeric dtype.
    """
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct)):
            continue
        kind = None if isinstance(leaf, (str, bytes)) else np.asarray(leaf).dtype.kind
        if kind is None or kind not in "biufc":
            raise PlanError(
                f"{what}{jax.tree_util.keystr(key_path)} is "
                f"{type(leaf).__name__} {leaf!r:.60}, not an array; a step's arguments may only "
                f"hold arrays and numbers. Keep it out of the pytree (a static field, e.g. "
                f"flax.struct.field(pytree_node=False)) or convert it to an array")


@dataclasses.dataclass(frozen=True)
class Roles:
    """The role of every argument leaf.

    Attributes:
      by_arg: per positional argument, the role of each leaf in flatten order.
    """

    by_arg: tuple[tuple[str, ...], ...]

    def flat(self) -> list[str]:
        """Roles of all argument leaves, in the flatten order of the argument tuple."""
        return [role for roles in self.by_arg for role in roles]

    def indices(self, *roles: str) -> list[int]:
        """Flat indices (over all arguments) of the leaves with one of ``roles``."""
        return [j for j, role in enumerate(self.flat()) if role in roles]


def find_roles(fn: Callable, abstract_args: Sequence[Any], *, batch_argnums: Sequence[int],
               donate_argnums: Sequence[int], traced: tuple | None = None) -> Roles:
    """Classifies every leaf of ``abstract_args`` (see the module docstring).

    Args:
      fn: the step.
      abstract_args: its positional arguments (arrays or ``jax.ShapeDtypeStruct`` leaves).
      batch_argnums: arguments holding the batch.
      donate_argnums: arguments holding the stored state.
      traced: ``trace(fn, abstract_args)`` if already done; traced here otherwise.

    Returns:
      The roles.
    """
    args = tuple(abstract_args)
    flat_paths, sizes = [], []
    for i, arg in enumerate(args):
        paths = [(i, *plain_path(kp)) for kp, _ in jax.tree_util.tree_flatten_with_path(arg)[0]]
        flat_paths += paths
        sizes.append(len(paths))
    offsets = np.cumsum([0] + sizes)
    flat_leaves = jax.tree.leaves(args)
    state = [j for i in donate_argnums for j in range(offsets[i], offsets[i + 1])]
    closed_jaxpr, _, out_shape = trace(fn, args) if traced is None else traced
    updated = _updated_in_place(closed_jaxpr.jaxpr, returned_state(args, out_shape,
                                                                   donate_argnums))
    parameters = [j for j in state if j in updated and jax.dtypes.issubdtype(
        getattr(flat_leaves[j], "dtype", np.result_type(flat_leaves[j])), np.inexact)]
    typed = {int(offsets[i]) + k for i in donate_argnums for k in _inside_optax_state(args[i])}
    shapes = [tuple(np.shape(leaf)) for leaf in flat_leaves]
    candidates = [j for j in state if j not in set(parameters)]
    mirrored = mirrors([flat_paths[j] for j in candidates], [shapes[j] for j in candidates],
                       [flat_paths[j] for j in parameters], [shapes[j] for j in parameters])
    optimizer = typed | {candidates[c] for c in mirrored}
    roles = [OTHER] * len(flat_paths)
    for i in batch_argnums:
        roles[offsets[i]:offsets[i + 1]] = [BATCH] * sizes[i]
    for j in state:
        roles[j] = OPTIMIZER if j in optimizer else PARAMETER if j in parameters else STATE
    return Roles(tuple(tuple(roles[offsets[i]:offsets[i + 1]]) for i in range(len(args))))


def mirrors(paths: Sequence[tuple], shapes: Sequence[tuple], target_paths: Sequence[tuple],
            target_shapes: Sequence[tuple]) -> dict[int, int]:
    """Which target leaf each leaf mirrors, as an optimizer moment mirrors its parameter.

    The targets' root is the longest key path that more than half of them start with (the
    parameters' subtree, even when a stray leaf elsewhere counts as a target too). A target's
    relative path is its path below the part of the root it shares: ``['dense']['kernel']``
    for ``[0]['dense']['kernel']`` under root ``[0]``. A leaf mirrors the target of equal shape
    whose relative path is the longest that ends the leaf's path.

    Args:
      paths, shapes: the leaves (plain paths, shapes).
      target_paths, target_shapes: the targets (e.g. the parameters).

    Returns:
      leaf index -> target index, for the leaves that mirror one.
    """
    root = _majority_prefix([tuple(p) for p in target_paths])
    by_shape: dict[tuple, list[tuple[tuple, int]]] = {}
    for t, (path, shape) in enumerate(zip(target_paths, target_shapes)):
        shared = 0
        while shared < min(len(root), len(path) - 1) and path[shared] == root[shared]:
            shared += 1
        by_shape.setdefault(tuple(shape), []).append((tuple(path[shared:]), t))
    found = {}
    for i, (path, shape) in enumerate(zip(paths, shapes)):
        matches = [(len(rel), t) for rel, t in by_shape.get(tuple(shape), ())
                   if len(path) > len(rel) and tuple(path[-len(rel):]) == rel]
        if matches:
            found[i] = max(matches)[1]
    return found


def _majority_prefix(paths: list[tuple]) -> tuple:
    """The longest prefix that more than half of ``paths`` start with and extend beyond."""
    root: tuple = ()
    while True:
        below = collections.Counter(p[len(root)] for p in paths
                                    if p[:len(root)] == root and len(p) > len(root) + 1)
        if not below:
            return root
        key, count = below.most_common(1)[0]
        if 2 * count <= len(paths):
            return root
        root += (key,)


def trace(fn: Callable, args: tuple):
    """``(closed_jaxpr, in_tree, out_shape)``: the jaxpr of ``fn`` over the flattened ``args``
    (the jaxpr whose equation indices ``parallel.Constraint`` refers to), the arguments' tree,
    and the output as a pytree of ``jax.ShapeDtypeStruct``."""
    flat_args, in_tree = jax.tree.flatten(args)
    out_tree = []

    def flat_fn(*flat):
        leaves, tree = jax.tree.flatten(fn(*jax.tree.unflatten(in_tree, flat)))
        out_tree.append(tree)
        return leaves

    closed = jax.make_jaxpr(flat_fn)(*flat_args)
    shapes = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in closed.out_avals]
    return closed, in_tree, jax.tree.unflatten(out_tree[0], shapes)


def returned_state(args: Sequence[Any], out_shape: Any,
                   donate_argnums: Sequence[int]) -> dict[int, int]:
    """Flat output leaf -> flat input leaf, for the stored state the step returns updated.

    An output entry (the output itself, or one entry of a tuple/list output) returns a donated
    argument when it has the argument's tree structure and leaf shapes.
    """
    offsets = np.cumsum([0] + [len(jax.tree.leaves(a)) for a in args])
    parts = list(out_shape) if isinstance(out_shape, (tuple, list)) else [out_shape]
    part_offsets = np.cumsum([0] + [len(jax.tree.leaves(p)) for p in parts])
    paired: dict[int, int] = {}
    for i in donate_argnums:
        want = jax.tree.structure(args[i])
        want_shapes = [tuple(np.shape(x)) for x in jax.tree.leaves(args[i])]
        for p, part in enumerate(parts):
            if (jax.tree.structure(part) == want
                    and [tuple(np.shape(x)) for x in jax.tree.leaves(part)] == want_shapes):
                for k in range(len(want_shapes)):
                    paired[int(part_offsets[p]) + k] = int(offsets[i]) + k
                break
    return paired


def _inside_optax_state(tree: Any) -> list[int]:
    """Flat indices of the leaves of ``tree`` that sit inside an optax state object."""
    found, index = [], 0
    for node in jax.tree.leaves(tree, is_leaf=_is_optax_state):
        count = len(jax.tree.leaves(node)) if _is_optax_state(node) else 1
        if _is_optax_state(node):
            found += range(index, index + count)
        index += count
    return found


def _is_optax_state(node: Any) -> bool:
    return type(node).__module__.split(".")[0] == "optax"


def _updated_in_place(jaxpr, returned: dict[int, int]) -> set[int]:
    """Inputs whose returned output is ``input ± something`` and that are read elsewhere too."""
    forms, uses = _forms(jaxpr, [("same", j) for j in range(len(jaxpr.invars))])
    found = set()
    for out, j in returned.items():
        atom = jaxpr.outvars[out]
        form = None if isinstance(atom, jax_core.Literal) else forms.get(atom)
        if form == ("plus", j) and uses.get(j, 0) > 1:  # the update, and another read
            found.add(j)
    return found


def _forms(jaxpr, in_forms: Sequence[tuple | None]) -> tuple[dict, dict]:
    """Follows the inputs through ``jaxpr``.

    Returns:
      ``(forms, uses)``: ``forms`` maps a variable to ``("same", j)`` when it equals input
      ``j`` (up to dtype), ``("plus", j)`` when it is input ``j`` plus or minus something;
      ``uses`` counts, per input, the equations that compute something from its value (the
      ``+`` of an update included; casts, copies and calls are looked through).
    """
    forms = {var: form for var, form in zip(jaxpr.invars, in_forms) if form is not None}
    uses: dict[int, int] = {}

    def form_of(atom):
        return None if isinstance(atom, jax_core.Literal) else forms.get(atom)

    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        ins = [form_of(a) for a in eqn.invars]
        same = [f[1] for f in ins if f is not None and f[0] == "same"]
        if not any(f is not None for f in ins):
            continue
        if name in _SAME_VALUE and ins[0] is not None:
            forms[eqn.outvars[0]] = ins[0]
            continue
        if name in _CALLS:
            body = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
            body = body.jaxpr if isinstance(body, jax_core.ClosedJaxpr) else body
            inner_forms, inner_uses = _forms(body, ins)
            for var, atom in zip(eqn.outvars, body.outvars):
                if not isinstance(atom, jax_core.Literal) and atom in inner_forms:
                    forms[var] = inner_forms[atom]
            for j, n in inner_uses.items():
                uses[j] = uses.get(j, 0) + n
            continue
        if name in ("add", "add_any") and len(same) == 1:
            forms[eqn.outvars[0]] = ("plus", same[0])
        elif name == "sub" and ins[0] is not None and ins[0][0] == "same":
            forms[eqn.outvars[0]] = ("plus", ins[0][1])
        for j in same:
            uses[j] = uses.get(j, 0) + 1
    return forms, uses
