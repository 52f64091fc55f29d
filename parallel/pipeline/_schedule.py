"""Static pipeline schedules: the order in which forward and backward tasks are issued."""
from __future__ import annotations

SCHEDULES = ("1f1b", "gpipe")


def stage_sequence(schedule: str, stage: int, num_stages: int,
                   num_micro_batches: int) -> list[tuple[str, int]]:
    """The ``("F"|"B", micro_batch)`` order one stage runs.

    GPipe runs every forward, then every backward. 1F1B (PipeDream-flush) runs
    ``num_stages - stage - 1`` forwards to fill the pipeline, then alternates one forward and one
    backward, then drains; a stage never holds more than ``num_stages - stage`` micro-batches.
    """
    m = num_micro_batches
    if schedule == "gpipe":
        return [("F", i) for i in range(m)] + [("B", i) for i in range(m)]
    if schedule != "1f1b":
        raise ValueError(f"unknown schedule {schedule!r}; use one of {SCHEDULES}")
    warmup = min(num_stages - stage - 1, m)
    order = [("F", i) for i in range(warmup)]
    for j in range(m - warmup):
        order += [("F", warmup + j), ("B", j)]
    order += [("B", j) for j in range(m - warmup, m)] if warmup else []
    return order


def issue_order(schedule: str, num_stages: int,
                num_micro_batches: int) -> list[tuple[str, int, int]]:
    """All ``(kind, stage, micro_batch)`` tasks in a global order that respects dependencies.

    Simulates clock ticks: each tick, every stage whose next task has its inputs (issued in an
    earlier tick) issues it. ``F(s, i)`` needs ``F(s-1, i)``; ``B(s, i)`` needs ``F(s, i)`` and
    ``B(s+1, i)``.
    """
    sequences = [stage_sequence(schedule, s, num_stages, num_micro_batches)
                 for s in range(num_stages)]
    pointer = [0] * num_stages
    done: set[tuple[str, int, int]] = set()
    order = []
    total = sum(len(seq) for seq in sequences)
    while len(order) < total:
        tick = []
        for s in range(num_stages):
            if pointer[s] == len(sequences[s]):
                continue
            kind, i = sequences[s][pointer[s]]
            needs = [("F", s - 1, i)] if kind == "F" and s > 0 else []
            if kind == "B":
                needs = [("F", s, i)] + ([("B", s + 1, i)] if s + 1 < num_stages else [])
            if all(n in done for n in needs):
                tick.append((kind, s, i))
                pointer[s] += 1
        if not tick:
            raise RuntimeError(f"schedule {schedule} deadlocked")  # a bug, not a user error
        order.extend(tick)
        done.update(tick)
    return order


def max_in_flight(schedule: str, stage: int, num_stages: int, num_micro_batches: int) -> int:
    """The most micro-batches whose forward ran and backward has not, on one stage."""
    live = peak = 0
    for kind, _ in stage_sequence(schedule, stage, num_stages, num_micro_batches):
        live += 1 if kind == "F" else -1
        peak = max(peak, live)
    return peak


def bubble_fraction(num_stages: int, num_micro_batches: int) -> float:
    """Idle share of each stage in GPipe and 1F1B: ``(S - 1) / (M + S - 1)``."""
    return (num_stages - 1) / (num_micro_batches + num_stages - 1)
