"""Where a pipelined step's values live: per stage, the layout of each value the stage holds
(its intra-op plan's specs for parameters, the batch split over the stage's ``data`` axis,
optimizer state split over the stage's devices as ZeRO would) and how a value arrives from the
stage that made it. Mixed into ``StageRunner``, which sets the attributes these read."""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from parallel._transfer import arrival_sharding
from parallel.pipeline._tasks import Accumulator, combine_of

# Leaves smaller than this stay whole (splitting them saves little and costs a collective).
_SPLIT_MIN_ELEMENTS = 1024


class StageLayouts:
    """Per (value, stage) shardings of a placed program; see ``StageRunner`` for the fields."""

    def spec(self, v: int, stage: int) -> PartitionSpec:
        """The stage's intra-op spec for the values it plans (parameters, gradients);
        per-example values split their batch dimension over the stage's ``data`` axis;
        everything else replicated."""
        v = self.same_as.get(v, v)
        planned = self.specs.get(stage, {}).get(v)
        if planned is not None:
            return planned
        if v in self._update_only:
            return self._split_over_stage(v, stage)
        if v in self._like:  # made per step from a stored leaf of its shape: its layout
            return self.spec(self._like[v], stage)
        if v in self.crossing:
            return PartitionSpec()
        return example_spec(self.program.avals[v].shape, self.regions.batch_dim.get(v),
                            self.meshes[stage].shape.get("data", 1))

    def _split_over_stage(self, v: int, stage: int) -> PartitionSpec:
        """A stored leaf only the update reads (optimizer state), split over all the stage's
        devices along its largest dimension that divides (as ZeRO does within the stage)."""
        mesh = self.meshes[stage]
        axes = tuple(a for a in mesh.axis_names if mesh.shape[a] > 1)
        shape = self.program.avals[v].shape
        ways = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
        dims = [d for d, n in enumerate(shape) if ways > 1 and n % ways == 0]
        if not dims or int(np.prod(shape)) < _SPLIT_MIN_ELEMENTS:
            return PartitionSpec()
        dim = max(dims, key=lambda d: shape[d])
        return PartitionSpec(*([None] * dim), axes if len(axes) > 1 else axes[0])

    def sharding(self, v: int, stage: int) -> NamedSharding:
        return NamedSharding(self.meshes[stage], self.spec(v, stage))

    def input_sharding(self, v: int, stage: int, per_step: bool = False) -> NamedSharding:
        """How a task on ``stage`` takes ``v``: as the stage lays it out if it is made there;
        else as it arrives from its stage (``arrival_sharding``), resharded inside the task's
        program. Across processes it arrives laid out as the stage wants it. A per-step task
        (``per_step``) reads a batch leaf whole, as the step received it."""
        want = self.sharding(v, stage)
        source = self.source_stage(v)
        if per_step and v in self.batch_inputs and jax.process_count() == 1:
            have = self.batch_sharding(v, source)
            return have if self.meshes[source] is self.meshes[stage] else arrival_sharding(
                have, self.meshes[stage])
        if (source is None or self.meshes[source] is self.meshes[stage]
                or jax.process_count() > 1):
            return want
        return arrival_sharding(self.source_sharding(v, source), self.meshes[stage])

    def source_stage(self, v: int) -> int | None:
        """The stage holding the original of ``v`` (``None``: a constant or the index)."""
        if v == self.index_value or v in self.program.consts:
            return None
        return self.placement.value_stage.get(v, self.placement.home.get(v))

    def source_sharding(self, v: int, stage: int) -> NamedSharding:
        if v in self.program.inputs and v in self.regions.batch_dim:
            return self.sharding(v, stage)  # a micro-batch, as the split makes it
        if v in self.crossing and combine_of(self.regions, v) == "concat":
            return self._finished_sharding(v, stage)
        return self.sharding(v, stage)

    def _acc_sharding(self, acc: Accumulator, stage: int) -> NamedSharding:
        if acc.kind == "concat":
            return NamedSharding(self.meshes[stage], PartitionSpec())
        return self.sharding(acc.value, stage)

    def _aval(self, v: int, per_step: bool = False):
        """``v``'s aval; for per-step tasks over the global batch (a batch leaf, a concatenated
        per-example value)."""
        aval = self.regions.global_avals.get(v, self.program.avals[v]) if per_step \
            else self.program.avals[v]
        return jax.ShapeDtypeStruct(aval.shape, aval.dtype,
                                    weak_type=getattr(aval, "weak_type", False))

    def _finished_shape(self, v: int) -> tuple:
        aval = self.program.avals[v]
        if combine_of(self.regions, v) != "concat":
            return tuple(aval.shape)
        return global_shape(self._aval(v), self.num_micro_batches, self.regions.batch_dim.get(v, 0))

    def _finished_sharding(self, v: int, stage: int) -> NamedSharding:
        if combine_of(self.regions, v) == "concat":
            return NamedSharding(self.meshes[stage], PartitionSpec())
        return self.sharding(v, stage)

    def batch_sharding(self, v: int, stage: int) -> NamedSharding:
        """How a global batch leaf is laid out on its stage (split over ``data`` if it can)."""
        size = self.meshes[stage].shape.get("data", 1)
        batch = self.program.avals[v].shape[0] * self.num_micro_batches
        spec = PartitionSpec("data") if size > 1 and batch % size == 0 else PartitionSpec()
        return NamedSharding(self.meshes[stage], spec)


def example_spec(shape: tuple, dim: int | None, data: int) -> PartitionSpec:
    """A per-example value's layout on a stage whose plan names none: its batch dimension
    ``dim`` split over the ``data`` axis (of size ``data``) where it divides, else whole."""
    if dim is None or data == 1 or shape[dim] % data:
        return PartitionSpec()
    return PartitionSpec(*([None] * dim), "data")


def global_shape(aval, m: int, axis: int = 0) -> tuple:
    shape = list(aval.shape)
    shape[axis] *= m
    return tuple(shape)
