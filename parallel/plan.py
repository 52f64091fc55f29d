"""Plans: which mesh, and which ``PartitionSpec`` each input and output leaf gets.

A plan is plain data. It is made by a ``Method``, compiled by ``parallelize``, saved as JSON with
checkpoints, and printed by ``scripts/plan.py``. Leaves are named by their key path (as
``jax.tree_util.keystr`` prints it), so a plan read back from JSON applies to any pytree whose
leaves have the same paths and shapes.
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from parallel import mesh as mesh_lib
from parallel._errors import PlanError


def spec_to_json(spec: PartitionSpec) -> list:
    """``P('data', None, ('a', 'b'))`` -> ``['data', None, ['a', 'b']]``."""
    return [list(entry) if isinstance(entry, tuple) else entry for entry in spec]


def spec_from_json(entries: Sequence) -> PartitionSpec:
    """Inverse of ``spec_to_json``."""
    return PartitionSpec(*(tuple(e) if isinstance(e, list) else e for e in entries))


def spec_axes(spec: PartitionSpec) -> list[str]:
    """The mesh axis names a spec uses, in order."""
    axes = []
    for entry in spec:
        if entry is None:
            continue
        axes.extend(entry if isinstance(entry, tuple) else (entry,))
    return axes


@dataclasses.dataclass(frozen=True)
class LeafPlan:
    """Placement of one array leaf.

    Attributes:
      path: the leaf's key path, e.g. ``"[0]['dense']['kernel']"``.
      shape: global shape.
      dtype: dtype name, e.g. ``"float32"``.
      spec: how the leaf is split over the mesh axes.
    """

    path: str
    shape: tuple[int, ...]
    dtype: str
    spec: PartitionSpec

    def bytes_per_device(self, mesh_shape: Mapping[str, int]) -> int:
        """Bytes of this leaf's shard on one device."""
        ways = math.prod(mesh_shape.get(axis, 1) for axis in spec_axes(self.spec))
        itemsize = _itemsize(self.dtype)
        return math.prod(self.shape) * itemsize // ways

    def to_json(self) -> dict:
        return {"path": self.path, "shape": list(self.shape), "dtype": self.dtype,
                "spec": spec_to_json(self.spec)}

    @classmethod
    def from_json(cls, data: Mapping) -> LeafPlan:
        return cls(data["path"], tuple(data["shape"]), data["dtype"], spec_from_json(data["spec"]))


@dataclasses.dataclass(frozen=True)
class Constraint:
    """A sharding constraint on an intermediate value of the traced function.

    Attributes:
      eqn: index of the equation in ``jax.make_jaxpr`` of the function over flat arguments
        (the top-level jaxpr ``parallelize`` traces).
      output: which output of that equation.
      spec: the ``PartitionSpec`` the value is constrained to.
    """

    eqn: int
    output: int
    spec: PartitionSpec

    def to_json(self) -> dict:
        return {"eqn": self.eqn, "output": self.output, "spec": spec_to_json(self.spec)}

    @classmethod
    def from_json(cls, data: Mapping) -> Constraint:
        return cls(int(data["eqn"]), int(data["output"]), spec_from_json(data["spec"]))


@dataclasses.dataclass(frozen=True)
class Plan:
    """How a function's arguments and results are laid out on a mesh.

    Attributes:
      method: name of the method that made the plan (``"data"``, ``"zero3"``, ...).
      mesh_shape: axis name -> size, in mesh order.
      inputs: one tuple of ``LeafPlan`` per positional argument, in flatten order.
      outputs: the ``LeafPlan`` of every output leaf, in flatten order.
      constraints: sharding constraints on intermediates (empty for the manual methods).
      batch_argnums: arguments whose leading dimension is the global batch.
      donate_argnums: arguments whose buffers the step reuses for its outputs.
      extras: method-specific JSON data (e.g. solver statistics, pipeline stages).
    """

    method: str
    mesh_shape: dict[str, int]
    inputs: tuple[tuple[LeafPlan, ...], ...]
    outputs: tuple[LeafPlan, ...]
    constraints: tuple[Constraint, ...] = ()
    batch_argnums: tuple[int, ...] = (1,)
    donate_argnums: tuple[int, ...] = (0,)
    extras: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def num_devices(self) -> int:
        return math.prod(self.mesh_shape.values())

    def make_mesh(self, devices: Sequence[jax.Device] | None = None) -> Mesh:
        """The mesh this plan was made for, over ``devices`` (default: all devices)."""
        return mesh_lib.make_mesh(self.mesh_shape, devices)

    def matches(self, abstract_args: Sequence[Any]) -> bool:
        """Whether every leaf of ``abstract_args`` has a planned path with the same shape."""
        if len(abstract_args) != len(self.inputs):
            return False
        for arg, planned in zip(abstract_args, self.inputs):
            leaves = _leaves_with_paths(arg)
            if len(leaves) != len(planned):
                return False
            by_path = {leaf.path: leaf for leaf in planned}
            for path, leaf in leaves:
                entry = by_path.get(path)
                if entry is None or entry.shape != tuple(np.shape(leaf)):
                    return False
        return True

    def input_specs(self, args: Sequence[Any]) -> tuple[Any, ...]:
        """One pytree of ``PartitionSpec`` per argument, shaped like ``args``.

        Raises:
          PlanError: a leaf of ``args`` has no planned path, or another shape.
        """
        if len(args) != len(self.inputs):
            raise PlanError(
                f"the plan has {len(self.inputs)} arguments but {len(args)} were given"
            )
        return tuple(_specs_like(arg, planned, f"argument {i}")
                     for i, (arg, planned) in enumerate(zip(args, self.inputs)))

    def output_specs(self, outputs: Any) -> Any:
        """A pytree of ``PartitionSpec`` shaped like ``outputs`` (abstract outputs are fine)."""
        return _specs_like(outputs, self.outputs, "output")

    def to_json(self, indent: int | None = 1) -> str:
        """The plan as JSON text."""
        return json.dumps({
            "method": self.method,
            "mesh_shape": self.mesh_shape,
            "inputs": [[leaf.to_json() for leaf in arg] for arg in self.inputs],
            "outputs": [leaf.to_json() for leaf in self.outputs],
            "constraints": [c.to_json() for c in self.constraints],
            "batch_argnums": list(self.batch_argnums),
            "donate_argnums": list(self.donate_argnums),
            "extras": self.extras,
        }, indent=indent)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        """Reads a plan written by ``to_json``."""
        data = json.loads(text)
        return cls(
            method=data["method"],
            mesh_shape={k: int(v) for k, v in data["mesh_shape"].items()},
            inputs=tuple(tuple(LeafPlan.from_json(x) for x in arg) for arg in data["inputs"]),
            outputs=tuple(LeafPlan.from_json(x) for x in data["outputs"]),
            constraints=tuple(Constraint.from_json(x) for x in data.get("constraints", [])),
            batch_argnums=tuple(data.get("batch_argnums", (1,))),
            donate_argnums=tuple(data.get("donate_argnums", (0,))),
            extras=dict(data.get("extras", {})),
        )

    def format_table(self, report: Any = None) -> str:
        """A readable table: each input leaf's path, shape, spec and bytes per device.

        Args:
          report: an optional ``parallel.Report`` whose figures are appended.
        """
        mesh = ", ".join(f"{k}={v}" for k, v in self.mesh_shape.items())
        lines = [f"plan: method={self.method} mesh=({mesh}) devices={self.num_devices}"]
        rows = [("argument", "path", "shape", "dtype", "spec", "bytes/device")]
        total = 0
        for i, arg in enumerate(self.inputs):
            for leaf in arg:
                per_device = leaf.bytes_per_device(self.mesh_shape)
                total += per_device
                rows.append((str(i), leaf.path or "<root>", "x".join(map(str, leaf.shape)) or "()",
                             leaf.dtype, _spec_str(leaf.spec), f"{per_device:,}"))
        widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
        for n, row in enumerate(rows):
            lines.append("  ".join(cell.ljust(w) if c < 5 else cell.rjust(w)
                                   for c, (cell, w) in enumerate(zip(row, widths))))
            if n == 0:
                lines.append("  ".join("-" * w for w in widths))
        lines.append(f"inputs total per device: {total:,} bytes")
        if self.constraints:
            lines.append(f"constraints on intermediates: {len(self.constraints)}")
        if "explanation" in self.extras:  # a solver's account of its choice (ShardParallel)
            lines.append(self.extras["explanation"])
        if report is not None:
            lines.append(report.format())
        return "\n".join(lines)


def format_plan(plan: Plan, report: Any = None) -> str:
    """``plan.format_table(report)``: the text ``scripts/plan.py`` prints."""
    return plan.format_table(report)


def leaves_with_paths(tree: Any) -> list[tuple[str, Any]]:
    """``(keystr(path), leaf)`` for every leaf of ``tree``, in flatten order."""
    return _leaves_with_paths(tree)


def make_leaf_plans(tree: Any, spec_fn) -> tuple[LeafPlan, ...]:
    """A ``LeafPlan`` per leaf of ``tree`` with the spec ``spec_fn(path, key_path, leaf)``."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return tuple(
        LeafPlan(jax.tree_util.keystr(kp), tuple(np.shape(leaf)), _dtype_name(leaf),
                 spec_fn(jax.tree_util.keystr(kp), kp, leaf))
        for kp, leaf in flat
    )


def shardings_from_specs(mesh: Mesh, specs: Any) -> Any:
    """Maps a pytree of ``PartitionSpec`` to ``NamedSharding`` on ``mesh``."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def _leaves_with_paths(tree: Any) -> list[tuple[str, Any]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(jax.tree_util.keystr(kp), leaf) for kp, leaf in flat]


def _specs_like(tree: Any, planned: Sequence[LeafPlan], what: str) -> Any:
    by_path = {leaf.path: leaf for leaf in planned}
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    specs = []
    for kp, leaf in flat:
        path = jax.tree_util.keystr(kp)
        entry = by_path.get(path)
        if entry is None:
            raise PlanError(f"{what}: leaf {path or '<root>'} is not in the plan; re-plan for "
                             f"this pytree structure")
        if entry.shape != tuple(np.shape(leaf)):
            raise PlanError(f"{what}: leaf {path} has shape {tuple(np.shape(leaf))} but the plan "
                             f"was made for {entry.shape}; re-plan for these shapes")
        specs.append(entry.spec)
    return jax.tree_util.tree_unflatten(treedef, specs)


def _dtype_name(leaf: Any) -> str:
    return str(getattr(leaf, "dtype", np.asarray(leaf).dtype))


def _itemsize(dtype: str) -> int:
    try:
        return jnp.dtype(dtype).itemsize
    except TypeError:
        # Extended dtypes such as typed PRNG keys (``key<fry>``): two uint32 words.
        return 8 if "key" in dtype else 4


def _spec_str(spec: PartitionSpec) -> str:
    return "P(" + ", ".join(repr(e) for e in spec) + ")"
