"""Moving arrays between device sets when those devices belong to several processes."""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def transfer(x: jax.Array, sharding: NamedSharding) -> jax.Array:
    """``jax.device_put(x, sharding)``, also from one process's devices to another's.

    In one process, or within one device set, that is ``jax.device_put``. Across processes JAX
    moves an array only between equal layouts on equally many devices (its cross-host
    transfer), so ``x`` is replicated on its own devices, copied replicated onto each group of
    as many target devices, the copies joined into one array over all target devices, and
    laid out as ``sharding`` says there.

    Raises:
      ValueError: the target device count is not a multiple of the source's.
    """
    source = x.sharding
    if (jax.process_count() == 1 or not isinstance(source, NamedSharding)
            or source.device_set == sharding.device_set):
        return jax.device_put(x, sharding)
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):  # moved as its raw key data
        data = transfer(jax.random.key_data(x), NamedSharding(sharding.mesh, sharding.spec))
        return jax.device_put(jax.random.wrap_key_data(data, impl=jax.random.key_impl(x)),
                              sharding)
    if source.is_fully_replicated and sharding.device_set <= source.device_set:  # a subset
        return jax.device_put(_from_local_copies(x, sharding.mesh), sharding)
    size, targets = source.mesh.size, list(sharding.mesh.devices.flat)
    if len(targets) % size:
        raise ValueError(f"cannot move an array from {size} devices to {len(targets)} across "
                         "processes: the target count must be a multiple of the source's")
    here = jax.device_put(x, NamedSharding(source.mesh, PartitionSpec()))
    local = {}
    for start in range(0, len(targets), size):
        group = targets[start:start + size]
        copy = here if set(group) == source.device_set else jax.device_put(
            here, NamedSharding(Mesh(np.array(group), ("copy",)), PartitionSpec()))
        local.update({shard.device: shard.data for shard in copy.addressable_shards})
    return jax.device_put(_from_local_copies(local, sharding.mesh, x), sharding)


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
