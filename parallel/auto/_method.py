"""``ShardParallel``: the automatic intra-op sharding method, plugged into ``parallelize``."""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax

from parallel._constraints import with_constraints
from parallel._errors import PlanError
from parallel._hlo import collective_list
from parallel._methods import Method, register_method
from parallel.auto._search import AXIS_NAMES, model_limit, solve
from parallel.auto._solution import MemoryBudgetError, Solution, rank, simplicity
from parallel.auto._solve import MeshResult
from parallel.auto._timing import time_compiled
from parallel.plan import Constraint, Plan, make_leaf_plans, shardings_from_specs
from parallel.profiles import DeviceProfile, allocatable_bytes, resolve_profile
from parallel.report import cost_figures, estimate_step_time, memory_bytes

# Re-plans with a tighter target when XLA's memory analysis finds the plan over the budget.
_BUDGET_CHECKS = 3
# Plans within this factor of the solver's best estimate are worth compiling to compare them by
# XLA's cost analysis (the figures ``analyze`` reports).
_FINALIST_RATIO = 1.25
# The data-parallel flavours (``solve``'s variants), in the order they are worth compiling.
_FLAVOURS = ("batch split", "update sharded", "state sharded")
_PINNED = {"all": "every value crossing between decision groups",
           "none": "none (XLA propagates from the inputs)"}


class _Check(NamedTuple):
    step_time_s: float
    memory_bytes: int
    result: MeshResult
    pin: str
    compiled: Any
    in_shardings: tuple


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
      validate: how many compiled programs may settle the choice (0: trust the solver): the
        solver's best, the data-parallel flavours, the other mesh shapes within 25% of its
        estimate, then the best with no intermediate pinned; the one XLA's cost analysis prices
        lowest (``analyze``'s estimate) is kept, or the fastest when they are timed.
      measure: time the compiled candidates on ``devices`` (a few steps each on zero-filled
        inputs) and keep the fastest. Off by default: a stopwatch on a shared machine can
        swap close candidates from one run to the next. Only plans that need at most a quarter
        of the device memory are run.

    The solver's cost model prices each operation on its own; XLA then fuses, merges
    collectives and reorders. Validation settles close calls with the compiled program, which
    must also fit the budget (``memory_budget_bytes``, or the device's memory) by XLA's memory
    analysis; if none does, the solver runs again with its target lowered by the observed ratio.

    The same program, devices and profile give the same plan: nothing is timed unless
    ``measure=True``, and estimates within 0.5% of each other are settled by a stated rule
    (``parallel.auto.rank``: the simpler plan wins, the one with less model parallelism and
    fewer sharded leaves).
    """

    name = "shard"

    def __init__(self, memory_budget_bytes: float | None = None,
                 mesh: Mapping[str, int] | None = None,
                 profile: str | DeviceProfile | None = None, time_limit_s: float = 30.0,
                 validate: int = 4, measure: bool = False):
        super().__init__(mesh)
        self.memory_budget_bytes = memory_budget_bytes
        self.profile = profile
        self.time_limit_s = time_limit_s
        self.validate = validate
        self.measure = measure

    def __repr__(self) -> str:
        return (f"ShardParallel(memory_budget_bytes={self.memory_budget_bytes}, "
                f"mesh={self.mesh})")

    def known_axes(self) -> tuple[str, ...]:
        return AXIS_NAMES

    def make_plan(self, fn: Callable, abstract_args: Sequence[Any], *,
                  batch_argnums: Sequence[int], donate_argnums: Sequence[int],
                  devices: Sequence[jax.Device], logical_axes: Sequence[Any] | None,
                  solution: Solution | None = None) -> Plan:
        """Solves for the plan of ``fn(*abstract_args)`` on ``devices`` (see ``Method``).

        ``solution``: the solver's answer already found for these devices and budget (the
        joint search's), used instead of solving again.

        Raises:
          MemoryBudgetError: no plan fits ``memory_budget_bytes``.
        """
        del logical_axes
        mesh_shape = None if self.mesh is None else self.resolve_mesh_shape(len(devices))
        budget = self.memory_budget_bytes
        if budget is None:  # the device's memory: a plan XLA finds bigger would not run
            budget = self.default_budget(devices)
        target = budget

        def fits(check: _Check) -> bool:
            return check.memory_bytes <= budget

        profile = self.device_profile(devices)
        for _ in range(_BUDGET_CHECKS):
            if solution is None or target != budget:
                solution = solve(fn, abstract_args, num_devices=len(devices),
                                 mesh_shape=mesh_shape, profile=profile,
                                 memory_budget_bytes=target, donate_argnums=donate_argnums,
                                 batch_argnums=batch_argnums, time_limit_s=self.time_limit_s,
                                 max_model=model_limit(profile))
            plan_args = (abstract_args, batch_argnums, donate_argnums)
            if self.memory_budget_bytes is None and not self.validate:
                return self._plan(solution, *plan_args)
            finalists = [r for r in solution.tried if r.status != "over_budget"
                         and r.step_time_s <= _FINALIST_RATIO * solution.best.step_time_s]
            checked: list[_Check] = []
            for r, pin in _checks(finalists, max(self.validate, 1)):
                # Compiled lazily: a finalist the solver already prices above a compiled plan
                # that fits cannot win on XLA's figures (they come out above the solver's, which
                # leaves out what XLA adds: copies, layout changes, unfused traffic); only a
                # stopwatch (measure=True) could still prefer it.
                bound = min((c.step_time_s for c in checked if fits(c)), default=float("inf"))
                if not self.measure and r.step_time_s > bound:
                    continue
                checked.append(self._check(fn, solution, r, pin, plan_args, devices, profile))
            fitting = [c for c in checked if fits(c)]
            if fitting:
                times = self._time(fitting, abstract_args, devices, profile)
                if times is None:  # the stated rule (``rank``): time, then the simpler plan
                    best = rank(fitting, lambda c: c.step_time_s,
                                lambda c: (simplicity(c.result), c.pin != "all"))[0]
                else:
                    best = fitting[times.index(min(times))]
                    best.result.measured_step_time_s = min(times)
                best.result.compiled_step_time_s = best.step_time_s
                best.result.compiled_memory_bytes = best.memory_bytes
                return self._plan(solution.with_best(best.result), *plan_args, best.pin)
            smallest = min(c.memory_bytes for c in checked)
            target = target * budget / smallest
        what = ("memory_budget_bytes" if self.memory_budget_bytes is not None
                else f"the {profile.name} device memory")
        raise MemoryBudgetError(
            f"ShardParallel's plans do not fit {what}={budget:.0f} once compiled: "
            f"XLA needs at least {smallest} bytes per device (solver target {target:.0f}). "
            "Raise memory_budget_bytes, use more devices, or shrink the model or batch.",
            smallest_bytes=smallest, budget=budget)

    def _check(self, fn: Callable, solution: Solution, result: MeshResult, pin: str,
               plan_args: tuple, devices: Sequence[jax.Device],
               profile: DeviceProfile) -> _Check:
        """XLA's figures for ``result``'s plan pinning ``pin`` intermediates."""
        plan = self._plan(solution.with_best(result), *plan_args, pin)
        compiled, in_shardings = _compile(fn, plan, plan_args[0], devices)
        check = _Check(_estimate(compiled, plan, profile), memory_bytes(compiled), result, pin,
                       compiled, in_shardings)
        if result.compiled_step_time_s is None:  # shown for the runner-ups in the explanation
            result.compiled_step_time_s = check.step_time_s
            result.compiled_memory_bytes = check.memory_bytes
        return check

    def _time(self, checks: list[_Check], abstract_args: Sequence[Any],
              devices: Sequence[jax.Device], profile: DeviceProfile) -> list[float] | None:
        """Measured seconds per step of each check's program, or ``None`` when not timed."""
        # Several processes: process 0 plans alone (see parallelize), and a program over every
        # process's devices cannot run in one of them.
        if (not self.measure or len(checks) < 2 or jax.process_count() > 1
                or max(c.memory_bytes for c in checks) * 4 > profile.memory_bytes):
            return None
        times = time_compiled([(c.compiled, c.in_shardings) for c in checks], abstract_args)
        for check, seconds in zip(checks, times or ()):
            if check.result.measured_step_time_s is None:  # shown for the runner-ups
                check.result.measured_step_time_s = seconds
        return times

    def default_budget(self, devices: Sequence[jax.Device]) -> int:
        """What the running devices can allocate (``memory_stats``), else the profile's memory."""
        profile = self.device_profile(devices)
        if self.profile is None:  # planning for the devices at hand
            return allocatable_bytes(devices[0]) or profile.memory_bytes
        return profile.memory_bytes

    def device_profile(self, devices: Sequence[jax.Device]) -> DeviceProfile:
        """The profile plans are priced with, for ``devices`` on the method's hosts.

        Raises:
          PlanError: the topology does not match the devices.
        """
        return resolve_profile(self.profile, len(devices), self.hosts(devices))

    def _plan(self, solution: Solution, abstract_args: Sequence[Any],
              batch_argnums: Sequence[int], donate_argnums: Sequence[int],
              pin: str = "all") -> Plan:
        """The plan of ``solution.best``; ``pin`` says which intermediates get sharding
        constraints: ``"all"`` that cross between decision groups, or ``"none"``."""
        best = solution.best
        in_specs = iter(best.input_specs)
        inputs = tuple(make_leaf_plans(arg, lambda path, key_path, leaf: next(in_specs))
                       for arg in abstract_args)
        out_specs = iter(best.output_specs)
        outputs = make_leaf_plans(solution.out_shape,
                                  lambda path, key_path, leaf: next(out_specs))
        constraints = tuple(Constraint(site[0], output, spec)
                            for site, output, spec in best.constraints
                            if len(site) == 1 and pin == "all")
        stats = {**solution.stats(), "pinned": pin}
        extras = {"solver": stats,
                  "explanation": solution.explain() + f"\npinned intermediates: {_PINNED[pin]}"}
        return Plan(self.name, dict(best.mesh_shape), inputs, outputs, constraints,
                    batch_argnums=tuple(batch_argnums), donate_argnums=tuple(donate_argnums),
                    extras=extras)


def _estimate(compiled: Any, plan: Plan, profile: DeviceProfile) -> float:
    """``analyze``'s estimated step time of a compiled plan."""
    flops, accessed = cost_figures(compiled)
    return estimate_step_time(flops, accessed, collective_list(compiled.as_text(), plan.num_devices),
                              profile)


def _checks(finalists: list[MeshResult], count: int) -> list[tuple[MeshResult, str]]:
    """The first ``count`` (candidate, pinning) pairs worth compiling, most telling first: the
    solver's best as solved, the data-parallel flavours unpinned (as the plain layouts
    compile) in the solver's order of flavours, the other mesh shapes, then the best
    unpinned."""
    best, others = finalists[0], finalists[1:]
    order = [(best, "none" if best.variant else "all")]
    order += [(r, "none") for r in sorted((r for r in others if r.variant),
                                          key=lambda r: _FLAVOURS.index(r.variant))]
    order += [(r, "all") for r in others if not r.variant]
    if not best.variant:
        order.append((best, "none"))
    return order[:count]


def _compile(fn: Callable, plan: Plan, abstract_args: Sequence[Any],
             devices: Sequence[jax.Device]):
    """``fn`` compiled with ``plan``'s shardings and constraints (nothing runs)."""
    mesh = plan.make_mesh(devices)
    in_shardings = tuple(shardings_from_specs(mesh, s) for s in plan.input_specs(abstract_args))
    out_shardings = shardings_from_specs(mesh, plan.output_specs(jax.eval_shape(fn, *abstract_args)))
    if plan.constraints:
        fn = with_constraints(fn, abstract_args, plan.constraints, mesh)
    jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings,
                     donate_argnums=plan.donate_argnums)
    return jitted.lower(*abstract_args).compile(), in_shardings


def _factory(mesh=None, rules=None, memory_budget_bytes=None, num_micro_batches=1, profile=None):
    if rules:
        raise PlanError(f"parallel.rules={dict(rules)} only applies to method 'manual'; "
                        "ShardParallel chooses every sharding itself. Set parallel.method=manual "
                        "or drop the rules")
    if num_micro_batches != 1:
        raise PlanError(f"parallel.num_micro_batches={num_micro_batches} applies to pipeline "
                        "methods; ShardParallel runs the whole batch at once. Use "
                        "train.grad_accum_steps for accumulation, or set it to 1")
    return ShardParallel(memory_budget_bytes=memory_budget_bytes, mesh=mesh, profile=profile)


register_method("shard", _factory)
