"""The residual-MLP step the planner's tests share (``test_auto_joint``,
``test_auto_stage_memory``, ``test_topology``): ``DEPTH`` blocks ``x + tanh(x @ up) @ down``
of width ``WIDTH`` and hidden width ``HIDDEN``, a squared-error loss, trained with Adam."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

WIDTH, HIDDEN, DEPTH = 32, 256, 4
# A large eps keeps Adam from scaling near-zero gradients up to the learning rate, so that
# parameters can be compared tightly across programs that sum in another order.
OPTIMIZER = optax.adam(1e-3, eps=1e-3)


def loss_fn(params, batch):
    x = batch["x"]  # (B, W)
    for layer in params:
        x = x + jnp.tanh(x @ layer["up"]) @ layer["down"]  # (B, H) -> (B, W)
    return jnp.mean((x - batch["y"]) ** 2)


def train_step(state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(state["params"], batch)
    updates, opt_state = OPTIMIZER.update(grads, state["opt"], state["params"])
    return {"params": optax.apply_updates(state["params"], updates), "opt": opt_state}, \
        {"loss": loss}


def init(key):
    params = [{"up": jax.random.normal(jax.random.fold_in(key, i), (WIDTH, HIDDEN)) * 0.1,
               "down": jax.random.normal(jax.random.fold_in(key, 100 + i), (HIDDEN, WIDTH)) * 0.1}
              for i in range(DEPTH)]
    return {"params": params, "opt": OPTIMIZER.init(params)}


def make_batch(size: int, seed: int = 0) -> dict:
    """``x`` and ``y`` of ``size`` examples, normal."""
    rng = np.random.default_rng(seed)
    return {"x": rng.normal(size=(size, WIDTH)).astype(np.float32),
            "y": rng.normal(size=(size, WIDTH)).astype(np.float32)}


def abstract(*trees):
    """``trees`` as ``jax.ShapeDtypeStruct`` leaves."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), trees)


def abstract_step(batch: int) -> tuple:
    """``(train_step, (state, batch))`` on abstract shapes, ``batch`` examples."""
    params = [{"up": jax.ShapeDtypeStruct((WIDTH, HIDDEN), jnp.float32),
               "down": jax.ShapeDtypeStruct((HIDDEN, WIDTH), jnp.float32)} for _ in range(DEPTH)]
    state = {"params": params, "opt": jax.eval_shape(OPTIMIZER.init, params)}
    data = {k: jax.ShapeDtypeStruct((batch, WIDTH), jnp.float32) for k in ("x", "y")}
    return train_step, (state, data)
