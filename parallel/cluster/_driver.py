"""The driver: places one worker per host, runs a function on all of them, restarts on failure."""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

from parallel.cluster._connect import bundle, check_resources, connect
from parallel.cluster._spec import ClusterError, ClusterSpec
from parallel.cluster._worker import Worker

POLL_S = 1.0
GRACE_S = 5.0  # after a first failure, how long to wait for the dead worker's own report


class WorkerFailure(Exception):
    """A worker died, hung or raised; the attempt is over (the run may restart)."""


def run(fn, args: tuple = (), *, spec: ClusterSpec, log_dir, fatal: tuple = (), out=None):
    """Runs ``fn(*args)`` in ``spec.num_hosts`` worker processes that form one JAX mesh.

    Every worker calls ``jax.distributed.initialize`` first, so inside ``fn``
    ``jax.devices()`` lists the devices of all workers (multi-controller: every worker runs the
    same program). When a worker dies, hangs (no ``heartbeat`` for ``spec.hang_timeout_s``) or
    raises, all workers are torn down and fresh ones run ``fn`` again, up to
    ``spec.max_restarts`` times; ``fn`` must resume from its own checkpoints
    (``worker_info().attempt`` tells it which attempt it is).

    Args:
      fn: a picklable function (defined at module level), called in every worker.
      args: its arguments (pickled to every worker).
      spec: the workers to start and how to watch them.
      log_dir: each worker's output goes to ``log_dir/worker-<i>.log`` (on a shared
        filesystem for a real cluster); worker 0's lines are printed here as they come.
      fatal: exception types that end the run at once instead of restarting (user mistakes).
      out: where the driver prints (default ``sys.stderr``).

    Returns:
      What ``fn`` returned in worker 0.

    Raises:
      ClusterError: the cluster cannot start or place the workers, or they failed more than
        ``spec.max_restarts`` times (the message names the worker, the cause and the restarts).
      An instance of ``fatal``: raised by ``fn`` in a worker.
    """
    out = out or sys.stderr
    log_dir = Path(log_dir).absolute()
    previous = _stop_on_sigterm()
    try:
        connect(spec)  # before `import ray`: the local instance's settings are read at import
        check_resources(spec)
        restarts = 0
        while True:
            attempt = _Attempt(spec, log_dir, restarts, out)
            try:
                return attempt.run(fn, args, fatal)
            except WorkerFailure as failure:
                if restarts >= spec.max_restarts:
                    raise ClusterError(f"{failure}; gave up after {restarts} restart(s) "
                                       f"(cluster.max_restarts={spec.max_restarts})") from None
                restarts += 1
                print(f"cluster: {failure}; restarting the workers ({restarts} of at most "
                      f"{spec.max_restarts} restarts)", file=out, flush=True)
            finally:
                attempt.close()
    finally:
        if "ray" in sys.modules:  # stops a local instance; disconnects from an existing cluster
            sys.modules["ray"].shutdown()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _stop_on_sigterm():
    """Makes SIGTERM unwind like Ctrl-C, so the workers and a local Ray instance are stopped."""
    def handler(signum, _frame):
        raise KeyboardInterrupt(f"received {signal.Signals(signum).name}")

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: the caller owns signals
        return None


class _Attempt:
    """One set of workers, from placement to teardown."""

    def __init__(self, spec: ClusterSpec, log_dir: Path, attempt: int, out):
        self.spec, self.log_dir, self.attempt, self.out = spec, log_dir, attempt, out
        self.actors, self.where, self.group, self.tail = [], [], None, None

    def run(self, fn, args, fatal):
        import ray

        self._start()
        refs = {actor.run.remote(fn, args): i for i, actor in enumerate(self.actors)}
        results, pending = {}, list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=POLL_S)
            if not done:
                self._check_progress()
                continue
            try:
                results[refs[done[0]]] = ray.get(done[0])
            except Exception as error:  # noqa: BLE001 (sorted out below)
                raise self._failure(refs, done[0], error, pending, fatal) from None
        return results[0]

    def close(self) -> None:
        import ray

        if self.tail is not None:
            self.tail.stop()
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        if self.group is not None:
            ray.util.remove_placement_group(self.group)

    # ----- start-up -------------------------------------------------------------------------
    def _start(self) -> None:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        spec, local = self.spec, not self.spec.address
        timeout = spec.startup_timeout_s
        self.group = ray.util.placement_group(
            [bundle(spec)] * spec.num_hosts, strategy="PACK" if local else "STRICT_SPREAD")
        try:
            ray.get(self.group.ready(), timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            raise ClusterError(
                f"Ray could not place {spec.num_hosts} workers of {bundle(spec)} within "
                f"cluster.startup_timeout_s={timeout} (cluster resources: "
                f"{ray.available_resources()}); lower cluster.num_hosts or free the cluster") from None
        actor_cls = ray.remote(Worker)
        for i in range(spec.num_hosts):
            self.actors.append(actor_cls.options(
                num_cpus=spec.cpus_per_host, num_gpus=spec.gpus_per_host, max_concurrency=2,
                max_restarts=0, runtime_env={"env_vars": _worker_env(spec)},
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self.group, placement_group_bundle_index=i)).remote())
        addresses = self._get([a.address.remote(local) for a in self.actors], "start")
        self.where = [f"pid {a['pid']} on {a['host']}" for a in addresses]
        for i, where in enumerate(self.where):
            print(f"cluster: worker {i} is {where} (attempt {self.attempt})", file=self.out, flush=True)
        coordinator = f"{addresses[0]['host']}:{addresses[0]['port']}"
        log_0 = self.log_dir / "worker-0.log"
        self.tail = _Tail(log_0, self.out)
        self._get([actor.join.remote(
            coordinator=coordinator, host=addresses[i]["host"], num_processes=spec.num_hosts,
            process_id=i, attempt=self.attempt, log_path=str(self.log_dir / f"worker-{i}.log"),
            cwd=os.getcwd(), devices_per_host=spec.devices_per_host,
            use_gpu=bool(spec.gpus_per_host), timeout_s=int(timeout))
            for i, actor in enumerate(self.actors)], "join the mesh")

    def _get(self, refs, what: str):
        """``ray.get`` bounded by the start-up timeout; a worker lost here is a failure."""
        import ray

        try:
            return ray.get(refs, timeout=self.spec.startup_timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise WorkerFailure(f"the workers did not {what} within cluster.startup_timeout_s="
                                f"{self.spec.startup_timeout_s}") from None
        except ray.exceptions.RayError as error:
            raise WorkerFailure(f"a worker failed to {what}: {_reason(error)}") from None

    # ----- watching -------------------------------------------------------------------------
    def _check_progress(self) -> None:
        import ray

        refs = [actor.progress.remote() for actor in self.actors]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=min(60.0, self.spec.hang_timeout_s))
        try:
            reports = ray.get(refs) if len(ready) == len(refs) else None
        except ray.exceptions.RayError:
            reports = None
        if reports is None:
            return  # a dead worker shows up in ray.wait on its run next
        worst = max(range(len(reports)), key=lambda i: reports[i]["idle_s"])
        idle = reports[worst]["idle_s"]
        if idle > self.spec.hang_timeout_s:
            step = reports[worst]["step"]
            raise WorkerFailure(
                f"worker {worst} ({self.where[worst]}) made no progress for {idle:.0f} s "
                f"(cluster.hang_timeout_s={self.spec.hang_timeout_s}; last step {step})")

    def _failure(self, refs, first, error, pending, fatal) -> BaseException:
        """The exception that ends this attempt; a worker's death is preferred as its cause.

        When one worker is killed, its peers often fail first (a broken collective); the dead
        worker's own report follows within seconds, so it is waited for briefly.
        """
        import ray

        reports = [(refs[first], error)]
        if not isinstance(error, ray.exceptions.RayActorError) and pending:
            done, _ = ray.wait(pending, num_returns=len(pending), timeout=GRACE_S)
            for ref in done:
                try:
                    ray.get(ref)
                except Exception as e:  # noqa: BLE001
                    reports.append((refs[ref], e))
        for i, e in reports:
            cause = getattr(e, "cause", None)
            if isinstance(e, ray.exceptions.RayTaskError) and isinstance(cause, fatal):
                return cause
        died = [(i, e) for i, e in reports if isinstance(e, ray.exceptions.RayActorError)]
        i, e = (died or reports)[0]
        message = f"worker {i} ({self.where[i]}) {_reason(e)}"
        if not died and not getattr(getattr(e, "cause", None), "shardax_progressed", True):
            return ClusterError(
                f"{message} before its first step, so it was not restarted (a fresh start would "
                f"fail the same way); its traceback is in {self.log_dir / f'worker-{i}.log'}")
        return WorkerFailure(message)


def _reason(error: BaseException) -> str:
    """One line: why a worker failed, from Ray's error."""
    import ray

    if isinstance(error, ray.exceptions.RayActorError):
        text = " ".join(str(error).split())
        detail = text.partition("Worker exit detail:")[2].strip() or text
        return "died: " + detail.split(". ")[0].rstrip(".")[:300]
    cause = getattr(error, "cause", None) or error
    message = " ".join(str(cause).split())[:300]
    return f"raised {type(cause).__name__}: {message}"


def _worker_env(spec: ClusterSpec) -> dict:
    """Environment of a worker process, set before it starts (so before JAX is imported)."""
    root = str(Path(__file__).resolve().parents[2])  # the directory holding `parallel`
    main = getattr(sys.modules.get("__main__"), "__file__", None)
    paths = [root, os.getcwd(), *([str(Path(main).resolve().parent)] if main else []),
             *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {"PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}
    if not spec.gpus_per_host:
        env["JAX_PLATFORMS"] = "cpu"
        if spec.devices_per_host is not None:
            flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
                     if not f.startswith("--xla_force_host_platform_device_count")]
            env["XLA_FLAGS"] = " ".join(
                [*flags, f"--xla_force_host_platform_device_count={spec.devices_per_host}"])
    return env


class _Tail:
    """Prints the lines a worker appends to its log file, from now on, as they come."""

    def __init__(self, path: Path, out):
        self.path, self.out = path, out
        self.offset = path.stat().st_size if path.exists() else 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, daemon=True, name="worker-0-log")
        self._thread.start()

    def _follow(self) -> None:
        while not self._stop.wait(0.2):
            self._read()
        self._read()

    def _read(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n") + 1  # whole lines only
        if end:
            self.out.write(data[:end].decode("utf-8", errors="replace"))
            self.out.flush()
            self.offset += end

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
