"""The joint planner on a cluster, on abstract shapes: its plan against the best SPMD plan and
hand pipelines, and how long the search took.

    python benchmarks/planner_check.py --config benchmarks/gpt-39b.yaml --devices 64 --hosts 8

Prints the planner's account, then the hand pipelines of 2, 4 and 8 stages (equal layer ranges,
Megatron inside each stage: the model axis over a host's devices with every parameter and its
optimizer state split over the stage's devices, the micro-batches the search used,
rematerialized if they do not fit otherwise) priced on the same cost model with their memory,
and one verdict line: whether the chosen plan's estimated step time is no worse than the best
SPMD plan and every hand pipeline that fits. Nothing is allocated or compiled. Run it on an
idle machine for the search time.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--hosts", type=int, default=1)
    parser.add_argument("--profile", default="h100")
    parser.add_argument("overrides", nargs="*", help="key.path=value, e.g. model.num_layers=8")
    args = parser.parse_args(argv)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={args.devices}")
    import parallel
    from parallel import auto
    from trainer import Trainer, load_config

    # The step and its abstract state, from the Trainer; the data-parallel plan it makes is
    # cheap and unused.
    trainer = Trainer(load_config(args.config, [*args.overrides, "parallel.method=data"])).build()
    step, abstract = trainer.fns.train_step, (trainer.abstract_state, trainer.batch_spec)
    profile = parallel.get_profile(args.profile, args.devices, num_hosts=args.hosts)
    start, cpu = time.perf_counter(), time.process_time()
    decision = auto.search(step, abstract, num_devices=args.devices, profile=profile,
                           memory_budget_bytes=profile.memory_bytes)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    print(decision.explanation)
    print(f"search: {seconds:.1f} s wall, {cpu:.1f} CPU-s, load average "
          f"{os.getloadavg()[0]:.2f} at its end")
    chosen = (decision.pipeline.step_time_s if decision.pipeline is not None
              else decision.spmd.best.step_time_s)
    rivals = {} if decision.spmd is None else {"best SPMD": decision.spmd.best.step_time_s}
    per_host = profile.devices_per_host or args.devices
    for m, found in sorted(decision.searches.items()):
        layers = found.pp.num_layers
        for stages in (2, 4, 8):
            n = args.devices // stages
            if args.devices % stages or stages > layers or n % min(per_host, n):
                continue
            model = min(per_host, n)
            starts = [k * layers // stages for k in range(stages)]
            hand = remat = None
            found.smallest_memory = float("inf")
            for remat in (False, True):  # rematerialized only when memory needs it
                hand = found.best(stages, remat=remat, meshes=(n // model, model), starts=starts,
                                  split_state=True)
                if hand is not None:
                    break
            label = (f"hand {stages} stages x {m} micro-batches (data {n // model} x model "
                     f"{model}, state split{', remat' if remat else ''})")
            if hand is None:
                print(f"{label}: does not fit the budget: needs "
                      f"{found.smallest_memory / 2**30:.2f} GiB per device")
            else:
                rivals[label] = hand.step_time_s
                print(f"{label}: {hand.step_time_s * 1e3:.3f} ms per step, "
                      f"{hand.memory_bytes / 2**30:.2f} GiB per device")
    worse = [name for name, t in rivals.items() if chosen > t * (1 + 1e-9)]
    print(f"verdict: chosen {chosen * 1e3:.3f} ms per step; "
          + ("no worse than " + ", ".join(rivals) if not worse and rivals else
             "nothing else fits" if not rivals else "WORSE than " + ", ".join(worse)))
    return 0 if not worse else 1


if __name__ == "__main__":
    sys.exit(main())
