"""Static pipeline schedules: the order in which forward and backward tasks are issued.

Stages are virtual: with ``virtual_stages = v``, ``S`` groups of devices run ``S * v`` stages,
stage ``k`` on group ``k % S`` (interleaved 1F1B; ``v = 1`` otherwise).
"""
from __future__ import annotations

SCHEDULES = ("1f1b", "gpipe", "interleaved")


def stage_sequence(schedule: str, stage: int, num_stages: int, num_micro_batches: int,
                   virtual_stages: int = 1) -> list[tuple[str, int, int]]:
    """The ``("F"|"B", virtual stage, micro_batch)`` order one group of devices runs.

    GPipe runs every forward, then every backward. 1F1B (PipeDream-flush) runs
    ``num_stages - stage - 1`` forwards to fill the pipeline, then alternates one forward and one
    backward, then drains; a stage never holds more than ``num_stages - stage`` micro-batches.
    Interleaved 1F1B (Megatron-LM's) does the same over ``virtual_stages`` model chunks per
    group: micro-batches go through the chunks in groups of ``num_stages``, forwards in chunk
    order and backwards in reverse, after ``2 (num_stages - stage - 1) + (v - 1) num_stages``
    warm-up forwards. ``"forward"`` runs the forwards alone (evaluation).
    """
    m, s_count, v = num_micro_batches, num_stages, virtual_stages
    if schedule == "forward":
        return [("F", c * s_count + stage, i) for i in range(m) for c in range(v)]
    if schedule == "gpipe":
        return ([("F", stage, i) for i in range(m)] + [("B", stage, i) for i in range(m)])
    if schedule == "1f1b":
        forwards = [("F", stage, i) for i in range(m)]
        backwards = [("B", stage, i) for i in range(m)]
        warmup = min(num_stages - stage - 1, m)
    elif schedule == "interleaved":
        forwards, backwards = [], []
        for first in range(0, m, s_count):
            group = range(first, min(first + s_count, m))
            forwards += [("F", c * s_count + stage, i) for c in range(v) for i in group]
            backwards += [("B", c * s_count + stage, i) for c in reversed(range(v)) for i in group]
        warmup = min(2 * (s_count - stage - 1) + (v - 1) * s_count, v * m)
    else:
        raise ValueError(f"unknown schedule {schedule!r}; use one of {SCHEDULES}")
    order = forwards[:warmup]
    for j in range(len(forwards) - warmup):
        order += [forwards[warmup + j], backwards[j]]
    return order + backwards[len(forwards) - warmup:]


def issue_order(schedule: str, num_stages: int, num_micro_batches: int,
                virtual_stages: int = 1) -> list[tuple[str, int, int]]:
    """All ``(kind, virtual stage, micro_batch)`` tasks in a global order respecting
    dependencies.

    Simulates clock ticks: each tick, every group of devices whose next task has its inputs
    (issued in an earlier tick) issues it. ``F(k, i)`` needs ``F(k-1, i)``; ``B(k, i)`` needs
    ``F(k, i)`` and ``B(k+1, i)``.
    """
    sequences = [stage_sequence(schedule, s, num_stages, num_micro_batches, virtual_stages)
                 for s in range(num_stages)]
    last = num_stages * virtual_stages - 1
    pointer = [0] * num_stages
    done: set[tuple[str, int, int]] = set()
    order = []
    total = sum(len(seq) for seq in sequences)
    while len(order) < total:
        tick = []
        for s in range(num_stages):
            if pointer[s] == len(sequences[s]):
                continue
            kind, k, i = sequences[s][pointer[s]]
            needs = [("F", k - 1, i)] if kind == "F" and k > 0 else []
            if kind == "B":
                needs = [("F", k, i)] + ([("B", k + 1, i)] if k < last else [])
            if all(n in done for n in needs):
                tick.append((kind, k, i))
                pointer[s] += 1
        if not tick:
            raise RuntimeError(f"schedule {schedule} deadlocked")  # a bug, not a user error
        order.extend(tick)
        done.update(tick)
    return order


def max_in_flight(schedule: str, stage: int, num_stages: int, num_micro_batches: int,
                  virtual_stages: int = 1) -> int:
    """The most micro-batches whose forward ran and backward has not, on one virtual stage
    (``stage`` is the virtual stage's index)."""
    group = stage % num_stages
    live = peak = 0
    for kind, k, _ in stage_sequence(schedule, group, num_stages, num_micro_batches,
                                     virtual_stages):
        if k == stage:
            live += 1 if kind == "F" else -1
            peak = max(peak, live)
    return peak


def bubble_fraction(num_stages: int, num_micro_batches: int, virtual_stages: int = 1) -> float:
    """Idle share of each group of devices: ``(S - 1) / (v M + S - 1)`` (GPipe and 1F1B have
    ``v = 1``)."""
    return (num_stages - 1) / (virtual_stages * num_micro_batches + num_stages - 1)
