"""``analyze`` under ``parallel.method=auto`` with default settings, on abstract shapes, end to end.

    /usr/bin/time -v python benchmarks/analyze_check.py

A 32-layer SwiGLU stack (width 1024, hidden 4096: 4.8 GB of parameters and Adam state) on 8
simulated CPU devices, as the issue's held-out check: imports, the search, its compiled checks
and the report's compile; nothing runs a step. Prints the plan's account and where the seconds
went. Run it on an idle machine for the wall time (user + sys otherwise).
"""
import os
import sys
import time

START = time.perf_counter()
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LAYERS, WIDTH, HIDDEN, BATCH = 32, 1024, 4096, 64


def main() -> int:
    import parallel
    from benchmarks._swiglu import swiglu_stack

    imported = time.perf_counter()
    step, args = swiglu_stack(LAYERS, WIDTH, HIDDEN, BATCH)
    parallel_step = parallel.parallelize(step, method=parallel.make_method("auto"))
    plan = parallel_step.plan(*args)
    planned = time.perf_counter()
    report = parallel_step.analyze(*args)
    done = time.perf_counter()
    print(plan.extras.get("explanation", ""))
    print(report.format())
    print(f"imports {imported - START:.1f} s, plan (search and compiled checks) "
          f"{planned - imported:.1f} s, report {done - planned:.1f} s; total {done - START:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
