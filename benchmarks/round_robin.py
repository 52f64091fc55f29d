"""Plans of one benchmark workload timed in one process, round-robin (one step of each plan per
round), so that the machine's load falls on every plan alike: for differences of a few percent
that separate processes (the suites) cannot resolve on a shared machine.

    python benchmarks/round_robin.py --workload models.wide_resnet --plans zero3,auto --rounds 10
    python benchmarks/round_robin.py --workload pipeline.wide_resnet --plans zero3,4x1,4x2,4x4,4x8,1x8
    python benchmarks/round_robin.py --workload pipeline.wide_resnet --batch 128 --plans zero3,4x8
    python benchmarks/round_robin.py --workload models.gpt --plans auto,manual,manual:d2xm4,shard:d4xm2

A plan is a method of the suites (``data``, ``zero2``, ``zero3``, ``manual``, ``auto``...) or
``SxM``: ``pipeshard`` with ``S`` stages (1: micro-batches accumulated in one SPMD stage on all
devices) and ``M`` micro-batches, or ``manual:dDxmM`` / ``shard:dDxmM``: the Megatron rules / the
solver on a mesh of data ``D`` x model ``M``. Prints each plan's median step, its ratio to the
first plan's, the median of its per-round ratios to the first plan's step of the same round
("paired": the load shifts between rounds more than within one), and its median process CPU
time per step.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from benchmarks import suites  # noqa: E402
from benchmarks._interleaved import make_method, time_interleaved  # noqa: E402
from benchmarks._report import paired_ratio  # noqa: E402
from benchmarks._workloads import build_workload  # noqa: E402

WORKLOADS = {f"{suite}.{name}": spec for suite, specs in (
    ("models", suites.MODEL_WORKLOADS), ("pipeline", suites.PIPELINE_WORKLOADS))
    for name, spec in specs.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", default="pipeline.wide_resnet", choices=sorted(WORKLOADS))
    parser.add_argument("--plans", default="zero3,4x1,4x2,4x4,4x8,1x8",
                        help="comma-separated; the first is the baseline of the ratios")
    parser.add_argument("--rounds", type=int, default=6, help="timed steps of each plan")
    parser.add_argument("--batch", type=int, default=None,
                        help="global batch (default: the suite's)")
    args = parser.parse_args(argv)
    plans = args.plans.split(",")
    for plan in plans:
        try:
            make_method(plan)
        except ValueError as e:
            parser.error(f"plan {plan!r}: {e}")
    spec = WORKLOADS[args.workload]
    if args.batch is not None:
        spec = dataclasses.replace(spec, batch_size=args.batch)
    timed = time_interleaved(build_workload(spec), plans,
                             jax.devices(), warmup=2, rounds=args.rounds)
    first = next(iter(timed.values()))
    for plan, run in timed.items():
        wall = run["step_time_s"]
        print(f"{plan:8s} {1000 * wall:8.1f} ms  {wall / first['step_time_s']:5.2f}x  "
              f"paired {paired_ratio(run['step_times_s'], first['step_times_s']):5.2f}x  "
              f"cpu {1000 * statistics.median(run['cpu_times_s']):8.1f} ms")


if __name__ == "__main__":
    main()
