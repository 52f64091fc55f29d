"""Specs on a logical mesh and what they cost: collectives (alpha-beta per mesh axis), resharding,
compute split over shards.

A *spec* is the solver's form of a ``PartitionSpec``: one tuple of mesh-axis indices per array
dimension, major axis first (``((0,), ())`` is ``P("data", None)`` on a ``("data", "model")``
mesh).
"""
from __future__ import annotations

import functools
import math

from jax.sharding import PartitionSpec

from parallel.profiles import DeviceProfile

Spec = tuple[tuple[int, ...], ...]


def replicated(ndim: int) -> Spec:
    """The spec that keeps every dimension whole."""
    return ((),) * ndim


def used_axes(spec: Spec) -> tuple[int, ...]:
    return tuple(a for dim in spec for a in dim)


class MeshModel:
    """A logical mesh and the alpha-beta cost of working on it.

    Args:
      axis_names: mesh axis names, e.g. ``("data", "model")``.
      axis_sizes: devices along each axis.
      profile: the device whose compute and link figures price the work.
    """

    def __init__(self, axis_names: tuple[str, ...], axis_sizes: tuple[int, ...],
                 profile: DeviceProfile, merged_all_reduce: bool = False):
        self.merged_all_reduce = merged_all_reduce
        self.axis_names = tuple(axis_names)
        self.axis_sizes = tuple(int(s) for s in axis_sizes)
        self.profile = profile
        # Axes of size 1 cannot split anything; strategies use only the others.
        self.axes = tuple(i for i, s in enumerate(self.axis_sizes) if s > 1)
        self._reshard_cache: dict[tuple, float] = {}

    @functools.cached_property
    def combined(self) -> MeshModel:
        """The mesh for work whose all-reduces XLA merges with their peers' (the gradient syncs
        feeding the optimizer): those pay the link latency once per step, not once each."""
        return MeshModel(self.axis_names, self.axis_sizes, self.profile, merged_all_reduce=True)

    def group_size(self, axes) -> int:
        return math.prod(self.axis_sizes[a] for a in axes)

    def shards(self, spec: Spec) -> int:
        """How many pieces ``spec`` cuts an array into."""
        return self.group_size(used_axes(spec))

    def fits(self, shape: tuple[int, ...], spec: Spec) -> bool:
        """Whether every dimension divides evenly by the axes splitting it."""
        return all(size % self.group_size(dim) == 0 for size, dim in zip(shape, spec))

    def partition_spec(self, spec: Spec) -> PartitionSpec:
        """The ``PartitionSpec`` of ``spec`` with the mesh's axis names."""
        entries = []
        for dim in spec:
            names = tuple(self.axis_names[a] for a in dim)
            entries.append(None if not names else names[0] if len(names) == 1 else names)
        while entries and entries[-1] is None:
            entries.pop()
        return PartitionSpec(*entries)

    # Collectives: time in seconds of one collective over the devices of ``axes``.
    def all_reduce(self, local_bytes: float, axes) -> float:
        n = self.group_size(axes)
        if n == 1:
            return 0.0
        latency = 0.0 if self.merged_all_reduce else self.profile.link_latency_s
        return latency + 2 * (n - 1) / n * local_bytes / self.profile.link_bandwidth

    def all_gather(self, gathered_bytes: float, axes) -> float:
        """``gathered_bytes``: the per-device size after the gather."""
        n = self.group_size(axes)
        return self.profile.comm_time((n - 1) / n * gathered_bytes) if n > 1 else 0.0

    def reduce_scatter(self, local_bytes: float, axes) -> float:
        """``local_bytes``: the per-device size before the scatter."""
        n = self.group_size(axes)
        return self.profile.comm_time((n - 1) / n * local_bytes) if n > 1 else 0.0

    def all_to_all(self, local_bytes: float, axes) -> float:
        n = self.group_size(axes)
        return self.profile.comm_time((n - 1) / n * local_bytes) if n > 1 else 0.0

    def compute_time(self, flops: float, shards: int) -> float:
        return flops / shards / self.profile.peak_flops

    def memory_time(self, nbytes: float, shards: int) -> float:
        """Time of an operation bound by memory traffic (element-wise work)."""
        return nbytes / shards / self.profile.memory_bandwidth

    def reshard(self, shape: tuple[int, ...], itemsize: int, src: Spec, dst: Spec) -> float:
        """Time to turn an array laid out as ``src`` into ``dst``.

        Axes that stay on the same dimension cost nothing; an axis that leaves a dimension is
        all-gathered, or moved by an all-to-all when it reappears on another dimension; an axis
        that only appears in ``dst`` is a local slice and free.
        """
        if src == dst:
            return 0.0
        key = (shape, itemsize, src, dst)
        cost = self._reshard_cache.get(key)
        if cost is None:
            cost = self._reshard_cache[key] = self._reshard(shape, itemsize, src, dst)
        return cost

    def _reshard(self, shape, itemsize, src: Spec, dst: Spec) -> float:
        removed, added = set(), set()
        for s, t in zip(src, dst):
            common = 0
            while common < min(len(s), len(t)) and s[common] == t[common]:
                common += 1
            removed.update(s[common:])
            added.update(t[common:])
        if not removed:
            return 0.0
        local = math.prod(shape) * itemsize / self.shards(src)
        moved = sorted(removed & added)
        gathered = sorted(removed - added)
        cost = self.all_to_all(local, moved) if moved else 0.0
        if gathered:
            whole = local * self.group_size(gathered)
            cost += self.all_gather(whole, gathered)
            # Gathering along a dimension behind a longer-than-1 one is a gather along the
            # major dimension and then a transposing copy of the result.
            leading = next((i for i, size in enumerate(shape) if size > 1), 0)
            if any(set(dim) & removed for dim in src[leading + 1:]):
                cost += self.memory_time(2 * whole, 1)
        return cost
