"""Device profiles: the one place that holds device-specific numbers.

The cost model (``analyze``'s ``estimated_step_time_s``) and the automatic sharding solver price
compute and communication with these figures. Everything else in ``parallel`` reads them from
here and never hard-codes a device number.
"""
from __future__ import annotations

import dataclasses
import functools
import time

import numpy as np

from parallel._errors import PlanError


class UnknownDeviceError(PlanError):
    """The running accelerator has no profile: nothing is priced as if it were another device."""


@dataclasses.dataclass(frozen=True)
class DeviceProfile:
    """Peak figures of one accelerator and its links.

    Attributes:
      name: profile name, e.g. ``"h100"``.
      peak_flops: dense matmul FLOP/s one device sustains in its fastest dtype (the solver's
        price of arithmetic).
      memory_bytes: memory one device has for the step.
      memory_bandwidth: bytes/s between the device's memory and its compute units.
      link_bandwidth: bytes/s one device sends over the collective links (the alpha-beta beta).
      link_latency_s: seconds a collective costs before the first byte (the alpha-beta alpha).
      native_reduce_scatter: whether XLA emits a real reduce-scatter on this platform; XLA:CPU
        lowers it to an all-reduce followed by a slice, which costs as much as the all-reduce.
      overlaps_memory: whether memory traffic hides behind arithmetic over a whole program (a
        roofline: the longer of the two). Simulated CPU devices share the host's cores and
        memory, and measured step times there track the sum of the two instead.
    """

    name: str
    peak_flops: float
    memory_bytes: int
    memory_bandwidth: float
    link_bandwidth: float
    link_latency_s: float
    native_reduce_scatter: bool = True
    overlaps_memory: bool = True
    dtype_flops: tuple[tuple[str, float], ...] = ()

    def peak_flops_for(self, dtype: str) -> float:
        """Dense matmul FLOP/s of one device computing in ``dtype`` (``"float32"``...).

        Raises:
          UnknownDeviceError: the profile has no figure for that dtype.
        """
        for name, flops in self.dtype_flops:
            if name == dtype:
                return flops
        if self.name == "cpu":  # measured in that dtype, shared as the float32 figure is
            return measured_cpu_flops(dtype) * self.peak_flops / measured_cpu_flops("float32")
        raise UnknownDeviceError(f"device profile {self.name!r} has no peak figure for {dtype}; "
                                 f"it has {', '.join(n for n, _ in self.dtype_flops)}")

    def compute_time(self, flops: float, bytes_accessed: float) -> float:
        """Seconds of ``flops`` arithmetic that reads and writes ``bytes_accessed``."""
        arithmetic, traffic = flops / self.peak_flops, bytes_accessed / self.memory_bandwidth
        return max(arithmetic, traffic) if self.overlaps_memory else arithmetic + traffic

    def comm_time(self, num_bytes: float) -> float:
        """Alpha-beta time of moving ``num_bytes`` per device over the links."""
        return self.link_latency_s + num_bytes / self.link_bandwidth if num_bytes > 0 else 0.0


# Published peak figures (dense bf16 tensor-core FLOP/s, HBM and NVLink per-GPU bandwidth).
# Per dtype: float32 dots run on TF32 tensor cores at JAX's default matmul precision (A100,
# H100); the V100 has neither TF32 nor bfloat16 units, and XLA runs bfloat16 dots in float32.
PUBLISHED = {
    "h100": DeviceProfile("h100", 989e12, 80 * 2**30, 3.35e12, 450e9, 5e-6, dtype_flops=(
        ("bfloat16", 989e12), ("float16", 989e12), ("float32", 494.5e12))),
    "a100": DeviceProfile("a100", 312e12, 80 * 2**30, 2.0e12, 300e9, 5e-6, dtype_flops=(
        ("bfloat16", 312e12), ("float16", 312e12), ("float32", 156e12))),
    "v100": DeviceProfile("v100", 125e12, 32 * 2**30, 0.9e12, 150e9, 8e-6, dtype_flops=(
        ("bfloat16", 15.7e12), ("float16", 125e12), ("float32", 15.7e12))),
}


# Timed runs of each CPU measurement; the best counts, so a burst of other work on the shared
# host does not halve the figures (plans chosen with them would change from run to run).
_REPEATS = 15


@functools.lru_cache(maxsize=None)
def measured_cpu_flops(dtype: str = "float32") -> float:
    """Matmul FLOP/s of the running CPU in ``dtype`` (best of several timed 1024^3 products)."""
    import jax
    import jax.numpy as jnp

    n = 1024
    cpu = jax.devices("cpu")[0]
    a = jax.device_put(jnp.ones((n, n), dtype), cpu)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()  # compile and warm up
    best = float("inf")
    for _ in range(_REPEATS):  # best of several: the host may be busy with other work
        start = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / max(best, 1e-9)


@functools.lru_cache(maxsize=None)
def measured_cpu_profile(num_devices: int = 1) -> DeviceProfile:
    """A profile for the running CPU, measured once (best of several timed matmuls and copies).

    The simulated devices of ``--xla_force_host_platform_device_count`` share the host's cores
    and memory, so each gets 1/num_devices of what is measured.
    """
    flops = measured_cpu_flops("float32")
    buf = np.ones(16 * 2**20 // 4, np.float32)
    best = float("inf")
    for _ in range(_REPEATS):
        start = time.perf_counter()
        buf.copy()
        best = min(best, time.perf_counter() - start)
    bandwidth = 2 * buf.nbytes / max(best, 1e-9)
    try:
        import os

        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = 8 * 2**30
    share = max(num_devices, 1)
    return DeviceProfile(
        name="cpu",
        peak_flops=flops / share,
        memory_bytes=int(memory // share),
        memory_bandwidth=bandwidth / share,
        link_bandwidth=bandwidth / share,
        link_latency_s=20e-6,
        native_reduce_scatter=False,
        overlaps_memory=False,
        dtype_flops=(("float32", flops / share),),
    )


def get_profile(name: str | None = None, num_devices: int = 1) -> DeviceProfile:
    """Returns the profile called ``name``, or the one for the platform JAX runs on.

    Args:
      name: ``"cpu"``, ``"h100"``, ``"a100"``, ``"v100"``; ``None`` picks by ``jax.devices()``.
      num_devices: devices sharing the host (used only by the measured CPU profile).

    Raises:
      UnknownDeviceError: ``name`` is None and the running accelerator has no profile.
      PlanError: ``name`` is not a known profile.
    """
    if name is None:
        import jax

        device = jax.devices()[0]
        if device.platform == "cpu":
            name = "cpu"
        else:
            name = running_profile_name(device)
    name = name.lower()
    if name == "cpu":
        return measured_cpu_profile(num_devices)
    if name not in PUBLISHED:
        raise PlanError(
            f"unknown device profile {name!r}; known profiles: cpu, {', '.join(sorted(PUBLISHED))}"
        )
    return PUBLISHED[name]


def running_profile_name(device) -> str:
    """The profile name of an accelerator, from its device kind (``"NVIDIA H100 80GB HBM3"``).

    Raises:
      UnknownDeviceError: no profile matches; the message says how to choose one.
    """
    kind = device.device_kind.lower()
    for name in PUBLISHED:
        if name in kind:
            return name
    raise UnknownDeviceError(
        f"no device profile for {device.platform} device {device.device_kind!r} (known: cpu, "
        f"{', '.join(sorted(PUBLISHED))}); set parallel.profile to the closest one to plan and "
        "price as that device")


def allocatable_bytes(device) -> int | None:
    """What the runtime says it can allocate on ``device`` (``memory_stats()["bytes_limit"]``:
    about 75% of a GPU's memory by default), or None where it does not say (CPU)."""
    try:
        stats = device.memory_stats()
    except Exception:  # backends without memory statistics raise various errors
        return None
    limit = (stats or {}).get("bytes_limit")
    return int(limit) if limit else None
