"""A small mixed-integer program builder over ``scipy.optimize.milp`` (HiGHS)."""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import scipy.optimize
import scipy.sparse

# A relaxed solution whose integer variables are this close to 0 or 1 is integral.
_INTEGRAL = 1e-6


@dataclasses.dataclass
class Result:
    """What the solver returned.

    Attributes:
      x: variable values (``None`` when no feasible point was found).
      objective: objective value at ``x``.
      status: ``"optimal"``, ``"time_limit"`` (``x`` is the best found) or ``"infeasible"``.
      seconds: wall time of the solve.
    """

    x: np.ndarray | None
    objective: float
    status: str
    seconds: float


class Program:
    """Binary choice variables, continuous product variables, linear rows; minimize cost."""

    def __init__(self):
        self._cost: list[np.ndarray] = []
        self._extra: list[tuple[np.ndarray, np.ndarray]] = []
        self._integer: list[np.ndarray] = []
        self._upper: list[np.ndarray] = []
        self.num_vars = 0
        self.num_rows = 0
        # The matrix's entries, in chunks of whole rows: row number, variable id, coefficient.
        self._entries: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._lo: list[float] = []
        self._hi: list[float] = []

    def _add_vars(self, cost: np.ndarray, integer: bool, upper: float = 1.0) -> np.ndarray:
        ids = np.arange(self.num_vars, self.num_vars + len(cost))
        self.num_vars += len(cost)
        self._cost.append(np.asarray(cost, float))
        self._integer.append(np.full(len(cost), 1 if integer else 0))
        self._upper.append(np.full(len(cost), upper))
        return ids

    def add_row(self, ids: np.ndarray, coefs: np.ndarray, lo: float, hi: float):
        ids = np.asarray(ids)
        self._entries.append((np.full(len(ids), self.num_rows), ids, np.asarray(coefs, float)))
        self.num_rows += 1
        self._lo.append(lo)
        self._hi.append(hi)

    def add_choice(self, cost: np.ndarray) -> np.ndarray:
        """Binary variables of which exactly one is 1; returns their ids."""
        ids = self._add_vars(cost, True)
        self.add_row(ids, np.ones(len(ids)), 1.0, 1.0)
        return ids

    def add_vars(self, cost: np.ndarray, upper: float = 1.0) -> np.ndarray:
        """Continuous variables in ``[0, upper]``; returns their ids."""
        return self._add_vars(cost, False, upper)

    def add_cost(self, ids: np.ndarray, cost: np.ndarray):
        """Adds ``cost`` to the objective coefficients of ``ids``."""
        self._extra.append((np.asarray(ids), np.asarray(cost, float)))

    def add_product(self, src: list[np.ndarray], dst: list[np.ndarray], cost: np.ndarray):
        """Charges ``cost[a, b]`` when one of ``src[a]`` and one of ``dst[b]`` is chosen.

        ``src[a]`` and ``dst[b]`` are sets of choice-variable ids (partitions of two choices).
        The product is linearized exactly by a transportation block: ``y[a, b] >= 0``,
        ``sum_b y[a, b] = sum(x[src[a]])``, ``sum_a y[a, b] = sum(x[dst[b]])``.
        """
        na, nb = cost.shape
        y = self._add_vars(cost.reshape(-1), False).reshape(na, nb)
        # Rows a (y[a], then src[a]) and then rows b (y[:, b], then dst[b]), made at once.
        pieces = [part for a in range(na) for part in (y[a], src[a])]
        pieces += [part for b in range(nb) for part in (y[:, b], dst[b])]
        lengths = [nb + len(s) for s in src] + [na + len(d) for d in dst]
        ids = np.concatenate(pieces)
        # y's ids come after every choice variable's.
        coefs = np.where(ids >= y[0, 0], 1.0, -1.0)
        rows = np.repeat(np.arange(self.num_rows, self.num_rows + na + nb), lengths)
        self._entries.append((rows, ids, coefs))
        self.num_rows += na + nb
        self._lo += [0.0] * (na + nb)
        self._hi += [0.0] * (na + nb)

    @property
    def size(self) -> tuple[int, int, int]:
        """(variables, rows, integer variables)."""
        return self.num_vars, self.num_rows, int(sum(i.sum() for i in self._integer))

    def solve(self, time_limit: float, gap: float = 1e-2, relax_first: bool = False) -> Result:
        """Minimizes the objective within ``time_limit`` seconds, to a relative ``gap``.

        A 1% gap is far below the cost model's own error and keeps memory-constrained programs,
        whose relaxation is loose, from spending seconds on proving optimality.
        ``relax_first``: solve the linear relaxation first and keep its optimum when integral
        (programs without a memory row: their relaxation usually is).
        """
        if time_limit <= 0:  # no time at all: no point found, whatever HiGHS could do in 1 ms
            return Result(None, float("inf"), "time_limit", 0.0)
        cost = np.concatenate(self._cost) if self._cost else np.zeros(0)
        for ids, extra in self._extra:
            np.add.at(cost, ids, extra)
        integrality = np.concatenate(self._integer) if self._integer else np.zeros(0)
        rows, cols, vals = (np.concatenate([e[i] for e in self._entries]) for i in range(3))
        matrix = scipy.sparse.csr_array((vals, (rows, cols)), shape=(self.num_rows, self.num_vars))
        start = time.perf_counter()
        bounds = scipy.optimize.Bounds(0, np.concatenate(self._upper))
        constraints = scipy.optimize.LinearConstraint(matrix, self._lo, self._hi)
        # The linear relaxation first: when its optimum is integral it is the program's optimum
        # (no integer point costs less), found without the branch-and-bound's root work (cuts,
        # heuristics), which takes 2-3x the relaxation on the planner's programs.
        relaxed = None
        if relax_first:
            relaxed = scipy.optimize.milp(cost, integrality=np.zeros_like(integrality),
                                          bounds=bounds, constraints=constraints,
                                          options={"time_limit": time_limit, "disp": False})
        if relaxed is not None and relaxed.status == 0 and relaxed.x is not None:
            whole = relaxed.x[integrality == 1]
            if np.all(np.abs(whole - np.round(whole)) <= _INTEGRAL):
                return Result(np.round(relaxed.x, 6), float(relaxed.fun), "optimal",
                              time.perf_counter() - start)
        time_limit = max(time_limit - (time.perf_counter() - start), 1e-3)
        res = scipy.optimize.milp(
            cost, integrality=integrality, bounds=bounds, constraints=constraints,
            options={"time_limit": time_limit, "mip_rel_gap": gap, "disp": False})
        seconds = time.perf_counter() - start
        if res.x is None:
            return Result(None, float("inf"), "infeasible" if res.status == 2 else "time_limit",
                          seconds)
        status = "optimal" if res.status == 0 else "time_limit"
        return Result(np.round(res.x, 6), float(res.fun), status, seconds)
