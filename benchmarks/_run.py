"""One benchmark case in this process: build the step for a method, time it, measure its cost.

``python -m benchmarks._run CASE_JSON`` runs one case and prints its result as JSON on the
last line of stdout; ``benchmarks.suites`` starts one such process per case with the device
count in ``XLA_FLAGS`` (set before jax is imported, which only a fresh process allows).
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import parallel
from benchmarks._workloads import Workload, WorkloadSpec, build_workload
from benchmarks.pmap_baseline import pmap_step
from parallel._hlo import collective_bytes
from parallel.plan import spec_to_json
from parallel.report import cost_figures, memory_bytes

METHODS = ("pmap", "data", "zero2", "zero3", "manual", "auto", "auto_timed", "pipeshard",
           "pipeshard_gpipe")
RESULT_MARKER = "BENCHMARK_RESULT "


def make_method(name: str, profile: str | None = None,
                pipeline: dict[str, Any] | None = None) -> parallel.Method:
    """The ``parallel`` method benchmarked under ``name`` (``"manual"`` is Megatron-style).

    ``profile`` names the device profile the automatic method prices its plan with
    (``None``: the running platform's). ``pipeline`` gives ``pipeshard``'s
    ``num_micro_batches`` and ``stages`` (``"auto"`` or a number).

    Raises:
      ValueError: ``name`` is not one of ``METHODS`` (or is ``"pmap"``, which is no method).
    """
    if name == "manual":
        return parallel.ManualParallel(parallel.MEGATRON_RULES)
    if name == "auto":
        return parallel.AutoParallel(profile=profile)
    if name == "auto_timed":  # the compiled SPMD finalists are timed on the devices
        return parallel.AutoParallel(profile=profile, measure=True)
    if name in ("data", "zero2", "zero3"):
        return parallel.make_method(name)
    if name in ("pipeshard", "pipeshard_gpipe"):
        pipeline = pipeline or {}
        return parallel.PipeshardParallel(
            pipeline.get("num_micro_batches", 1), stage_option=pipeline.get("stages", "auto"),
            schedule="gpipe" if name == "pipeshard_gpipe" else "1f1b", profile=profile)
    raise ValueError(f"unknown benchmark method {name!r}; expected one of {METHODS[1:]} "
                     f"('pmap' runs the jax.pmap baseline instead of a parallel.Method)")


def _time_steps(step, state, batch, warmup: int, steps: int,
                after_step=None) -> tuple[list[float], list[float]]:
    """Runs ``warmup + steps`` steps; returns the timed steps' seconds and every step's loss.
    ``after_step`` (if given) is called with no arguments after each timed step."""
    times, losses = [], []
    for i in range(warmup + steps):
        start = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready((state, metrics))
        if i >= warmup:
            times.append(time.perf_counter() - start)
            if after_step is not None:
                after_step()
        losses.append(float(metrics["loss"]))
    return times, losses


def _plan_summary(plan: parallel.Plan) -> dict[str, Any]:
    """The mesh and every parameter leaf's shape and spec (keyed by its path below params)."""
    params = {leaf.path.removeprefix("['params']"): {"shape": list(leaf.shape),
                                                     "spec": spec_to_json(leaf.spec)}
              for leaf in plan.inputs[0] if leaf.path.startswith("['params']")}
    return {"method": plan.method, "mesh_shape": dict(plan.mesh_shape), "params": params}


def _compile_figures(compiled, num_devices: int) -> dict[str, Any]:
    collectives = collective_bytes(compiled.as_text(), num_devices)
    flops, _ = cost_figures(compiled)
    return {"per_device_memory_bytes": memory_bytes(compiled),
            "communication_bytes": sum(c["sent_bytes"] for c in collectives.values()),
            "collectives": {k: c for k, c in collectives.items() if c["count"]},
            "flops_per_device": flops}


def run_pmap(workload: Workload, devices: list, warmup: int, steps: int) -> dict[str, Any]:
    """The ``jax.pmap`` baseline: replicated state, batch split over the devices."""
    if workload.has_model_state:
        raise ValueError(f"workload {workload.spec.name!r} keeps non-param model state "
                         f"(batch norm); the pmap baseline steps params and optimizer state only")
    step = pmap_step(workload.loss_fn, workload.optimizer, devices)
    state = step.replicate(jax.jit(workload.init)(jax.random.key(0)))  # [n, ...] per leaf
    mesh = Mesh(np.array(devices), ("batch",))
    batch = jax.device_put(workload.batch, NamedSharding(mesh, PartitionSpec("batch")))
    start = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_time = time.perf_counter() - start
    times, losses = _time_steps(step, state, batch, warmup, steps)
    plan = {"method": "pmap", "mesh_shape": {"batch": len(devices)}, "params": "replicated"}
    return {**_compile_figures(compiled, len(devices)), "compile_time_s": compile_time,
            "solve_time_s": 0.0, "step_times_s": times, "losses": losses, "plan": plan}


def run_solve(workload: Workload, num_devices: int, profile: str | None) -> dict[str, Any]:
    """``parallel.auto.solve`` alone on abstract shapes: the solver's time and its plan, with
    nothing compiled or allocated (how the issue's solve-time targets are measured)."""
    abstract_state = jax.eval_shape(workload.init, jax.random.key(0))
    abstract_batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), workload.batch)
    solution = parallel.auto.solve(workload.train_step, (abstract_state, abstract_batch),
                                   num_devices=num_devices, profile=profile)
    return {"per_device_memory_bytes": solution.best.memory_bytes,
            "communication_bytes": None, "estimated_step_time_s": solution.best.step_time_s,
            "solve_time_s": solution.solve_time_s, "compile_time_s": None,
            "solver": solution.stats(), "explanation": solution.explain(),
            "plan": {"method": "solve", "mesh_shape": dict(solution.mesh_shape)}}


def run_parallel(workload: Workload, method_name: str, devices: list, warmup: int, steps: int,
                 measure: bool, profile: str | None,
                 estimate_profiles: tuple[str, ...] = (),
                 pipeline: dict[str, Any] | None = None) -> dict[str, Any]:
    """A ``parallel.parallelize`` step: plan, compile, report and (if ``measure``) time it.

    ``profile`` prices the plan and the estimate (``None``: the running platform's);
    ``estimate_profiles`` adds the cost model's step time for other devices, e.g. ``h100``.
    """
    logical_axes = workload.logical_axes if method_name == "manual" else None
    step = parallel.parallelize(workload.train_step,
                                method=make_method(method_name, profile, pipeline),
                                logical_axes=logical_axes, devices=devices)
    abstract_state = jax.eval_shape(workload.init, jax.random.key(0))
    abstract_batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), workload.batch)
    report = step.analyze(abstract_state, abstract_batch, profile=profile)
    result = {"per_device_memory_bytes": report.per_device_memory_bytes,
              "communication_bytes": report.communication_bytes,
              "collectives": {k: c for k, c in report.collectives.items() if c["count"]},
              "flops_per_device": report.flops,
              "estimated_step_time_s": report.estimated_step_time_s,
              "profile": report.profile,
              "compile_time_s": report.compile_time_s, "solve_time_s": report.solve_time_s,
              "plan": _plan_summary(step.plan(abstract_state, abstract_batch))}
    extras = step.plan(abstract_state, abstract_batch).extras
    if "solver" in extras:
        result["solver"] = extras["solver"]
        result["explanation"] = extras.get("explanation")
    estimates = {}
    for name in estimate_profiles:
        seconds = step.analyze(abstract_state, abstract_batch, profile=name).estimated_step_time_s
        estimates[name] = {"step_time_s": seconds,
                           "tflops": workload.flops_per_step / seconds / 1e12}
    if estimates:
        result["estimates"] = estimates
    issued: list[dict] = []  # pipelines: the runner's account of each timed step
    if measure:
        state = step.init_state(workload.init, jax.random.key(0), abstract_batch)
        batch = jax.device_put(workload.batch, step.input_shardings(state, abstract_batch)[1])
        runner = (step.compile(state, abstract_batch).runner if report.stages is not None
                  else None)
        record = (lambda: issued.append(dict(runner.last_step))) if runner else None
        result["step_times_s"], result["losses"] = _time_steps(step, state, batch, warmup, steps,
                                                               record)
    if report.stages is not None:
        result["pipeline"] = _pipeline_figures(step.compile(state if measure else abstract_state,
                                                            abstract_batch),
                                               report, result.get("step_times_s"), issued)
    return result


def _pipeline_figures(pipelined, report, step_times, issued=()) -> dict[str, Any]:
    """The stages, the schedule's bubble, the bubble measured (the share of device time idle in
    a step, from each stage's forward and backward programs timed alone) and the host's issue
    time: the median over the timed steps of the seconds Python spent issuing one step's
    programs and transfers (``host_s``, waits excluded), also per (stage, micro-batch)."""
    busy = pipelined.time_stages()
    m = report.stages["num_micro_batches"]
    figures = {"stages": [{k: s[k] for k in ("layers", "devices", "max_micro_batches_in_flight",
                                             "activation_bytes_per_micro_batch")}
                          for s in report.stages["stages"]],
               "schedule": report.stages["schedule"], "num_micro_batches": m,
               "bubble_fraction": report.stages["bubble_fraction"],
               "stage_time_per_micro_batch_s": busy}
    if step_times:
        step = statistics.median(step_times)
        sizes = [len(s["devices"]) for s in report.stages["stages"]]
        used = sum(m * t * n for t, n in zip(busy, sizes))
        figures["measured_bubble_fraction"] = max(0.0, 1.0 - used / (sum(sizes) * step))
    if issued:
        tasks = len(report.stages["stages"]) * m
        host = statistics.median(s["host_s"] for s in issued)
        figures["issue"] = {"host_s": host, "wait_s": statistics.median(s["wait_s"] for s in issued),
                            "programs": issued[-1]["programs"],
                            "transfers": issued[-1]["transfers"], "stage_micro_batches": tasks,
                            "issue_ms_per_task": host / tasks * 1e3}
    return figures


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    """Runs one benchmark case in this process.

    Args:
      case: ``{"workload": WorkloadSpec fields, "method": one of METHODS, ``"solve"`` (the
        solver alone) or ``"interleaved"`` (the methods in ``"plans"`` timed in turns in this
        process, ``"steps"`` rounds; returns ``{"workload", "method", "devices", "platform",
        "plans"}``, see ``benchmarks._interleaved``), "devices": N,
        "warmup": steps, "steps": timed steps, "measure": bool (time real steps; else
        compile and estimate only), "profile": device profile for the estimate or None}``.

    Returns:
      ``{"workload", "method", "devices", "step_time_s" (median of the timed steps, or None
      when not measured), "per_device_memory_bytes", "communication_bytes", "plan", ...}``.

    Raises:
      ValueError: fewer devices than the case asks for, or an unknown method.
    """
    spec = WorkloadSpec(**case["workload"])
    n = int(case["devices"])
    if jax.device_count() < n and case["method"] != "solve":
        raise ValueError(f"case asks for {n} devices but jax sees {jax.device_count()}; on CPU "
                         f"set XLA_FLAGS=--xla_force_host_platform_device_count={n} before "
                         f"importing jax (benchmarks.suites does this per case)")
    devices = jax.devices()[:n]
    workload = build_workload(spec)
    warmup, steps = int(case.get("warmup", 2)), int(case.get("steps", 5))
    if case["method"] == "interleaved":  # several plans timed in turns (round-robin)
        from benchmarks._interleaved import time_interleaved

        return {"workload": spec.name, "method": "interleaved", "devices": n,
                "platform": devices[0].platform,
                "plans": time_interleaved(workload, list(case["plans"]), devices, warmup, steps)}
    if case["method"] == "pmap":
        result = run_pmap(workload, devices, warmup, steps)
    elif case["method"] == "solve":
        result = run_solve(workload, n, case.get("profile"))
    else:
        result = run_parallel(workload, case["method"], devices, warmup, steps,
                              bool(case.get("measure", True)), case.get("profile"),
                              tuple(case.get("estimate_profiles", ())), case.get("pipeline"))
    times = result.get("step_times_s")
    step_time = statistics.median(times) if times else None
    return {"workload": spec.name, "method": case.get("label", case["method"]), "devices": n,
            "platform": devices[0].platform, "step_time_s": step_time,
            "per_device_memory_bytes": result.pop("per_device_memory_bytes"),
            "communication_bytes": result.pop("communication_bytes"),
            "num_params": workload.num_params, "batch_size": spec.batch_size,
            "model_flops_per_step": workload.flops_per_step,
            "tflops": workload.flops_per_step / step_time / 1e12 if step_time else None,
            **result}


if __name__ == "__main__":
    print(RESULT_MARKER + json.dumps(run_case(json.loads(sys.argv[1]))), flush=True)
