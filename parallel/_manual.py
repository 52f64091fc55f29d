"""ManualParallel: place leaves by mapping their logical axis names to mesh axes.

Models name the dimensions of their parameters (``("embed", "mlp")``); rules such as
``{"mlp": "model"}`` say which mesh axis each name is split over. Megatron-style tensor
parallelism for a GPT is ``{"heads": "model", "mlp": "model", "vocab": "model"}``.

Which leaves get which names: ``logical_axes`` has one entry per positional argument, a pytree
whose leaves are tuples of names (or ``PartitionSpec``s of names, as ``nnx.get_partition_spec``
returns). A leaf of the argument takes the names of the entry whose key path is the longest
prefix of the leaf's key path, so ``{"w": names_tree}`` names only the leaves under ``"w"``, and
``(names_tree, None)`` only the first entry of a ``(weights, optimizer_state)`` tuple.

Optimizer state: a stored-state leaf (of a donated argument) without names of its own that
mirrors a named leaf gets that leaf's spec. Mirroring is by structure, not by key names: equal
shapes, and the leaf's key path ends with the named leaf's path below the prefix all named
leaves share (``[1][0].mu['dense']['kernel']`` mirrors ``[0]['dense']['kernel']``), which is
how optax lays out its moments (``parallel._roles.mirrors``). Everything else is replicated;
batch leaves are split over ``"data"``.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import PartitionSpec

from parallel import mesh as mesh_lib
from parallel._errors import PlanError
from parallel._methods import Method, batch_leaf_spec, register_method, warn_once
from parallel._roles import BATCH, OTHER, mirrors, plain_path

MEGATRON_RULES = {"heads": "model", "mlp": "model", "vocab": "model", "expert": "model"}


def _is_names(x: Any) -> bool:
    if x is None or isinstance(x, PartitionSpec):
        return True
    return isinstance(x, tuple) and all(e is None or isinstance(e, str) for e in x)


class ManualParallel(Method):
    """Places leaves by logical-axis rules (tensor parallelism written by hand).

    Args:
      rules: logical axis name -> mesh axis name, a tuple of mesh axis names, or ``None``
        (replicated). ``None`` means ``MEGATRON_RULES``.
      mesh: axis name -> size; ``None`` takes the largest divisor of the device count that is
        at most its square root for ``"model"`` and the rest for ``"data"`` (8 -> data 4,
        model 2).
      strict: raise instead of replicating a dimension whose size does not divide by its mesh
        axis size.
    """

    name = "manual"

    def __init__(self, rules: Mapping[str, Any] | None = None,
                 mesh: Mapping[str, int] | None = None, strict: bool = False):
        super().__init__(mesh)
        rules = dict(MEGATRON_RULES if rules is None else rules)
        for logical, target in rules.items():
            targets = target if isinstance(target, tuple) else (target,)
            if not all(t is None or isinstance(t, str) for t in targets):
                raise PlanError(f"rule {logical!r} -> {target!r}: a rule maps a logical axis "
                                 f"name to a mesh axis name, a tuple of them, or None")
        self.rules = rules
        self.strict = strict

    def __repr__(self) -> str:
        return f"ManualParallel(rules={self.rules}, mesh={self.mesh}, strict={self.strict})"

    def rule_axes(self) -> list[str]:
        """Mesh axes the rules map to, in first-use order."""
        axes = []
        for target in self.rules.values():
            for axis in target if isinstance(target, tuple) else (target,):
                if axis is not None and axis not in axes:
                    axes.append(axis)
        return axes

    def default_mesh(self, num_devices: int) -> dict[str, int]:
        model = max(d for d in range(1, math.isqrt(num_devices) + 1) if num_devices % d == 0)
        return {mesh_lib.DATA_AXIS: num_devices // model, mesh_lib.MODEL_AXIS: model}

    def known_axes(self) -> tuple[str, ...]:
        return (mesh_lib.DATA_AXIS, *self.rule_axes())

    def resolve_mesh_shape(self, num_devices: int) -> dict[str, int]:
        shape = super().resolve_mesh_shape(num_devices)
        missing = [axis for axis in self.rule_axes() if axis not in shape]
        if missing:
            raise PlanError(f"rules {self.rules} map to mesh axes {missing} that mesh "
                             f"{shape} does not have; add them to parallel.mesh or fix the rules")
        return shape

    def prepare(self, abstract_args, mesh_shape, logical_axes, roles):
        """Resolves each leaf's logical names, and the specs unnamed stored leaves mirror."""
        names_by_arg, named, unnamed = [], [], []
        for i, arg in enumerate(abstract_args):
            entry = logical_axes[i] if logical_axes is not None and i < len(logical_axes) else None
            table = self._names_table(entry)
            names_by_arg.append(table)
            leaves = jax.tree_util.tree_flatten_with_path(arg)[0]
            for (key_path, leaf), role in zip(leaves, roles.by_arg[i]):
                path, shape = (i, *plain_path(key_path)), tuple(np.shape(leaf))
                names = _lookup(table, path[1:])
                if names is not None and role != BATCH:
                    spec = self._spec(names, shape, jax.tree_util.keystr(key_path), mesh_shape)
                    named.append((path, shape, spec))
                elif names is None and role not in (BATCH, OTHER):
                    unnamed.append((path, shape))
        found = mirrors([p for p, _ in unnamed], [s for _, s in unnamed],
                        [p for p, _, _ in named], [s for _, s, _ in named])
        mirrored = {unnamed[u][0]: named[t][2] for u, t in found.items()}
        return {"names": names_by_arg, "mirrored": mirrored}

    def leaf_spec(self, role, path, key_path, leaf, mesh_shape, argnum, context):
        plain = plain_path(key_path)
        names = _lookup(context["names"][argnum], plain)
        if names is not None:
            return self._spec(names, np.shape(leaf), path, mesh_shape)
        return context["mirrored"].get((argnum, *plain), PartitionSpec())

    def batch_spec(self, path, leaf, mesh_shape, argnum, key_path, context):
        names = _lookup(context["names"][argnum], plain_path(key_path))
        if names is not None:
            return self._spec(names, np.shape(leaf), path, mesh_shape)
        return batch_leaf_spec(path, leaf, mesh_shape, argnum, self.batch_axis)

    def _names_table(self, entry: Any) -> list[tuple[tuple, tuple]]:
        if entry is None:
            return []
        flat = jax.tree_util.tree_flatten_with_path(entry, is_leaf=_is_names)[0]
        return [(plain_path(kp), tuple(names)) for kp, names in flat if names is not None]

    def _spec(self, names: tuple, shape: tuple, path: str,
              mesh_shape: Mapping[str, int]) -> PartitionSpec:
        if len(names) != len(shape):
            raise PlanError(f"leaf {path} has shape {tuple(shape)} ({len(shape)} dims) but "
                             f"logical axes {names} ({len(names)} names); give one name (or "
                             f"None) per dimension")
        entries, used = [], set()
        for dim, (name, size) in enumerate(zip(names, shape)):
            target = self.rules.get(name) if name is not None else None
            axes = tuple(a for a in (target if isinstance(target, tuple) else (target,))
                         if a is not None)
            ways = math.prod(mesh_shape[a] for a in axes)
            if not axes or ways == 1:
                entries.append(None)
                continue
            problem = None
            if used.intersection(axes):
                problem = (f"mesh axes {axes} already split another dimension of {path} "
                           f"(logical axes {names})")
            elif size % ways:
                problem = (f"dimension {dim} ({name!r}, size {size}) of {path} does not divide "
                           f"by mesh axes {axes} of size {ways}")
            if problem:
                if self.strict:
                    raise PlanError(f"{problem}; change the rule for {name!r}, the mesh, or "
                                     f"the model size (strict=True refuses to replicate it)")
                warn_once(f"{problem}; replicating that dimension instead")
                entries.append(None)
                continue
            used.update(axes)
            entries.append(axes[0] if len(axes) == 1 else axes)
        while entries and entries[-1] is None:
            entries.pop()
        return PartitionSpec(*entries)


def _lookup(table: Sequence[tuple[tuple, tuple]], path: tuple) -> tuple | None:
    best, best_len = None, -1
    for prefix, names in table:
        if len(prefix) > best_len and path[:len(prefix)] == prefix:
            best, best_len = names, len(prefix)
    return best


def _manual_factory(mesh=None, rules=None, memory_budget_bytes=None, num_micro_batches=1,
                    profile=None):
    del profile  # the rules fix the layout whatever the device
    if num_micro_batches != 1:
        raise PlanError(f"parallel.num_micro_batches={num_micro_batches} applies to pipeline "
                         f"methods; method 'manual' runs the whole batch at once. Set it to 1")
    if memory_budget_bytes is not None:
        warn_once(f"method 'manual' does not search plans, so parallel.memory_budget_bytes="
                  f"{memory_budget_bytes} is not enforced")
    return ManualParallel(rules=rules, mesh=mesh)


register_method("manual", _manual_factory)
