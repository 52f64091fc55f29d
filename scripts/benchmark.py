"""Benchmarks: ``parallelize`` vs ``jax.pmap``, the model suite, the solver's cost.

    python scripts/benchmark.py --suite seed --devices 8 --json bench.json --plot bench.png

Each case runs in a fresh process (simulated CPU devices via XLA_FLAGS); see benchmarks.suites.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import suites  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=suites.SUITES, required=True)
    parser.add_argument("--devices", type=int, default=8, help="devices per case (default 8)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per case (>= 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds over all cases; timed steps are pooled per case")
    parser.add_argument("--json", metavar="PATH", help="write the results here")
    parser.add_argument("--plot", metavar="PATH", help="draw the results as a PNG here")
    parser.add_argument("--markdown", metavar="PATH", help="write the results as tables here")
    args = parser.parse_args(argv)
    if args.plot and not suites.can_plot():
        print("error: --plot needs matplotlib: pip install -e '.[bench]'", file=sys.stderr)
        return 2
    try:
        data = suites.run_suite(args.suite, args.devices, steps=args.steps, warmup=args.warmup,
                                    repeat=args.repeat)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(suites.format_markdown(data))
    if args.json:
        suites.write_json(data, args.json)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(suites.format_markdown(data))
    if args.plot:
        suites.plot(data, args.plot)
    return 1 if any("error" in r for r in data["results"]) else 0


if __name__ == "__main__":
    sys.exit(main())
