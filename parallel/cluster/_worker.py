"""The process Ray starts on each host: sets up JAX, joins the global mesh, runs the function.

One ``Worker`` actor lives in each placement-group bundle. The driver calls, in order:
``address`` (where it runs, a free port there), ``join`` (environment, log file, then
``jax.distributed.initialize``), ``run`` (the user's function). ``progress`` answers from a
second thread while ``run`` is busy, so a worker stuck in a collective is still seen as stuck.
"""
from __future__ import annotations

import dataclasses
import os
import socket
import sys
import time
import traceback


@dataclasses.dataclass(frozen=True)
class WorkerInfo:
    """What a function run by ``parallel.cluster.run`` may ask about its own process.

    Attributes:
      process_id: this worker's JAX process index (0 writes logs and metrics).
      num_processes: how many workers form the mesh.
      attempt: 0 for the first start, ``k`` after the ``k``-th restart.
    """

    process_id: int
    num_processes: int
    attempt: int


_info: WorkerInfo | None = None
_beat = {"time": time.monotonic(), "step": None}


def worker_info() -> WorkerInfo | None:
    """This process's ``WorkerInfo`` inside a cluster worker, None anywhere else."""
    return _info


def heartbeat(step: int | None = None) -> None:
    """Tells the driver this process is making progress (call it once per training step).

    Cheap and harmless outside a cluster worker. The driver restarts the workers when no
    worker has beaten for ``hang_timeout_s``: a collective that waits on a lost peer hangs.
    """
    _beat["time"] = time.monotonic()
    _beat["step"] = step


def free_port(host: str) -> int:
    """A TCP port nobody listens on at ``host`` right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Worker:
    """One host's process (wrapped by ``ray.remote`` in ``_driver``)."""

    def address(self, local: bool) -> dict:
        """This worker's node address, a free port on it for the coordinator, and its pid."""
        import ray

        host = "127.0.0.1" if local else ray.util.get_node_ip_address()
        return {"host": host, "port": free_port(host), "pid": os.getpid()}

    def join(self, *, coordinator: str, host: str, num_processes: int, process_id: int,
             attempt: int, log_path: str, cwd: str, devices_per_host: int | None,
             use_gpu: bool, timeout_s: int) -> dict:
        """Redirects output to ``log_path``, sets up JAX's platform, joins the distributed mesh.

        Must run before anything in this process touches a JAX backend.

        Returns:
          ``{"devices": global device count, "local_devices": this process's count}``.
        """
        global _info
        _redirect_output(log_path)
        if os.path.isdir(cwd):  # relative paths of the config mean what they meant to the driver
            os.chdir(cwd)
        if not use_gpu:
            os.environ["JAX_PLATFORMS"] = "cpu"
            if devices_per_host is not None:
                flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
                         if not f.startswith("--xla_force_host_platform_device_count")]
                os.environ["XLA_FLAGS"] = " ".join(
                    [*flags, f"--xla_force_host_platform_device_count={devices_per_host}"])
        import jax

        if not use_gpu:
            # gloo runs cross-process collectives on CPU; the transfer server lets
            # jax.device_put move arrays (a pipeline's activations) between processes.
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.config.update("jax_cross_host_transfer_socket_address", f"{host}:{free_port(host)}")
        jax.config.update("jax_cross_host_transport_addresses", f"{host}:0")
        jax.distributed.initialize(
            coordinator_address=coordinator, num_processes=num_processes, process_id=process_id,
            initialization_timeout=timeout_s, coordinator_bind_address=coordinator)
        _info = WorkerInfo(process_id, num_processes, attempt)
        heartbeat()
        print(f"[worker {process_id}/{num_processes} pid {os.getpid()} on {host}, attempt "
              f"{attempt}] {jax.local_device_count()} of {jax.device_count()} "
              f"{jax.devices()[0].platform} devices", flush=True)
        return {"devices": jax.device_count(), "local_devices": jax.local_device_count()}

    def run(self, fn, args: tuple):
        """Calls ``fn(*args)``; its exceptions travel to the driver, their traceback to the log.

        An exception carries ``shardax_progressed``: whether a step finished before it (one
        raised before the first step would be raised again by a fresh start).
        """
        heartbeat()
        try:
            return fn(*args)
        except Exception as error:
            traceback.print_exc()
            error.shardax_progressed = _beat["step"] is not None
            raise
        finally:
            sys.stdout.flush()
            sys.stderr.flush()

    def progress(self) -> dict:
        """Seconds since this worker last beat, and the step it reported then."""
        return {"idle_s": time.monotonic() - _beat["time"], "step": _beat["step"]}


def _redirect_output(log_path: str) -> None:
    """Sends this process's stdout and stderr (Python and native code) to ``log_path``."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
