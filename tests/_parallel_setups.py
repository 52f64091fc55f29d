"""Small train setups shared by the ``test_parallel*`` files: a pure-JAX MLP and an NNX GPT.

Each setup gives ``init(key) -> state``, ``train_step(state, batch) -> (state, metrics)``, a
fixed numpy batch, and the state's logical axis names (for ``ManualParallel``).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import models


@dataclasses.dataclass
class Setup:
    init: Callable
    train_step: Callable
    batch: dict
    logical_axes: Any
    loss_fn: Callable
    optimizer: Any


def _train_step(loss_fn, optimizer):
    def train_step(state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(state["params"], batch)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        new_state = {"step": state["step"] + 1,
                     "params": optax.apply_updates(state["params"], updates),
                     "opt_state": opt_state, "rng": state["rng"]}
        return new_state, {"loss": loss}

    return train_step


def mlp_setup(sizes=(16, 64, 16), batch_size=32, learning_rate=1e-2) -> Setup:
    """A tanh MLP regressing random targets; layers ``dense_i`` with ``kernel``/``bias``."""
    optimizer = optax.adam(learning_rate)

    def init(key):
        keys = jax.random.split(key, len(sizes) - 1)
        params = {f"dense_{i}": {
            "kernel": jax.random.normal(keys[i], (d_in, d_out)) / np.sqrt(d_in),
            "bias": jnp.full((d_out,), 0.1 * (i + 1), jnp.float32)}
            for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:]))}
        return {"step": jnp.zeros((), jnp.int32), "params": params,
                "opt_state": optimizer.init(params), "rng": jax.random.key(7)}

    def loss_fn(params, batch):
        h = batch["x"]  # (B, D_0)
        for i in range(len(sizes) - 1):
            h = h @ params[f"dense_{i}"]["kernel"] + params[f"dense_{i}"]["bias"]  # (B, D_i+1)
            if i < len(sizes) - 2:
                h = jnp.tanh(h)
        return jnp.mean((h - batch["y"]) ** 2)

    rng = np.random.default_rng(0)
    batch = {"x": rng.normal(size=(batch_size, sizes[0])).astype(np.float32),
             "y": rng.normal(size=(batch_size, sizes[-1])).astype(np.float32)}
    names = {f"dense_{i}": {"kernel": ("embed", "mlp") if i % 2 == 0 else ("mlp", "embed"),
                            "bias": ("mlp",) if i % 2 == 0 else ("embed",)}
             for i in range(len(sizes) - 1)}
    return Setup(init, _train_step(loss_fn, optimizer), batch, {"params": names}, loss_fn,
                 optimizer)


GPT_OPTIONS = dict(vocab_size=64, block_size=8, num_layers=1, num_heads=4, hidden_size=32,
                   use_bias=False)


def gpt_setup(batch_size=8, seq_len=8, learning_rate=1e-2) -> Setup:
    """The registry GPT (tied embeddings) with next-token cross entropy and Adam."""
    optimizer = optax.adam(learning_rate)

    def build(key):
        with nnx.use_eager_sharding(False):
            return models.create_model("gpt", GPT_OPTIONS, rngs=nnx.Rngs(key))

    abstract = nnx.eval_shape(lambda: build(jax.random.key(0)))
    graphdef, abstract_params = nnx.split(abstract, nnx.Param)

    def init(key):
        params = nnx.to_pure_dict(nnx.split(build(key), nnx.Param)[1])
        return {"step": jnp.zeros((), jnp.int32), "params": params,
                "opt_state": optimizer.init(params), "rng": jax.random.key(7)}

    def loss_fn(params, batch):
        model = nnx.merge(graphdef, params)
        logits = model(batch["inputs"])  # (B, T, V)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()

    is_var = lambda v: isinstance(v, nnx.Variable)
    names = nnx.to_pure_dict(jax.tree.map(
        lambda v: v.replace(tuple(v.get_metadata().get("out_sharding") or (None,) * v.ndim)),
        abstract_params, is_leaf=is_var))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, GPT_OPTIONS["vocab_size"], size=(batch_size, seq_len + 1))
    batch = {"inputs": tokens[:, :-1].astype(np.int32), "targets": tokens[:, 1:].astype(np.int32)}
    return Setup(init, _train_step(loss_fn, optimizer), batch,
                 {"step": None, "params": names, "opt_state": None, "rng": None}, loss_fn,
                 optimizer)


def run_reference(setup: Setup, steps: int = 3, initial=None):
    """``steps`` steps of ``jax.jit(train_step)`` on one device: (final state, losses).

    Starts from ``initial`` (copied, not donated) or ``setup.init(jax.random.key(0))``.
    """
    device = jax.devices()[0]
    if initial is None:
        initial = setup.init(jax.random.key(0))
    state = jax.device_put(jax.tree.map(jnp.copy, initial), device)
    step = jax.jit(setup.train_step)
    losses = []
    for _ in range(steps):
        state, metrics = step(state, jax.device_put(setup.batch, device))
        losses.append(float(metrics["loss"]))
    return state, losses
