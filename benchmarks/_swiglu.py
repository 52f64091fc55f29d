"""A stack of SwiGLU blocks with Adam, on abstract shapes: the planner's held-out check
(benchmarks/analyze_check.py) and its tests. Imports only jax and optax."""
import jax
import jax.numpy as jnp
import optax


def swiglu_stack(num_layers: int, width: int, hidden: int, batch_size: int):
    """``(train_step, (state, batch))``: the step over ``num_layers`` residual SwiGLU blocks
    (``width`` -> ``hidden`` -> ``width``) and its abstract arguments."""
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

    up = jax.ShapeDtypeStruct((width, hidden), jnp.float32)
    down = jax.ShapeDtypeStruct((hidden, width), jnp.float32)
    params = [{"gate": up, "up": up, "down": down} for _ in range(num_layers)]
    x = jax.ShapeDtypeStruct((batch_size, width), jnp.float32)
    return train_step, ({"params": params, "opt_state": jax.eval_shape(optimizer.init, params)},
                        {"x": x, "y": x})
