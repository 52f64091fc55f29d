"""What checkpointing costs a training loop: step time with no save, an async save, a sync save.

The three modes run interleaved in rounds within one process, so load from other processes
and clock drift hit each mode alike. Used by the benchmarks; not a test (times vary by machine).
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any, Callable

import jax

from parallel.checkpoint import Checkpointer

MODES = ("none", "async", "sync")


def save_overhead(step_fn: Callable, state: Any, batch: Any, directory, *, steps: int = 10,
                  rounds: int = 3) -> dict:
    """Median seconds per step of ``step_fn`` without checkpoints and saving after every step.

    Args:
      step_fn: ``(state, batch) -> (state, metrics)``, e.g. a ``parallel.parallelize`` step
        (already compiled: call it once before).
      state: its first state; it is consumed (the step may donate it).
      batch: one batch, reused for every step.
      directory: scratch space; ``<directory>/async`` and ``<directory>/sync`` get the saves.
      steps: steps per mode per round.
      rounds: rounds of (none, async, sync).

    Returns:
      ``{"none": s, "async": s, "sync": s, "async_save_call": s, "checkpoint_bytes": n,
      "steps": steps * rounds}``. A saving step's time includes waiting for the previous save
      and each block's last step waits for its own, so the figures are what a loop saving every
      step sustains; ``async_save_call`` is the median time one async ``save`` call blocks
      (which includes waiting for the previous save when steps are shorter than a write).
    """
    directory = Path(directory)
    savers = {"none": None,
              "async": Checkpointer(directory / "async", max_to_keep=2, async_save=True),
              "sync": Checkpointer(directory / "sync", max_to_keep=2, async_save=False)}
    times = {mode: [] for mode in MODES}
    blocking = []  # how long each async save() call held the loop
    step = 0
    for _ in range(rounds):
        for mode in MODES:
            saver = savers[mode]
            for i in range(steps):
                start = time.perf_counter()
                state, metrics = step_fn(state, batch)
                jax.block_until_ready(metrics)
                step += 1
                if saver is not None:
                    save_start = time.perf_counter()
                    saver.save(step, state, {"step": step})
                    if mode == "async":
                        blocking.append(time.perf_counter() - save_start)
                    if i == steps - 1:
                        saver.wait()
                times[mode].append(time.perf_counter() - start)
    sizes = [info.size_bytes for info in savers["async"].list()]
    for saver in savers.values():
        if saver is not None:
            saver.close()
    return {**{mode: statistics.median(times[mode]) for mode in MODES},
            "async_save_call": statistics.median(blocking), "checkpoint_bytes": max(sizes),
            "steps": steps * rounds}
