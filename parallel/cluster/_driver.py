"""The driver: places one worker per host, runs a function on all of them, restarts on failure."""
from __future__ import annotations

import collections
import signal
import sys
import time
from pathlib import Path

from parallel.cluster import _checks
from parallel.cluster._attempt import Attempt, Stopped, WorkerFailure
from parallel.cluster._connect import check_resources, connect
from parallel.cluster._spec import ClusterError, ClusterSpec


def run(fn, args: tuple = (), *, spec: ClusterSpec, log_dir, fatal: tuple = (), out=None,
        shared_dir=None):
    """Runs ``fn(*args)`` in ``spec.num_hosts`` worker processes that form one JAX mesh.

    Every worker calls ``jax.distributed.initialize`` first, so inside ``fn``
    ``jax.devices()`` lists the devices of all workers (multi-controller: every worker runs the
    same program). When a worker dies, hangs (no heartbeat within its phase's limit, or no
    answer to the driver) or raises, all workers are torn down and fresh ones run ``fn`` again,
    up to ``spec.max_restarts`` times within ``spec.restart_window_s``; ``fn`` must resume
    from its own checkpoints (``worker_info().attempt`` tells it which attempt it is).

    SIGTERM or SIGINT to the driver asks every worker to stop after one agreed step
    (``should_stop``); ``run`` then returns worker 0's result as usual. A second signal
    tears the workers down at once.

    Args:
      fn: a picklable function (defined at module level), called in every worker.
      args: its arguments (pickled to every worker).
      spec: the workers to start and how to watch them.
      log_dir: each worker's output goes to ``log_dir/worker-<i>.log`` (on a shared
        filesystem for a real cluster); worker 0's lines are printed here as they come.
      fatal: exception types that end the run at once instead of restarting (user mistakes),
        unless a worker died or hung around the same time (then the death is the cause).
      out: where the driver prints (default ``sys.stderr``).
      shared_dir: a directory every worker must see as the driver does (checked with a
        marker file before the mesh forms); None checks nothing.

    Returns:
      What ``fn`` returned in worker 0.

    Raises:
      ClusterError: the cluster cannot start or place the workers, a worker is misconfigured
        (versions, devices, shared directory), or they failed more than ``spec.max_restarts``
        times within the window (the message names the worker, the cause and the restarts).
      An instance of ``fatal``: raised by ``fn`` in a worker.
    """
    out = out or sys.stderr
    log_dir = Path(log_dir).absolute()
    shared = Path(shared_dir).absolute() if shared_dir is not None else None
    token = _checks.write_marker(shared) if shared is not None else ""
    stop = _StopSignal()
    restarts = RestartBudget(spec.max_restarts, spec.restart_window_s)
    number = 0  # of the attempt
    try:
        connect(spec)  # before `import ray`: the local instance's settings are read at import
        stop.install()  # after ray.init, which installs a SIGTERM handler of its own
        check_resources(spec)
        context = dict(spec=spec, log_dir=log_dir, shared_dir=shared, token=token,
                       versions=_checks.versions(), out=out, stop=stop)
        while True:
            attempt = Attempt(number, **context)
            try:
                return attempt.run(fn, args, fatal)
            except Stopped as stopped:
                print(f"cluster: {stopped}", file=out, flush=True)
                return stopped.result
            except WorkerFailure as failure:
                if stop.name is not None:
                    raise ClusterError(f"{failure} while stopping on {stop.name}; the newest "
                                       "committed checkpoint is intact") from None
                used = restarts.take(time.monotonic())
                if used is None:
                    raise ClusterError(
                        f"{failure}; gave up: {spec.max_restarts} restart(s) within "
                        f"cluster.restart_window_s={spec.restart_window_s:g} already "
                        f"(cluster.max_restarts={spec.max_restarts})") from None
                number += 1
                print(f"cluster: {failure}; restarting the workers ({used} of at most "
                      f"{spec.max_restarts} restarts within {spec.restart_window_s:g} s)",
                      file=out, flush=True)
            finally:
                attempt.close()
    finally:
        stop.uninstall()
        if "ray" in sys.modules:  # stops a local instance; disconnects from an existing cluster
            sys.modules["ray"].shutdown()
        if shared is not None:
            (shared / _checks.MARKER).unlink(missing_ok=True)


class RestartBudget:
    """At most ``max_restarts`` restarts within any ``window_s`` seconds."""

    def __init__(self, max_restarts: int, window_s: float):
        self.max_restarts, self.window_s = max_restarts, window_s
        self.times: collections.deque = collections.deque()

    def take(self, now: float) -> int | None:
        """Counts a restart at ``now``; returns how many the window holds with it, or None
        (no restart left: the run must stop)."""
        while self.times and now - self.times[0] > self.window_s:
            self.times.popleft()
        if len(self.times) >= self.max_restarts:
            return None
        self.times.append(now)
        return len(self.times)


class _StopSignal:
    """SIGTERM/SIGINT to the driver: the first asks the workers to save and stop, the second
    unwinds at once (workers and a local Ray instance are still stopped on the way out)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.name, self.previous = None, {}

    def install(self) -> None:
        def handler(signum, _frame):
            if self.name is not None:
                raise KeyboardInterrupt(f"received {signal.Signals(signum).name} twice")
            self.name = signal.Signals(signum).name

        for sig in self.SIGNALS:
            try:
                self.previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread: the caller owns signals
                return

    def uninstall(self) -> None:
        for sig, old in self.previous.items():
            signal.signal(sig, old)
        self.previous.clear()
