"""The driver's view of its workers' liveness, which needs nothing from a frozen worker.

Each worker has at most one progress query in flight. A worker that answers reports its phase
and how long since its last heartbeat; the workers are hung when every one of them is past its
phase's limit (they wait for each other in every step). A worker that does not answer (stopped, swapped out, its node cut off or gone) is hung once the
query has waited past ``ClusterSpec.answer_limit()`` (``answer_timeout_s``; by default
``hang_timeout_s`` up to 300 s) or the limit of the phase it was last seen in, whichever is
shorter: in every phase, since a second thread of the worker answers (a frozen process is not
"in a long phase", and the phase it was last seen in may be long: a checkpoint). Unanswered queries outrank idle answers: a worker waiting in a
collective for a frozen peer still answers, and the frozen one is the cause.
"""
from __future__ import annotations

import time


class Watch:
    """Progress queries to every worker of an attempt, and the verdict on them.

    Args:
      actors: the workers' actor handles.
      where: a name per worker for messages (``"pid 12 on 10.0.0.2"``).
      spec: the ``ClusterSpec`` with the limits.
    """

    def __init__(self, actors, where, spec):
        self.actors, self.where, self.spec = actors, where, spec
        now = time.monotonic()
        self.last = [{"phase": "start-up", "idle_s": 0.0, "step": None} for _ in actors]
        self.asked = [None] * len(actors)  # (ref, sent at) of the query in flight
        self.answered_at = [now] * len(actors)
        self.dead: dict[int, BaseException] = {}

    def poll(self) -> None:
        """Collects answers that came in and sends a query to every worker with none in flight."""
        import ray

        now = time.monotonic()
        for i, actor in enumerate(self.actors):
            if i in self.dead:
                continue
            if self.asked[i] is not None:
                ref, _ = self.asked[i]
                ready, _ = ray.wait([ref], timeout=0)
                if not ready:
                    continue
                try:
                    self.last[i] = ray.get(ref)
                    self.answered_at[i] = now
                except ray.exceptions.RayError as error:  # dead: its run reports why
                    self.dead[i] = error
                    continue
            self.asked[i] = (actor.progress.remote(), now)

    def hung(self, finished=()) -> str | None:
        """A line naming the hung workers, their phases and how long, or None.

        Args:
          finished: workers whose function returned (they wait for nothing).
        """
        now = time.monotonic()
        silent = []
        for i, asked in enumerate(self.asked):
            if asked is None or i in self.dead or i in finished:
                continue
            waited = now - asked[1]
            phase = self.last[i]["phase"]
            answer, key = self.spec.answer_limit()
            limit = min(answer, self.spec.phase_limit(phase))
            if waited > limit:
                silent.append((i, waited, phase, limit,
                               key if limit == answer else self.spec.phase_limit_key(phase)))
        if silent:
            i, waited, phase, limit, key = silent[0]
            return (f"worker {i} ({self.where[i]}) did not answer the driver for {waited:.0f} s "
                    f"(cluster.{key}={limit:g}; last seen in phase {phase}, "
                    f"{self._step(i)}): frozen, or its node is cut off or lost")
        # Workers wait for each other in every step, so one worker over its phase's limit is
        # no hang while another still works within its own (e.g. compiles what the first
        # loaded from the compilation cache). All of them over their limits is one.
        running = [i for i in range(len(self.actors)) if i not in self.dead and i not in finished]
        over = [i for i in running
                if self.last[i]["idle_s"] > self.spec.phase_limit(self.last[i]["phase"])]
        if not running or len(over) < len(running):
            return None
        stuck = ", ".join(
            f"worker {i} ({self.where[i]}) for {self.last[i]['idle_s']:.0f} s in phase "
            f"{self.last[i]['phase']} (cluster.{self.spec.phase_limit_key(self.last[i]['phase'])}="
            f"{self.spec.phase_limit(self.last[i]['phase']):g}; {self._step(i)})"
            for i in over[:4])
        more = f" and {len(over) - 4} more" if len(over) > 4 else ""
        return f"no worker made progress: {stuck}{more}"

    def silent(self, within_s: float) -> list[int]:
        """Workers whose query in flight is older than ``within_s`` (asked again if none is)."""
        now = time.monotonic()
        return [i for i, asked in enumerate(self.asked)
                if i not in self.dead and asked is not None and now - asked[1] > within_s]

    def _step(self, i: int) -> str:
        step = self.last[i]["step"]
        return "no step finished yet" if step is None else f"last finished step {step}"
