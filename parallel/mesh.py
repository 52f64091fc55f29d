"""Device meshes: named axes over the local devices or every device of a multi-process run."""
from __future__ import annotations

import difflib
import math
from collections.abc import Mapping, Sequence

import jax
from jax.sharding import AxisType, Mesh

from parallel._errors import PlanError

DATA_AXIS = "data"
MODEL_AXIS = "model"


def resolve_mesh_shape(shape: Mapping[str, int] | None, num_devices: int) -> dict[str, int]:
    """Turns a user mesh shape into concrete axis sizes whose product is the device count.

    Args:
      shape: axis name -> size, in mesh order; one size may be ``-1`` to take the devices the
        other axes leave. ``None`` means ``{"data": num_devices}``.
      num_devices: how many devices the mesh must cover.

    Returns:
      An ordered dict axis name -> positive size with product ``num_devices``.

    Raises:
      PlanError: a size is not a positive integer or -1, more than one size is -1, or the
        sizes do not multiply to ``num_devices``.
    """
    if shape is None:
        return {DATA_AXIS: num_devices}
    if not isinstance(shape, Mapping) or not shape:
        raise PlanError(
            f"mesh shape must be a non-empty mapping axis name -> size such as "
            f"{{'data': 2, 'model': 4}}; got {shape!r}"
        )
    sizes = {}
    for name, size in shape.items():
        if not isinstance(name, str) or not name:
            raise PlanError(f"mesh axis names must be non-empty strings; got {name!r} in {dict(shape)}")
        if isinstance(size, bool) or not isinstance(size, int) or (size < 1 and size != -1):
            raise PlanError(
                f"mesh axis {name!r} has size {size!r}; use a positive integer, or -1 to fill "
                f"the remaining devices (mesh {dict(shape)})"
            )
        sizes[name] = size
    fill = [name for name, size in sizes.items() if size == -1]
    if len(fill) > 1:
        raise PlanError(f"only one mesh axis may be -1; got {fill} in mesh {dict(shape)}")
    known = math.prod(size for size in sizes.values() if size != -1)
    if fill:
        if num_devices % known:
            raise PlanError(
                f"mesh {dict(shape)}: the fixed axes multiply to {known}, which does not divide "
                f"the {num_devices} devices, so axis {fill[0]!r} cannot fill the rest; choose "
                f"fixed sizes whose product divides {num_devices}"
            )
        sizes[fill[0]] = num_devices // known
    elif known != num_devices:
        raise PlanError(
            f"mesh {dict(shape)} has {known} devices but {num_devices} are available; make the "
            f"sizes multiply to {num_devices} or set one axis to -1 to fill the rest"
        )
    return sizes


def make_mesh(
    shape: Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """Builds a mesh with classic (``Auto``) axes for ``jax.jit`` shardings.

    Args:
      shape: axis name -> size (``-1`` fills the rest); ``None`` puts every device on ``"data"``.
      devices: the devices to use; ``None`` means ``jax.devices()``, which in a multi-process
        run is every device of every process.

    Returns:
      A ``jax.sharding.Mesh`` whose axis order is the order of ``shape``.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = resolve_mesh_shape(shape, len(devices))
    axis_types = (AxisType.Auto,) * len(sizes)
    return jax.make_mesh(tuple(sizes.values()), tuple(sizes), axis_types, devices=devices)


def check_axes_known(mesh_shape: Mapping[str, int], known: Sequence[str], who: str) -> None:
    """Raises if the mesh has an axis that ``who`` would leave idle.

    Args:
      mesh_shape: axis name -> size.
      known: the axis names ``who`` places something on.
      who: what is asking, for the message (e.g. ``"DataParallel"``).

    Raises:
      PlanError: an axis of size > 1 is not in ``known``.
    """
    for name, size in mesh_shape.items():
        if name in known or size == 1:
            continue
        hint = difflib.get_close_matches(name, list(known), n=1)
        did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise PlanError(
            f"mesh axis {name!r} (size {size}) in mesh {dict(mesh_shape)} is not used by {who}"
            f"{did_you_mean}; {who} places data only on axes {sorted(known)}. Rename the axis, "
            f"add a rule that maps a logical axis to it, or drop it from the mesh"
        )


def count_hosts(devices: Sequence[jax.Device], num_hosts: int | None = None,
                devices_per_host: int | None = None) -> int:
    """The hosts ``devices`` are spread over: ``num_hosts`` when given (a simulated cluster, or
    the config's ``cluster.num_hosts``), else the processes owning them.

    Hosts hold consecutive devices (``jax.devices()`` lists each process's devices together).

    Raises:
      PlanError: the topology does not match the devices: ``num_hosts`` x
        ``devices_per_host`` is not the device count, the devices do not split evenly over
        the hosts, or a multi-process run has another number of processes, or its processes'
        devices are not consecutive and equal in number.
    """
    devices = list(devices)
    processes = list(dict.fromkeys(d.process_index for d in devices))
    n = len(devices)
    if num_hosts is None:
        num_hosts = len(processes)
    if isinstance(num_hosts, bool) or not isinstance(num_hosts, int) or num_hosts < 1:
        raise PlanError(f"the host count must be a positive integer; got {num_hosts!r}")
    if devices_per_host is not None and num_hosts * devices_per_host != n:
        raise PlanError(
            f"the topology {num_hosts} hosts x {devices_per_host} devices per host = "
            f"{num_hosts * devices_per_host} devices does not match the {n} devices JAX sees; "
            f"set cluster.num_hosts and cluster.devices_per_host so they multiply to {n}")
    if n % num_hosts:
        raise PlanError(
            f"{n} devices do not split evenly over {num_hosts} hosts; set cluster.num_hosts to "
            f"a divisor of {n}")
    if len(processes) > 1:
        per_host = n // num_hosts
        owners = [d.process_index for d in devices]
        blocks = [owners[i:i + per_host] for i in range(0, n, per_host)]
        if len(processes) != num_hosts or any(len(set(b)) != 1 for b in blocks):
            raise PlanError(
                f"the topology {num_hosts} hosts x {per_host} devices does not match the devices "
                f"JAX sees: {len(processes)} processes own "
                f"{', '.join(str(owners.count(p)) for p in processes)} devices; each host must "
                "be one process owning consecutive devices")
    return num_hosts
