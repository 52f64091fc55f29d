"""Per-device memory of a program: which arrays are alive while each equation runs."""
from __future__ import annotations

import numpy as np

from parallel.auto._graph import Graph


class Liveness:
    """Live ranges of the arrays XLA keeps in memory, in program order.

    Point ``t`` is "while equation ``t`` runs": a value is alive from the equation that produces
    it through the last one that reads it (inputs from the start; outputs, and inputs that are
    not donated, to the end). Donated inputs die at their last read, where XLA reuses their
    buffers for the updated state.

    Only values XLA keeps in memory count: inputs, outputs, and what goes into or comes out of
    an operation that is not fused; ``fused`` names the fusible primitives (element-wise ops),
    whose intermediate results live only in registers.

    Args:
      graph: the program.
      donated: value ids of donated inputs.
      fused: primitive names whose results are not kept unless a non-fused op reads them.
    """

    def __init__(self, graph: Graph, donated: set[int], fused: frozenset[str] = frozenset()):
        end = len(graph.eqns) - 1
        self.num_points = len(graph.eqns)
        self.start = np.array([max(v.producer, 0) for v in graph.values], np.int64)
        self.stop = self.start.copy()
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
        self._ids = np.flatnonzero(kept_values(graph, fused))

    def profile(self, nbytes: np.ndarray) -> np.ndarray:
        """Bytes alive at each point, for per-value sizes ``nbytes``."""
        delta = np.zeros(self.num_points + 1)
        ids = self._ids
        np.add.at(delta, self.start[ids], nbytes[ids])
        np.add.at(delta, self.stop[ids] + 1, -nbytes[ids])
        return np.cumsum(delta)[:-1]

    def live_at(self, point: int) -> np.ndarray:
        """Ids of the values alive while equation ``point`` runs."""
        ids = self._ids
        return ids[(self.start[ids] <= point) & (self.stop[ids] >= point)]


def kept_values(graph: Graph, fused: frozenset[str]) -> np.ndarray:
    """Mask of the values XLA writes to memory: inputs, outputs, and whatever a non-fused
    operation reads or produces (results of ``fused`` ops that only feed fused ops stay in
    registers)."""
    kept = np.zeros(len(graph.values), bool)
    kept[graph.inputs + graph.constants] = True
    kept[[v for v in graph.outputs if v is not None]] = True
    for eqn in graph.eqns:
        if eqn.prim not in fused:
            kept[list(eqn.outputs)] = True
            kept[[v for v in eqn.inputs if v is not None]] = True
    return kept


def peak_points(profile: np.ndarray, count: int) -> list[int]:
    """Up to ``count`` well-separated points with the most bytes alive."""
    order = np.argsort(-profile, kind="stable")
    spacing = max(1, len(profile) // (4 * count))
    chosen: list[int] = []
    for i in order:
        if all(abs(int(i) - c) >= spacing for c in chosen):
            chosen.append(int(i))
            if len(chosen) == count:
                break
    return chosen
