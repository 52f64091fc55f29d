"""Per-device memory of a program: which arrays are alive after each equation."""
from __future__ import annotations

import numpy as np

from parallel.auto._graph import Graph


class Liveness:
    """Live ranges of every value in program order.

    A value is alive after equation ``t`` when it was produced at or before ``t`` and is read
    after ``t`` (outputs and inputs that are not donated stay alive to the end). Point ``-1`` is
    before the first equation. Donated inputs die at their last read, which is where XLA reuses
    their buffers for the updated state.

    Args:
      graph: the program.
      donated: value ids of donated inputs.
    """

    def __init__(self, graph: Graph, donated: set[int]):
        end = len(graph.eqns)
        self.num_points = end + 1  # points -1 .. end-1, stored at index t + 1
        self.start = np.array([v.producer for v in graph.values], np.int64)
        self.stop = self.start.copy()  # alive while start <= t < stop
        for i, eqn in enumerate(graph.eqns):
            for v in eqn.inputs:
                if v is not None:
                    self.stop[v] = max(self.stop[v], i)
        for v in graph.outputs:
            if v is not None:
                self.stop[v] = end
        for v in graph.inputs + graph.constants:
            if v not in donated:
                self.stop[v] = end
        for out, into, _ in graph.loops:
            self.stop[into] = max(self.stop[into], self.stop[out])
        self._ids = np.flatnonzero(self.stop > self.start)

    def profile(self, nbytes: np.ndarray) -> np.ndarray:
        """Bytes alive after each point, for per-value sizes ``nbytes``."""
        delta = np.zeros(self.num_points + 1)
        ids = self._ids
        np.add.at(delta, self.start[ids] + 1, nbytes[ids])
        np.add.at(delta, self.stop[ids] + 1, -nbytes[ids])
        return np.cumsum(delta)[:-1]

    def live_at(self, point: int) -> np.ndarray:
        """Ids of the values alive after ``point`` (-1: before the first equation)."""
        ids = self._ids
        return ids[(self.start[ids] <= point) & (self.stop[ids] > point)]


def peak_points(profile: np.ndarray, count: int) -> list[int]:
    """Up to ``count`` well-separated points with the most bytes alive (as equation indices)."""
    order = np.argsort(-profile, kind="stable")
    spacing = max(1, len(profile) // (4 * count))
    chosen: list[int] = []
    for i in order:
        if all(abs(int(i) - c) >= spacing for c in chosen):
            chosen.append(int(i))
            if len(chosen) == count:
                break
    return [c - 1 for c in chosen]
