"""The joint search of ``method="auto"`` on abstract shapes: SPMD plans and pipelined plans
priced on one cost model (the intra-op solver's), each within the per-device memory budget.

SPMD plans are ``ShardParallel``'s (every mesh shape and data-parallel flavour); pipelined plans
choose the number of stages, the layer range of each, each stage's sub-mesh shape and the
micro-batches (a one-stage "pipeline" is gradient accumulation inside an SPMD plan), with
rematerialization when memory needs it. A pipeline is chosen only where it is cheaper or where
nothing else fits (``_choose``).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax

from parallel._errors import PlanError
from parallel._roles import trace
from parallel.auto._account import Decision, explain
from parallel.auto._concurrent import in_background
from parallel.auto._layers import LayerPricer, _nbytes, global_trace, pipeline_program
from parallel.auto._pipelines import PipelinePrice, PipelineSearch, stage_counts
from parallel.auto._search import model_limit, prepare, solve
from parallel.auto._solution import TIE, MemoryBudgetError, Solution
from parallel.auto._tiny import step_size, tiny_account
from parallel.profiles import DeviceProfile

# Pipelines are searched up to this many stages (or one per host, on more hosts), over twice
# as many layers.
MAX_STAGES = 8


def search(fn: Callable, abstract_args: Sequence[Any], *, num_devices: int,
           profile: DeviceProfile, memory_budget_bytes: float,
           batch_argnums: Sequence[int] = (1,), donate_argnums: Sequence[int] = (0,),
           num_micro_batches: int = 1, max_stages: int | None = None,
           mesh_shape: dict[str, int] | None = None, time_limit_s: float = 30.0,
           spmd_refused: str | None = None, tiny_step_s: float | None = None) -> Decision:
    """The joint search on abstract shapes: SPMD plans and pipelines priced by the solver.

    Args:
      fn, abstract_args: the step and its arguments (``jax.ShapeDtypeStruct`` leaves suffice).
      num_devices: devices to plan for.
      profile: the device and its hosts (``DeviceProfile.on_hosts``).
      memory_budget_bytes: bytes per device every candidate must fit.
      num_micro_batches: ``1``: searched; more: only plans with that many micro-batches.
      max_stages: pipelines up to this many stages; ``None``: ``MAX_STAGES``, or one stage
        per host on a cluster of more hosts (Alpa's GPT-76B: 15 hosts, 15 stages).
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
            decision.explanation = explain(decision, profile, n)
            return decision
    spmd, smallest_spmd, whole, early = None, math.inf, None, None
    if num_micro_batches == 1 and spmd_refused is None:
        # One trace of the step on the global batch serves the SPMD solve and every
        # micro-batch count the pipelines are priced for.
        prepared = prepare(fn, abstract_args, donate_argnums=donate_argnums,
                           batch_argnums=batch_argnums, traced=traced)
        whole = global_trace(fn, abstract_args, prepared.closed, prepared.out_shape)
        if mesh_shape is None and not profile.shared_host:
            early = _early_program(fn, abstract_args, batch_argnums, donate_argnums, profile, n,
                                   batch, max_stages, whole)
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
            _activations_per_device(smallest_spmd, state, n), 2 * state / n, whole, early)
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
    decision.explanation = explain(decision, profile, n)
    return decision


def _stage_options(profile: DeviceProfile, n: int, max_stages: int | None) -> list[int]:
    """The stage counts pipelines are searched for (``max_stages`` as ``search`` takes it)."""
    per_host = profile.devices_per_host
    if max_stages is None:
        max_stages = max(MAX_STAGES, n // per_host if per_host else 1)
    max_stages = min(max_stages, n)
    return [s for s in stage_counts(n, 2 * max_stages, per_host) if s <= max_stages]


def _early_program(fn, abstract_args, batch_argnums, donate_argnums, profile, n, batch,
                   max_stages, whole) -> tuple[int, Any] | None:
    """The pipeline program of the first micro-batch count ``_pipelines`` tries without a
    memory estimate (four per stage of the longest pipeline), started on its own thread while
    the SPMD plans solve (the trace holds the GIL, HiGHS does not): ``(count, future)``, or
    ``None`` where pipelines may not be searched (one stage only)."""
    counts = _stage_options(profile, n, max_stages)
    if not counts or max(counts) < 2:
        return None
    m = _micro_batch_options(batch, max(counts), 1)[0]
    return m, in_background(pipeline_program, fn, abstract_args, batch_argnums, donate_argnums,
                            m, max(2 * max(counts), 2), whole)


def _pipelines(fn, abstract_args, batch_argnums, donate_argnums, profile, n, budget, batch, spmd,
               num_micro_batches, max_stages, time_limit_s, activations, state_per_device,
               whole=None, early=None
               ) -> tuple[list[PipelinePrice], int, float, dict[int, PipelineSearch]]:
    """The best pipeline for each stage count (and, when memory needs them, more micro-batches
    and rematerialization), the fewest bytes per device any reached, and the searches.

    ``early``: ``_early_program``'s, used for its count (or rescaled for the first other)."""
    if spmd is not None and profile.shared_host:
        # Stages on devices that share a host cannot overlap: a pipeline only ever adds
        # transfers to the same work. Searched only when no SPMD plan fits.
        return [], 0, math.inf, {}
    counts = _stage_options(profile, n, max_stages)
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
    # Each stage on its fastest plans first, at every micro-batch count memory needs; a
    # stage's state split over its devices (slower) only when none of those fits.
    for split in (False, True):
        if split and (spmd is not None or not searches):
            break
        options = (_micro_batch_options(batch, max(counts), num_micro_batches, wanted)
                   if not split else list(searches))
        for m in options:
            if not split:
                if m < traced:
                    break  # fewer micro-batches than a count that traced and did not fit
                try:
                    whole = whole or global_trace(fn, abstract_args)
                    if early is not None and not traced and m == early[0]:
                        pp = early[1].result()
                    else:
                        like = searches[traced].pp if traced else _made(early)
                        pp = pipeline_program(fn, abstract_args, batch_argnums, donate_argnums,
                                              m, num_layers, whole, like=like)
                except PlanError as error:  # e.g. micro-batches this small do not trace alike
                    failed = failed or error
                    continue
                traced = m
                num_layers = pp.num_layers
                searches[m] = PipelineSearch(pp, LayerPricer(pp, profile, time_limit_s),
                                             profile, n, budget)
                searches[m].prefetch(counts)  # every count's solves side by side
            stages = searches[m]
            stages.split = split
            for remat in (False, True):
                for s in counts:
                    if s <= stages.pp.num_layers:
                        best = stages.best(s, remat=remat)
                        if best is not None:
                            found.append(best)
                if any(p.memory_bytes <= budget for p in found):
                    break  # rematerialization only when memory needs it
            smallest = min(smallest, stages.smallest_memory)
            if spmd is not None or any(p.memory_bytes <= budget for p in found):
                break  # more micro-batches only when memory needs them
        if any(p.memory_bytes <= budget for p in found):
            break
    if failed is not None and not found and smallest == math.inf and spmd is None:
        raise failed
    return found, num_layers, smallest, searches


def _made(early):
    """``early``'s program, or ``None`` when it raised (or there is none)."""
    if early is None or early[1].exception() is not None:
        return None
    return early[1].result()


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
