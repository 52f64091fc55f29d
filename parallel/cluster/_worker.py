"""The process Ray starts on each host: sets up JAX, joins the global mesh, runs the function.

One ``Worker`` actor lives in each placement-group bundle. The driver calls, in order:
``address`` (where it runs, a free port there, its versions, whether it sees the shared
directory), ``join`` (log file, JAX's platform, ``jax.distributed.initialize``, the device
check), ``run`` (the user's function). ``progress``, ``request_stop`` and ``set_stop_step``
answer from a second thread while ``run`` is busy.
"""
from __future__ import annotations

import dataclasses
import faulthandler
import os
import signal
import socket
import sys
import traceback

from parallel.cluster import _checks, _progress
from parallel.cluster._spec import ClusterSpec


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


def worker_info() -> WorkerInfo | None:
    """This process's ``WorkerInfo`` inside a cluster worker, None anywhere else."""
    return _info


def free_port(host: str) -> int:
    """A TCP port nobody listens on at ``host`` right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Worker:
    """One host's process (wrapped by ``ray.remote`` in ``_driver``)."""

    def address(self, local: bool, shared_dir: str | None, token: str, cwd: str) -> dict:
        """Where this worker runs, a free port there, its versions and what it cannot see.

        Imports JAX but starts no backend.
        """
        import ray

        host = "127.0.0.1" if local else ray.util.get_node_ip_address()
        who = f"worker on {host} (pid {os.getpid()})"
        problems = [_checks.marker_problem(shared_dir, token, who)] if shared_dir else []
        if not os.path.isdir(cwd):
            problems.append(f"{who} has no directory {cwd}, the driver's working directory "
                            "(relative paths in the config are read from it); run from a "
                            "directory every node has, such as the shared checkout")
        return {"host": host, "port": free_port(host), "pid": os.getpid(),
                "versions": _checks.versions(), "problems": [p for p in problems if p]}

    def join(self, *, spec: ClusterSpec, coordinator: str, host: str, process_id: int,
             attempt: int, log_path: str, cwd: str) -> dict:
        """Redirects output to ``log_path``, joins the distributed mesh, checks the devices.

        Must run before anything in this process touches a JAX backend.

        Returns:
          ``{"devices": global count, "local_devices": this process's, "problem": why this
          worker's devices are not what ``spec`` asks for, or None}``.
        """
        global _info
        _redirect_output(log_path)
        # `kill -USR1 <pid>` writes every thread's Python stack to the log: what a hung worker does.
        faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
        os.chdir(cwd)  # relative paths of the config mean what they meant to the driver
        import jax

        if not spec.gpus_per_host:
            _bind_gloo(host)
        jax.config.update("jax_cross_host_transfer_socket_address", f"{host}:{free_port(host)}")
        jax.config.update("jax_cross_host_transport_addresses", f"{host}:0")
        # Explicit local devices and no cluster auto-detection: under Slurm, JAX would
        # otherwise give each process the one GPU of its Slurm task.
        local_ids = list(range(spec.gpus_per_host)) if spec.gpus_per_host else None
        jax.distributed.initialize(
            coordinator_address=coordinator, num_processes=spec.num_hosts, process_id=process_id,
            local_device_ids=local_ids, cluster_detection_method="deactivate",
            initialization_timeout=int(spec.startup_timeout_s), coordinator_bind_address=coordinator)
        _info = WorkerInfo(process_id, spec.num_hosts, attempt)
        who = f"worker {process_id} (pid {os.getpid()} on {host})"
        problem = _checks.device_problem(spec, who)
        if problem is not None:
            print(problem, flush=True)
            return {"problem": problem}
        _progress.watch_steps()
        _progress.heartbeat()
        passed = sorted(k for k in os.environ if k.startswith(_checks.FORWARDED_PREFIXES)
                        or k in spec.env)
        print(f"[worker {process_id}/{spec.num_hosts} pid {os.getpid()} on {host}, attempt "
              f"{attempt}] {jax.local_device_count()} of {jax.device_count()} "
              f"{jax.devices()[0].platform} devices; coordinator {coordinator}; "
              f"environment {' '.join(passed)}", flush=True)
        return {"devices": jax.device_count(), "local_devices": jax.local_device_count(),
                "problem": None}

    def run(self, fn, args: tuple):
        """Calls ``fn(*args)``; its exceptions travel to the driver, their traceback to the log.

        An exception carries ``shardax_progressed``: whether a step ran before it (one raised
        before the first step of a first attempt would be raised again by a fresh start).
        """
        _progress.heartbeat()
        try:
            return fn(*args)
        except Exception as error:
            traceback.print_exc()
            error.shardax_progressed = _progress.progressed()
            raise
        finally:
            sys.stdout.flush()
            sys.stderr.flush()

    def progress(self) -> dict:
        """This worker's phase, seconds since it last beat, and its last finished step."""
        return _progress.report()

    def request_stop(self, signal_name: str) -> int | None:
        return _progress.request_stop(signal_name)

    def set_stop_step(self, step: int) -> None:
        _progress.set_stop_step(step)


def _bind_gloo(host: str) -> None:
    """Makes gloo (CPU collectives across processes) listen on ``host``, this node's address.

    Left to itself gloo binds what the machine's hostname resolves to (127.0.1.1 on a stock
    Debian host), which other nodes cannot reach. JAX has no setting for it, so the CPU backend
    is registered with gloo collectives made for ``host`` (through JAX internals that exist in
    JAX 0.10-0.12; without them gloo keeps JAX's choice, and the log says so).
    """
    import jax
    from jax.extend import backend

    try:
        from jax._src import distributed, xla_bridge
        from jaxlib import _jax

        _jax.make_gloo_tcp_collectives, xla_bridge.make_cpu_client  # noqa: B018
    except (ImportError, AttributeError) as e:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        print(f"gloo listens where this host's name resolves to (cannot bind it to {host}: {e})",
              flush=True)
        return

    def cpu_backend():
        collectives = _jax.make_gloo_tcp_collectives(
            distributed_client=distributed.global_state.client, hostname=host)
        return xla_bridge.make_cpu_client(collectives=collectives)

    backend.register_backend_factory("cpu", cpu_backend, priority=0, fail_quietly=False)


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
