"""What a cluster run asks for, and the error it raises."""
from __future__ import annotations

import dataclasses
from typing import Mapping

# What a worker may be doing; each has its own limit for going without a heartbeat.
PHASES = ("start-up", "planning", "compile", "restore", "step", "eval", "checkpoint")
LONG_PHASES = ("planning", "compile", "restore", "eval", "checkpoint")  # one call may take long
LONG_PHASE_S = 3600.0
ANSWER_S = 300.0  # the longest default wait for an answer to a progress query


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
      gpus_per_host: GPUs each worker asks Ray for and must see (0: CPU workers).
      cpus_per_host: CPUs each worker asks Ray for.
      max_restarts: how many restarts within ``restart_window_s`` the run survives.
      restart_window_s: restarts older than this no longer count against ``max_restarts``.
      startup_timeout_s: limit for connecting, placing the workers and forming the mesh, and
        for the ``start-up`` phase (a worker's function before its first phase).
      hang_timeout_s: the ``step`` phase's limit: a worker whose last step finished longer ago
        counts as hung.
      phase_timeout_s: limits of the other phases (``LONG_PHASES``; ``LONG_PHASE_S`` each
        by default).
      answer_timeout_s: a worker that leaves the driver's progress query unanswered this long
        (or past its phase's limit, if shorter) counts as hung: frozen, or its node cut off,
        whatever phase it was in (a second thread answers; a healthy worker answers at once).
        None: ``hang_timeout_s``, at most ``ANSWER_S``.
      capacity_timeout_s: after a failure, how long to wait for the cluster to offer the
        workers' resources again (a lost node being replaced) before giving up.
      env: environment variables for every worker, on top of those passed from the driver
        (``XLA_FLAGS``, ``NCCL_*``, ``JAX_*``).
      compilation_cache_dir: JAX's persistent compilation cache for every worker (on a shared
        filesystem): a restarted attempt loads its programs instead of compiling them.
    """

    num_hosts: int
    address: str = ""
    devices_per_host: int | None = None
    gpus_per_host: int = 0
    cpus_per_host: int = 1
    max_restarts: int = 3
    restart_window_s: float = 3600.0
    startup_timeout_s: float = 120.0
    hang_timeout_s: float = 600.0
    phase_timeout_s: Mapping[str, float] = dataclasses.field(default_factory=dict)
    answer_timeout_s: float | None = None
    capacity_timeout_s: float = 600.0
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)
    compilation_cache_dir: str | None = None

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
        for name in ("startup_timeout_s", "hang_timeout_s", "answer_timeout_s",
                     "capacity_timeout_s", "restart_window_s"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ClusterError(f"ClusterSpec.{name} must be positive, got {getattr(self, name)}")
        for phase, limit in self.phase_timeout_s.items():
            if phase not in LONG_PHASES:
                where = {"step": "hang_timeout_s", "start-up": "startup_timeout_s"}.get(phase)
                raise ClusterError(
                    f"phase_timeout_s names {phase!r}; " + (f"its limit is {where}" if where else
                    f"the phases with a limit of their own are {', '.join(LONG_PHASES)}"))
            if not isinstance(limit, (int, float)) or limit <= 0:
                raise ClusterError(f"phase_timeout_s[{phase!r}] must be a positive number of "
                                   f"seconds, got {limit!r}")
        for key, value in self.env.items():
            if not isinstance(key, str) or not isinstance(value, str) or not key:
                raise ClusterError(f"env must map variable names to strings, got {key!r}: {value!r}")

    def answer_limit(self) -> tuple[float, str]:
        """How long a progress query may go unanswered, and the setting that says so."""
        if self.answer_timeout_s is not None:
            return float(self.answer_timeout_s), "answer_timeout_s"
        if self.hang_timeout_s <= ANSWER_S:
            return float(self.hang_timeout_s), "hang_timeout_s"
        return ANSWER_S, "answer_timeout_s"

    def phase_limit(self, phase: str) -> float:
        """Seconds a worker may spend in ``phase`` without a heartbeat."""
        if phase in self.phase_timeout_s:
            return float(self.phase_timeout_s[phase])
        return {"start-up": self.startup_timeout_s, "step": self.hang_timeout_s}.get(phase, LONG_PHASE_S)

    def phase_limit_key(self, phase: str) -> str:
        """The setting that holds ``phase``'s limit, for messages."""
        return {"start-up": "startup_timeout_s", "step": "hang_timeout_s"}.get(
            phase, f"phase_timeout_s.{phase}")
