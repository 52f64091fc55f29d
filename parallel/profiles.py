"""Device profiles: the one place that holds device-specific numbers.

The cost model (``analyze``'s ``estimated_step_time_s``) and the automatic sharding solver price
compute and communication with these figures, on a cluster of hosts x devices per host.
Everything else in ``parallel`` reads them from here and never hard-codes a device number.
"""
from __future__ import annotations

import dataclasses
import functools
import time


from parallel._errors import PlanError


class UnknownDeviceError(PlanError):
    """The running accelerator has no profile: nothing is priced as if it were another device."""


@dataclasses.dataclass(frozen=True)
class DeviceProfile:
    """Peak figures of one accelerator, its links, and the hosts the devices sit on.

    A cluster is ``num_hosts`` hosts of ``devices_per_host`` devices each. Devices of one host
    talk over the intra-host link (NVLink on a GPU server; shared memory for simulated CPU
    devices), devices of different hosts over the inter-host link (InfiniBand or Ethernet).

    Attributes:
      name: profile name, e.g. ``"h100"``.
      peak_flops: dense matmul FLOP/s one device sustains in its fastest dtype (the solver's
        price of arithmetic).
      memory_bytes: memory one device has for the step.
      memory_bandwidth: bytes/s between the device's memory and its compute units.
      link_bandwidth: bytes/s one device sends over the intra-host links (the alpha-beta beta).
      link_latency_s: seconds a collective inside a host costs before the first byte (alpha).
      native_reduce_scatter: whether XLA emits a real reduce-scatter on this platform; XLA:CPU
        lowers it to an all-reduce followed by a slice, which costs as much as the all-reduce.
      overlaps_memory: whether memory traffic hides behind arithmetic over a whole program (a
        roofline: the longer of the two). Simulated CPU devices share the host's cores and
        memory, and measured step times there track the sum of the two instead.
      dtype_flops: ``(dtype name, FLOP/s)`` pairs for dtypes slower than ``peak_flops``.
      inter_host_bandwidth: bytes/s one device sends to devices of other hosts.
      inter_host_latency_s: latency of a collective that crosses hosts.
      num_hosts: hosts in the cluster the plan is for (see :meth:`on_hosts`).
      devices_per_host: devices of one host; ``None``: every device is on one host.
      shared_host: the devices share one host's cores (simulated CPU devices): programs on
        different devices do not run at the same time, so pipeline stages cannot overlap.
      program_overhead_s: seconds launching one step program on the devices costs before any
        work, the same under every plan (so the solver does not price it). A step whose whole
        work unsplit takes less is planned as data parallelism without a search
        (``parallel.auto._tiny``).
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
    inter_host_bandwidth: float | None = None
    inter_host_latency_s: float | None = None
    num_hosts: int = 1
    devices_per_host: int | None = None
    shared_host: bool = False
    program_overhead_s: float = 20e-6

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

    def on_hosts(self, num_hosts: int, num_devices: int) -> DeviceProfile:
        """This profile for ``num_devices`` devices spread evenly over ``num_hosts`` hosts.

        Raises:
          PlanError: the devices do not split evenly over the hosts.
        """
        if num_hosts < 1 or num_devices % num_hosts:
            raise PlanError(f"{num_devices} devices do not split over {num_hosts} hosts; use a "
                            f"host count that divides the device count (cluster.num_hosts)")
        return dataclasses.replace(self, num_hosts=num_hosts,
                                   devices_per_host=num_devices // num_hosts)

    def host_of(self, device_index: int) -> int:
        """The host of the device at ``device_index`` (hosts hold consecutive devices)."""
        return 0 if self.devices_per_host is None else device_index // self.devices_per_host

    def compute_time(self, flops: float, bytes_accessed: float) -> float:
        """Seconds of ``flops`` arithmetic that reads and writes ``bytes_accessed``."""
        arithmetic, traffic = flops / self.peak_flops, bytes_accessed / self.memory_bandwidth
        return max(arithmetic, traffic) if self.overlaps_memory else arithmetic + traffic

    def comm_time(self, num_bytes: float, crosses_hosts: bool = False) -> float:
        """Alpha-beta time of moving ``num_bytes`` per device over one link."""
        if num_bytes <= 0:
            return 0.0
        bandwidth, latency = self.link(crosses_hosts)
        return latency + num_bytes / bandwidth

    def link(self, crosses_hosts: bool) -> tuple[float, float]:
        """``(bytes/s, latency s)`` of the intra-host link, or of the inter-host one."""
        if not crosses_hosts:
            return self.link_bandwidth, self.link_latency_s
        return (self.inter_host_bandwidth or self.link_bandwidth,
                self.inter_host_latency_s or self.link_latency_s)

    def collective_time(self, kind: str, nbytes: float, group_size: int, hosts: int = 1,
                        latency: bool = True) -> float:
        """Seconds of one collective over ``group_size`` devices on ``hosts`` hosts.

        Hierarchical, as NCCL runs it across hosts: the ``k = group_size / hosts`` devices of a
        host exchange over the intra-host link, and each moves ``1/k`` of the data over the
        inter-host link to its peers on the other hosts.

        Args:
          kind: ``"all-reduce"`` (``nbytes``: the buffer on each device), ``"all-gather"``
            (``nbytes``: the gathered result), ``"reduce-scatter"`` (``nbytes``: the input),
            ``"all-to-all"`` (``nbytes``: the buffer on each device), or
            ``"collective-permute"`` (``nbytes`` sent by each device).
          nbytes: bytes, as ``kind`` says.
          group_size: devices taking part.
          hosts: hosts those devices are on.
          latency: count the latency (``False`` for collectives merged with others).
        """
        n = group_size
        if n <= 1 or nbytes <= 0:
            return 0.0
        hosts = max(1, min(hosts, n))
        k = n // hosts
        intra_bw, intra_lat = self.link(False)
        inter_bw, inter_lat = self.link(True)
        alpha = (intra_lat + (inter_lat if hosts > 1 else 0.0)) if latency else 0.0
        if kind == "collective-permute":
            return alpha + nbytes / (inter_bw if hosts > 1 else intra_bw)
        if kind == "all-to-all":
            inside, outside = (k - 1) / n * nbytes, (n - k) / n * nbytes
        else:
            inside = (k - 1) / k * nbytes
            outside = (hosts - 1) / (hosts * k) * nbytes
            if kind == "all-reduce":  # a reduce-scatter, then an all-gather
                inside, outside = 2 * inside, 2 * outside
        return alpha + inside / intra_bw + outside / inter_bw


# Published peak figures (dense bf16 tensor-core FLOP/s, HBM and NVLink per-GPU bandwidth).
# Per dtype: float32 dots run on TF32 tensor cores at JAX's default matmul precision (A100,
# H100); the V100 has neither TF32 nor bfloat16 units, and XLA runs bfloat16 dots in float32.
# Between hosts, per GPU: H100 servers have one 400 Gb/s InfiniBand NDR port per GPU (about
# 45 GB/s achieved, a tenth of NVLink), A100 servers one 200 Gb/s HDR port per GPU, V100
# servers (AWS p3dn) 100 Gb/s Ethernet per 8 GPUs. Launching a step program (host dispatch of
# one XLA executable) costs tens of microseconds on a GPU: program_overhead_s keeps its default
# 20 us.
PUBLISHED = {
    "h100": DeviceProfile("h100", 989e12, 80 * 2**30, 3.35e12, 450e9, 5e-6, dtype_flops=(
        ("bfloat16", 989e12), ("float16", 989e12), ("float32", 494.5e12)),
        inter_host_bandwidth=45e9, inter_host_latency_s=10e-6),
    "a100": DeviceProfile("a100", 312e12, 80 * 2**30, 2.0e12, 300e9, 5e-6, dtype_flops=(
        ("bfloat16", 312e12), ("float16", 312e12), ("float32", 156e12)),
        inter_host_bandwidth=22e9, inter_host_latency_s=10e-6),
    "v100": DeviceProfile("v100", 125e12, 32 * 2**30, 0.9e12, 150e9, 8e-6, dtype_flops=(
        ("bfloat16", 15.7e12), ("float16", 125e12), ("float32", 15.7e12)),
        inter_host_bandwidth=1.5e9, inter_host_latency_s=30e-6),
}

# The "cpu" profile's figures for a whole host: float32 matmul FLOP/s, memory bandwidth, and
# the latency of a collective between simulated devices (a copy through shared memory). They are
# fixed, not measured when used: measured figures swing 2-3x with the load of a shared machine,
# and plans made with them would change from run to run. Between hosts (processes on one or
# several machines exchanging over TCP with gloo): bandwidth and latency per device.
# Launching a program costs about 15 us per simulated device (``x + 1`` on 1, 2 and 8 devices,
# best of 300 runs: 12, 39 and 120 us).
CPU_HOST = {"peak_flops": 64e9, "memory_bandwidth": 24e9, "link_latency_s": 20e-6,
            "inter_host_bandwidth": 1e9, "inter_host_latency_s": 100e-6,
            "launch_per_device_s": 15e-6}


# Timed runs of the CPU matmul measurement (the ratio between dtypes); the best counts.
_REPEATS = 15


@functools.lru_cache(maxsize=None)
def measured_cpu_flops(dtype: str = "float32") -> float:
    """Matmul FLOP/s of the running CPU in ``dtype`` (best of several timed 1024^3 products).

    Only the ratio between dtypes is used (``DeviceProfile.peak_flops_for``): plans are priced
    with the fixed figures of ``CPU_HOST``.
    """
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


def cpu_profile(num_devices: int = 1) -> DeviceProfile:
    """The profile of simulated CPU devices: each of the ``num_devices`` devices of
    ``--xla_force_host_platform_device_count`` gets ``1/num_devices`` of the host's figures
    (``CPU_HOST``) and memory, since they share its cores."""
    try:
        import os

        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = 8 * 2**30
    share = max(num_devices, 1)
    flops = CPU_HOST["peak_flops"] / share
    bandwidth = CPU_HOST["memory_bandwidth"] / share
    return DeviceProfile(
        name="cpu",
        peak_flops=flops,
        memory_bytes=int(memory // share),
        memory_bandwidth=bandwidth,
        link_bandwidth=bandwidth,
        link_latency_s=CPU_HOST["link_latency_s"],
        native_reduce_scatter=False,
        overlaps_memory=False,
        dtype_flops=(("float32", flops),),
        inter_host_bandwidth=CPU_HOST["inter_host_bandwidth"],
        inter_host_latency_s=CPU_HOST["inter_host_latency_s"],
        shared_host=True,
        program_overhead_s=CPU_HOST["launch_per_device_s"] * share,
    )


def get_profile(name: str | None = None, num_devices: int = 1,
                num_hosts: int = 1) -> DeviceProfile:
    """Returns the profile called ``name``, or the one for the platform JAX runs on, for
    ``num_devices`` devices on ``num_hosts`` hosts.

    Args:
      name: ``"cpu"``, ``"h100"``, ``"a100"``, ``"v100"``; ``None`` picks by ``jax.devices()``.
      num_devices: devices the plan covers (simulated CPU devices of one host share its
        figures).
      num_hosts: hosts they are spread over.

    Raises:
      UnknownDeviceError: ``name`` is None and the running accelerator has no profile.
      PlanError: ``name`` is not a known profile, or the devices do not split over the hosts.
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
        profile = cpu_profile(max(num_devices // max(num_hosts, 1), 1))
    elif name in PUBLISHED:
        profile = PUBLISHED[name]
    else:
        raise PlanError(
            f"unknown device profile {name!r}; known profiles: cpu, {', '.join(sorted(PUBLISHED))}"
        )
    return profile.on_hosts(num_hosts, num_devices) if num_hosts > 1 else profile


def resolve_profile(profile: str | DeviceProfile | None, num_devices: int,
                    num_hosts: int = 1) -> DeviceProfile:
    """``profile`` (a name, ``None`` for the running device, or a profile) for ``num_devices``
    devices on ``num_hosts`` hosts. A profile object that names its own hosts is kept."""
    if not isinstance(profile, DeviceProfile):
        return get_profile(profile, num_devices, num_hosts)
    if profile.devices_per_host is None and num_hosts > 1:
        return profile.on_hosts(num_hosts, num_devices)
    return profile


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
