"""``ShardParallel``: the automatic intra-op sharding method, plugged into ``parallelize``."""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from parallel._errors import PlanError
from parallel._methods import Method, register_method
from parallel.auto._search import AXIS_NAMES, solve
from parallel.plan import Constraint, Plan, make_leaf_plans
from parallel.profiles import DeviceProfile


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
        """Solves for the plan of ``fn(*abstract_args)`` on ``devices`` (see ``Method``)."""
        del logical_axes
        mesh_shape = None if self.mesh is None else self.resolve_mesh_shape(len(devices))
        solution = solve(fn, abstract_args, num_devices=len(devices), mesh_shape=mesh_shape,
                         profile=self.profile, memory_budget_bytes=self.memory_budget_bytes,
                         donate_argnums=donate_argnums, batch_argnums=batch_argnums,
                         time_limit_s=self.time_limit_s)
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
