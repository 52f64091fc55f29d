"""Plans of one workload timed in one process, round-robin: one step of each plan per round.

A fresh process per plan (the suites' cases) starts each plan from a different machine state:
the same plan measured in two processes of one idle run differed by 25% (the models suite at
b7975b1: ``auto`` and ``auto_timed`` chose the identical MoE plan, 276.8 and 207.8 ms). Timed
in turns in one process, every plan meets the same load, caches and allocator, so ratios of a
few percent mean something.
"""
from __future__ import annotations

import re
import statistics
import time
from typing import Any

import jax

import parallel
from benchmarks import _run
from benchmarks._workloads import Workload


def make_method(plan: str) -> parallel.Method:
    """``"zero3"`` -> that method; ``"4x8"`` -> pipeshard, 4 stages x 8 micro-batches;
    ``"manual:d2xm4"`` (Megatron rules on data 2 x model 4) or ``"shard:d4xm2"`` (the solver
    on that mesh).

    Raises:
      ValueError: an unknown method name, or an explicit mesh not written as above.
    """
    pipelined = re.fullmatch(r"(\d+)x(\d+)", plan)
    if pipelined:
        stages, micro = (int(g) for g in pipelined.groups())
        return _run.make_method("pipeshard", None, {"num_micro_batches": micro,
                                                    "stages": stages})
    on_mesh = re.fullmatch(r"(manual|shard):d(\d+)xm(\d+)", plan)
    if on_mesh:
        mesh = {"data": int(on_mesh.group(2)), "model": int(on_mesh.group(3))}
        if on_mesh.group(1) == "manual":
            return parallel.ManualParallel(parallel.MEGATRON_RULES, mesh=mesh)
        return parallel.ShardParallel(mesh=mesh)
    if ":" in plan:
        raise ValueError(f"plan {plan!r}: an explicit mesh is written manual:d2xm4 (data 2 x "
                         "model 4) or shard:d4xm2")
    return _run.make_method(plan)


def round_order(plans: list[str], i: int) -> list[str]:
    """The plans in the order round ``i`` runs them: each round starts one plan later than the
    last, so that no plan always follows the same one (a step's time on the shared cores
    depends on what ran just before it)."""
    k = i % len(plans)
    return plans[k:] + plans[:k]


def time_interleaved(workload: Workload, plans: list[str], devices: list, warmup: int,
                     rounds: int) -> dict[str, dict[str, Any]]:
    """Builds every plan, runs ``warmup`` untimed steps of each, then ``rounds`` rounds of one
    timed step of each plan in turn, in ``round_order``.

    Returns:
      Per plan: ``{"step_times_s", "cpu_times_s" (process CPU seconds per step), "step_time_s"
      (the median), "losses" (every step's), "mesh_shape"}``.
    """
    batch_shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), workload.batch)
    runs = {}
    for plan in plans:
        method = make_method(plan)
        step = parallel.parallelize(
            workload.train_step, method=method, devices=devices,
            logical_axes=(workload.logical_axes if isinstance(method, parallel.ManualParallel)
                          else None))
        state = step.init_state(workload.init, jax.random.key(0), batch_shapes)
        batch = jax.device_put(workload.batch, step.input_shardings(state, batch_shapes)[1])
        runs[plan] = {"step": step, "state": state, "batch": batch, "losses": [],
                      "step_times_s": [], "cpu_times_s": [],
                      "mesh_shape": dict(step.plan(state, batch_shapes).mesh_shape)}
    for i in range(warmup + rounds):
        for run in (runs[plan] for plan in round_order(plans, i)):
            wall, cpu = time.perf_counter(), time.process_time()
            run["state"], metrics = run["step"](run["state"], run["batch"])
            jax.block_until_ready((run["state"], metrics))
            if i >= warmup:
                run["step_times_s"].append(time.perf_counter() - wall)
                run["cpu_times_s"].append(time.process_time() - cpu)
            run["losses"].append(float(metrics["loss"]))
    return {plan: {"step_times_s": r["step_times_s"], "cpu_times_s": r["cpu_times_s"],
                   "step_time_s": statistics.median(r["step_times_s"]), "losses": r["losses"],
                   "mesh_shape": r["mesh_shape"]}
            for plan, r in runs.items()}
