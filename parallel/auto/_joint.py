"""``method="auto"``: one planner for data, operator and pipeline parallelism together.

It prices, on one cost model (the intra-op solver's), the SPMD plans of ``ShardParallel`` (every
mesh shape and data-parallel flavour) and pipelined plans: the number of stages, the layer range
of each, each stage's sub-mesh shape, and the micro-batches (a one-stage "pipeline" is gradient
accumulation inside an SPMD plan); rematerialization when memory needs it. Every candidate
must fit the per-device memory budget. A pipeline is chosen only where it is cheaper or where
nothing else fits, and the plan's explanation says why, with the runner-ups.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from parallel._errors import PlanError
from parallel._methods import Method, register_method
from parallel.auto._account import Decision
from parallel.auto._account import gib as _gib
from parallel.auto._account import stats as _stats
from parallel.auto._decide import search
from parallel.auto._method import ShardParallel
from parallel.auto._search import AXIS_NAMES
from parallel.auto._solution import MemoryBudgetError
from parallel.plan import Plan
from parallel.profiles import DeviceProfile

# Searches for a pipeline that fits once compiled (each lowers the budget by the overshoot).
_COMPILED_ROUNDS = 3


class AutoParallel(Method):
    """Chooses SPMD sharding, gradient accumulation, rematerialization and pipeline stages
    together, for the devices and hosts it runs on (``method="auto"``).

    Args:
      memory_budget_bytes: per-device memory limit; ``None``: the device's memory.
      profile: device profile name or object (``None``: the running device's).
      num_micro_batches: ``1``: the search chooses; more: only plans with that many
        micro-batches (it must divide the batch).
      max_stages: pipelines are searched up to this many stages; ``None``: 8, or one stage
        per host on a cluster of more hosts.
      time_limit_s, validate, measure: as for ``ShardParallel`` (SPMD plans).
      tiny_step_s: a step whose whole work unsplit on one device is estimated below this many
        seconds is planned as data parallelism without a search (``parallel.auto._tiny``);
        ``None``: the profile's ``program_overhead_s``; ``0``: always search.
    """

    name = "auto"

    def __init__(self, memory_budget_bytes: float | None = None,
                 profile: str | DeviceProfile | None = None, num_micro_batches: int = 1,
                 max_stages: int | None = None, time_limit_s: float = 30.0, validate: int = 4,
                 measure: bool = False, mesh: Mapping[str, int] | None = None,
                 tiny_step_s: float | None = None):
        super().__init__(mesh)
        if not isinstance(num_micro_batches, int) or num_micro_batches < 1:
            raise PlanError(f"num_micro_batches={num_micro_batches!r} must be a positive integer")
        self.memory_budget_bytes = memory_budget_bytes
        self.profile = profile
        self.num_micro_batches = num_micro_batches
        self.max_stages = max_stages
        self.tiny_step_s = tiny_step_s
        self.shard = ShardParallel(memory_budget_bytes, mesh, profile, time_limit_s, validate,
                                   measure)
        self._decisions: dict[tuple, Decision] = {}
        self._plans: dict[tuple, Plan] = {}

    def __repr__(self) -> str:
        return (f"AutoParallel(memory_budget_bytes={self.memory_budget_bytes}, "
                f"num_micro_batches={self.num_micro_batches})")

    def known_axes(self) -> tuple[str, ...]:
        return AXIS_NAMES

    # ----- the two ways parallelize asks ---------------------------------------------------
    def build_executable(self, fn: Callable, abstract_args: Sequence[Any], *,
                         batch_argnums: Sequence[int], donate_argnums: Sequence[int],
                         devices: Sequence[jax.Device]):
        """The pipelined step when the search chose a pipeline; ``None`` for an SPMD plan
        (``parallelize`` then asks ``make_plan``). With several processes, process 0 searches
        alone and hands its choice to the others (as ``parallelize`` does with plans)."""
        budget = self._budget(devices)
        planning, notes = None, []
        for _ in range(_COMPILED_ROUNDS):
            try:
                choice = _from_process_0(lambda: self._choose(
                    fn, abstract_args, batch_argnums, donate_argnums, devices, planning))
            except MemoryBudgetError as error:
                if planning is None:
                    raise
                raise MemoryBudgetError(
                    f"no plan of this step on {len(devices)} devices fits {budget:.0f} bytes "
                    f"per device once compiled: {notes[-1]}, and {error}",
                    smallest_bytes=peak, budget=budget) from None
            if choice["kind"] == "spmd":
                return None
            step = self._pipeline_step(choice, fn, abstract_args, batch_argnums,
                                       donate_argnums, devices)
            # The plan that runs must fit once compiled: XLA's temporaries and buffers can
            # exceed the search's estimate. Over the budget: searched again for a budget
            # lowered by the overshoot.
            peak = _compiled_peak(step)
            if peak <= budget:
                break
            # Lowered by the overshoot, and at least by what the estimate missed.
            planning = max(min((planning or budget) - (peak - budget),
                               budget - (peak - choice["memory_bytes"])), 0.0)
            notes.append(f"compiled: {choice['what']} needs {_gib(peak)} per device once "
                         f"compiled (XLA), over the budget {_gib(budget)}; searched again "
                         f"planning for {_gib(planning)}")
        else:
            raise MemoryBudgetError(
                f"no pipelined plan of this step on {len(devices)} devices fits {budget:.0f} "
                f"bytes per device once compiled: the last needs {peak:.0f} ({notes[-1]}). "
                "Raise memory_budget_bytes, use more devices, or shrink the model or batch.",
                smallest_bytes=peak, budget=budget)
        extras = step.plan.extras
        extras["explanation"] = "\n".join([choice["explanation"], *notes,
                                           extras.get("explanation", "")])
        extras["planner"] = choice["planner"]
        return step

    def _pipeline_step(self, choice, fn, abstract_args, batch_argnums, donate_argnums,
                       devices):
        from parallel.pipeline._dp import StageLayout
        from parallel.pipeline._method import PipeshardParallel

        layout = StageLayout(choice["num_layers"], tuple(choice["starts"]),
                             tuple(choice["sizes"]), tuple(choice["mesh_shapes"]),
                             tuple(choice["stage_times_s"]), choice["cost_s"],
                             tuple(choice.get("split_state", ())))
        method = PipeshardParallel(choice["num_micro_batches"], stage_option=layout,
                                   remat=choice["remat"], profile=self.device_profile(devices))
        method.num_hosts, method.devices_per_host = self.num_hosts, self.devices_per_host
        return method.build_executable(fn, abstract_args, batch_argnums=batch_argnums,
                                       donate_argnums=donate_argnums, devices=devices)

    def _budget(self, devices) -> float:
        return float(self.memory_budget_bytes if self.memory_budget_bytes is not None
                     else self.shard.default_budget(devices))

    def _choose(self, fn, abstract_args, batch_argnums, donate_argnums, devices,
                planning: float | None = None) -> dict:
        """The search's choice as JSON-friendly data; an SPMD plan is made (and checked on
        XLA's compiled memory) here and kept for ``make_plan``. ``planning``: search for this
        budget (below the real one: a pipeline chosen before did not fit once compiled)."""
        decision = self.decide(fn, abstract_args, batch_argnums, donate_argnums, devices,
                               planning=planning)
        key = self._key(fn, abstract_args, batch_argnums, donate_argnums, devices)
        if decision.tiny is not None:
            self._plans[key] = self._tiny_plan(decision, fn, abstract_args, batch_argnums,
                                               donate_argnums, devices)
            return {"kind": "spmd"}
        if decision.pipeline is None:
            try:  # the SPMD plan, checked on XLA's compiled memory: it may not fit after all
                self._plans[key] = self._spmd_plan(decision, fn, abstract_args, batch_argnums,
                                                   donate_argnums, devices)
                return {"kind": "spmd"}
            except MemoryBudgetError as error:
                # Searched again without SPMD plans: micro-batches and pipelines.
                decision = self.decide(fn, abstract_args, batch_argnums, donate_argnums,
                                       devices, spmd_refused=str(error))
                if decision.pipeline is None:
                    raise
        chosen = decision.pipeline
        return {"kind": "pipeline", "num_layers": decision.num_layers,
                "starts": [s.first for s in chosen.stages],
                "sizes": [s.devices for s in chosen.stages],
                "mesh_shapes": [{"data": s.mesh[0], "model": s.mesh[1]} for s in chosen.stages],
                "stage_times_s": [s.time_s for s in chosen.stages],
                "split_state": [s.split_state for s in chosen.stages],
                "cost_s": chosen.step_time_s, "num_micro_batches": chosen.num_micro_batches,
                "remat": chosen.remat, "explanation": decision.explanation,
                "what": chosen.describe().split(":")[0], "memory_bytes": chosen.memory_bytes,
                "planner": _stats(decision)}

    def make_plan(self, fn: Callable, abstract_args: Sequence[Any], *,
                  batch_argnums: Sequence[int], donate_argnums: Sequence[int],
                  devices: Sequence[jax.Device], logical_axes: Sequence[Any] | None) -> Plan:
        """The plan the search chose (see ``build_executable``; a pipeline's is its step's)."""
        key = self._key(fn, abstract_args, batch_argnums, donate_argnums, devices)
        if key in self._plans:
            return self._plans.pop(key)
        decision = self.decide(fn, abstract_args, batch_argnums, donate_argnums, devices)
        if decision.tiny is not None:
            return self._tiny_plan(decision, fn, abstract_args, batch_argnums, donate_argnums,
                                   devices)
        if decision.pipeline is not None:
            return self.build_executable(fn, abstract_args, batch_argnums=batch_argnums,
                                         donate_argnums=donate_argnums, devices=devices).plan
        return self._spmd_plan(decision, fn, abstract_args, batch_argnums, donate_argnums,
                               devices, logical_axes)

    def _spmd_plan(self, decision, fn, abstract_args, batch_argnums, donate_argnums, devices,
                   logical_axes=None) -> Plan:
        plan = self.shard.make_plan(fn, abstract_args, batch_argnums=batch_argnums,
                                    donate_argnums=donate_argnums, devices=devices,
                                    logical_axes=logical_axes, solution=decision.spmd)
        extras = dict(plan.extras)
        extras["explanation"] = decision.explanation + "\n" + extras.get("explanation", "")
        extras["planner"] = _stats(decision)
        return dataclasses.replace(plan, method=self.name, extras=extras)

    def _tiny_plan(self, decision, fn, abstract_args, batch_argnums, donate_argnums,
                   devices) -> Plan:
        """Data parallelism (``DataParallel``'s plan), for a tiny step."""
        from parallel._methods import DataParallel

        plan = DataParallel().make_plan(fn, abstract_args, batch_argnums=batch_argnums,
                                        donate_argnums=donate_argnums, devices=devices,
                                        logical_axes=None)
        extras = {**plan.extras, "explanation": decision.explanation,
                  "planner": _stats(decision)}
        return dataclasses.replace(plan, method=self.name, extras=extras)

    def device_profile(self, devices: Sequence[jax.Device]) -> DeviceProfile:
        self.shard.num_hosts, self.shard.devices_per_host = self.num_hosts, self.devices_per_host
        return self.shard.device_profile(devices)

    # ----- the search ------------------------------------------------------------------------
    @staticmethod
    def _key(fn, abstract_args, batch_argnums, donate_argnums, devices) -> tuple:
        return (fn, _signature(abstract_args), tuple(batch_argnums), tuple(donate_argnums),
                tuple(d.id for d in devices))

    def decide(self, fn: Callable, abstract_args: Sequence[Any], batch_argnums: Sequence[int],
               donate_argnums: Sequence[int], devices: Sequence[jax.Device],
               spmd_refused: str | None = None, planning: float | None = None) -> Decision:
        """The joint search (``search``) for ``fn`` on ``devices``, made once per argument
        signature; ``spmd_refused``: why the SPMD plan chosen before did not fit once
        compiled (searched again without SPMD plans); ``planning``: searched again for this
        budget (a pipeline chosen before did not fit once compiled)."""
        key = self._key(fn, abstract_args, batch_argnums, donate_argnums, devices)
        if key not in self._decisions or spmd_refused is not None or planning is not None:
            budget = planning if planning is not None else self._budget(devices)
            if spmd_refused is None and key in self._decisions:
                spmd_refused = self._decisions[key].spmd_refused
            self._decisions[key] = search(
                fn, abstract_args, num_devices=len(devices),
                profile=self.device_profile(devices), memory_budget_bytes=budget,
                batch_argnums=batch_argnums, donate_argnums=donate_argnums,
                num_micro_batches=self.num_micro_batches, max_stages=self.max_stages,
                mesh_shape=None if self.mesh is None else self.resolve_mesh_shape(len(devices)),
                time_limit_s=self.shard.time_limit_s, spmd_refused=spmd_refused,
                tiny_step_s=self.tiny_step_s)
        return self._decisions[key]
def _signature(abstract_args) -> tuple:
    leaves, treedef = jax.tree.flatten(tuple(abstract_args))
    return treedef, tuple((tuple(x.shape), str(x.dtype)) for x in leaves)

def _compiled_peak(step) -> float:
    """The most loaded device's bytes of a pipelined step, with XLA's compiled temporaries
    (``parallel.pipeline._memory.runner_memory``); its programs stay compiled for the step."""
    from parallel.pipeline._memory import runner_memory

    return float(max(m.total for m in runner_memory(step.runner, step.compile_all())))


def _from_process_0(make: Callable[[], dict]) -> dict:
    """``make()`` (JSON-friendly) run by process 0 alone and handed to every process."""
    if jax.process_count() == 1:
        return make()
    import json

    import numpy as np
    from jax.experimental import multihost_utils

    text = json.dumps(make()).encode() if jax.process_index() == 0 else b""
    size = int(multihost_utils.broadcast_one_to_all(np.int64(len(text))))
    buffer = np.zeros(size, np.uint8)
    buffer[:len(text)] = np.frombuffer(text, np.uint8)
    return json.loads(bytes(np.asarray(multihost_utils.broadcast_one_to_all(buffer))).decode())


def _factory(mesh=None, rules=None, memory_budget_bytes=None, num_micro_batches=1, profile=None):
    if rules:
        raise PlanError(f"parallel.rules={dict(rules)} only applies to method 'manual'; "
                        "method 'auto' chooses every sharding itself. Set parallel.method=manual "
                        "or drop the rules")
    return AutoParallel(memory_budget_bytes=memory_budget_bytes, mesh=mesh, profile=profile,
                        num_micro_batches=num_micro_batches)


register_method("auto", _factory)
