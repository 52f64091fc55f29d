"""What the SPMD search found and how it reads: ``Solution`` (its ``explain``), the ranking of
close plans (``rank``, ``simplicity``), and the error when nothing fits the memory budget."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import numpy as np

from parallel._errors import PlanError
from parallel.auto._solve import MeshResult

# Estimated step times closer than this (relative) are a tie (see ``rank``).
TIE = 0.005
# The data-parallel flavours of a 1-D mesh, simplest first.
_FLAVOURS = ("", "batch split", "update sharded", "state sharded")


class MemoryBudgetError(PlanError):
    """No plan keeps the per-device memory within the budget.

    Attributes:
      smallest_bytes: the lowest per-device memory any plan reached (``None``: not known).
      budget: the budget.
    """

    def __init__(self, message: str, smallest_bytes: float | None = None,
                 budget: float | None = None):
        super().__init__(message)
        self.smallest_bytes = smallest_bytes
        self.budget = budget


@dataclasses.dataclass
class Solution:
    """What :func:`solve` found.

    Attributes:
      best: the chosen plan (mesh, per-leaf specs, constraints, cost split).
      tried: every mesh shape tried, best first; the others are the runner-ups.
      memory_budget_bytes: the per-device budget the plans were held to.
      solve_time_s: seconds from tracing to the last solve.
      num_equations, num_groups, num_classes: size of the flattened program, of the decision
        groups, and of the integer program after tying repeated layers.
      in_tree: tree structure of the arguments (as a tuple).
      out_shape: the output as a pytree of ``jax.ShapeDtypeStruct``.
    """

    best: MeshResult
    tried: list[MeshResult]
    memory_budget_bytes: float
    solve_time_s: float
    num_equations: int
    num_groups: int
    num_classes: int
    in_tree: Any
    out_shape: Any

    @property
    def mesh_shape(self) -> dict[str, int]:
        return dict(self.best.mesh_shape)

    def with_best(self, result: MeshResult) -> Solution:
        """This solution with ``result`` (one of ``tried``) as the chosen plan."""
        return dataclasses.replace(self, best=result,
                                   tried=[result] + [r for r in self.tried if r is not result])

    def stats(self) -> dict[str, Any]:
        """Solver figures as JSON-friendly data (saved in the plan's extras)."""
        return {
            "solve_time_s": self.solve_time_s,
            "memory_budget_bytes": self.memory_budget_bytes,
            "num_equations": self.num_equations,
            "num_groups": self.num_groups,
            "num_classes": self.num_classes,
            "meshes": [{"mesh_shape": r.mesh_shape, "variant": r.variant, "status": r.status,
                        "step_time_s": _finite(r.step_time_s), "compute_s": _finite(r.compute_s),
                        "comm_s": _finite(r.comm_s), "memory_bytes": _finite(r.memory_bytes),
                        "solve_time_s": r.solve_time_s,
                        "compiled_step_time_s": r.compiled_step_time_s,
                        "compiled_memory_bytes": r.compiled_memory_bytes,
                        "measured_step_time_s": r.measured_step_time_s} for r in self.tried],
        }

    def input_specs(self) -> tuple:
        """One ``PartitionSpec`` per argument leaf, as a tuple of per-argument pytrees."""
        return jax.tree.unflatten(self.in_tree, self.best.input_specs)

    def output_specs(self):
        """One ``PartitionSpec`` per output leaf, in the output's structure."""
        return jax.tree.unflatten(jax.tree.structure(self.out_shape), self.best.output_specs)

    def explain(self) -> str:
        """The chosen mesh, its cost split, the runner-ups and why they lost, and solve stats."""
        b = self.best
        variant = f" ({b.variant})" if b.variant else ""
        lines = [
            f"ShardParallel: mesh {b.mesh_shape}{variant}, estimated step {_ms(b.step_time_s)} "
            f"(compute {_ms(b.compute_s)}, communication {_ms(b.comm_s)}), "
            f"memory {_mb(b.memory_bytes)} per device (budget {_mb(self.memory_budget_bytes)})"
            + _compiled(b),
            f"solver: {self.num_equations} equations -> "
            f"{self.num_groups} groups -> {self.num_classes} classes after tying repeated layers",
            "operator strategies (most used first):",
        ]
        for what, label, used in b.choices[:12]:
            lines.append(f"  {used:4d}x {what}: {label}")
        if len(self.tried) > 1:
            lines.append("runner-ups:")
        for r in self.tried[1:]:
            variant = f" ({r.variant})" if r.variant else ""
            lines.append(f"  mesh {r.mesh_shape}{variant}: {self._why_lost(r)}")
        return "\n".join(lines)

    def _why_lost(self, r: MeshResult) -> str:
        if r.status == "over_budget":
            return (f"needs {_mb(r.memory_bytes)} per device, over the budget "
                    f"{_mb(self.memory_budget_bytes)}")
        b = self.best
        if r.measured_step_time_s is not None and b.measured_step_time_s is not None:
            return (f"timed, {r.measured_step_time_s / b.measured_step_time_s:.2f}x the "
                    f"measured step time of the chosen plan (compiled estimate "
                    f"{_ms(r.compiled_step_time_s)})")
        if r.compiled_step_time_s is not None and b.compiled_step_time_s is not None:
            return (f"compiled, {r.compiled_step_time_s / b.compiled_step_time_s:.2f}x the "
                    f"step time of the chosen plan (solver estimate {_ms(r.step_time_s)})")
        worse = "communication" if r.comm_s - b.comm_s > r.compute_s - b.compute_s else "compute"
        return (f"{r.step_time_s / max(b.step_time_s, 1e-30):.2f}x the step time "
                f"({_ms(r.step_time_s)}: compute {_ms(r.compute_s)}, communication "
                f"{_ms(r.comm_s)}; more {worse})")


def _finite(x: float) -> float | None:
    """``None`` for the infinities of a plan over budget (JSON has no infinity)."""
    return None if np.isinf(x) else x


def _compiled(r: MeshResult) -> str:
    if r.compiled_step_time_s is None:
        return ""
    measured = ("" if r.measured_step_time_s is None
                else f"; measured: {_ms(r.measured_step_time_s)} per step")
    return (f"; compiled: {_ms(r.compiled_step_time_s)}, "
            f"{_mb(r.compiled_memory_bytes)} per device" + measured)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms" if seconds >= 1e-4 else f"{seconds * 1e6:.2f} us"


def _mb(nbytes: float) -> str:
    return f"{nbytes / 2**20:.2f} MiB"


def rank(candidates: Sequence[Any], time_of: Callable[[Any], float],
         simplicity_of: Callable[[Any], Any]) -> list[Any]:
    """``candidates`` best first, by the planner's stated rule.

    The lower estimated step time wins. Times within ``TIE`` (relative) of each other are a
    tie: the estimates cannot tell such plans apart, and the simpler plan wins, the one with
    the lower ``simplicity_of`` (``simplicity``: the larger data axis, then batch split before
    update sharded before state sharded, then the solver's plan as solved before the one left to
    XLA's propagation), then the one listed first. A fixed rule keeps the choice the same from
    run to run.
    """
    left = list(candidates)
    out = []
    while left:
        fastest = min(time_of(c) for c in left)
        tied = [c for c in left if time_of(c) <= fastest * (1 + TIE) + 1e-15]
        best = min(tied, key=simplicity_of)  # min keeps the first of equals
        out.append(best)
        left = [c for c in left if c is not best]
    return out


def simplicity(result: MeshResult) -> tuple:
    """``rank``'s order of tied plans: less model parallelism, then fewer sharded leaves."""
    flavour = _FLAVOURS.index(result.variant) if result.variant in _FLAVOURS else 0
    return (-result.mesh_shape.get("data", 1), flavour)
