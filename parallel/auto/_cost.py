"""Specs on a logical mesh and what they cost: collectives (alpha-beta per mesh axis), resharding,
compute split over shards.

A *spec* is the solver's form of a ``PartitionSpec``: one tuple of mesh-axis indices per array
dimension, major axis first (``((0,), ())`` is ``P("data", None)`` on a ``("data", "model")``
mesh).
"""
from __future__ import annotations

import functools
import math

import numpy as np

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
      profile: the device whose compute and link figures price the work, and the hosts the
        devices sit on (``DeviceProfile.on_hosts``).
      first_device: index of the mesh's first device among the cluster's devices (a pipeline
        stage's sub-mesh starts further on); the mesh holds the devices from there on in
        row-major order, so a collective along an axis crosses hosts when its devices do.
      data_axis_named: the user named axis 0 ``data``: it splits only batch dimensions and
        stored state, even when it is the only axis.
    """

    def __init__(self, axis_names: tuple[str, ...], axis_sizes: tuple[int, ...],
                 profile: DeviceProfile, merged_all_reduce: bool = False,
                 first_device: int = 0, data_axis_named: bool = False):
        self.merged_all_reduce = merged_all_reduce
        self.data_axis_named = data_axis_named
        self.axis_names = tuple(axis_names)
        self.axis_sizes = tuple(int(s) for s in axis_sizes)
        self.profile = profile
        self.first_device = first_device
        # Axes of size 1 cannot split anything; strategies use only the others.
        self.axes = tuple(i for i, s in enumerate(self.axis_sizes) if s > 1)
        self._reshard_cache: dict[tuple, float] = {}
        self._matrix_cache: dict[tuple, np.ndarray] = {}
        self._hosts: dict[tuple[int, ...], int] = {}
        self._shards: dict[Spec, int] = {}

    @functools.cached_property
    def combined(self) -> MeshModel:
        """The mesh for work whose all-reduces XLA merges with their peers' (the gradient syncs
        feeding the optimizer): those pay the link latency once per step, not once each."""
        return MeshModel(self.axis_names, self.axis_sizes, self.profile, merged_all_reduce=True,
                         first_device=self.first_device, data_axis_named=self.data_axis_named)

    def renamed(self, axis_names: tuple[str, ...]) -> MeshModel:
        """The same devices with other axis names."""
        return MeshModel(axis_names, self.axis_sizes, self.profile, self.merged_all_reduce,
                         self.first_device, self.data_axis_named)

    def group_size(self, axes) -> int:
        return math.prod(self.axis_sizes[a] for a in axes)

    def hosts(self, axes: tuple[int, ...]) -> int:
        """How many hosts the devices of one collective over ``axes`` span (the most of any
        group)."""
        if self.profile.devices_per_host is None or not axes:
            return 1
        if axes not in self._hosts:
            self._hosts[axes] = self._count_hosts(axes)
        return self._hosts[axes]

    def _count_hosts(self, axes: tuple[int, ...]) -> int:
        index = np.arange(math.prod(self.axis_sizes)).reshape(self.axis_sizes)
        others = [a for a in range(len(self.axis_sizes)) if a not in axes]
        groups = np.transpose(index, others + list(axes)).reshape(-1, self.group_size(axes))
        host = (groups + self.first_device) // self.profile.devices_per_host
        return int(max(len(np.unique(row)) for row in host))

    def crosses_hosts(self, axis: int) -> bool:
        """Whether a collective along mesh axis ``axis`` crosses hosts."""
        return self.hosts((axis,)) > 1

    def shards(self, spec: Spec) -> int:
        """How many pieces ``spec`` cuts an array into."""
        n = self._shards.get(spec)
        if n is None:
            n = self._shards[spec] = self.group_size(used_axes(spec))
        return n

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
    def _collective(self, kind: str, nbytes: float, axes, latency: bool = True) -> float:
        axes = tuple(sorted(axes))
        return self.profile.collective_time(kind, nbytes, self.group_size(axes),
                                            self.hosts(axes), latency)

    def all_reduce(self, local_bytes: float, axes) -> float:
        return self._collective("all-reduce", local_bytes, axes, not self.merged_all_reduce)

    def all_gather(self, gathered_bytes: float, axes) -> float:
        """``gathered_bytes``: the per-device size after the gather."""
        return self._collective("all-gather", gathered_bytes, axes)

    def reduce_scatter(self, local_bytes: float, axes) -> float:
        """``local_bytes``: the per-device size before the scatter."""
        return self._collective("reduce-scatter", local_bytes, axes)

    def all_to_all(self, local_bytes: float, axes) -> float:
        return self._collective("all-to-all", local_bytes, axes)

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

    def reshard_matrix(self, shape: tuple[int, ...], itemsize: int,
                       specs: tuple[Spec, ...]) -> np.ndarray:
        """``reshard`` from each of ``specs`` (rows) to each (columns), read-only; kept, as
        the strategy tables of a mesh's repeated layers ask for the same ones."""
        key = (shape, itemsize, specs)
        found = self._matrix_cache.get(key)
        if found is None:
            found = np.array([[self.reshard(shape, itemsize, a, b) for b in specs]
                              for a in specs])
            found.flags.writeable = False
            self._matrix_cache[key] = found
        return found

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
