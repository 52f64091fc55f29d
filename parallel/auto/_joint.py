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
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from parallel._errors import PlanError
from parallel._methods import Method, register_method
from parallel._roles import trace
from parallel.auto._layers import LayerPricer, _nbytes, global_trace, pipeline_program
from parallel.auto._method import ShardParallel
from parallel.auto._pipelines import PipelinePrice, PipelineSearch, stage_counts
from parallel.auto._search import (AXIS_NAMES, TIE, MemoryBudgetError, Solution, model_limit,
                                   prepare, solve)
from parallel.auto._tiny import step_size, tiny_account
from parallel.plan import Plan
from parallel.profiles import DeviceProfile

# Pipelines are searched up to this many stages, over twice as many layers.
MAX_STAGES = 8
# Searches for a pipeline that fits once compiled (each lowers the budget by the overshoot).
_COMPILED_ROUNDS = 3


@dataclasses.dataclass
class Decision:
    """What the joint search chose, and what it compared.

    Attributes:
      spmd: the best SPMD plan (``None``: none fits).
      pipeline: the chosen pipeline (``None``: the SPMD plan was chosen).
      pipelines: the best pipeline found for each stage count, micro-batches and remat.
      budget: bytes per device every candidate had to fit.
      explanation: the account printed with the plan.
      search_time_s: seconds the search took.
      searches: the pipeline searches by micro-batch count (their priced layers; for pricing
        other layouts of the same step).
      spmd_refused: why no SPMD plan was searched (the solver's did not fit once compiled).
      tiny: why nothing was searched: the step is tiny (``parallel.auto._tiny``), and the plan
        is data parallelism.
    """

    spmd: Solution | None
    pipeline: PipelinePrice | None
    pipelines: list[PipelinePrice]
    budget: float
    num_layers: int
    explanation: str = ""
    search_time_s: float = 0.0
    searches: dict[int, PipelineSearch] = dataclasses.field(default_factory=dict)
    spmd_refused: str | None = None
    tiny: str | None = None


class AutoParallel(Method):
    """Chooses SPMD sharding, gradient accumulation, rematerialization and pipeline stages
    together, for the devices and hosts it runs on (``method="auto"``).

    Args:
      memory_budget_bytes: per-device memory limit; ``None``: the device's memory.
      profile: device profile name or object (``None``: the running device's).
      num_micro_batches: ``1``: the search chooses; more: only plans with that many
        micro-batches (it must divide the batch).
      max_stages: pipelines are searched up to this many stages.
      time_limit_s, validate, measure: as for ``ShardParallel`` (SPMD plans).
      tiny_step_s: a step whose whole work unsplit on one device is estimated below this many
        seconds is planned as data parallelism without a search (``parallel.auto._tiny``);
        ``None``: the profile's ``program_overhead_s``; ``0``: always search.
    """

    name = "auto"

    def __init__(self, memory_budget_bytes: float | None = None,
                 profile: str | DeviceProfile | None = None, num_micro_batches: int = 1,
                 max_stages: int = MAX_STAGES, time_limit_s: float = 30.0, validate: int = 4,
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
                             tuple(choice["stage_times_s"]), choice["cost_s"])
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

def search(fn: Callable, abstract_args: Sequence[Any], *, num_devices: int,
           profile: DeviceProfile, memory_budget_bytes: float,
           batch_argnums: Sequence[int] = (1,), donate_argnums: Sequence[int] = (0,),
           num_micro_batches: int = 1, max_stages: int = MAX_STAGES,
           mesh_shape: dict[str, int] | None = None, time_limit_s: float = 30.0,
           spmd_refused: str | None = None, tiny_step_s: float | None = None) -> Decision:
    """The joint search on abstract shapes: SPMD plans and pipelines priced by the solver.

    Args:
      fn, abstract_args: the step and its arguments (``jax.ShapeDtypeStruct`` leaves suffice).
      num_devices: devices to plan for.
      profile: the device and its hosts (``DeviceProfile.on_hosts``).
      memory_budget_bytes: bytes per device every candidate must fit.
      num_micro_batches: ``1``: searched; more: only plans with that many micro-batches.
      max_stages: pipelines up to this many stages.
      mesh_shape: SPMD plans on this mesh only; micro-batches and pipelines (which choose
        their own sub-meshes) only when no plan on it fits.
      spmd_refused: no SPMD plan is searched, for this reason (the one the solver chose did
        not fit once compiled).
      tiny_step_s: a step whose whole work unsplit on one device is estimated below this is
        planned as data parallelism without a search (``Decision.tiny``); ``None``: the
        profile's ``program_overhead_s``; ``0``: always search.

    Raises:
      PlanError: ``num_micro_batches`` does not divide the batch.
      MemoryBudgetError: no plan fits the budget, even with micro-batches and
        rematerialization (the message names the fewest bytes reached and the budget).
    """
    start = time.perf_counter()
    n, budget = num_devices, float(memory_budget_bytes)
    batch = _batch_size(abstract_args, batch_argnums)
    if num_micro_batches > 1 and batch % num_micro_batches:
        raise PlanError(f"parallel.num_micro_batches={num_micro_batches} does not divide the "
                        f"batch of {batch}; use a divisor of {batch} (or 1 to let auto choose)")
    limit = profile.program_overhead_s if tiny_step_s is None else tiny_step_s
    traced = None  # the step traced once, for the tiny check and the SPMD solve alike
    if (limit > 0 and num_micro_batches == 1 and spmd_refused is None and mesh_shape is None
            and batch % n == 0):
        traced = trace(fn, tuple(abstract_args))
        size = step_size(fn, abstract_args, donate_argnums, profile, n, traced=traced)
        if size.time_s < limit and size.bytes_accessed <= budget:
            decision = Decision(None, None, [], budget, 0,
                                tiny=tiny_account(size, profile, limit))
            decision.search_time_s = time.perf_counter() - start
            decision.explanation = _explain(decision, profile, n)
            return decision
    spmd, smallest_spmd, whole = None, math.inf, None
    if num_micro_batches == 1 and spmd_refused is None:
        # One trace of the step on the global batch serves the SPMD solve and every
        # micro-batch count the pipelines are priced for.
        prepared = prepare(fn, abstract_args, donate_argnums=donate_argnums,
                           batch_argnums=batch_argnums, traced=traced)
        whole = global_trace(fn, abstract_args, prepared.closed, prepared.out_shape)
        try:
            spmd = solve(fn, abstract_args, num_devices=n, profile=profile,
                         memory_budget_bytes=budget, donate_argnums=donate_argnums,
                         batch_argnums=batch_argnums, time_limit_s=time_limit_s,
                         mesh_shape=mesh_shape, max_model=model_limit(profile),
                         prepared=prepared)
        except MemoryBudgetError as error:
            smallest_spmd = error.smallest_bytes or math.inf
    pipelines, num_layers, smallest_pipe, searches = [], 0, math.inf, {}
    if mesh_shape is None or spmd is None:
        state = sum(_nbytes(x) for i in donate_argnums for x in jax.tree.leaves(abstract_args[i]))
        pipelines, num_layers, smallest_pipe, searches = _pipelines(
            fn, abstract_args, batch_argnums, donate_argnums, profile, n, budget, batch, spmd,
            num_micro_batches, max_stages, time_limit_s,
            _activations_per_device(smallest_spmd, state, n), 2 * state / n, whole)
    chosen = _choose(spmd, [p for p in pipelines if p.memory_bytes <= budget])
    if spmd is None and chosen is None:
        smallest = min(smallest_spmd, smallest_pipe)
        raise MemoryBudgetError(
            f"no plan of this step on {n} devices fits {budget:.0f} bytes per device, even "
            f"with micro-batches and rematerialization: the fewest bytes reached are "
            f"{smallest:.0f} ({'pipelined' if smallest_pipe < smallest_spmd else 'SPMD'}). "
            "Raise memory_budget_bytes, use more devices, or shrink the model or batch.",
            smallest_bytes=smallest, budget=budget)
    decision = Decision(spmd, chosen, pipelines, budget, num_layers, searches=searches,
                        spmd_refused=spmd_refused)
    decision.search_time_s = time.perf_counter() - start
    decision.explanation = _explain(decision, profile, n)
    return decision


def _pipelines(fn, abstract_args, batch_argnums, donate_argnums, profile, n, budget, batch, spmd,
               num_micro_batches, max_stages, time_limit_s, activations, state_per_device,
               whole=None) -> tuple[list[PipelinePrice], int, float, dict[int, PipelineSearch]]:
    """The best pipeline for each stage count (and, when memory needs them, more micro-batches
    and rematerialization), the fewest bytes per device any reached, and the searches."""
    per_host = profile.devices_per_host
    if spmd is not None and profile.shared_host:
        # Stages on devices that share a host cannot overlap: a pipeline only ever adds
        # transfers to the same work. Searched only when no SPMD plan fits.
        return [], 0, math.inf, {}
    max_stages = min(max_stages, n)
    counts = [s for s in stage_counts(n, 2 * max_stages, per_host) if s <= max_stages]
    if spmd is not None:
        counts = [s for s in counts if s > 1]  # accumulation only when memory needs it
    if not counts:
        return [], 0, math.inf, {}
    num_layers = max(2 * max(counts), 2)
    found: list[PipelinePrice] = []
    searches: dict[int, PipelineSearch] = {}
    smallest = math.inf
    failed: PlanError | None = None
    # As many micro-batches as the longest pipeline's activations in flight need to fit next to
    # the state (an estimate from the SPMD plans' fewest bytes), at least four per stage.
    room = budget - state_per_device
    wanted = 0.0
    if not math.isinf(activations) and activations > 0:
        wanted = max(counts) * activations / room if room > 0 else math.inf
    traced = 0
    for m in _micro_batch_options(batch, max(counts), num_micro_batches, wanted):
        if m < traced:
            break  # fewer micro-batches than a count that traced and did not fit: no help
        try:
            whole = whole or global_trace(fn, abstract_args)
            pp = pipeline_program(fn, abstract_args, batch_argnums, donate_argnums, m,
                                  num_layers, whole)
        except PlanError as error:  # e.g. micro-batches this small do not trace alike
            failed = failed or error
            continue
        traced = m
        num_layers = pp.num_layers
        pricer = LayerPricer(pp, profile, time_limit_s)
        stages = searches[m] = PipelineSearch(pp, pricer, profile, n, budget)
        for remat in (False, True):
            for s in counts:
                if s <= pp.num_layers:
                    best = stages.best(s, remat=remat)
                    if best is not None:
                        found.append(best)
            if any(p.memory_bytes <= budget for p in found):
                break  # rematerialization only when memory needs it
        smallest = min(smallest, stages.smallest_memory)
        if spmd is not None or any(p.memory_bytes <= budget for p in found):
            break  # more micro-batches only when memory needs them
    if failed is not None and not found and smallest == math.inf and spmd is None:
        raise failed
    return found, num_layers, smallest, searches


def _choose(spmd: Solution | None, pipelines: list[PipelinePrice]) -> PipelinePrice | None:
    """The chosen pipeline, or ``None`` for the SPMD plan. A pipeline must be cheaper than the
    SPMD plan by more than ``TIE``; among pipelines within ``TIE`` of each other the one with
    fewer stages, then fewer micro-batches, then no rematerialization wins."""
    if not pipelines:
        return None
    fastest = min(p.step_time_s for p in pipelines)
    tied = [p for p in pipelines if p.step_time_s <= fastest * (1 + TIE)]
    best = min(tied, key=lambda p: (p.num_stages, p.num_micro_batches, p.remat))
    if spmd is not None and best.step_time_s * (1 + TIE) >= spmd.best.step_time_s:
        return None
    return best


def _micro_batch_options(batch: int, max_stages: int, fixed: int,
                         wanted: float = 0.0) -> list[int]:
    """Micro-batch counts to try, in order: ``fixed`` if set; else four per stage of the
    longest pipeline (the 1F1B bubble under 20%) or ``wanted`` if more, then more, doubling,
    up to one example each (tried only while nothing fits), then fewer (only if those cannot
    be traced)."""
    if fixed > 1:
        return [fixed]
    first = 1
    while first < max(4 * max_stages, wanted) and batch % (2 * first) == 0:
        first *= 2
    options = [first]
    while batch % (2 * options[-1]) == 0:
        options.append(2 * options[-1])
    fewer = first // 2
    while fewer >= 2:
        options.append(fewer)
        fewer //= 2
    return options


def _activations_per_device(smallest_spmd: float, state: float, n: int) -> float:
    """What the SPMD plans' fewest bytes per device hold beyond the state and its gradients
    (about the full batch's activations), or ``inf`` when no SPMD plan was tried."""
    if math.isinf(smallest_spmd):
        return math.inf
    return max(smallest_spmd - 2 * state / n, 0.0)


def _batch_size(abstract_args, batch_argnums) -> int:
    sizes = {leaf.shape[0] for i in batch_argnums for leaf in jax.tree.leaves(abstract_args[i])
             if getattr(leaf, "shape", ())}
    if len(sizes) != 1:
        raise PlanError(f"batch leaves have different leading dimensions {sorted(sizes)}; they "
                        f"must share the global batch size")
    return sizes.pop()


def _signature(abstract_args) -> tuple:
    leaves, treedef = jax.tree.flatten(tuple(abstract_args))
    return treedef, tuple((tuple(x.shape), str(x.dtype)) for x in leaves)


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms"


def _gib(nbytes: float) -> str:
    if nbytes < 2**30:
        return f"{nbytes / 2**20:.2f} MiB"
    return f"{nbytes / 2**30:.2f} GiB"


def _explain(d: Decision, profile: DeviceProfile, n: int) -> str:
    """Which plan, why, and the runner-ups (best SPMD plan, best pipeline per stage count)."""
    topology = (f"{profile.num_hosts} hosts x {profile.devices_per_host}"
                if profile.devices_per_host else f"1 host x {n}")
    lines = [f"auto: {n} devices ({topology}), '{profile.name}' profile, budget "
             f"{_gib(d.budget)} per device"]
    if d.tiny is not None:
        return "\n".join(lines + [f"chosen: data parallelism, mesh {{'data': {n}}}",
                                  f"why: {d.tiny}"])
    spmd_line = ("SPMD: no plan fits the budget" if d.spmd is None else
                 f"SPMD: mesh {d.spmd.best.mesh_shape}"
                 + (f" ({d.spmd.best.variant})" if d.spmd.best.variant else "")
                 + f", {_ms(d.spmd.best.step_time_s)} per step, "
                 f"{_gib(d.spmd.best.memory_bytes)} per device")
    if d.pipeline is None:
        lines.append(f"chosen: {spmd_line}")
        why = ("no pipeline is cheaper" if d.pipelines else
               "pipelines were not searched: the devices share one host, so stages cannot "
               "overlap" if profile.shared_host else "no pipeline fits")
        lines.append(f"why: {why}")
    else:
        p = d.pipeline
        what = ("micro-batches in an SPMD plan (gradient accumulation)" if p.num_stages == 1
                else "pipeline")
        lines.append(f"chosen: {what}, {p.describe()}; {_ms(p.step_time_s)} per step, "
                     f"{_gib(p.memory_bytes)} per device")
        if d.spmd_refused is not None:
            lines.append(f"why: the solver's SPMD plan does not fit once compiled "
                         f"({d.spmd_refused.split('. ')[0]})")
        elif d.spmd is None:
            lines.append("why: no SPMD plan fits the budget at the full batch")
        else:
            lines.append(f"why: {d.spmd.best.step_time_s / p.step_time_s:.2f}x faster than "
                         "the best SPMD plan")
        lines.append(f"  runner-up {spmd_line}")
    for p in sorted(d.pipelines, key=lambda p: (p.num_stages, p.num_micro_batches, p.remat)):
        if p is d.pipeline:
            continue
        fits = "" if p.memory_bytes <= d.budget else " (over the budget)"
        lines.append(f"  runner-up pipeline: {p.describe()}; {_ms(p.step_time_s)} per step, "
                     f"{_gib(p.memory_bytes)} per device{fits}")
    return "\n".join(lines)


def _stats(d: Decision) -> dict:
    """The search as JSON-friendly data (saved in the plan's extras)."""
    return {"search_time_s": d.search_time_s, "memory_budget_bytes": d.budget,
            "spmd_step_time_s": None if d.spmd is None else d.spmd.best.step_time_s,
            "pipelines": [{"stages": p.num_stages, "num_micro_batches": p.num_micro_batches,
                           "remat": p.remat, "step_time_s": p.step_time_s,
                           "memory_bytes": p.memory_bytes,
                           "layers": [[s.first, s.last] for s in p.stages],
                           "meshes": [list(s.mesh) for s in p.stages]} for p in d.pipelines],
            "chosen": ("data (tiny model)" if d.tiny is not None else
                       "spmd" if d.pipeline is None else "pipeline")}


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
