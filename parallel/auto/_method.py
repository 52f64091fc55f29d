"""``ShardParallel``: the automatic intra-op sharding method, plugged into ``parallelize``."""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from parallel._constraints import with_constraints
from parallel._errors import PlanError
from parallel._methods import Method, register_method
from parallel.auto._search import AXIS_NAMES, MemoryBudgetError, Solution, solve
from parallel.plan import Constraint, Plan, make_leaf_plans, shardings_from_specs
from parallel.profiles import DeviceProfile
from parallel.report import memory_bytes

# Re-plans with a tighter target when XLA's memory analysis finds the plan over the budget.
_BUDGET_CHECKS = 3


class ShardParallel(Method):
    """Finds the sharding of a step automatically (Alpa-style intra-op parallelism).

    Traces the step to a jaxpr, prices sharding strategies for every operation on each 2-D
    ``("data", "model")`` factorization of the devices, solves an integer program with HiGHS,
    and keeps the mesh with the lowest estimated step time within the memory budget. Needs no
    logical axis names (``logical_axes`` is ignored).

    Args:
      memory_budget_bytes: per-device memory limit; ``None`` uses the device profile's memory.
      mesh: ``{"data": d, "model": m}`` to plan on that mesh only; ``None`` tries them all.
      profile: device profile name (``"cpu"``, ``"h100"``...) or object that prices compute and
        links; ``None`` uses the running platform's.
      time_limit_s: solver time limit per mesh shape; on a time-out the best plan found so far
        is used, with a warning.

    With a ``memory_budget_bytes``, the chosen plan is compiled and XLA's memory analysis
    checked against the budget (the solver's own estimate is approximate); if XLA needs more,
    the solver runs again with its target lowered by the observed ratio.
    """

    name = "shard"

    def __init__(self, memory_budget_bytes: float | None = None,
                 mesh: Mapping[str, int] | None = None,
                 profile: str | DeviceProfile | None = None, time_limit_s: float = 30.0):
        super().__init__(mesh)
        self.memory_budget_bytes = memory_budget_bytes
        self.profile = profile
        self.time_limit_s = time_limit_s

    def __repr__(self) -> str:
        return (f"ShardParallel(memory_budget_bytes={self.memory_budget_bytes}, "
                f"mesh={self.mesh})")

    def known_axes(self) -> tuple[str, ...]:
        return AXIS_NAMES

    def make_plan(self, fn: Callable, abstract_args: Sequence[Any], *,
                  batch_argnums: Sequence[int], donate_argnums: Sequence[int],
                  devices: Sequence[jax.Device], logical_axes: Sequence[Any] | None) -> Plan:
        """Solves for the plan of ``fn(*abstract_args)`` on ``devices`` (see ``Method``).

        Raises:
          MemoryBudgetError: no plan fits ``memory_budget_bytes``.
        """
        del logical_axes
        mesh_shape = None if self.mesh is None else self.resolve_mesh_shape(len(devices))
        budget = self.memory_budget_bytes
        target = budget
        for _ in range(_BUDGET_CHECKS):
            solution = solve(fn, abstract_args, num_devices=len(devices), mesh_shape=mesh_shape,
                             profile=self.profile, memory_budget_bytes=target,
                             donate_argnums=donate_argnums, batch_argnums=batch_argnums,
                             time_limit_s=self.time_limit_s)
            plan = self._plan(solution, abstract_args, batch_argnums, donate_argnums)
            if budget is None:
                return plan
            used = _compiled_memory(fn, plan, abstract_args, devices)
            if used <= budget:
                return plan
            target = target * budget / used
        raise MemoryBudgetError(
            f"ShardParallel's plans do not fit memory_budget_bytes={budget:.0f} once compiled: "
            f"XLA needs {used} bytes per device for the last one (mesh {plan.mesh_shape}). "
            "Raise memory_budget_bytes, use more devices, or shrink the model or batch.")

    def _plan(self, solution: Solution, abstract_args: Sequence[Any],
              batch_argnums: Sequence[int], donate_argnums: Sequence[int]) -> Plan:
        best = solution.best
        in_specs = iter(best.input_specs)
        inputs = tuple(make_leaf_plans(arg, lambda path, key_path, leaf: next(in_specs))
                       for arg in abstract_args)
        out_specs = iter(best.output_specs)
        outputs = make_leaf_plans(solution.out_shape,
                                  lambda path, key_path, leaf: next(out_specs))
        constraints = tuple(Constraint(site[0], output, spec)
                            for site, output, spec in best.constraints if len(site) == 1)
        extras = {"solver": solution.stats(), "explanation": solution.explain()}
        return Plan(self.name, dict(best.mesh_shape), inputs, outputs, constraints,
                    batch_argnums=tuple(batch_argnums), donate_argnums=tuple(donate_argnums),
                    extras=extras)


def _compiled_memory(fn: Callable, plan: Plan, abstract_args: Sequence[Any],
                     devices: Sequence[jax.Device]) -> int:
    """Peak bytes per device XLA assigns to ``fn`` compiled with ``plan`` (nothing runs)."""
    mesh = plan.make_mesh(devices)
    in_shardings = tuple(shardings_from_specs(mesh, s) for s in plan.input_specs(abstract_args))
    out_shardings = shardings_from_specs(mesh, plan.output_specs(jax.eval_shape(fn, *abstract_args)))
    if plan.constraints:
        fn = with_constraints(fn, abstract_args, plan.constraints, mesh)
    jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings,
                     donate_argnums=plan.donate_argnums)
    return memory_bytes(jitted.lower(*abstract_args).compile())


def _factory(mesh=None, rules=None, memory_budget_bytes=None, num_micro_batches=1):
    if rules:
        raise PlanError(f"parallel.rules={dict(rules)} only applies to method 'manual'; "
                        "ShardParallel chooses every sharding itself. Set parallel.method=manual "
                        "or drop the rules")
    if num_micro_batches != 1:
        raise PlanError(f"parallel.num_micro_batches={num_micro_batches} applies to pipeline "
                        "methods; ShardParallel runs the whole batch at once. Use "
                        "train.grad_accum_steps for accumulation, or set it to 1")
    return ShardParallel(memory_budget_bytes=memory_budget_bytes, mesh=mesh)


register_method("shard", _factory)
register_method("auto", _factory)
