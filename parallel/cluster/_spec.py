"""What a cluster run asks for, and the error it raises."""
from __future__ import annotations

import dataclasses


class ClusterError(RuntimeError):
    """The cluster cannot start, or the workers kept failing; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
    """The workers of a run: how many, where, with which devices, and how they are watched.

    Attributes:
      num_hosts: worker processes, one per host (a placement-group bundle each).
      address: empty for a private local Ray instance; ``"auto"``, ``"host:port"`` or
        ``"ray://host:port"`` for a running cluster.
      devices_per_host: CPU devices each worker simulates (None: the platform's default).
      gpus_per_host: GPUs each worker asks Ray for (0: CPU workers).
      cpus_per_host: CPUs each worker asks Ray for.
      max_restarts: how often dead or hung workers are replaced before the run fails.
      startup_timeout_s: limit for connecting, placing the workers and forming the mesh.
      hang_timeout_s: a worker that reported no progress for this long counts as hung.
    """

    num_hosts: int
    address: str = ""
    devices_per_host: int | None = None
    gpus_per_host: int = 0
    cpus_per_host: int = 1
    max_restarts: int = 3
    startup_timeout_s: float = 120.0
    hang_timeout_s: float = 1800.0

    def __post_init__(self):
        for name in ("num_hosts", "cpus_per_host"):
            if getattr(self, name) < 1:
                raise ClusterError(f"ClusterSpec.{name} must be at least 1, got {getattr(self, name)}")
        for name in ("gpus_per_host", "max_restarts"):
            if getattr(self, name) < 0:
                raise ClusterError(f"ClusterSpec.{name} must be zero or positive, got {getattr(self, name)}")
        if self.devices_per_host is not None and self.gpus_per_host:
            raise ClusterError("devices_per_host simulates CPU devices; with gpus_per_host each "
                               "worker uses its GPUs, so leave devices_per_host unset")
        if self.startup_timeout_s <= 0 or self.hang_timeout_s <= 0:
            raise ClusterError("startup_timeout_s and hang_timeout_s must be positive, got "
                               f"{self.startup_timeout_s} and {self.hang_timeout_s}")
