"""Moving arrays between device sets, device to device, in one process or several.

``jax.device_put`` copies device to device only when every target shard already exists whole
on some source device (the same layout, or a replicated source); any other change of layout,
even on the same devices, reads the array back to the host and uploads it again. Here a layout
change is a compiled reshard (a ``jax.jit`` identity with the target's ``out_shardings``: XLA's
collectives, on the devices), and a move to other devices is a copy that keeps the layout.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# Compiled reshard programs by target sharding (jit caches per input sharding and shape itself).
_RESHARDS: dict = {}
_ARRIVALS: dict = {}


def reshard(x: jax.Array, sharding: NamedSharding) -> jax.Array:
    """``x`` laid out as ``sharding`` on the devices it is already on (a compiled program)."""
    if x.sharding == sharding:
        return x
    if tuple(x.sharding._device_assignment) != tuple(sharding._device_assignment):
        return jax.device_put(x, sharding)  # JAX reorders device to device, then reshards
    program = _RESHARDS.get(sharding)
    if program is None:
        program = _RESHARDS[sharding] = jax.jit(lambda a: a, out_shardings=sharding)
    return program(x)


def transfer(x: jax.Array, sharding: NamedSharding) -> jax.Array:
    """``x`` laid out as ``sharding``, moved device to device, never through host memory.

    In one process: a reshard if ``x`` is on the target's devices; otherwise a copy that keeps
    ``x``'s layout onto as many target devices (after gathering ``x`` onto each of its own
    devices if the counts differ), then a reshard there. Across processes JAX moves an array
    only between equal layouts on equally many devices (its cross-host transfer), so ``x`` is
    replicated on its own devices, copied replicated onto each group of as many target devices,
    the copies joined into one array over all target devices, and resharded there.

    Raises:
      ValueError: across processes, the target device count is not a multiple of the source's.
    """
    source = x.sharding
    if source == sharding:
        return x
    if not isinstance(source, NamedSharding) or not isinstance(sharding, NamedSharding):
        return jax.device_put(x, sharding)
    if source.device_set == sharding.device_set:
        return reshard(x, sharding)
    if jax.process_count() == 1:
        return _move_in_process(x, sharding)
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):  # moved as its raw key data
        data = transfer(jax.random.key_data(x), NamedSharding(sharding.mesh, sharding.spec))
        return reshard(jax.random.wrap_key_data(data, impl=jax.random.key_impl(x)), sharding)
    if source.is_fully_replicated and sharding.device_set <= source.device_set:  # a subset
        return reshard(_from_local_copies(x, sharding.mesh), sharding)
    size, targets = source.mesh.size, list(sharding.mesh.devices.flat)
    if len(targets) % size:
        raise ValueError(f"cannot move an array from {size} devices to {len(targets)} across "
                         "processes: the target count must be a multiple of the source's")
    here = reshard(x, NamedSharding(source.mesh, PartitionSpec()))
    local = {}
    for start in range(0, len(targets), size):
        group = targets[start:start + size]
        copy = here if set(group) == source.device_set else jax.device_put(
            here, NamedSharding(Mesh(np.array(group), ("copy",)), PartitionSpec()))
        local.update({shard.device: shard.data for shard in copy.addressable_shards})
    return reshard(_from_local_copies(local, sharding.mesh, x), sharding)


def arrival_sharding(source: NamedSharding, mesh: Mesh) -> NamedSharding:
    """The layout ``copy_to`` gives an array laid out as ``source`` on ``mesh``'s devices.

    On as many devices, ``source``'s own layout (the mesh's devices in ``source``'s mesh shape
    and axis names): every shard moves whole from one device to one device. On a different
    number of devices, replicated. A program on ``mesh`` can take the array in this layout and
    reshard it as it computes, so a move between stages runs no program of its own.
    """
    key = (source, mesh)
    found = _ARRIVALS.get(key)
    if found is None:
        targets = mesh.devices.flatten()
        if len(targets) == source.mesh.size:
            found = NamedSharding(Mesh(targets.reshape(source.mesh.devices.shape),
                                       source.mesh.axis_names,
                                       axis_types=source.mesh.axis_types), source.spec)
        else:
            found = NamedSharding(mesh, PartitionSpec())
        _ARRIVALS[key] = found
    return found


def copy_to(x: jax.Array, mesh: Mesh) -> jax.Array:
    """``x`` on ``mesh``'s devices (of this process) laid out as ``arrival_sharding`` says,
    device to device: a copy per shard, after gathering ``x`` if the device counts differ."""
    return copy_all([x], mesh)[0]


def copy_all(xs: list, mesh: Mesh) -> list:
    """``copy_to`` of each of ``xs`` onto ``mesh``, in one batched call.

    Where each shard moves whole from one device to one device (``arrival_sharding`` on as many
    devices) the shards are copied by the runtime's batched copy directly: ``jax.device_put``
    takes the same path but spends 150-200 us of Python per array on checks first (measured on
    CPU devices), which a pipeline pays for every activation of every micro-batch.
    """
    targets = [arrival_sharding(x.sharding, mesh) for x in xs]
    xs = [x if x.sharding.mesh.size == mesh.size or x.sharding.is_fully_replicated
          else reshard(x, NamedSharding(x.sharding.mesh, PartitionSpec())) for x in xs]
    direct = [i for i, x in enumerate(xs)
              if _BATCHED_COPY is not None and x.sharding.mesh.size == mesh.size
              and x.is_fully_addressable and not x.is_deleted()]
    out = [None] * len(xs)
    moved = set(direct)
    others = [i for i in range(len(xs)) if i not in moved]
    if others:
        for i, y in zip(others, jax.device_put([xs[i] for i in others],
                                               [targets[i] for i in others])):
            out[i] = y
    if direct:
        picked = [targets[i] for i in direct]
        copies = _BATCHED_COPY([xs[i] for i in direct],
                               [t._internal_device_list for t in picked], picked,
                               [_ALWAYS_COPY] * len(direct))
        for i, y in zip(direct, copies):
            out[i] = y
    return out


try:  # the copy ``jax.device_put`` ends in for a shard-to-shard move (JAX's own, not public)
    from jax._src.lib import xla_client as _xc
    _BATCHED_COPY = _xc.batched_copy_array_to_devices_with_sharding
    _ALWAYS_COPY = _xc.ArrayCopySemantics.ALWAYS_COPY
except (ImportError, AttributeError):  # another JAX: jax.device_put does it, only slower
    _BATCHED_COPY = _ALWAYS_COPY = None


def _move_in_process(x: jax.Array, sharding: NamedSharding) -> jax.Array:
    """Device to device onto other devices of this process: a copy, then a reshard there."""
    return reshard(copy_to(x, sharding.mesh), sharding)


def _from_local_copies(copies, mesh: Mesh, like: jax.Array | None = None) -> jax.Array:
    """One array replicated over ``mesh`` from whole copies on this process's devices.

    ``copies`` is a replicated array (its shards are the copies) or a dict device -> copy.
    """
    like = copies if like is None else like
    if not isinstance(copies, dict):
        copies = {shard.device: shard.data for shard in copies.addressable_shards}
    everywhere = NamedSharding(mesh, PartitionSpec())
    local = [copies[d] for d in everywhere.addressable_devices_indices_map(like.shape)]
    return jax.make_array_from_single_device_arrays(like.shape, everywhere, local, dtype=like.dtype)


def spans_every_process(x) -> bool:
    """Whether devices of every process hold a part of ``x`` (what orbax needs to save it)."""
    return len({d.process_index for d in x.sharding.device_set}) == jax.process_count()


def on_all_devices_sharding() -> NamedSharding:
    """Replicated over every device of every process."""
    return NamedSharding(Mesh(np.array(jax.devices()), ("all",)), PartitionSpec())


def on_all_devices(x: jax.Array) -> jax.Array:
    """``x`` replicated over every device of every process."""
    return transfer(x, on_all_devices_sharding())


def place_outputs(results, shardings, mesh: Mesh, spread=None) -> list:
    """A pipelined step's outputs moved to their planned ``shardings``; with several processes,
    each replicated one (a metric on one stage's devices) spread over the whole ``mesh`` so every
    process reads it. ``spread``: per output, whether it may be spread (default: all)."""
    placed = [x if x.sharding == sh else transfer(x, sh) for x, sh in zip(results, shardings)]
    if jax.process_count() == 1:
        return placed
    everywhere = NamedSharding(mesh, PartitionSpec())
    spread = [True] * len(placed) if spread is None else spread
    return [transfer(x, everywhere) if ok and x.sharding.is_fully_replicated else x
            for x, ok in zip(placed, spread)]
