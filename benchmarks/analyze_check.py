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


def swiglu_stack():
    import jax
    import jax.numpy as jnp
    import optax

    optimizer = optax.adam(1e-3)

    def train_step(state, batch):
        def loss_fn(params):
            h = batch["x"]  # (B, D)
            for layer in params:
                gate, up = jax.nn.silu(h @ layer["gate"]), h @ layer["up"]  # (B, F)
                h = h + (gate * up) @ layer["down"]  # (B, D)
            return jnp.mean((h - batch["y"]) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(state["params"])
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates),
                "opt_state": opt_state}, {"loss": loss}

    up = jax.ShapeDtypeStruct((WIDTH, HIDDEN), jnp.float32)
    down = jax.ShapeDtypeStruct((HIDDEN, WIDTH), jnp.float32)
    params = [{"gate": up, "up": up, "down": down} for _ in range(LAYERS)]
    x = jax.ShapeDtypeStruct((BATCH, WIDTH), jnp.float32)
    return train_step, ({"params": params, "opt_state": jax.eval_shape(optimizer.init, params)},
                        {"x": x, "y": x})


def main() -> int:
    import parallel

    imported = time.perf_counter()
    step, args = swiglu_stack()
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
