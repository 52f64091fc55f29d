"""Print the parallel plan of a config: ``python scripts/plan.py --config gpt.yaml [key=value ...]``.

Each parameter's shape, PartitionSpec and bytes per device, the planner's account of its choice
(for ``parallel.method=auto``: the best SPMD plan and pipelines it compared, and why), then the
step's cost report (memory, communication, FLOPs, estimated time). Nothing is allocated: shapes
are abstract. ``--no-compile`` stops after the plan (no XLA compile: large models on a laptop).
"""
import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="gpt.yaml", help="a YAML path or a name in configs/")
    parser.add_argument("--devices", type=int, default=None,
                        help="simulate this many CPU devices (set before jax starts)")
    parser.add_argument("--profile", default=None,
                        help="plan and price for this device: cpu, h100, a100, v100 "
                             "(default: the running one)")
    parser.add_argument("--no-compile", action="store_true",
                        help="print the plan and the planner's estimates only")
    parser.add_argument("overrides", nargs="*", help="key.path=value, e.g. parallel.method=zero3")
    args = parser.parse_args(argv)
    if args.devices:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_force_host_platform_device_count={args.devices}")
    from trainer import cli

    if args.no_compile:
        return cli.run(lambda: print(_plan_only(args.config, args.overrides, args.profile)))
    return cli.run(lambda: print(cli.plan(args.config, args.overrides, args.profile)))


def _plan_only(config_name, overrides, profile) -> str:
    import parallel
    from trainer import Trainer, load_config

    overrides = [*overrides, f"parallel.profile={profile}"] if profile else list(overrides)
    trainer = Trainer(load_config(config_name, overrides)).build()
    header = f"model: {trainer.model_name} with {trainer.num_params():,} parameters"
    return header + "\n" + parallel.format_plan(trainer.plan)


if __name__ == "__main__":
    sys.exit(main())
