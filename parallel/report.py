"""What a plan costs: memory, communication, FLOPs and an estimated step time."""
from __future__ import annotations

import dataclasses
from typing import Any

from parallel import profiles
from parallel._hlo import Collective, collective_bytes, collective_list
from parallel.plan import Plan


@dataclasses.dataclass(frozen=True)
class Report:
    """The cost of one compiled step, per device.

    Attributes:
      method: the plan's method name.
      mesh_shape: axis name -> size.
      per_device_memory_bytes: peak bytes one device holds during the step (XLA memory
        analysis: arguments + outputs + temporaries - outputs aliased to donated arguments).
      communication_bytes: bytes one device sends per step in collectives (ring formulas).
      collectives: per collective kind, ``{"count", "payload_bytes", "sent_bytes"}``: how many
        run, the sum of their full operand sizes, and the bytes one device sends
        (``communication_bytes`` is the sum of ``sent_bytes``).
      flops: floating-point operations one device runs per step (XLA cost analysis).
      bytes_accessed: bytes one device reads and writes in memory per step (XLA cost analysis).
      estimated_step_time_s: the compute time of ``flops`` and ``bytes_accessed``
        (``DeviceProfile.compute_time``: their roofline maximum on accelerators, their sum on
        the CPU) plus an alpha-beta time per collective, with the figures of ``profile``
        (collectives whose devices sit on several hosts use the inter-host link).
      profile: name of the device profile used for the estimate.
      solve_time_s: seconds the method took to make the plan.
      compile_time_s: seconds XLA took to compile the step.
      shardings: one pytree of ``PartitionSpec`` per argument.
      stages: pipeline stages (pipeline methods only), else ``None``.
      device_memory_bytes: the memory one device of ``profile`` has, when known; ``format``
        says in one line when the plan needs more.
    """

    method: str
    mesh_shape: dict[str, int]
    per_device_memory_bytes: int
    communication_bytes: float
    collectives: dict[str, dict[str, float]]
    flops: float
    bytes_accessed: float
    estimated_step_time_s: float
    profile: str
    solve_time_s: float
    compile_time_s: float
    shardings: Any
    stages: Any = None
    device_memory_bytes: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The scalar fields as a JSON-friendly dict (no ``shardings``)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in ("shardings", "stages")}

    def fits(self) -> bool:
        """Whether the step's peak memory fits one device of the profile (or it is unknown)."""
        return (self.device_memory_bytes is None
                or self.per_device_memory_bytes <= self.device_memory_bytes)

    def _too_big(self) -> str:
        if self.fits():
            return ""
        return (f"  DOES NOT FIT: {self.per_device_memory_bytes / 2**30:,.1f} GiB per device, "
                f"the {self.profile} has {self.device_memory_bytes / 2**30:,.1f} GiB")

    def format(self) -> str:
        """The figures as readable lines."""
        comm = ", ".join(f"{kind} x{int(c['count'])} {c['sent_bytes']:,.0f}"
                         for kind, c in self.collectives.items() if c["count"])
        return "\n".join([
            f"report: method={self.method} mesh={self.mesh_shape}",
            f"  per-device memory   {self.per_device_memory_bytes:,} bytes" + self._too_big(),
            f"  communication       {self.communication_bytes:,.0f} bytes/device/step"
            + (f" ({comm})" if comm else ""),
            f"  flops               {self.flops:,.0f} per device per step",
            f"  estimated step time {self.estimated_step_time_s * 1e3:.3f} ms on '{self.profile}'",
            f"  solve / compile     {self.solve_time_s:.3f} s / {self.compile_time_s:.3f} s",
        ] + ([self.stages["table"]] if isinstance(self.stages, dict) and "table" in self.stages
             else []))


def memory_bytes(compiled: Any) -> int:
    """Peak per-device bytes from ``compiled.memory_analysis()``."""
    stats = compiled.memory_analysis()
    if isinstance(stats, (list, tuple)):
        stats = stats[0]
    return int(stats.argument_size_in_bytes + stats.output_size_in_bytes
               + stats.temp_size_in_bytes - stats.alias_size_in_bytes)


def cost_figures(compiled: Any) -> tuple[float, float]:
    """``(flops, bytes_accessed)`` per device from ``compiled.cost_analysis()``."""
    costs = compiled.cost_analysis()
    if isinstance(costs, (list, tuple)):
        costs = costs[0] if costs else {}
    costs = costs or {}
    return float(costs.get("flops", 0.0)), float(costs.get("bytes accessed", 0.0))


def estimate_step_time(flops: float, bytes_accessed: float,
                       collectives: list[tuple[Collective, float]],
                       profile: profiles.DeviceProfile, first_device: int = 0) -> float:
    """Compute time (``DeviceProfile.compute_time``) plus the alpha-beta time of every
    collective (``DeviceProfile.collective_time``: on the inter-host link for the share that
    crosses hosts), in seconds.

    Args:
      flops, bytes_accessed: one device's figures (XLA's cost analysis).
      collectives: ``parallel._hlo.collective_list`` of the program.
      profile: the device and the hosts the devices sit on.
      first_device: the cluster index of the program's first device (a pipeline stage's).
    """
    compute = profile.compute_time(flops, bytes_accessed)
    comm = sum(times * profile.collective_time(
        c.kind, c.full_bytes, c.group_size, c.hosts(profile.devices_per_host, first_device))
        for c, times in collectives)
    return compute + comm


def build_report(compiled: Any, plan: Plan, shardings: Any, *, solve_time_s: float,
                 compile_time_s: float, profile: str | profiles.DeviceProfile | None = None,
                 num_hosts: int = 1) -> Report:
    """Measures a compiled SPMD step.

    Args:
      compiled: the ``jax.stages.Compiled`` step.
      plan: the plan it was compiled for.
      shardings: one pytree of ``PartitionSpec`` per argument.
      solve_time_s: planning time.
      compile_time_s: compile time.
      profile: device profile name or object; ``None`` picks the running platform.
      num_hosts: hosts the plan's devices are spread over.
    """
    device_profile = profiles.resolve_profile(profile, plan.num_devices, num_hosts)
    text = compiled.as_text()
    collectives = collective_bytes(text, plan.num_devices)
    flops, accessed = cost_figures(compiled)
    return Report(
        method=plan.method,
        mesh_shape=dict(plan.mesh_shape),
        per_device_memory_bytes=memory_bytes(compiled),
        communication_bytes=sum(c["sent_bytes"] for c in collectives.values()),
        collectives=collectives,
        flops=flops,
        bytes_accessed=accessed,
        estimated_step_time_s=estimate_step_time(
            flops, accessed, collective_list(text, plan.num_devices), device_profile),
        profile=device_profile.name,
        solve_time_s=solve_time_s,
        compile_time_s=compile_time_s,
        shardings=shardings,
        stages=plan.extras.get("stages"),
        device_memory_bytes=device_profile.memory_bytes,
    )
