"""What micro-batches cost: the pipeline suite's Wide-ResNet under ZeRO-3 and under ``pipeshard``
with several (stages, micro-batches), timed in one process, round-robin (one step of each plan
per round), so that the machine's load falls on every plan alike.

    python benchmarks/micro_batch_cost.py --plans 4x1,4x2,4x4,4x8,1x8 --rounds 6

A plan ``SxM`` is ``S`` stages (1: micro-batches accumulated in one SPMD stage on all devices)
and ``M`` micro-batches; ZeRO-3 (the suite's best unpipelined plan) always runs first. Prints
each plan's median step, its ratio to ZeRO-3 and its median process CPU time per step.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

import parallel  # noqa: E402
from benchmarks import _run, suites  # noqa: E402
from benchmarks._workloads import build_workload  # noqa: E402


def parse_plan(text: str) -> tuple[int, int]:
    """``"4x8"`` -> (4 stages, 8 micro-batches)."""
    try:
        stages, micro = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"plan {text!r} is not STAGESxMICRO_BATCHES, e.g. 4x8")
    return stages, micro


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plans", default="4x1,4x2,4x4,4x8,1x8",
                        type=lambda s: [parse_plan(p) for p in s.split(",")])
    parser.add_argument("--rounds", type=int, default=6, help="timed steps of each plan")
    args = parser.parse_args(argv)
    workload = build_workload(suites.PIPELINE_WORKLOADS["wide_resnet"])
    batch_shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), workload.batch)
    methods = [("zero3", _run.make_method("zero3"))] + [
        (f"pipeshard {s} x {m}", _run.make_method("pipeshard", None, {
            "num_micro_batches": m, "stages": s})) for s, m in args.plans]
    runs = []
    for name, method in methods:
        step = parallel.parallelize(workload.train_step, method=method, devices=jax.devices())
        state = step.init_state(workload.init, jax.random.key(0), batch_shapes)
        batch = jax.device_put(workload.batch, step.input_shardings(state, batch_shapes)[1])
        for _ in range(2):  # compile and warm up
            state, metrics = step(state, batch)
        jax.block_until_ready((state, metrics))
        runs.append({"name": name, "step": step, "state": state, "batch": batch, "wall": [],
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
        print(f"{run['name']:18s} {1000 * wall:8.1f} ms  {wall / base:5.2f}x  "
              f"cpu {1000 * statistics.median(run['cpu']):8.1f} ms")


if __name__ == "__main__":
    main()
