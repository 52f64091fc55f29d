"""Plans of one benchmark workload timed in one process, round-robin (one step of each plan per
round), so that the machine's load falls on every plan alike: for differences of a few percent
that separate processes (the suites) cannot resolve on a shared machine.

    python benchmarks/round_robin.py --workload models.wide_resnet --plans zero3,auto --rounds 10
    python benchmarks/round_robin.py --workload pipeline.wide_resnet --plans zero3,4x1,4x2,4x4,4x8,1x8
    python benchmarks/round_robin.py --workload pipeline.wide_resnet --batch 128 --plans zero3,4x8

A plan is a method of the suites (``data``, ``zero2``, ``zero3``, ``manual``, ``auto``...) or
``SxM``: ``pipeshard`` with ``S`` stages (1: micro-batches accumulated in one SPMD stage on all
devices) and ``M`` micro-batches. Prints each plan's median step, its ratio to the first plan's
and its median process CPU time per step.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import statistics
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

import parallel  # noqa: E402
from benchmarks import _run, suites  # noqa: E402
from benchmarks._workloads import build_workload  # noqa: E402

WORKLOADS = {f"{suite}.{name}": spec for suite, specs in (
    ("models", suites.MODEL_WORKLOADS), ("pipeline", suites.PIPELINE_WORKLOADS))
    for name, spec in specs.items()}


def make_method(plan: str) -> parallel.Method:
    """``"zero3"`` -> that method; ``"4x8"`` -> pipeshard, 4 stages x 8 micro-batches."""
    pipelined = re.fullmatch(r"(\d+)x(\d+)", plan)
    if pipelined:
        stages, micro = (int(g) for g in pipelined.groups())
        return _run.make_method("pipeshard", None, {"num_micro_batches": micro,
                                                    "stages": stages})
    return _run.make_method(plan)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default="pipeline.wide_resnet", choices=sorted(WORKLOADS))
    parser.add_argument("--plans", default="zero3,4x1,4x2,4x4,4x8,1x8",
                        help="comma-separated; the first is the baseline of the ratios")
    parser.add_argument("--rounds", type=int, default=6, help="timed steps of each plan")
    parser.add_argument("--batch", type=int, default=None,
                        help="global batch (default: the suite's)")
    args = parser.parse_args(argv)
    methods = []
    for plan in args.plans.split(","):
        try:
            methods.append((plan, make_method(plan)))
        except ValueError as e:
            parser.error(f"plan {plan!r}: {e}")
    spec = WORKLOADS[args.workload]
    if args.batch is not None:
        spec = dataclasses.replace(spec, batch_size=args.batch)
    workload = build_workload(spec)
    batch_shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), workload.batch)
    runs = []
    for plan, method in methods:
        step = parallel.parallelize(
            workload.train_step, method=method, devices=jax.devices(),
            logical_axes=workload.logical_axes if plan == "manual" else None)
        state = step.init_state(workload.init, jax.random.key(0), batch_shapes)
        batch = jax.device_put(workload.batch, step.input_shardings(state, batch_shapes)[1])
        for _ in range(2):  # compile and warm up
            state, metrics = step(state, batch)
        jax.block_until_ready((state, metrics))
        runs.append({"plan": plan, "step": step, "state": state, "batch": batch, "wall": [],
                     "cpu": []})
    for _ in range(args.rounds):
        for run in runs:
            wall, cpu = time.perf_counter(), time.process_time()
            run["state"], metrics = run["step"](run["state"], run["batch"])
            jax.block_until_ready((run["state"], metrics))
            run["wall"].append(time.perf_counter() - wall)
            run["cpu"].append(time.process_time() - cpu)
    base = statistics.median(runs[0]["wall"])
    for run in runs:
        wall = statistics.median(run["wall"])
        print(f"{run['plan']:8s} {1000 * wall:8.1f} ms  {wall / base:5.2f}x  "
              f"cpu {1000 * statistics.median(run['cpu']):8.1f} ms")


if __name__ == "__main__":
    main()
