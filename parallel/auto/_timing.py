"""Timing compiled candidate plans on the devices they are for, with zero-filled inputs.

The cost model and XLA's cost analysis rank most plans correctly but cannot separate close
ones: on simulated CPU devices two plans 5% apart in XLA's figures can be 15% apart in time.
Running each finalist for a few steps settles it (Alpa profiled its candidate stages the same
way).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)


def _zeros(leaf: Any) -> jax.Array:
    """A zero-filled array shaped like ``leaf`` (PRNG keys: the key of seed 0)."""
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        return jnp.broadcast_to(jax.random.key(0), leaf.shape)
    return jnp.zeros(leaf.shape, leaf.dtype)


def time_compiled(candidates: Sequence[tuple[Any, Any]], abstract_args: Sequence[Any],
                  rounds: int = 3) -> list[float] | None:
    """The fastest of ``rounds`` timed runs of each compiled step, after one warm-up run.

    Args:
      candidates: ``(compiled step, its input shardings per argument)`` pairs.
      abstract_args: the step's arguments (shapes and dtypes only are used).
      rounds: timed runs per candidate; the candidates take turns, so a burst of other work
        on the host weighs on each alike.

    Returns:
      Seconds per candidate, or ``None`` when a candidate cannot run (the caller keeps its
      estimates instead).
    """
    try:
        makers = [jax.jit(lambda: jax.tree.map(_zeros, tuple(abstract_args)),
                          out_shardings=tuple(shardings)) for _, shardings in candidates]
        best = [float("inf")] * len(candidates)
        for round_index in range(rounds + 1):
            for i, (compiled, _) in enumerate(candidates):
                args = jax.block_until_ready(makers[i]())  # fresh: the step donates its state
                start = time.perf_counter()
                jax.block_until_ready(compiled(*args))
                if round_index:
                    best[i] = min(best[i], time.perf_counter() - start)
                del args
        return best
    except Exception as error:  # noqa: BLE001 - timing is an optional refinement
        log.info("could not time the candidate plans (%s); keeping the cost estimates", error)
        return None
