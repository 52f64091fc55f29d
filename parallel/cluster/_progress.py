"""A worker's progress as the driver sees it: its phase, its last finished step, stop requests.

The function a worker runs reports what it does with ``phase`` and ``heartbeat``; the driver
reads ``report()`` through a second actor thread, so a worker busy in a long call still answers
and a frozen one does not. Outside a cluster worker everything here is cheap and harmless.

Stopping (a preempted driver) must end every worker after the same step, or the ones that
stopped early leave the others waiting in a collective. The driver asks every worker where it
is (``request_stop`` returns the last step it dispatched and makes it wait at the next step
boundary), then sets the stop step to one past the furthest (``set_stop_step``): no worker can
have passed it, and ``should_stop`` lets each run on until exactly that step.
"""
from __future__ import annotations

import queue
import threading
import time


class _Progress:
    def __init__(self):
        self.lock = threading.Condition()
        self.phase = "start-up"
        self.since = time.monotonic()  # the last heartbeat or phase change
        self.step = None  # the last step known finished
        self.position = None  # the last step dispatched (stop agreement)
        self.stop_signal = None  # set by request_stop: the name of the driver's signal
        self.stop_step = None
        self.pending: queue.SimpleQueue = queue.SimpleQueue()
        self.finisher = None  # started in a cluster worker (``watch_steps``)

    def beat(self, step=None) -> None:
        with self.lock:
            self.since = time.monotonic()
            if step is not None:
                self.step = step if self.step is None else max(self.step, step)
                if self.phase == "start-up":
                    self.phase = "step"

    def request_stop(self, signal_name: str) -> int | None:
        with self.lock:
            self.stop_signal = signal_name
            return self.position

    def set_stop_step(self, step: int) -> None:
        with self.lock:
            self.stop_step = step
            self.lock.notify_all()

    def should_stop(self, step: int) -> str | None:
        with self.lock:
            self.position = step
            if self.stop_signal is None:
                return None
            while self.stop_step is None:
                self.lock.wait(timeout=1.0)
            return self.stop_signal if step >= self.stop_step else None

    def wait_then_beat(self) -> None:
        """The finisher thread: beats for each step once its result is computed."""
        while True:
            step, ready = self.pending.get()
            try:
                ready.block_until_ready()
            except Exception:  # a failed step: the training thread raises it
                continue
            self.beat(step)


_progress = _Progress()


def heartbeat(step: int | None = None, ready=None) -> None:
    """Tells the driver this worker makes progress.

    Args:
      step: the step that finished (or, with ``ready``, that was dispatched).
      ready: an array the step computes (e.g. its loss). The beat is given when it is ready,
        not when the step was queued: JAX dispatches asynchronously, and a step stuck in a
        collective on a lost peer must count as no progress.
    """
    if ready is None or _progress.finisher is None:  # outside a worker nobody waits for it
        _progress.beat(step)
    else:
        _progress.pending.put((step, ready))


def watch_steps() -> None:
    """Starts the thread that beats as steps finish (in a cluster worker, before ``fn``)."""
    if _progress.finisher is None:
        _progress.finisher = threading.Thread(target=_progress.wait_then_beat, daemon=True,
                                              name="cluster-heartbeat")
        _progress.finisher.start()


class phase:
    """Says what this worker does now (one of ``PHASES``); each phase has its own limit.

    ``cluster.phase("step")`` switches until the next switch; ``with cluster.phase("eval"):``
    returns to the phase before when the block ends. Every switch counts as a heartbeat.
    """

    def __init__(self, name: str):
        with _progress.lock:
            self.outer, _progress.phase, _progress.since = _progress.phase, name, time.monotonic()

    def __enter__(self) -> "phase":
        return self

    def __exit__(self, *exc) -> None:
        with _progress.lock:
            _progress.phase, _progress.since = self.outer, time.monotonic()


def report() -> dict:
    """What the driver's progress query gets: phase, seconds since the last beat, last step."""
    with _progress.lock:
        return {"phase": _progress.phase, "idle_s": time.monotonic() - _progress.since,
                "step": _progress.step}


def progressed() -> bool:
    """Whether a step of this attempt finished (or was dispatched) in this worker."""
    return _progress.step is not None or _progress.position is not None


def request_stop(signal_name: str) -> int | None:
    """Asks this worker to stop; returns the last step it dispatched (None: not training yet).

    From now on the worker waits at its next step boundary until ``set_stop_step``.
    """
    return _progress.request_stop(signal_name)


def set_stop_step(step: int) -> None:
    """The step after which every worker stops (one past the furthest ``request_stop`` answer)."""
    _progress.set_stop_step(step)


def should_stop(step: int) -> str | None:
    """Called after dispatching ``step``: the driver's signal name if training stops here.

    Returns None while no stop is requested (and outside a cluster worker).
    """
    return _progress.should_stop(step)
