"""One set of workers, from placement to teardown: start-up checks, watching, failure causes."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from parallel.cluster import _checks
from parallel.cluster._connect import bundle
from parallel.cluster._spec import ClusterError
from parallel.cluster._watch import Watch
from parallel.cluster._worker import Worker

POLL_S = 1.0
GRACE_S = 5.0  # after a first error: how long to gather the other workers' reports
SILENT_S = 3.0  # a progress query unanswered this long during the grace counts as a hang
PLACE_NOTE_S = 5.0  # placement slower than this is announced as waiting for capacity


class WorkerFailure(Exception):
    """A worker died, hung or raised; the attempt is over (the run may restart)."""


class Stopped(Exception):
    """The driver was signalled and every worker stopped after the same step."""

    def __init__(self, message: str, result):
        super().__init__(message)
        self.result = result


class Attempt:
    """Places, starts, watches and tears down one set of workers (attempt ``number``)."""

    def __init__(self, number: int, *, spec, log_dir: Path, shared_dir, token: str,
                 versions: dict, out, stop):
        self.number, self.spec, self.log_dir, self.out, self.stop = number, spec, log_dir, out, stop
        self.shared_dir, self.token, self.versions = shared_dir, token, versions
        self.actors, self.where, self.group, self.tail = [], [], None, None
        self.hosts: list[str] = []
        self.stop_step = None

    def run(self, fn, args, fatal):
        import ray

        self._start()
        refs = {actor.run.remote(fn, args): i for i, actor in enumerate(self.actors)}
        watch = Watch(self.actors, self.where, self.spec)
        results, pending = {}, list(refs)
        while pending:
            self._stop_if_signalled(watch)
            done, pending = ray.wait(pending, num_returns=1, timeout=POLL_S)
            if not done:
                watch.poll()
                hung = watch.hung(finished={refs[ref] for ref in refs if ref not in pending})
                if hung is not None:
                    raise WorkerFailure(hung)
                continue
            try:
                results[refs[done[0]]] = ray.get(done[0])
            except Exception as error:  # noqa: BLE001 (sorted out below)
                raise self._failure(refs, done[0], error, pending, fatal, watch) from None
        if self.stop.name is not None:
            raise Stopped(f"received {self.stop.name}: the workers stopped and saved the step "
                          "they reached; run the same command again to resume", results[0])
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
        self.group = ray.util.placement_group(
            [bundle(spec)] * spec.num_hosts, strategy="PACK" if local else "STRICT_SPREAD")
        self._wait_for_placement()
        actor_cls = ray.remote(Worker)
        env = _checks.worker_env(spec)
        for i in range(spec.num_hosts):
            self.actors.append(actor_cls.options(
                num_cpus=spec.cpus_per_host, num_gpus=spec.gpus_per_host, max_concurrency=3,
                max_restarts=0, runtime_env={"env_vars": env},
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self.group, placement_group_bundle_index=i)).remote())
        shared = str(self.shared_dir) if self.shared_dir is not None else None
        addresses = self._get([a.address.remote(local, shared, self.token, os.getcwd())
                               for a in self.actors], "start")
        self.where = [f"pid {a['pid']} on {a['host']}" for a in addresses]
        self.hosts = [a["host"] for a in addresses]
        for i, where in enumerate(self.where):
            print(f"cluster: worker {i} is {where} (attempt {self.number})", file=self.out, flush=True)
        self._check_workers(addresses)
        coordinator = f"{addresses[0]['host']}:{addresses[0]['port']}"
        self.tail = _Tail(self.log_dir / "worker-0.log", self.out)
        joined = self._get([actor.join.remote(
            spec=spec, coordinator=coordinator, host=addresses[i]["host"], process_id=i,
            attempt=self.number, log_path=str(self.log_dir / f"worker-{i}.log"), cwd=os.getcwd())
            for i, actor in enumerate(self.actors)], "join the mesh",
            stop_early=lambda answer: answer["problem"] is not None)
        problems = [answer["problem"] for answer in joined
                    if answer is not None and answer["problem"] is not None]
        if problems:
            raise ClusterError("; ".join(problems))

    def _wait_for_placement(self) -> None:
        """Waits for the placement group: ``startup_timeout_s`` on the first attempt; after a
        failure up to ``capacity_timeout_s``, for a lost node's replacement."""
        import ray

        spec = self.spec
        limit, key = ((spec.startup_timeout_s, "startup_timeout_s") if self.number == 0
                      else (spec.capacity_timeout_s, "capacity_timeout_s"))
        ready = ray.wait([self.group.ready()], timeout=min(PLACE_NOTE_S, limit))[0]
        if not ready and limit > PLACE_NOTE_S:
            nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
            print(f"cluster: waiting up to {limit:g} s (cluster.{key}) for room for "
                  f"{spec.num_hosts} workers of {bundle(spec)} ({nodes} node(s) alive now)",
                  file=self.out, flush=True)
            ready = ray.wait([self.group.ready()], timeout=limit - PLACE_NOTE_S)[0]
        if not ready:
            raise ClusterError(
                f"Ray could not place {spec.num_hosts} workers of {bundle(spec)} within "
                f"cluster.{key}={limit:g} (cluster resources: {ray.available_resources()}); "
                "add nodes, lower cluster.num_hosts or free the cluster")

    def _check_workers(self, addresses) -> None:
        """Refuses workers that run other versions or cannot see the shared directory (all
        problems of all workers in one line)."""
        problems = []
        for i, answer in enumerate(addresses):
            who = f"worker {i} ({self.where[i]})"
            problems.append(_checks.version_problem(self.versions, answer["versions"], who))
            problems += [p.replace(f"worker on {answer['host']} (pid {answer['pid']})", who)
                         for p in answer["problems"]]
        problems = [p for p in problems if p is not None]
        if problems:
            changed = (" (restarting after a failure: did the checkout change since the run "
                       "started?)" if self.number else "")
            raise ClusterError("; ".join(problems) + changed)

    def _get(self, refs, what: str, stop_early=None):
        """The answers of ``refs`` within the start-up timeout; a worker lost here is a failure.

        ``stop_early(answer)`` true for one answer returns at once (the others may wait on it).
        """
        import ray

        deadline = time.monotonic() + self.spec.startup_timeout_s
        answers, pending = {}, list(refs)
        index = {ref: i for i, ref in enumerate(refs)}
        while pending:
            done, pending = ray.wait(pending, num_returns=1,
                                     timeout=max(0.0, deadline - time.monotonic()))
            if not done:
                raise WorkerFailure(f"the workers did not {what} within cluster.startup_timeout_s="
                                    f"{self.spec.startup_timeout_s:g}")
            try:
                answers[index[done[0]]] = ray.get(done[0])
            except ray.exceptions.RayError as error:
                raise WorkerFailure(f"worker {index[done[0]]} failed to {what}: "
                                    f"{_reason(error)}") from None
            if stop_early is not None and stop_early(answers[index[done[0]]]):
                break
        return [answers.get(i) for i in range(len(refs))]

    # ----- stopping -------------------------------------------------------------------------
    def _stop_if_signalled(self, watch: Watch) -> None:
        """On the driver's first signal: agrees with the workers on the step to stop after."""
        import ray

        if self.stop.name is None or self.stop_step is not None:
            return
        answer, key = self.spec.answer_limit()
        refs = [actor.request_stop.remote(self.stop.name) for actor in self.actors]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=answer)
        if len(ready) < len(refs):
            raise WorkerFailure(f"a worker did not answer the stop request within "
                                f"cluster.{key}={answer:g}")
        try:
            positions = ray.get(refs)
        except ray.exceptions.RayError as error:
            raise WorkerFailure(f"a worker failed on the stop request: {_reason(error)}") from None
        known = [p for p in positions if p is not None]
        self.stop_step = max(known, default=-1) + 1
        try:
            ray.get([actor.set_stop_step.remote(self.stop_step) for actor in self.actors],
                    timeout=answer)
        except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError) as error:
            raise WorkerFailure(f"a worker failed on the stop request: {_reason(error)}") from None
        when = f"step {self.stop_step}" if known else "the first step of this attempt"
        print(f"cluster: received {self.stop.name}: every worker stops after {when} and saves "
              "it (signal again to stop at once, without saving)", file=self.out, flush=True)

    # ----- failures -------------------------------------------------------------------------
    def _failure(self, refs, first, error, pending, fatal, watch: Watch) -> BaseException:
        """The exception that ends this attempt, chosen by cause.

        A worker that hung, then one that died, outranks the errors of the others: they are what a lost
        peer looks like from its side (a broken collective, a checkpoint write that lost a
        shard), and a restart cures them. The other workers' reports and answers are gathered
        for ``GRACE_S`` first. Without a death or hang, a ``fatal`` error ends the run, and so
        does any error before the first step of a first attempt (a fresh start would fail the
        same way); other errors restart.
        """
        import ray

        reports = [(refs[first], error)]
        deadline = time.monotonic() + GRACE_S
        while pending and time.monotonic() < deadline:
            watch.poll()
            done, pending = ray.wait(pending, num_returns=1, timeout=0.5)
            for ref in done:
                try:
                    ray.get(ref)
                except Exception as e:  # noqa: BLE001
                    reports.append((refs[ref], e))
        watch.poll()
        died = [(i, e) for i, e in reports if isinstance(e, ray.exceptions.RayActorError)]
        # A worker whose node is lost outranks one that died on a live node: a peer's process
        # ends when the coordination service loses the other (seen reported first under load).
        lost = _lost_hosts()
        died.sort(key=lambda d: self.hosts[d[0]] not in lost)
        silent = [i for i in watch.silent(SILENT_S) if i not in {j for j, _ in died}]

        def after(cause: int) -> str:
            others = "; ".join(f"worker {i} {_reason(e)}" for i, e in reports if i != cause)
            return f" (after which {others})" if others else ""

        # A frozen worker outranks a dead one: JAX's coordination service ends the processes
        # of a job whose member stops sending heartbeats, while no death freezes a peer.
        if silent:
            i = silent[0]
            return WorkerFailure(f"worker {i} ({self.where[i]}) stopped answering the driver "
                                 f"(frozen, or its node is cut off or lost){after(i)}")
        if died:
            i, e = died[0]
            return WorkerFailure(f"worker {i} ({self.where[i]}) {_reason(e)}{after(i)}")
        for i, e in reports:
            cause = getattr(e, "cause", None)
            if isinstance(e, ray.exceptions.RayTaskError) and isinstance(cause, fatal):
                return cause
        i, e = reports[0]
        message = f"worker {i} ({self.where[i]}) {_reason(e)}"
        if self.number == 0 and not getattr(getattr(e, "cause", None), "shardax_progressed", True):
            return ClusterError(
                f"{message} before its first step, so it was not restarted (a fresh start would "
                f"fail the same way); its traceback is in {self.log_dir / f'worker-{i}.log'}")
        return WorkerFailure(message)


def _lost_hosts() -> set[str]:
    """Addresses of the nodes Ray counts as dead (none if it cannot say)."""
    import ray

    try:
        return {n["NodeManagerAddress"] for n in ray.nodes() if not n["Alive"]}
    except Exception:  # noqa: BLE001 (the ranking is a refinement; the failure still ends)
        return set()


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
